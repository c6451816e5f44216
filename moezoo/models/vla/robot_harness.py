"""Closed-loop evaluation of VLA policies on heterogeneous robots (``eval/vla/run.py --robots`` wraps
:func:`run_robot_benchmark`).

Per embodiment (= task here, see :mod:`moezoo.models.vla.robots`) and held-out seed, an episode is run by the policy
(``predict_action_chunk`` every ``n_action_steps`` actions, the embodiment's own dimensions of the padded chunk are
executed); the scripted expert and a zero-torque "idle" policy are the baselines. Metrics per embodiment: success
rate, final distance, action-chunk latency (ms, CPU). Expert use of the AS-MoE / HB-MoE (or top-k) layers is counted
per embodiment over every chunk of every episode and drawn as a heatmap. The comparison trains each action-expert
variant (:data:`moezoo.models.vla.recipe.ROBOT_VARIANTS`) on the same demonstrations and budget over several training
seeds and reports mean ± std.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ...metrics.seeds import runs_table

ROBOT_METRICS = ("success", "final_distance", "latency_ms")


def _to_batch(obs: dict, size: int) -> dict:
    img = torch.from_numpy(obs["observation.images.front"]).float()[None] / 255.0
    if img.shape[-1] != size:
        img = torch.nn.functional.interpolate(img, size=(size, size), mode="area")
    return {"observation.images.front": img, "observation.state": torch.from_numpy(obs["observation.state"])[None],
            "task": [obs["task"]], "embodiment": obs["embodiment"]}


def run_robot_episode(policy, embodiment: str, seed: int, *, mode: str = "policy", record: bool = False,
                      env=None) -> dict:
    """One closed-loop episode; ``mode``: ``"policy"``, ``"expert"`` (scripted expert acts) or ``"idle"`` (zero)."""
    from .robots import RobotEnv

    own = env is None
    env = env or RobotEnv(embodiment, image_size=policy.config.image_size[0] if policy is not None else 32)
    obs = env.reset(seed)
    frames, lat, usage = [], [], {}
    queue: list = []
    while True:
        if record:
            frames.append(obs["observation.images.front"].transpose(1, 2, 0))
        if mode == "expert":
            a = env.expert_action()
        elif mode == "idle":
            a = np.zeros(env.spec.action_dim, dtype=np.float32)
        else:
            if not queue:
                t0 = time.perf_counter()
                chunk, out = policy.predict_action_chunk(_to_batch(obs, policy.config.image_size[0]),
                                                         return_output=True)
                lat.append(time.perf_counter() - t0)
                own_dims = policy.embodiment_actions(chunk, embodiment)[0]
                queue.extend(own_dims[: policy.config.n_action_steps].numpy())
                for k, v in (out.expert_selection or {}).items():
                    usage.setdefault(k, []).append(v[0].numpy())
            a = queue.pop(0)
        if env.step(a):
            break
        obs = env.observation()
    m = {"success": float(env.success()), "final_distance": env.distance(), "latency": lat, "usage": usage}
    if record:
        m["frames"] = frames
    if own:
        env.close()
    return m


def _usage_counts(usage: dict, policy) -> dict:
    """Per layer: (num_experts,) counts; AS layers count the chosen experts, HB / top-k layers the routed slots."""
    out = {}
    for k, rows in usage.items():
        kind, i = k.split(".")
        E = policy.action_expert["layers"][int(i)].mlp.num_experts
        c = np.zeros(E)
        for r in rows:
            if kind == "as_moe":
                for e in np.asarray(r).reshape(-1):
                    c[int(e)] += 1
            else:
                c += np.asarray(r)[:E]
        out[k] = c
    return out


def evaluate_robots(policy, embodiments, seeds, *, mode: str = "policy", record_dir: str | Path | None = None,
                    printer: Callable = print, tag: str = "") -> dict:
    """Per-embodiment metrics over held-out ``seeds``; a GIF of the first episode of each embodiment."""
    from .robots import RobotEnv

    res = {}
    for emb in embodiments:
        env = RobotEnv(emb, image_size=policy.config.image_size[0] if policy is not None else 32)
        eps = []
        for i, s in enumerate(seeds):
            rec = record_dir is not None and i == 0
            m = run_robot_episode(policy, emb, int(s), mode=mode, record=rec, env=env)
            if rec:
                save_video(m.pop("frames"), Path(record_dir) / f"{tag or mode}_{emb}.gif")
            eps.append(m)
        env.close()
        lat = [x for m in eps for x in m["latency"]]
        row = {"success": float(np.mean([m["success"] for m in eps])),
               "final_distance": float(np.mean([m["final_distance"] for m in eps])),
               "latency_ms": float(np.mean(lat) * 1000) if lat else 0.0}
        usage: dict = {}
        for m in eps:
            for k, v in m["usage"].items():
                usage.setdefault(k, []).extend(v)
        row["expert_use"] = {k: v.tolist() for k, v in _usage_counts(usage, policy).items()} if policy is not None else {}
        res[emb] = row
        printer(f"[eval] {tag or mode} {emb}: success {row['success']:.2f} distance {row['final_distance']:.3f} "
                f"latency {row['latency_ms']:.0f} ms")
    return res


def save_video(frames, path: str | Path, fps: int = 10) -> str:
    """Frames (H, W, 3) uint8 -> GIF (imageio); upscaled x4 for viewing."""
    try:
        import imageio.v2 as imageio
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("rollout videos need imageio: pip install imageio") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = [np.asarray(f).repeat(4, 0).repeat(4, 1) for f in frames]
    imageio.mimsave(str(path), big, duration=1.0 / fps)
    return str(path)


def expert_use_heatmap(rows: dict, out_path: str | Path, title: str = "") -> str:
    """Heatmap PNG of expert use per MoE layer: rows = embodiment (task), columns = experts, each row normalised.

    ``rows``: ``{embodiment: {"expert_use": {"as_moe.0": [counts], ...}}}`` (from :func:`evaluate_robots`; several
    runs can be summed first)."""
    from ...plots import heatmap_panels
    from .robots import EMBODIMENTS

    embs = list(rows)
    layers = sorted({k for r in rows.values() for k in r.get("expert_use", {})}, key=lambda k: int(k.split(".")[1]))
    if not layers:
        raise ValueError("no MoE expert use recorded (a dense policy has no experts to draw)")
    panels = {}
    for k in layers:
        mat = np.array([rows[e]["expert_use"].get(k, []) for e in embs], dtype=float)
        kind, i = k.split(".")
        name = "AS" if kind == "as_moe" else "HB" if kind == "hb_moe" else "top-k"
        panels[f"{name} layer {i}"] = mat / np.maximum(mat.sum(1, keepdims=True), 1)
    return heatmap_panels(out_path, panels, title=title or "expert use by embodiment / task", vmin=0.0, vmax=1.0,
                          ylabel="embodiment / task", annotate=True,
                          row_labels=[f"{e}/{EMBODIMENTS[e].task}" if e in EMBODIMENTS else e for e in embs])


def robot_table(rows: dict, embodiments) -> str:
    """Markdown table: one row per (method, embodiment), mean ± std over training seeds."""
    from .robots import EMBODIMENTS

    return runs_table(rows, embodiments, ROBOT_METRICS, group_header="embodiment / task",
                      group_label=lambda e: f"{e} / {EMBODIMENTS[e].task}")


def run_robot_benchmark(*, output_dir: str | Path, model: str = "himoe_vla_tiny_e8k2", tiny: bool = True,
                        variants=("dense", "topk", "himoe", "as_only", "hb_only"), train_seeds=(0, 1, 2),
                        steps: int = 100, batch_size: int = 8, data_dir: str | Path | None = None,
                        embodiments=("reacher", "pusher"), demo_seeds=tuple(range(8)), eval_seeds=(100, 101),
                        baselines: bool = True, printer: Callable = print) -> dict:
    """Collect demonstrations, train every variant per training seed, evaluate closed-loop on held-out seeds; write
    ``results.md`` / ``results.json``, GIFs under ``videos/`` and ``expert_use_<variant>.png`` heatmaps."""
    from .harness import prepare_benchmark
    from .recipe import ROBOT_VARIANTS, train_robots
    from .robots import check_embodiment

    for e in embodiments:
        check_embodiment(e)
    out, data_dir = prepare_benchmark(variants, list(ROBOT_VARIANTS), eval_seeds, demo_seeds, output_dir, data_dir)
    results, params, files, timing = {}, {}, [], {}
    t_start = time.time()
    for v in variants:
        for s in train_seeds:
            t0 = time.time()
            cfg = {"model": {"name": model, "tiny": tiny, "variant": v},
                   "data": {"dir": str(data_dir), "embodiments": list(embodiments), "seeds": list(demo_seeds)},
                   "trainer": {"output_dir": str(out / "runs" / f"{v}_seed{s}"), "max_steps": steps,
                               "batch_size": batch_size, "seed": int(s)}}
            r = train_robots(cfg, printer=printer)
            policy = r["policy"].eval()
            summ = policy.parameter_summary()
            params[v] = {"total": summ["total"], "active": summ["active"]}
            res = evaluate_robots(policy, embodiments, eval_seeds, printer=printer, tag=f"{v}_seed{s}",
                                  record_dir=out / "videos" if s == train_seeds[0] else None)
            results.setdefault(v, []).append(res)
            timing.setdefault(v, []).append(time.time() - t0)
            (out / "results_partial.json").write_text(json.dumps(
                {"params": params, "train_seconds": timing,
                 "results": {k: [{e: {m: r[e][m] for m in ROBOT_METRICS} for e in embodiments} for r in runs]
                             for k, runs in results.items()}}, indent=1))
            printer(f"[bench] {v} seed {s} done in {time.time() - t0:.0f}s")
        use = {e: {"expert_use": {}} for e in embodiments}
        for run in results[v]:
            for e in embodiments:
                for k, c in run[e]["expert_use"].items():
                    prev = use[e]["expert_use"].get(k)
                    use[e]["expert_use"][k] = (np.asarray(c) + (prev if prev is not None else 0)).tolist()
        if any(use[e]["expert_use"] for e in embodiments):
            files.append(expert_use_heatmap(use, out / f"expert_use_{v}.png",
                                            title=f"{v}: expert use by embodiment / task (held-out episodes)"))
    if baselines:
        for mode in ("expert", "idle"):
            results[f"{mode} (baseline)"] = [evaluate_robots(None, embodiments, eval_seeds, mode=mode, printer=printer,
                                                             tag=mode, record_dir=out / "videos")]
    md = robot_table(results, embodiments)
    summary = {"table": md, "params": params, "seconds": time.time() - t_start, "train_seconds": timing,
               "eval_seeds": list(eval_seeds), "demo_seeds": list(demo_seeds), "train_seeds": list(train_seeds),
               "steps": steps, "batch_size": batch_size, "files": files,
               "results": {k: [{e: {m: r[e][m] for m in ROBOT_METRICS} for e in embodiments} for r in v]
                           for k, v in results.items()}}
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    printer(md)
    return summary


__all__ = ["run_robot_episode", "evaluate_robots", "expert_use_heatmap", "robot_table", "run_robot_benchmark",
           "save_video", "ROBOT_METRICS"]
