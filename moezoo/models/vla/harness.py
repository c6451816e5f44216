"""Closed-loop evaluation of VLA driving policies in highway-env (``eval/vla/run.py`` wraps :func:`run_benchmark`).

Per scenario and held-out seed an episode is driven by the policy (``select_action``: a chunk is re-planned every
``n_action_steps``); the IDM expert runs alongside only to label the step's skill and relevant view (for the
heatmaps), never to act. Metrics per scenario: success rate, route completion, collision rate, mean speed, driving
score (route completion x 0.6 per collision, Bench2Drive-style), action-chunk latency (ms, CPU) and control rate (Hz =
actions executed per second of policy compute). Baselines: the IDM expert itself and a constant "idle" policy (keep
speed, no steering). The comparison trains Drive-π0, DriveMoE and each MoE alone (:data:`recipe.VARIANTS`) on the same
demonstrations and budget, over several training seeds, and reports mean ± std.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ...metrics.seeds import runs_table


def run_episode(policy, scenario: str, seed: int, *, record: bool = False, image_size: int | None = None,
                mode: str = "policy") -> dict:
    """One closed-loop episode. ``mode``: ``"policy"``, ``"expert"`` (IDM acts) or ``"idle"`` (zero action)."""
    from .driving import DrivingEnv

    cams = policy.config.camera_names if policy is not None else None
    env = DrivingEnv(scenario, image_size=64, cameras=cams)
    obs = env.reset(seed)
    size = image_size or (policy.config.image_size[0] if policy is not None else 64)
    frames, lat, cam_sel, skill_sel, skill_lab = [], [], [], [], []
    if policy is not None:
        policy.reset()
    while True:
        a_exp, skill, _ = env.expert_action()
        if record:
            frames.append(obs[f"observation.images.{env.cameras[0]}"].transpose(1, 2, 0))
        if mode == "expert":
            a = a_exp
        elif mode == "idle":
            a = np.zeros(2, dtype=np.float32)
        else:
            batch = _to_batch(obs, size)
            if not policy._queue:
                t0 = time.perf_counter()
                chunk, out = policy.predict_action_chunk(batch, return_output=True)
                lat.append(time.perf_counter() - t0)
                policy._queue.extend(chunk[:, : policy.config.n_action_steps].transpose(0, 1))
                if out.camera_selection is not None:
                    cam_sel.append(int(out.camera_selection[0, 0]))
                if out.skill_logits is not None:
                    skill_sel.append(int(out.skill_logits[0].argmax()))
                    skill_lab.append(skill)
            a = policy._queue.popleft()[0].numpy()
        if env.step(a):
            break
        obs = env.observation()
    m = env.metrics()
    env.close()
    m.update(latency=lat, camera_selection=cam_sel, expert_selection=skill_sel, skill_labels=skill_lab)
    if record:
        m["frames"] = frames
    return m


def _to_batch(obs: dict, size: int) -> dict:
    out = {}
    for k, v in obs.items():
        if k.startswith("observation.images."):
            img = torch.from_numpy(np.ascontiguousarray(v)).float()[None] / 255.0
            if img.shape[-1] != size:
                img = torch.nn.functional.interpolate(img, size=(size, size), mode="area")
            out[k] = img
        elif k == "task":
            out[k] = [v]
        else:
            out[k] = torch.from_numpy(np.asarray(v))[None]
    return out


def evaluate(policy, scenarios, seeds, *, mode: str = "policy", record_dir: str | Path | None = None,
             printer: Callable = print, tag: str = "") -> dict:
    """Per-scenario metrics over ``seeds``; optional GIF of the first episode of each scenario."""
    res = {}
    for sc in scenarios:
        eps = []
        for i, s in enumerate(seeds):
            rec = record_dir is not None and i == 0
            m = run_episode(policy, sc, int(s), record=rec, mode=mode)
            if rec:
                import imageio

                Path(record_dir).mkdir(parents=True, exist_ok=True)
                imageio.mimsave(str(Path(record_dir) / f"{tag or mode}_{sc}.gif"), m.pop("frames"), duration=0.2)
            eps.append(m)
        lat = [x for m in eps for x in m["latency"]]
        n_act = policy.config.n_action_steps if policy is not None else 1
        row = {k: float(np.mean([m[k] for m in eps])) for k in ("success", "route_completion", "collision",
                                                                   "mean_speed", "driving_score")}
        row["latency_ms"] = float(np.mean(lat) * 1000) if lat else 0.0
        row["control_hz"] = float(n_act / np.mean(lat)) if lat else 0.0
        row["camera_selection"] = [x for m in eps for x in m["camera_selection"]]
        row["expert_selection"] = [x for m in eps for x in m["expert_selection"]]
        row["skill_labels"] = [x for m in eps for x in m["skill_labels"]]
        res[sc] = row
        printer(f"[eval] {tag or mode} {sc}: success {row['success']:.2f} RC {row['route_completion']:.2f} "
                f"collision {row['collision']:.2f} speed {row['mean_speed']:.1f} DS {row['driving_score']:.2f} "
                f"latency {row['latency_ms']:.0f} ms")
    return res


METRICS = ("success", "route_completion", "collision", "mean_speed", "driving_score", "latency_ms", "control_hz")


def table(rows: dict, scenarios) -> str:
    """Markdown table: one row per (method, scenario) with mean ± std over training seeds."""
    return runs_table(rows, scenarios, METRICS, group_header="scenario", digits=2)


def heatmaps(results: dict, scenarios, out_dir: str | Path, num_experts: int, cameras) -> list[str]:
    """camera selection (candidate view x scenario) and action expert by skill label, from DriveMoE runs."""
    from .driving import SKILLS

    out, files = Path(out_dir), []
    runs = results.get("drivemoe") or []
    cam = np.zeros((len(cameras), len(scenarios)))
    exp = np.zeros((len(SKILLS), num_experts))
    for r in runs:
        for j, sc in enumerate(scenarios):
            for c in r[sc]["camera_selection"]:
                cam[c, j] += 1
            for e, s in zip(r[sc]["expert_selection"], r[sc]["skill_labels"]):
                exp[s, e] += 1
    from ...plots import heatmap_panels

    for name, mat, ylab, xlab, xname, yname in (
            ("camera_selection_heatmap.png", cam, cameras, scenarios, "scenario", "camera"),
            ("expert_by_skill_heatmap.png", exp, SKILLS, [f"e{i}" for i in range(num_experts)], "expert", "skill")):
        norm = mat / np.maximum(mat.sum(0, keepdims=True), 1) if "camera" in name else \
            mat / np.maximum(mat.sum(1, keepdims=True), 1)
        files.append(heatmap_panels(out / name, [norm], vmin=0.0, vmax=1.0, annotate=[mat], annotate_fmt="{:.0f}",
                                    row_labels=list(ylab), x_labels=list(xlab), xlabel=xname, ylabel=yname,
                                    title=name.replace("_heatmap.png", "").replace("_", " ")))
    return files


def prepare_benchmark(variants, known, eval_seeds, demo_seeds, output_dir, data_dir) -> tuple[Path, Path]:
    """Checks shared by the driving and robot benchmarks (known variants, held-out seeds disjoint from the
    demonstration seeds); makes ``output_dir`` and returns it with the demonstrations folder."""
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; expected {list(known)}")
    overlap = set(eval_seeds) & set(demo_seeds)
    if overlap:
        raise ValueError(f"eval seeds {sorted(overlap)} are also demonstration seeds; held-out seeds must differ")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out, Path(data_dir or out / "data")


def run_benchmark(*, output_dir: str | Path, model: str = "drivemoe_tiny_e6k1", tiny: bool = True,
                  variants=("drive_pi0", "drivemoe", "camera_moe", "action_moe"), train_seeds=(0, 1, 2),
                  steps: int = 800, batch_size: int = 8, data_dir: str | Path | None = None,
                  scenarios=("highway", "merge", "roundabout", "intersection"), demo_seeds=(0, 1, 2, 3),
                  eval_seeds=(100, 101), baselines: bool = True, printer: Callable = print) -> dict:
    """Collect demonstrations, train every variant per training seed, evaluate closed-loop on held-out seeds."""
    from .driving import check_scenario
    from .recipe import VARIANTS, train

    for sc in scenarios:
        check_scenario(sc)
    out, data_dir = prepare_benchmark(variants, sorted(VARIANTS), eval_seeds, demo_seeds, output_dir, data_dir)
    results, params = {}, {}
    t_start = time.time()
    for v in variants:
        for s in train_seeds:
            cfg = {"model": {"name": model, "tiny": tiny, "variant": v},
                   "data": {"dir": str(data_dir), "scenarios": list(scenarios), "seeds": list(demo_seeds)},
                   "trainer": {"output_dir": str(out / "runs" / f"{v}_seed{s}"), "max_steps": steps,
                               "batch_size": batch_size, "seed": int(s)}}
            r = train(cfg, printer=printer)
            policy = r["policy"].eval()
            params[v] = {"total": sum(p.numel() for p in policy.parameters()),
                         "active": policy.parameter_summary()["active"]}
            res = evaluate(policy, scenarios, eval_seeds, printer=printer, tag=f"{v}_seed{s}",
                           record_dir=out / "videos" if s == train_seeds[0] else None)
            results.setdefault(v, []).append(res)
            num_experts, cameras = policy.config.num_experts, policy.config.candidate_cameras
    return _finish(out, results, scenarios, eval_seeds, baselines, printer, t_start, num_experts, cameras,
                   params=params, train_seeds=list(train_seeds), steps=steps)


def evaluate_runs(run_dir: str | Path, *, eval_seeds=(100, 101), scenarios=("highway", "merge", "roundabout",
                                                                          "intersection"),
                  output_dir: str | Path | None = None, baselines: bool = True, printer: Callable = print) -> dict:
    """Evaluate again the policies that :func:`run_benchmark` saved (``RUN_DIR/runs/<variant>_seed<s>/model``) on
    other held-out seeds, without training: more episodes per scenario for a tighter table. Writes
    ``results.md`` / ``results.json`` and the heatmaps into ``output_dir`` (default ``RUN_DIR/eval_<n>seeds``)."""
    import re

    from .driving import check_scenario
    from .modeling_vla import MoezooVlaPolicy

    for sc in scenarios:
        check_scenario(sc)
    run_dir = Path(run_dir)
    found = sorted((m.group(1), int(m.group(2)), d) for d in (run_dir / "runs").glob("*_seed*")
                   if (m := re.fullmatch(r"(.+)_seed(\d+)", d.name)) and (d / "model" / "config.json").is_file())
    if not found:
        raise FileNotFoundError(f"no trained policies in {run_dir / 'runs'} (expected <variant>_seed<s>/model)")
    demo_seeds = {int(x) for _, _, d in found if (d / "recipe.json").is_file()
                  for x in json.loads((d / "recipe.json").read_text()).get("data", {}).get("seeds", [])}
    overlap = set(eval_seeds) & demo_seeds
    if overlap:
        raise ValueError(f"eval seeds {sorted(overlap)} are also demonstration seeds; held-out seeds must differ")
    out = Path(output_dir or run_dir / f"eval_{len(eval_seeds)}seeds")
    out.mkdir(parents=True, exist_ok=True)
    results, params, t_start = {}, {}, time.time()
    num_experts = cameras = None
    for v, s, d in found:
        policy = MoezooVlaPolicy.from_pretrained(str(d / "model")).eval()
        params[v] = {"total": sum(p.numel() for p in policy.parameters()),
                     "active": policy.parameter_summary()["active"]}
        results.setdefault(v, []).append(evaluate(policy, scenarios, eval_seeds, printer=printer, tag=f"{v}_seed{s}"))
        if v == "drivemoe":
            num_experts, cameras = policy.config.num_experts, policy.config.candidate_cameras
    return _finish(out, results, scenarios, eval_seeds, baselines, printer, t_start, num_experts, cameras,
                   params=params, train_seeds=sorted({s for _, s, _ in found}), source=str(run_dir))


def _finish(out: Path, results: dict, scenarios, eval_seeds, baselines: bool, printer: Callable, t_start: float,
            num_experts, cameras, **extra) -> dict:
    """Baselines, the mean ± std table, the heatmaps and results.{md,json}: the end of both driving benchmarks."""
    if baselines:
        for mode in ("expert", "idle"):
            results[f"{mode} (baseline)"] = [evaluate(None, scenarios, eval_seeds, mode=mode, printer=printer,
                                                      tag=mode, record_dir=out / "videos")]
    md = table(results, scenarios)
    files = heatmaps(results, scenarios, out, num_experts, cameras) if "drivemoe" in results else []
    summary = {"table": md, **extra, "seconds": time.time() - t_start, "eval_seeds": list(eval_seeds),
               "files": files,
               "results": {k: [{sc: {m: r[sc][m] for m in METRICS} for sc in scenarios} for r in v]
                           for k, v in results.items()}}
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    printer(md)
    return summary


__all__ = ["run_episode", "evaluate", "table", "heatmaps", "run_benchmark", "evaluate_runs", "METRICS"]
