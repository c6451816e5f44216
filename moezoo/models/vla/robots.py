"""Heterogeneous robots for HiMoE-VLA, headless on a CPU: two MuJoCo embodiments with different action spaces and state
layouts (gymnasium's MuJoCo environments), scripted experts, demonstrations in the VLA episode format with
per-embodiment statistics, and closed-loop success.

Embodiments (:data:`EMBODIMENTS`; their place in the padded action vector is ``config.embodiments``, e.g.
:data:`moezoo.models.vla.ROBOT_EMBODIMENTS`):

- ``reacher`` (``Reacher-v5``): planar 2-link arm, 2 joint torques in [-1, 1]; state = the 10-D observation (joint
  cos / sin, target xy, joint velocities, fingertip - target); task ``reach``: "move the fingertip to the red target";
  success = fingertip within :data:`REACH_TOL` m of the target at the end (50 steps). Expert: inverse kinematics of
  the two links + a PD controller on the joint angles.
- ``pusher`` (``Pusher-v5``'s 7-DoF arm): 7 joint torques in [-2, 2]; state = the 23-D observation (joint angles and
  velocities, gripper, object and goal positions); task ``hover``: "move the gripper above the object" (the object is
  placed at random per seed); success = gripper within :data:`HOVER_TOL` m of the point :data:`HOVER_Z` above the
  object's centre at the end (:data:`HOVER_STEPS` steps). Expert: damped-least-squares inverse kinematics of the
  gripper to that point (on a copy of the simulator state, joint limits respected) + a PD controller on the joint
  angles. (A scripted push through the goal did not move the object reliably with this arm's two-finger tip, so the
  7-DoF task is the reach; stated, not hidden.)

Camera images (one ``front`` view) come from ``mujoco.Renderer`` with shadows / reflections off (MuJoCo's EGL or OSMesa
backend, ``MUJOCO_GL``; default ``egl``). Needs ``pip install mujoco`` (gymnasium's MuJoCo environments) and a GL
library: ``apt-get install -y libegl1 libegl-mesa0`` (EGL) or ``libosmesa6`` (OSMesa, with ``MUJOCO_GL=osmesa``).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("MUJOCO_GL", "egl")  # MuJoCo picks its GL backend when first imported

REACH_TOL = 0.02
HOVER_TOL = 0.03
HOVER_Z = -0.15
HOVER_STEPS = 50


@dataclass(frozen=True)
class Embodiment:
    name: str
    env_id: str
    task: str
    instruction: str
    state_dim: int
    action_dim: int
    max_steps: int
    action_low: float
    action_high: float
    camera: tuple  # (lookat xyz, distance, azimuth, elevation)


EMBODIMENTS = {
    "reacher": Embodiment("reacher", "Reacher-v5", "reach", "move the fingertip to the red target", 10, 2, 50, -1.0,
                          1.0, ((0.0, 0.0, 0.0), 0.55, 90.0, -90.0)),
    "pusher": Embodiment("pusher", "Pusher-v5", "hover", "move the gripper above the object", 23, 7, HOVER_STEPS, -2.0,
                         2.0, ((0.45, -0.3, -0.3), 1.2, 90.0, -60.0)),
}
TASKS = {e.task: e.name for e in EMBODIMENTS.values()}


def check_embodiment(name: str) -> Embodiment:
    if name not in EMBODIMENTS:
        raise ValueError(f"unknown embodiment {name!r}; expected one of {sorted(EMBODIMENTS)}")
    return EMBODIMENTS[name]


def require_mujoco():
    """Import gymnasium + mujoco with a headless GL backend, or raise naming what to install."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import gymnasium  # noqa: F401
        import mujoco
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("the robot embodiments need MuJoCo: pip install mujoco gymnasium (gymnasium[mujoco])"
                                  ) from exc
    return mujoco


def make_renderer(model, size: int):
    """A ``mujoco.Renderer`` without shadows / reflections; a missing GL backend raises naming the packages."""
    mujoco = require_mujoco()
    backend = os.environ.get("MUJOCO_GL", "egl")
    try:
        r = mujoco.Renderer(model, size, size)
    except Exception as exc:  # GL context creation failures come as several exception types
        pkgs = {"egl": "apt-get install -y libegl1 libegl-mesa0", "osmesa": "apt-get install -y libosmesa6",
                "glfw": "a display (glfw needs X11)"}.get(backend, "libegl1 libegl-mesa0 or libosmesa6")
        raise RuntimeError(f"MuJoCo could not create a headless rendering context with MUJOCO_GL={backend!r} "
                           f"({type(exc).__name__}: {exc}); install the backend's GL library ({pkgs}) or choose "
                           "another one: MUJOCO_GL=egl (libegl1 libegl-mesa0) / osmesa (libosmesa6, PyOpenGL); "
                           "MUJOCO_GL must be set before mujoco is first imported") from exc
    for flag in ("mjRND_SHADOW", "mjRND_REFLECTION", "mjRND_SKYBOX", "mjRND_FOG", "mjRND_HAZE"):
        r.scene.flags[getattr(mujoco.mjtRndFlag, flag)] = False
    return r


class RobotEnv:
    """One embodiment: gymnasium MuJoCo env + camera + scripted expert + success."""

    def __init__(self, embodiment: str, image_size: int = 32):
        self.spec = check_embodiment(embodiment)
        mujoco = require_mujoco()
        import gymnasium as gym

        self.env = gym.make(self.spec.env_id, max_episode_steps=10_000)
        self.u = self.env.unwrapped
        self.image_size = image_size
        self.renderer = make_renderer(self.u.model, image_size)
        self.cam = mujoco.MjvCamera()
        lookat, dist, az, el = self.spec.camera
        self.cam.lookat[:] = lookat
        self.cam.distance, self.cam.azimuth, self.cam.elevation = dist, az, el
        self._mujoco = mujoco
        self.obs = None
        self.steps = 0

    # ------------------------------------------------------------------ episode
    def reset(self, seed: int) -> dict:
        self.obs, _ = self.env.reset(seed=int(seed))
        self.steps = 0
        self.phase = 0
        return self.observation()

    def render(self) -> np.ndarray:
        """(3, S, S) uint8 view of the scene."""
        self.renderer.update_scene(self.u.data, self.cam)
        for flag in ("mjRND_SHADOW", "mjRND_REFLECTION", "mjRND_SKYBOX"):
            self.renderer.scene.flags[getattr(self._mujoco.mjtRndFlag, flag)] = False
        return np.ascontiguousarray(self.renderer.render().transpose(2, 0, 1))

    def observation(self) -> dict:
        return {"observation.images.front": self.render(), "observation.state": self.obs.astype(np.float32),
                "task": self.spec.instruction, "embodiment": self.spec.name}

    def step(self, action) -> bool:
        """Apply one action (clipped to the embodiment's range); True when the episode is over."""
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[: self.spec.action_dim],
                    self.spec.action_low, self.spec.action_high)
        self.obs, _, term, trunc, _ = self.env.step(a)
        self.steps += 1
        return bool(term or trunc) or self.steps >= self.spec.max_steps

    def close(self) -> None:
        self.renderer.close()
        self.env.close()

    # ------------------------------------------------------------------ metrics
    def hover_point(self) -> np.ndarray:
        obj = self.u.get_body_com("object")
        return np.array([obj[0], obj[1], HOVER_Z])

    def distance(self) -> float:
        """Reacher: fingertip-target distance (table plane); pusher: gripper - point above the object (m)."""
        if self.spec.name == "reacher":
            return float(np.linalg.norm(self.u.get_body_com("fingertip")[:2] - self.u.get_body_com("target")[:2]))
        return float(np.linalg.norm(self.u.data.body("tips_arm").xpos - self.hover_point()))

    def success(self) -> bool:
        return self.distance() < (REACH_TOL if self.spec.name == "reacher" else HOVER_TOL)

    # ------------------------------------------------------------------ scripted experts
    def expert_action(self) -> np.ndarray:
        return self._reacher_expert() if self.spec.name == "reacher" else self._pusher_expert()

    def _reacher_expert(self) -> np.ndarray:
        d = self.u.data
        q, qd = d.qpos[:2].copy(), d.qvel[:2].copy()
        tx, ty = self.u.get_body_com("target")[:2]
        l1, l2 = 0.1, 0.11
        r2 = min(tx * tx + ty * ty, (l1 + l2 - 1e-4) ** 2)
        c2 = np.clip((r2 - l1 * l1 - l2 * l2) / (2 * l1 * l2), -1.0, 1.0)
        best = None
        for s in (1.0, -1.0):  # the elbow solution closer to the current posture
            q2 = s * math.acos(c2)
            q1 = math.atan2(ty, tx) - math.atan2(l2 * math.sin(q2), l1 + l2 * math.cos(q2))
            des = np.array([q1, q2])
            err = (des - q + np.pi) % (2 * np.pi) - np.pi
            if best is None or np.abs(err).sum() < np.abs(best).sum():
                best = err
        return np.clip(2.0 * best - 0.15 * qd, -1.0, 1.0).astype(np.float32)

    def _pusher_expert(self) -> np.ndarray:
        m, d = self.u.model, self.u.data
        mujoco = self._mujoco
        if getattr(self, "_ik_data", None) is None:
            self._ik_data = mujoco.MjData(m)
        d2, bid = self._ik_data, m.body("tips_arm").id
        target = self.hover_point()
        lo, hi = m.jnt_range[:7, 0] + 1e-3, m.jnt_range[:7, 1] - 1e-3
        q = d.qpos[:7].copy()
        d2.qpos[:] = d.qpos
        jacp = np.zeros((3, m.nv))
        for _ in range(15):  # damped least squares on a copy of the state
            d2.qpos[:7] = q
            mujoco.mj_kinematics(m, d2)
            mujoco.mj_comPos(m, d2)
            mujoco.mj_jacBody(m, d2, jacp, None, bid)
            J = jacp[:, :7]
            err = target - d2.body(bid).xpos
            q = np.clip(q + J.T @ np.linalg.solve(J @ J.T + 1e-2 * np.eye(3), err), lo, hi)
        return np.clip(10.0 * (q - d.qpos[:7]) - 1.0 * d.qvel[:7], -2.0, 2.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# demonstrations (the VLA episode format of moezoo.models.vla.data, with an embodiment per episode)
# ----------------------------------------------------------------------------------------------------------------------

from .data import FORMAT as ROBOT_FORMAT  # the driving episode format, one embodiment per episode (see data.py)


def collect_robot_demonstrations(out_dir, embodiments, seeds, *, image_size: int = 32, log=print) -> Path:
    """Run the scripted expert of each embodiment on every seed; write episodes, ``meta.json`` and ``stats.json``
    (per-embodiment statistics over each embodiment's own dimensions)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    episodes = []
    for name in embodiments:
        spec = check_embodiment(name)
        env = RobotEnv(name, image_size=image_size)
        for seed in seeds:
            t0 = time.time()
            obs = env.reset(seed)
            rows = {"observation.images.front": [], "observation.state": [], "action": []}
            while True:
                a = env.expert_action()
                rows["observation.images.front"].append(obs["observation.images.front"])
                rows["observation.state"].append(obs["observation.state"])
                rows["action"].append(a)
                if env.step(a):
                    break
                obs = env.observation()
            fname = f"episode_{len(episodes):06d}.safetensors"
            save_file({k: torch.from_numpy(np.stack(v)).contiguous() for k, v in rows.items()}, str(out / fname))
            ok = env.success()
            episodes.append({"file": fname, "embodiment": name, "scenario": spec.task, "task": spec.instruction,
                             "seed": int(seed), "length": len(rows["action"]),
                             "metrics": {"success": float(ok), "final_distance": env.distance()}})
            log(f"[collect] {name} seed {seed}: {len(rows['action'])} steps, success {ok}, distance "
                f"{env.distance():.3f} ({time.time() - t0:.1f}s)")
        env.close()
    meta = {"format": ROBOT_FORMAT, "cameras": ["front"], "image_size": image_size,
            "embodiments": {n: {"task": EMBODIMENTS[n].task, "state_dim": EMBODIMENTS[n].state_dim,
                                "action_dim": EMBODIMENTS[n].action_dim} for n in embodiments},
            "episodes": episodes}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    (out / "stats.json").write_text(json.dumps(compute_embodiment_stats(out)))
    return out


def compute_embodiment_stats(folder) -> dict:
    """``{"embodiments": {name: {"observation.state": {mean, std, min, max}, "action": {...}}}}`` over each
    embodiment's own (unpadded) dimensions."""
    from safetensors.torch import load_file

    meta = json.loads((Path(folder) / "meta.json").read_text())
    cols: dict = {}
    for ep in meta["episodes"]:
        data = load_file(str(Path(folder) / ep["file"]))
        c = cols.setdefault(ep["embodiment"], {"observation.state": [], "action": []})
        for k in c:
            c[k].append(data[k].float())
    out = {}
    for name, c in cols.items():
        out[name] = {}
        for k, v in c.items():
            x = torch.cat(v)
            out[name][k] = {"mean": x.mean(0).tolist(), "std": x.std(0).clamp_min(1e-3).tolist(),
                            "min": x.min(0).values.tolist(), "max": x.max(0).values.tolist()}
    return {"embodiments": out}


class RobotEpisodeDataset(torch.utils.data.Dataset):
    """Samples of a robot demonstration folder, padded for a HiMoE policy: ``observation.state`` (state_dim),
    ``action`` (chunk, action_dim) placed at the embodiment's ``action_indices``, ``action_is_pad`` past the episode
    end, ``action_mask`` (the action-space descriptor), ``embodiment`` and ``task``; raw units (the policy normalises
    with its per-embodiment statistics)."""

    def __init__(self, folder, config, embodiments=None):
        from safetensors.torch import load_file

        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        if self.meta.get("format") != ROBOT_FORMAT or "embodiments" not in self.meta:
            raise ValueError(f"{self.folder} is not a robot demonstration folder (collect_robot_demonstrations)")
        self.stats = json.loads((self.folder / "stats.json").read_text())
        emb_cfg = config.embodiments or {}
        self.chunk, self.state_dim, self.action_dim = config.chunk_size, config.state_dim, config.action_dim
        self.size = config.image_size[0]
        self.episodes, self.index = [], []
        for ep in self.meta["episodes"]:
            name = ep["embodiment"]
            if embodiments and name not in embodiments:
                continue
            if name not in emb_cfg:
                raise ValueError(f"the data has embodiment {name!r}, the policy config only {sorted(emb_cfg)}")
            idx = emb_cfg[name]["action_indices"]
            data = load_file(str(self.folder / ep["file"]))
            if data["action"].shape[-1] != len(idx):
                raise ValueError(f"{name} actions have {data['action'].shape[-1]} dims, config action_indices {idx}")
            mask = torch.zeros(self.action_dim, dtype=torch.bool)
            mask[idx] = True
            self.episodes.append((ep, data, torch.tensor(idx), mask))
            self.index.extend((len(self.episodes) - 1, t) for t in range(ep["length"]))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        e, t = self.index[i]
        ep, d, idx, mask = self.episodes[e]
        T, H = ep["length"], self.chunk
        steps = torch.arange(t, t + H).clamp_max(T - 1)
        img = d["observation.images.front"][t].float() / 255.0
        if img.shape[-1] != self.size:
            img = torch.nn.functional.interpolate(img[None], size=(self.size, self.size), mode="area")[0]
        state = torch.zeros(self.state_dim)
        s = d["observation.state"][t].float()
        state[: s.shape[0]] = s
        action = torch.zeros(H, self.action_dim)
        action[:, idx] = d["action"][steps].float()
        return {"observation.images.front": img, "observation.state": state, "action": action,
                "action_is_pad": torch.arange(t, t + H) >= T, "action_mask": mask, "embodiment": ep["embodiment"],
                "task": ep["task"]}


__all__ = ["EMBODIMENTS", "TASKS", "Embodiment", "RobotEnv", "check_embodiment", "require_mujoco", "make_renderer",
           "collect_robot_demonstrations", "compute_embodiment_stats", "RobotEpisodeDataset", "REACH_TOL", "HOVER_TOL"]
