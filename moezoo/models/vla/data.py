"""Driving demonstrations: collection with the IDM expert, a documented on-disk format, a chunked dataset and
dataset statistics; :class:`LeRobotDataset` reads LeRobot-format folders (parquet + mp4) into the same samples.

Format (one folder)::

    meta.json            {"format": "moezoo-vla-episodes/1", "cameras": [...], "image_size": S, "state_dim": 6,
                          "action_dim": 2, "waypoint_dim": 2, "skills": [...], "fps": policy frequency,
                          "episodes": [{"file": "episode_000000.safetensors", "scenario", "seed", "task", "length",
                                        "metrics": {...}}, ...]}
    stats.json           {"observation.state": {"mean", "std", "min", "max"}, "action": {...}}  (lists of floats)
    episode_<i>.safetensors
        observation.images.<camera>  (T, 3, S, S) uint8
        observation.state            (T, 6) float32
        observation.waypoint         (T, 2) float32
        action                       (T, 2) float32 in [-1, 1] (acceleration / 5 m/s², steering / (π/4))
        skill_label                  (T,) int64, index into meta["skills"]
        camera_label                 (T,) int64, index into the candidate cameras (meta["cameras"][1:])

Heterogeneous robots (HiMoE-VLA, :mod:`moezoo.models.vla.robots`) use the same format with one embodiment per
episode::

    meta.json            {..., "cameras": ["front"], "embodiments": {name: {"task", "state_dim", "action_dim"}},
                          "episodes": [{..., "embodiment": name, "scenario": task, "metrics": {"success",
                                        "final_distance"}}, ...]}
    stats.json           {"embodiments": {name: {"observation.state": {...}, "action": {...}}}}  (each over the
                          embodiment's own dimensions; ``policy.set_normalization_stats`` takes it as is)
    episode_<i>.safetensors
        observation.images.front     (T, 3, S, S) uint8
        observation.state            (T, state_dim of the embodiment) float32
        action                       (T, action_dim of the embodiment) float32 (joint torques)

:class:`moezoo.models.vla.robots.RobotEpisodeDataset` pads state / actions to the policy's widths (actions at the
embodiment's ``action_indices``) and adds ``action_mask`` and ``embodiment``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = "moezoo-vla-episodes/1"


def collect_demonstrations(out_dir, scenarios, seeds, *, image_size: int = 64, cameras=None, log=print) -> Path:
    """Run the IDM expert on every (scenario, seed) and write the episodes + statistics to ``out_dir``."""
    from .driving import CAMERAS, SKILLS, DrivingEnv, check_scenario

    for s in scenarios:
        check_scenario(s)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cameras = list(cameras or CAMERAS)
    episodes, fps = [], None
    for scenario in scenarios:
        env = DrivingEnv(scenario, image_size=image_size, cameras=cameras)
        fps = env.u.config["policy_frequency"]
        for seed in seeds:
            t0 = time.time()
            obs = env.reset(seed)
            rows = {k: [] for k in [f"observation.images.{c}" for c in cameras] +
                    ["observation.state", "observation.waypoint", "action", "skill_label", "camera_label"]}
            while True:
                a, skill, cam = env.expert_action()
                for k in rows:
                    if k in obs:
                        rows[k].append(np.asarray(obs[k]))
                rows["action"].append(a)
                rows["skill_label"].append(skill)
                rows["camera_label"].append(cam)
                if env.step(a):
                    break
                obs = env.observation()
            name = f"episode_{len(episodes):06d}.safetensors"
            save_file({k: torch.from_numpy(np.stack(v)).contiguous() for k, v in rows.items()}, str(out / name))
            episodes.append({"file": name, "scenario": scenario, "seed": int(seed), "task": env.instruction,
                             "length": len(rows["action"]), "metrics": env.metrics()})
            log(f"[collect] {scenario} seed {seed}: {len(rows['action'])} steps, {env.metrics()} "
                f"({time.time() - t0:.1f}s)")
        env.close()
    meta = {"format": FORMAT, "cameras": cameras, "image_size": image_size, "state_dim": 6, "action_dim": 2,
            "waypoint_dim": 2, "skills": SKILLS, "fps": fps, "episodes": episodes}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    (out / "stats.json").write_text(json.dumps(compute_stats(out)))
    return out


def _load_meta(folder) -> dict:
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a {FORMAT} folder (write one with collect_demonstrations)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def compute_stats(folder) -> dict:
    """Mean / std / min / max of ``observation.state`` and ``action`` over every step of the folder."""
    meta = _load_meta(folder)
    cols = {"observation.state": [], "action": []}
    for ep in meta["episodes"]:
        data = load_file(str(Path(folder) / ep["file"]))
        for k in cols:
            cols[k].append(data[k].float())
    out = {}
    for k, v in cols.items():
        x = torch.cat(v)
        out[k] = {"mean": x.mean(0).tolist(), "std": x.std(0).clamp_min(1e-3).tolist(), "min": x.min(0).values.tolist(),
                  "max": x.max(0).values.tolist()}
    return out


class EpisodeDataset(torch.utils.data.Dataset):
    """Samples of a ``moezoo-vla-episodes`` folder: the observation at step t and the action chunk t..t+H-1
    (``action_is_pad`` past the episode end), as the raw dict :meth:`MoezooVlaPolicy.compute_loss` takes. Images are
    resized (area) to ``image_size`` when it differs from the stored size."""

    def __init__(self, folder, chunk_size: int, image_size: int | None = None, cameras=None, scenarios=None):
        self.folder = Path(folder)
        self.meta = _load_meta(folder)
        self.stats = json.loads((self.folder / "stats.json").read_text())
        self.chunk_size = chunk_size
        self.cameras = list(cameras or self.meta["cameras"])
        missing = [c for c in self.cameras if c not in self.meta["cameras"]]
        if missing:
            raise ValueError(f"cameras {missing} are not in the dataset (has {self.meta['cameras']})")
        self.image_size = image_size or self.meta["image_size"]
        self.episodes, self.index = [], []
        for ep in self.meta["episodes"]:
            if scenarios and ep["scenario"] not in scenarios:
                continue
            data = load_file(str(self.folder / ep["file"]))
            e = len(self.episodes)
            self.episodes.append((ep, data))
            self.index.extend((e, t) for t in range(ep["length"]))

    def __len__(self) -> int:
        return len(self.index)

    def _img(self, x: torch.Tensor) -> torch.Tensor:
        img = x.float() / 255.0
        if img.shape[-1] != self.image_size:
            img = torch.nn.functional.interpolate(img[None], size=(self.image_size, self.image_size), mode="area")[0]
        return img

    def __getitem__(self, i: int) -> dict:
        e, t = self.index[i]
        ep, d = self.episodes[e]
        T, H = ep["length"], self.chunk_size
        idx = torch.arange(t, t + H).clamp_max(T - 1)
        out = {f"observation.images.{c}": self._img(d[f"observation.images.{c}"][t]) for c in self.cameras}
        out.update({"observation.state": d["observation.state"][t].float(),
                    "observation.waypoint": d["observation.waypoint"][t].float(), "task": ep["task"],
                    "action": d["action"][idx].float(), "action_is_pad": torch.arange(t, t + H) >= T,
                    "skill_label": d["skill_label"][t].long(), "camera_label": d["camera_label"][t].long()})
        return out


__all__ = ["FORMAT", "collect_demonstrations", "compute_stats", "EpisodeDataset"]


class LeRobotDataset(torch.utils.data.Dataset):
    """A LeRobot-format dataset folder (v2.x layout: ``meta/info.json``, ``meta/episodes.jsonl``,
    ``meta/tasks.jsonl``, optional ``meta/stats.json``, ``data/chunk-XXX/episode_XXXXXX.parquet`` and
    ``videos/chunk-XXX/<video key>/episode_XXXXXX.mp4``), read offline, as the same raw samples as
    :class:`EpisodeDataset`: images (3, S, S) in [0, 1] for every video / image feature, ``observation.state``, the
    ``task`` string, an ``action`` chunk of ``chunk_size`` steps with ``action_is_pad``.

    Needs ``pyarrow`` (parquet) and OpenCV (video decoding; the codec must be one OpenCV's FFmpeg decodes).
    ``camera_map`` renames LeRobot image keys (``observation.images.top``) to the policy's camera names.
    """

    def __init__(self, root, chunk_size: int, image_size: int | None = None, camera_map: dict | None = None):
        try:
            import pandas as pd
            import pyarrow  # noqa: F401
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError("reading LeRobot parquet files needs pandas and pyarrow: pip install pyarrow") \
                from exc
        self.root = Path(root)
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{info_path} not found: not a LeRobot dataset folder")
        self.info = json.loads(info_path.read_text())
        self.fps = float(self.info["fps"])
        feats = self.info["features"]
        for key in ("observation.state", "action"):
            if key not in feats:
                raise ValueError(f"the LeRobot dataset has no {key!r} feature (has {sorted(feats)})")
        self.video_keys = [k for k, f in feats.items() if f.get("dtype") == "video"]
        self.camera_map = dict(camera_map or {})
        self.chunk_size, self.image_size = chunk_size, image_size
        tasks = [json.loads(line) for line in (self.root / "meta" / "tasks.jsonl").read_text().splitlines() if line]
        self.tasks = {int(t["task_index"]): t["task"] for t in tasks}
        episodes = [json.loads(line) for line in (self.root / "meta" / "episodes.jsonl").read_text().splitlines()
                    if line]
        stats_path = self.root / "meta" / "stats.json"
        self.stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
        csize = int(self.info.get("chunks_size", 1000))
        self.episodes, self.index = [], []
        for ep in episodes:
            e = int(ep["episode_index"])
            fmt = dict(episode_chunk=e // csize, episode_index=e)
            df = pd.read_parquet(self.root / self.info["data_path"].format(**fmt))
            data = {"observation.state": torch.tensor(np.stack(df["observation.state"].to_numpy()), dtype=torch.float32),
                    "action": torch.tensor(np.stack(df["action"].to_numpy()), dtype=torch.float32),
                    "timestamp": df["timestamp"].to_numpy(), "task_index": df["task_index"].to_numpy()}
            videos = {k: self.root / self.info["video_path"].format(video_key=k, **fmt) for k in self.video_keys}
            self.episodes.append((data, videos, {}))
            self.index.extend((len(self.episodes) - 1, t) for t in range(len(df)))
        if self.stats is None:
            self.stats = {k: {"mean": torch.cat([d[k] for d, _, _ in self.episodes]).mean(0).tolist(),
                              "std": torch.cat([d[k] for d, _, _ in self.episodes]).std(0).clamp_min(1e-3).tolist()}
                          for k in ("observation.state", "action")}

    def __len__(self) -> int:
        return len(self.index)

    def _frames(self, path: Path, cache: dict) -> np.ndarray:
        if path not in cache:
            import cv2

            cap = cv2.VideoCapture(str(path))
            frames = []
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            cap.release()
            if not frames:
                raise ValueError(f"could not decode {path} with OpenCV (codec unsupported?); re-encode it as mp4v/h264")
            cache[path] = np.stack(frames)
        return cache[path]

    def __getitem__(self, i: int) -> dict:
        e, t = self.index[i]
        data, videos, cache = self.episodes[e]
        T, H = data["action"].shape[0], self.chunk_size
        idx = torch.arange(t, t + H).clamp_max(T - 1)
        out = {"observation.state": data["observation.state"][t], "action": data["action"][idx],
               "action_is_pad": torch.arange(t, t + H) >= T, "task": self.tasks[int(data["task_index"][t])]}
        for key, path in videos.items():
            frames = self._frames(path, cache)
            f = min(int(round(float(data["timestamp"][t]) * self.fps)), len(frames) - 1)
            img = torch.from_numpy(frames[f]).permute(2, 0, 1).float() / 255.0
            if self.image_size and img.shape[-1] != self.image_size:
                img = torch.nn.functional.interpolate(img[None], size=(self.image_size, self.image_size), mode="area")[0]
            name = self.camera_map.get(key, key.removeprefix("observation.images."))
            out[f"observation.images.{name}"] = img
        return out


__all__ += ["LeRobotDataset"]
