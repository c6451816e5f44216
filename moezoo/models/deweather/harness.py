"""Deweather benchmark harness (``eval/deweather/run.py`` is a thin wrapper around :func:`run_benchmark`).

In one run:

1. **Restoration quality**: PSNR / SSIM per weather type and overall of the degraded input and of every model --
   given as folders (``models={"label": "path"}``) and/or trained here from recipe configs at an equal budget
   (``train_configs``; the default compares tiny MoFME with the tiny conventional MoE), once per seed with ``seeds``
   (mean ± std over the seeds) -- on the built-in multi-weather test split (held-out photos) or All-Weather folders;
   triptych PNGs (degraded / each model / clean) per weather type.
2. **Size and speed**: parameters (whole model and MoE layers) and median CPU inference time (same input, fixed torch
   threads, models interleaved so background load hits all alike) of MoFME vs the conventional MoE at equal expert
   count, with the savings in % as the MoFME paper reports them: for the evaluated pair and for the registered
   ``_s_`` configs at E = 4 / 8 / 16 (randomly initialised; no training is needed to count or time them).

Writes ``results.md`` (markdown tables) and ``results.json`` to ``output_dir``.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ...metrics.seeds import mean_std

__all__ = ["S_PAIRS", "TINY_PAIRS", "count_parameters", "time_models", "efficiency_comparison", "load_model",
           "run_benchmark", "efficiency_table", "quality_table", "aggregate_seeds", "seeds_table"]

S_PAIRS = [("deweather_mofme_s_e4k2", "deweather_moe_s_e4k2"), ("deweather_mofme_s_e8k2", "deweather_moe_s_e8k2"),
           ("deweather_mofme_s_e16k4", "deweather_moe_s_e16k4")]
TINY_PAIRS = [("deweather_mofme_tiny_e4k2", "deweather_moe_tiny_e4k2")]


def count_parameters(model: nn.Module) -> dict:
    """``{"total", "moe_layers", "experts_active"}``: all parameters, those inside MoE layers (router, experts and,
    for MoFME, the shared basenet + adaptor), and the active parameters per token from ``parameter_summary``."""
    total = sum(p.numel() for p in model.parameters())
    moe = sum(p.numel() for _, m in model.moe_layers() for p in m.parameters())
    out = {"total": total, "moe_layers": moe}
    if hasattr(model, "parameter_summary"):
        out["active"] = model.parameter_summary()["active"]
    return out


def _saving(a: float, b: float) -> float:
    """Saving of ``a`` relative to ``b`` in % (positive = ``a`` is smaller)."""
    return 100.0 * (1.0 - a / b) if b else float("nan")


@torch.no_grad()
def time_models(models: Mapping[str, nn.Module], pixel_values: torch.Tensor, repeats: int = 10, warmup: int = 2,
                threads: int = 1, moe_only: bool = True) -> dict:
    """Median seconds per forward of each model on the same ``pixel_values`` (and of its MoE layers alone).

    ``torch.set_num_threads(threads)`` during the measurement (restored afterwards); the models run interleaved
    (m1, m2, m1, m2, ...) so background load affects all of them alike. With ``moe_only`` the inputs each MoE layer
    received are recorded once and the MoE layers are timed on them alone (``moe_s``).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        states = {}
        layer_inputs: dict[str, list] = {}
        for name, m in models.items():
            states[name] = m.training
            m.eval()
            if moe_only:
                rec = []
                hooks = [layer.register_forward_pre_hook(lambda mod, args, rec=rec: rec.append((mod, args[0])))
                         for _, layer in m.moe_layers()]
                m(pixel_values=pixel_values)
                for h in hooks:
                    h.remove()
                layer_inputs[name] = rec
        full = {n: [] for n in models}
        moe = {n: [] for n in models}
        for i in range(warmup + repeats):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(pixel_values=pixel_values)
                t1 = time.perf_counter()
                if moe_only:
                    for mod, x in layer_inputs[name]:
                        mod(x)
                t2 = time.perf_counter()
                if i >= warmup:
                    full[name].append(t1 - t0)
                    moe[name].append(t2 - t1)
        for name, m in models.items():
            m.train(states[name])
    finally:
        torch.set_num_threads(old)
    out = {}
    for name in models:
        out[name] = {"forward_s": statistics.median(full[name]), "forward_all_s": full[name]}
        if moe_only:
            out[name]["moe_s"] = statistics.median(moe[name])
    return out


def efficiency_comparison(pairs, *, time_it: bool = True, image_size: int | None = None, batch_size: int = 1,
                          repeats: int = 10, warmup: int = 2, threads: int = 1, tiny: bool = False,
                          models: Mapping[str, nn.Module] | None = None, seed: int = 0) -> list[dict]:
    """Parameters (+ median CPU forward time) of MoFME vs conventional MoE for each ``(mofme, moe)`` pair.

    Pairs name registered models (built randomly initialised, ``tiny`` overrides optional) or keys of ``models``.
    Without ``time_it`` the models are built on the meta device (parameter counts only, no memory).
    """
    import moezoo

    rows = []
    for a, b in pairs:
        built = {}
        for n in (a, b):
            if models is not None and n in models:
                built[n] = models[n]
            elif time_it:
                torch.manual_seed(seed)
                built[n] = moezoo.create_model(n, tiny=tiny)
            else:
                with torch.device("meta"):
                    built[n] = moezoo.create_model(n, tiny=tiny)
        ma, mb = built[a], built[b]
        if ma.config.num_experts != mb.config.num_experts:
            raise ValueError(f"{a} has {ma.config.num_experts} experts but {b} has {mb.config.num_experts}; "
                             "compare at equal expert count")
        pa, pb = count_parameters(ma), count_parameters(mb)
        row = {"mofme": a, "moe": b, "num_experts": ma.config.num_experts, "top_k": ma.config.num_experts_per_tok,
               "params_mofme": pa, "params_moe": pb,
               "param_saving_total_pct": _saving(pa["total"], pb["total"]),
               "param_saving_moe_pct": _saving(pa["moe_layers"], pb["moe_layers"])}
        if time_it:
            H, W = ma.config.image_hw if image_size is None else (image_size, image_size)
            g = torch.Generator().manual_seed(seed)
            x = torch.rand(batch_size, ma.config.in_channels, H, W, generator=g)
            t = time_models({a: ma, b: mb}, x, repeats=repeats, warmup=warmup, threads=threads)
            row.update({"input_shape": list(x.shape), "threads": threads, "repeats": repeats,
                        "time_mofme_s": t[a]["forward_s"], "time_moe_s": t[b]["forward_s"],
                        "time_saving_pct": _saving(t[a]["forward_s"], t[b]["forward_s"]),
                        "moe_time_mofme_s": t[a]["moe_s"], "moe_time_moe_s": t[b]["moe_s"],
                        "moe_time_saving_pct": _saving(t[a]["moe_s"], t[b]["moe_s"])})
        rows.append(row)
    return rows


def efficiency_table(rows: list[dict]) -> str:
    """Markdown table of :func:`efficiency_comparison` rows."""
    head = ("| MoFME | conventional MoE | E / k | params MoFME / MoE (total) | saving total | MoE-layer params "
            "MoFME / MoE | saving MoE layers | CPU forward MoFME / MoE | saving | MoE layers only | saving |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pa, pb = r["params_mofme"], r["params_moe"]
        t = ["-"] * 4
        if "time_mofme_s" in r:
            t = [f"{1e3 * r['time_mofme_s']:.1f} / {1e3 * r['time_moe_s']:.1f} ms", f"{r['time_saving_pct']:.1f}%",
                 f"{1e3 * r['moe_time_mofme_s']:.2f} / {1e3 * r['moe_time_moe_s']:.2f} ms",
                 f"{r['moe_time_saving_pct']:.1f}%"]
        lines.append(f"| {r['mofme']} | {r['moe']} | {r['num_experts']} / {r['top_k']} | "
                     f"{pa['total']:,} / {pb['total']:,} | {r['param_saving_total_pct']:.1f}% | "
                     f"{pa['moe_layers']:,} / {pb['moe_layers']:,} | {r['param_saving_moe_pct']:.1f}% | "
                     + " | ".join(t) + " |")
    return "\n".join(lines)


def quality_table(results: Mapping[str, Mapping]) -> str:
    """Markdown PSNR / SSIM table (rows: degraded input + models)."""
    from moezoo.metrics.restoration import format_metrics_table

    return format_metrics_table(results)


def aggregate_seeds(runs: list[Mapping]) -> dict:
    """Per-weather mean / std over seeds of :func:`evaluate_restoration` ``restored`` dicts (one per seed).

    Returns ``{weather: {"psnr", "psnr_std", "ssim", "ssim_std", "count", "seeds"}}`` (psnr / ssim are the means).
    """
    if not runs:
        raise ValueError("aggregate_seeds needs at least one run")
    out = {}
    for w in runs[0]:
        ps, ss = mean_std([r[w]["psnr"] for r in runs]), mean_std([r[w]["ssim"] for r in runs])
        out[w] = {"psnr": ps[0], "psnr_std": ps[1], "ssim": ss[0], "ssim_std": ss[1], "count": runs[0][w]["count"],
                  "seeds": len(runs)}
    return out


def seeds_table(results: Mapping[str, Mapping], extra: Mapping[str, list[str]] | None = None,
                extra_head: list[str] | None = None) -> str:
    """Markdown table of :func:`aggregate_seeds` results: ``PSNR mean ± std / SSIM mean ± std`` per weather.

    ``extra``: more cells per row (e.g. parameters, time) under the column names ``extra_head``."""
    weathers = [w for w in next(iter(results.values())) if w != "overall"] + ["overall"]
    extra_head = list(extra_head or [])
    head = "| system | " + " | ".join(f"{w} PSNR / SSIM" for w in weathers) + "".join(f" | {h}" for h in extra_head) + " |"
    lines = [head, "|---|" + "---|" * (len(weathers) + len(extra_head))]
    for name, r in results.items():
        cells = []
        for w in weathers:
            d = r[w]
            if d.get("seeds", 1) > 1:
                cells.append(f"{d['psnr']:.2f} ± {d['psnr_std']:.2f} / {d['ssim']:.4f} ± {d['ssim_std']:.4f}")
            else:
                cells.append(f"{d['psnr']:.2f} / {d['ssim']:.4f}")
        cells += list((extra or {}).get(name, ["-"] * len(extra_head)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_model(path: str | os.PathLike):
    """A deweather model from a moezoo folder (``save_pretrained`` output or a Trainer checkpoint)."""
    from transformers import AutoModelForImageToImage

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"--model {str(path)!r} must be a folder with config.json + model.safetensors "
                         "(a training run's <output_dir>/model or checkpoint-<step>)")
    return AutoModelForImageToImage.from_pretrained(str(p))


def run_benchmark(*, output_dir: str | os.PathLike, models: Mapping[str, str] | None = None,
                  train_configs: Mapping[str, Mapping] | None = None, data: Mapping | None = None,
                  fast: bool = False, speed_pairs: list | None = None, speed_repeats: int = 10, threads: int = 1,
                  triptychs: int = 4, max_items: int | None = None, seeds: list[int] | None = None,
                  printer: Callable = print) -> dict:
    """Evaluate / train-then-evaluate models and compare MoFME with the conventional MoE (see module docstring).

    Args:
        models: ``{label: folder}`` of trained models to evaluate.
        train_configs: ``{label: recipe config}`` trained here first, each with the same ``trainer`` section as given
            (give them equal budgets); their output_dir defaults to ``<output_dir>/train/<label>[/seed<s>]``.
        seeds: train every config once per seed (``trainer.seed``: initialisation and crop order; the data and its
            held-out photos stay the same) and report mean ± std over the seeds; None = each config's own seed.
        data: the recipe ``data`` section of the evaluation set (default: the built-in multi-weather test split;
            train-then-eval runs use each config's own data section for training).
        fast: CI mode -- time the ``_s_`` configs not at all (parameter counts only, on the meta device).
        speed_pairs: ``(mofme, moe)`` registry names whose parameters and CPU time are compared (default
            :data:`S_PAIRS`); the evaluated models are compared too when a MoFME and a conventional MoE with equal
            expert counts are among them.
    """
    from .recipe import DEFAULT_RECIPE, _merge, build_datasets, evaluate_restoration, save_triptychs, train

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not models and not train_configs:
        raise ValueError("give at least one model folder (models=...) or a training config (train_configs=...)")
    if seeds is not None and (not seeds or not all(isinstance(x, int) for x in seeds)):
        raise ValueError(f"seeds must be a non-empty list of ints or None, got {seeds!r}")
    model_dirs: dict[str, list[str]] = {}   # label -> one folder per seed
    trained: dict[str, dict] = {}
    for label, cfg in (train_configs or {}).items():
        runs = []
        for seed in (seeds or [None]):
            c = copy.deepcopy(dict(cfg))
            c.setdefault("trainer", {})
            base = c["trainer"].get("output_dir") or str(out / "train" / label)
            if seed is not None:
                c["trainer"]["seed"] = seed
                c["trainer"]["output_dir"] = str(Path(base) / f"seed{seed}") if seeds and len(seeds) > 1 else base
            else:
                c["trainer"]["output_dir"] = base
            printer(f"\n--- training {label} ({c.get('model', {}).get('name')})"
                    + (f", seed {seed}" if seed is not None else "") + " ---")
            res = train(c, printer=printer, progress=not fast)
            run = {k: res[k] for k in ("step", "model_dir", "train_time_s", "loss", "routing_plots")}
            run["seed"] = res["config"]["trainer"]["seed"]
            run["routing_summary"] = (res.get("routing_summary") or {}).get("_all")
            if "val" in res["metrics"]:
                run["val"] = res["metrics"]["val"]["after"]["overall"]
            runs.append(run)
        model_dirs[label] = [r["model_dir"] for r in runs]
        tt = mean_std([r["train_time_s"] for r in runs])
        trained[label] = {**runs[0], "runs": runs, "seeds": [r["seed"] for r in runs],
                          "train_time_s": tt[0], "train_time_std_s": tt[1],
                          "loss": statistics.fmean(r["loss"] for r in runs)}
    for label, path in (models or {}).items():
        model_dirs[label] = [str(path)]
    loaded: dict[str, nn.Module] = {label: load_model(dirs[0]) for label, dirs in model_dirs.items()}

    patch = max(int(m.config.patch_size) for m in loaded.values())
    data_cfg = _merge(DEFAULT_RECIPE["data"], data or {})
    if data is None and train_configs:  # evaluate on the test split the (first) trained model was built with
        first = next(iter(train_configs.values()))
        data_cfg = _merge(DEFAULT_RECIPE["data"], first.get("data") or {})
    if any(patch % int(m.config.patch_size) for m in loaded.values()):
        raise ValueError(f"models have incompatible patch sizes {[m.config.patch_size for m in loaded.values()]}")
    _, test = build_datasets(data_cfg, patch_size=patch, progress=not fast)
    printer(f"\nevaluation set ({data_cfg['source']}): {len(test)} test samples")
    quality: dict[str, dict] = {}
    per_seed: dict[str, list] = {}
    bs = 32 if data_cfg["source"] != "allweather" else 1
    for label, dirs in model_dirs.items():
        per_seed[label] = []
        for k, d in enumerate(dirs):
            m = loaded[label] if k == 0 else load_model(d)
            r = evaluate_restoration(m, test, batch_size=bs, max_items=max_items, include_input=not quality)
            if "degraded input" in r:
                quality["degraded input"] = r["degraded input"]
            per_seed[label].append(r["restored"])
        quality[label] = aggregate_seeds(per_seed[label])
    trip = save_triptychs(loaded, test, out / "triptychs", triptychs, patch) if triptychs else []

    # equal-expert-count pairs among the evaluated models
    own_pairs = []
    fme = [k for k, m in loaded.items() if m.config.expert_type == "fme"]
    ffn = [k for k, m in loaded.items() if m.config.expert_type == "ffn"]
    for a in fme:
        b = next((b for b in ffn if loaded[b].config.num_experts == loaded[a].config.num_experts), None)
        if b is not None:
            own_pairs.append((a, b))
    if own_pairs:
        printer(f"timing the evaluated MoFME / MoE pair(s) on CPU: {own_pairs}")
    own_rows = efficiency_comparison(own_pairs, models=loaded, repeats=speed_repeats, threads=threads,
                                     warmup=1 if fast else 2)
    pairs = S_PAIRS if speed_pairs is None else speed_pairs
    if pairs and not fast:
        printer(f"timing {len(pairs)} registered MoFME / MoE pair(s) on CPU ({threads} thread(s), "
                f"median of {speed_repeats}) ...")
    s_rows = efficiency_comparison(pairs, time_it=not fast, repeats=speed_repeats, threads=threads)

    n_seeds = max(len(v) for v in per_seed.values())
    extra_head, extra = ["params", "train time"], {"degraded input": ["-", "-"]}
    for label, m in loaded.items():
        t = trained.get(label)
        tt = "-" if t is None else (f"{t['train_time_s']:.0f} ± {t['train_time_std_s']:.0f} s" if len(t["runs"]) > 1
                                    else f"{t['train_time_s']:.0f} s")
        extra[label] = [f"{count_parameters(m)['total']:,}", tt]
    md = ["# Deweather benchmark: MoFME vs conventional MoE", "",
          f"Evaluation set: {data_cfg['source']}" + (f" ({data_cfg.get('photos')} photos)" if data_cfg["source"] == "builtin" else "")
          + f", {len(test)} held-out test samples; PSNR (dB) / SSIM per weather type, averaged over images"
          + (f"; mean ± std over {n_seeds} seeds" if n_seeds > 1 else "") + ".", "",
          seeds_table(quality, extra, extra_head), ""]
    if trained:
        runs = [f"{k}: {v['step']} steps, {v['train_time_s']:.0f} s, final loss {v['loss']:.4f}"
                + (f" (seeds {v['seeds']})" if len(v["runs"]) > 1 else "") for k, v in trained.items()]
        md += ["Training (equal budget): " + "; ".join(runs), ""]
    if own_rows:
        md += ["## Evaluated models: size and CPU inference time", "", efficiency_table(own_rows), ""]
    if s_rows:
        md += ["## Registered `_s_` configs (random init): size" + ("" if fast else " and CPU inference time"), "",
               efficiency_table(s_rows), ""]
    md += [f"CPU times: median of {speed_repeats} forwards after warm-up, torch threads = {threads}, batch 1 at the "
           "config's image size (evaluated models: their image size); 'MoE layers only' times the MoE layers on the "
           "token tensors they received. Savings = 1 - MoFME / MoE.", ""]
    if trip:
        md += ["Triptychs (degraded / restored / clean): " + ", ".join(Path(p).name for p in trip), ""]
    text = "\n".join(md)
    (out / "results.md").write_text(text)
    results = {"quality": quality, "quality_per_seed": per_seed, "seeds": seeds, "trained": trained,
               "efficiency_evaluated": own_rows,
               "efficiency_registered": s_rows, "triptychs": trip, "data": data_cfg, "fast": fast,
               "threads": threads, "speed_repeats": speed_repeats}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    printer("\n" + text)
    return results
