"""The Time-MoE long-horizon benchmark (what ``eval/time_moe/run.py`` runs).

Protocol (Informer / Time-MoE): ETT-layout CSV, standard splits and a scaler fit on the train rows
(:mod:`moezoo.data.timeseries`), every stride-1 test window, MSE and MAE averaged over channels on the scaled values
(:mod:`moezoo.metrics.timeseries`). Context per horizon as Time-MoE's evaluation: 96 -> 512, 192 -> 1024, 336 -> 2048,
720 -> 3072 (override with ``context_lengths``).

Models in one run, all scored on the same windows:

* ``time_moe``: the Time-MoE model, zero-shot (``mode="zero_shot"``: a save_pretrained folder, e.g. a converted
  official checkpoint) or fine-tuned (``mode="finetune"``: a registry name trained from scratch, or a folder trained
  further) with the recipe code (:mod:`moezoo.models.time_moe.recipe`) for ``steps`` x ``batch_size`` windows.
* ``dense``: ``dense_config_like(config)`` (same active parameters, dense SwiGLU FFN), trained from scratch with the
  same budget (steps, batch, learning rate, window).
* ``dlinear``: DLinear, one per horizon, trained with the same steps and batch size on (context, horizon) windows.
* ``seasonal_naive``: repeats the last season (period from the timestamps, e.g. 24 for hourly data).
* ``pretrained``: extra save_pretrained folders evaluated zero-shot in the same run (``label=folder``; ``{seed}`` in
  the folder is replaced by the run's seed, so each seed can use its own pretraining run), always with the paper's
  per-window normalisation of the context (``model.forecast(normalize=True)``).

Several seeds: :func:`run_benchmark_seeds` runs the whole benchmark once per seed (``output_dir/seed<k>``; the seed
sets the fresh weights, the data order of every trained model and, through ``{seed}``, the pretrained folder) and
writes ``results.md`` / ``results.json`` with the mean +- sample std over seeds of every model and horizon.

Outputs in ``output_dir``: ``results.md`` (table), ``results.json`` (everything, including per-channel errors),
``forecast_h<H>.png`` (a few test windows: context, truth, each model's forecast), ``expert_load.png`` (the MoE
model's expert load on test windows) and, for trained models, ``train/<model>/`` (checkpoints, log, routing plots).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...data.timeseries import (ForecastWindowDataset, TimeSeriesWindowDataset, infer_season_length, load_table,
                                make_splits)
from ...metrics.seeds import format_mean_std, mean_std
from .baselines import DLinear, dlinear_loss, seasonal_naive
from .recipe import build_model, evaluate_forecaster, time_moe_predictor, train_model

__all__ = ["DEFAULT_CONTEXTS", "DEFAULT_HORIZONS", "BASELINES", "BenchmarkConfig", "fast_config", "run_benchmark",
           "run_benchmark_seeds", "aggregate_seeds", "markdown_table", "markdown_table_seeds", "save_forecast_plot",
           "save_expert_load"]

DEFAULT_CONTEXTS = {96: 512, 192: 1024, 336: 2048, 720: 3072}
DEFAULT_HORIZONS = (96, 192, 336, 720)
BASELINES = ("seasonal_naive", "dlinear", "dense")
MODES = ("auto", "zero_shot", "finetune")


@dataclass
class BenchmarkConfig:
    """Settings of :func:`run_benchmark` (the command-line flags of ``eval/time_moe/run.py``).

    ``model``: a registry name (fresh weights; implies fine-tuning) or a save_pretrained folder. ``mode``: ``"auto"``
    (zero-shot for a folder, fine-tune for a name), ``"zero_shot"`` or ``"finetune"``. ``context_lengths``: horizon ->
    context (default :data:`DEFAULT_CONTEXTS`; an int uses one context for every horizon). ``max_windows``: evaluate
    this many evenly spaced test windows per horizon (``None``: all of them, stride 1). ``train_window``: points per
    Time-MoE training window (default: longest context + longest horizon, capped at ``max_position_embeddings``).
    ``threads``: torch intra-op threads for the run (``None``: leave as is; 1 is fastest for tiny models on a CPU).
    ``normalize``: z-score each Time-MoE / dense input window by its own statistics (training windows and forecast
    contexts; the paper's zero-shot inference); off by default, as in Time-MoE's ``run_eval.py`` on scaled data.
    ``pretrained``: ``{label: folder}`` (or ``"label=folder"`` strings) evaluated zero-shot beside the others;
    ``{seed}`` in a folder is replaced by ``seed``. ``dlinear_steps`` / ``dlinear_batch_size``: DLinear's own budget
    (default: ``steps`` / ``batch_size``; DLinear is cheap, so it can be trained to convergence beside a small budget).
    """

    csv: str
    output_dir: str = "outputs/eval_time_moe"
    model: str = "time_moe_tiny_e4k2"
    tiny: bool = False
    mode: str = "auto"
    horizons: tuple = DEFAULT_HORIZONS
    context_lengths: dict | int | None = None
    baselines: tuple = BASELINES
    steps: int = 400
    batch_size: int = 32
    learning_rate: float = 3e-3
    dlinear_learning_rate: float = 5e-3
    dlinear_steps: int | None = None
    dlinear_batch_size: int | None = None
    weight_decay: float = 0.1
    train_window: int | None = None
    train_stride: int = 1
    max_windows: int | None = None
    eval_batch_size: int = 64
    normalize: bool = False
    season_length: int | None = None
    plot_windows: int = 3
    plot_channel: int = -1
    protocol: str = "auto"
    seed: int = 0
    progress: bool = True
    threads: int | None = None
    pretrained: dict | tuple = ()

    def __post_init__(self):
        pre = self.pretrained
        if not isinstance(pre, dict):
            items = {}
            for text in pre:
                if "=" not in str(text):
                    raise ValueError(f"pretrained entries are 'label=folder', got {text!r}")
                label, folder = str(text).split("=", 1)
                items[label.strip()] = folder.strip()
            pre = items
        clash = sorted(set(pre) & {"time_moe", "dense", "dlinear", "seasonal_naive"})
        if clash or any(not k for k in pre):
            raise ValueError(f"pretrained labels must be non-empty and differ from the built-in models, got {clash}")
        self.pretrained = dict(pre)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        self.horizons = tuple(int(h) for h in self.horizons)
        if not self.horizons or any(h < 1 for h in self.horizons):
            raise ValueError(f"horizons must be positive ints, got {self.horizons!r}")
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
        self.baselines = tuple(self.baselines)
        for name in ("dlinear_steps", "dlinear_batch_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        for name in ("steps", "batch_size", "train_stride", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        ctx = self.context_lengths
        if ctx is None:
            missing = [h for h in self.horizons if h not in DEFAULT_CONTEXTS]
            if missing:
                raise ValueError(f"no default context for horizon(s) {missing}; pass context_lengths")
            ctx = {h: DEFAULT_CONTEXTS[h] for h in self.horizons}
        elif isinstance(ctx, int):
            ctx = {h: ctx for h in self.horizons}
        else:
            ctx = {int(k): int(v) for k, v in dict(ctx).items()}
            missing = [h for h in self.horizons if h not in ctx]
            if missing:
                raise ValueError(f"context_lengths has no entry for horizon(s) {missing}")
        if any(c < 1 for c in ctx.values()):
            raise ValueError(f"context lengths must be positive, got {ctx}")
        self.context_lengths = {h: ctx[h] for h in self.horizons}

    def context(self, horizon: int) -> int:
        return self.context_lengths[horizon]


def fast_config(csv: str, output_dir: str, **overrides) -> BenchmarkConfig:
    """The ``--fast`` CI subset: horizon 96, context 96, 16 test windows, 10 training steps of 8 windows."""
    kw = dict(csv=csv, output_dir=output_dir, horizons=(96,), context_lengths=96, max_windows=16, steps=10,
              batch_size=8, train_window=192, plot_windows=2, train_stride=4)
    kw.update(overrides)
    return BenchmarkConfig(**kw)


# --------------------------------------------------------------------------------------------------------- plots
def _figure(**kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def save_forecast_plot(path, windows: list[dict], title: str = "", max_context_shown: int | None = None) -> str:
    """PNG with one panel per window: ``{"context": (T,), "truth": (H,), "forecasts": {name: (H,)}, "label": str}``."""
    if not windows:
        raise ValueError("save_forecast_plot needs at least one window")
    fig = _figure(figsize=(11.5, 2.6 * len(windows)))
    axes = fig.subplots(len(windows), 1, squeeze=False)[:, 0]
    for ax, w in zip(axes, windows):
        ctx = np.asarray(w["context"])
        truth = np.asarray(w["truth"])
        H = len(truth)
        show = min(len(ctx), max_context_shown or 2 * H)
        t_ctx = np.arange(-show, 0)
        ax.plot(t_ctx, ctx[-show:], color="0.35", lw=1.0, label="context")
        ax.plot(np.arange(H), truth, color="black", lw=1.4, label="truth")
        for name, f in w["forecasts"].items():
            ax.plot(np.arange(H), np.asarray(f), lw=1.1, label=name)
        ax.axvline(0, color="0.6", lw=0.8, ls="--")
        ax.set_title(w.get("label", ""), fontsize=9)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes[-1].set_xlabel("time step (0 = first forecast point)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return str(path)


def save_expert_load(model, contexts: torch.Tensor, path, title: str = "") -> dict:
    """Run ``model`` on ``contexts`` (N, T) and save the per-layer expert-load heatmap; returns the load summary."""
    from ...core.stats import RoutingStats

    stats = RoutingStats(keep_history=False)
    model.eval()
    with torch.no_grad():
        for lo in range(0, contexts.shape[0], 64):
            out = model(input_ids=contexts[lo:lo + 64].to(model.device, model.dtype), use_cache=False)
            for i, ro in enumerate(out.router_outputs or ()):
                if ro is not None:
                    stats.update(f"layer {i}", ro)
    if not len(stats):
        return {}
    stats.save_heatmap(path, title=title or "expert load on test windows")
    return stats.summary()


# --------------------------------------------------------------------------------------------------------- run
def _trainer_cfg(cfg: BenchmarkConfig, out: Path, lr: float, weight_decay: float, steps: int | None = None,
                 batch_size: int | None = None) -> dict:
    steps = steps or cfg.steps
    return dict(output_dir=str(out), max_steps=steps, batch_size=batch_size or cfg.batch_size, learning_rate=lr,
                weight_decay=weight_decay, warmup_steps=min(100, max(1, steps // 10)), lr_schedule="cosine",
                min_lr_ratio=0.1, grad_clip=1.0, mixed_precision="auto", save_every=None, keep_last=1,
                log_every=max(1, min(50, steps // 10)), seed=cfg.seed, resume="never",
                overwrite_output_dir=True, progress_bar=cfg.progress)


def _params(model) -> dict:
    if hasattr(model, "parameter_summary"):
        s = model.parameter_summary()
        return {"total": int(s["total"]), "active": int(s["active"])}
    n = sum(p.numel() for p in model.parameters())
    return {"total": n, "active": n}


def run_benchmark(cfg: BenchmarkConfig, printer=print) -> dict:
    """Train (as configured) and evaluate every model on every horizon; write the table, JSON and PNGs."""
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_benchmark(cfg, printer)
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(cfg: BenchmarkConfig, printer) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    table = load_table(cfg.csv)
    C = table.num_channels
    season = cfg.season_length or infer_season_length(table.dates, table.values[: table.num_rows // 2])
    max_ctx, max_h = max(cfg.context_lengths.values()), max(cfg.horizons)
    base = make_splits(table, context_length=max_ctx, protocol=cfg.protocol)   # train rows do not depend on ctx
    printer(f"data: {table.name}, {table.num_rows} rows x {C} channels, protocol {base.protocol}, "
            f"train/val/test borders {base.borders}, season length {season}")

    # ---- the Time-MoE model: zero-shot or trained with the recipe code
    is_folder = Path(cfg.model).is_dir()
    mode = cfg.mode if cfg.mode != "auto" else ("zero_shot" if is_folder else "finetune")
    if mode == "zero_shot" and not is_folder:
        raise ValueError(f"zero-shot mode needs a save_pretrained folder, got {cfg.model!r} (not a folder)")
    model_cfg = {"init_from": cfg.model} if is_folder else {"name": cfg.model, "tiny": cfg.tiny}
    moe = build_model(model_cfg)
    mpe = moe.config.max_position_embeddings
    too_long = [h for h in cfg.horizons if cfg.context(h) > mpe]
    if too_long:
        raise ValueError(f"context for horizon(s) {too_long} exceeds the model's max_position_embeddings={mpe}")
    train_window = min(cfg.train_window or (max_ctx + max_h), mpe)
    if train_window + 1 > base.train.shape[0]:
        raise ValueError(f"train_window {train_window} is longer than the train split ({base.train.shape[0]} rows)")
    ts_train = TimeSeriesWindowDataset(base.train, window_length=train_window, stride=cfg.train_stride,
                                       normalize=cfg.normalize)
    records = {"time_moe": {"model": moe, "mode": mode, "init": "pretrained" if is_folder else "scratch",
                            "params": _params(moe), "train": None}}

    def fit_time_moe(name, model):
        t = time.time()
        printer(f"training {name}: {cfg.steps} steps x {cfg.batch_size} windows of {train_window} points "
                f"({len(ts_train)} windows in the train split)")
        if getattr(model.config, "context_window", None) is None:   # trained on windows of train_window points:
            model.config.context_window = train_window               # forecasts roll on within them (checkpoints too)
        trainer, res = train_model(model, ts_train, _trainer_cfg(cfg, out / "train" / name, cfg.learning_rate,
                                                                 cfg.weight_decay))
        return {"steps": res["step"], "loss_first": res["losses"][0], "loss_last": res["losses"][-1],
                "seconds": round(time.time() - t, 1), "checkpoint": res["checkpoint"], "window": train_window,
                "routing_plots": res["routing_plots"]}

    if mode == "finetune":
        records["time_moe"]["train"] = fit_time_moe("time_moe", moe)
    for label, folder in cfg.pretrained.items():
        folder = str(folder).replace("{seed}", str(cfg.seed))
        zs = build_model({"init_from": folder})
        records[label] = {"model": zs, "mode": "zero_shot", "init": f"pretrained ({folder})", "params": _params(zs),
                          "train": None, "normalize": True}
        printer(f"zero-shot {label}: {folder} ({_params(zs)['total']} parameters)")
    if "dense" in cfg.baselines:
        from . import MoezooTimeMoeForPrediction, dense_config_like

        dense = MoezooTimeMoeForPrediction(dense_config_like(moe.config))
        records["dense"] = {"model": dense, "mode": "trained", "init": "scratch", "params": _params(dense),
                            "train": fit_time_moe("dense", dense)}

    # ---- evaluation per horizon
    rows, plots = [], {}
    routing = {}
    for h in cfg.horizons:
        ctx = cfg.context(h)
        splits = make_splits(table, context_length=ctx, protocol=cfg.protocol)
        test = ForecastWindowDataset(splits.test, ctx, h, max_windows=cfg.max_windows)
        n_plot = min(cfg.plot_windows, len(test))
        keep = sorted(set(np.linspace(0, len(test) - 1, n_plot).round().astype(int).tolist())) if n_plot else []
        printer(f"horizon {h}: context {ctx}, {len(test)} test windows x {C} channels")
        predictors = {}
        for name, rec in records.items():
            if "model" in rec:
                predictors[name] = time_moe_predictor(rec["model"], h, normalize=rec.get("normalize", cfg.normalize),
                                                      batch_size=cfg.eval_batch_size * C)
        if "dlinear" in cfg.baselines:
            t = time.time()
            torch.manual_seed(cfg.seed)
            dl = DLinear(ctx, h)
            dl_train = ForecastWindowDataset(splits.train, ctx, h, channel_independent=True)
            dl_steps, dl_bs = cfg.dlinear_steps or cfg.steps, cfg.dlinear_batch_size or cfg.batch_size
            printer(f"training dlinear (context {ctx}, horizon {h}): {dl_steps} steps x {dl_bs} windows")
            _, res = train_model(dl, dl_train, _trainer_cfg(cfg, out / "train" / f"dlinear_h{h}",
                                                            cfg.dlinear_learning_rate, 0.0, dl_steps, dl_bs),
                                 loss_fn=dlinear_loss, routing_stats=False)
            dl.eval()
            records[f"dlinear_h{h}"] = {"params": _params(dl), "train": {
                "steps": res["step"], "loss_first": res["losses"][0], "loss_last": res["losses"][-1],
                "seconds": round(time.time() - t, 1), "checkpoint": res["checkpoint"]}}
            predictors["dlinear"] = lambda x, dl=dl: dl(x.to(torch.float32).to(dl.linear_trend.weight.device))
        if "seasonal_naive" in cfg.baselines:
            predictors["seasonal_naive"] = lambda x, h=h: seasonal_naive(x, h, min(season, x.shape[-1]))
        kept_all = {}
        for name, pred in predictors.items():
            t = time.time()
            m, kept = evaluate_forecaster(pred, test, batch_size=cfg.eval_batch_size, keep=keep,
                                          desc=f"{name} h{h}", progress=cfg.progress)
            kept_all[name] = kept
            rec = records.get(name) or records.get(f"{name}_h{h}") or {}
            train = rec.get("train")
            rows.append({"model": name, "mode": rec.get("mode", "trained" if train else "none"),
                         "init": rec.get("init", "scratch" if train else "-"), "horizon": h, "context": ctx,
                         "mse": m["mse"], "mae": m["mae"], "mse_per_channel": m["mse_per_channel"],
                         "mae_per_channel": m["mae_per_channel"], "windows": len(test),
                         "params": rec.get("params", {"total": 0, "active": 0}),
                         "train_steps": train["steps"] if train else 0,
                         "train_seconds": train["seconds"] if train else 0.0,
                         "eval_seconds": round(time.time() - t, 1)})
            printer(f"  {name:>15}: MSE {m['mse']:.4f}  MAE {m['mae']:.4f}")
        if keep:
            ch = cfg.plot_channel % C
            windows = []
            for i in keep:
                item = test[i]
                windows.append({"context": item["inputs"][ch].numpy(), "truth": item["labels"][ch].numpy(),
                                "forecasts": {n: kept_all[n][i][ch] for n in predictors},
                                "label": f"test window {i} (rows from {int(item['start'])}), channel "
                                         f"{table.columns[ch]}"})
            plots[f"forecast_h{h}"] = save_forecast_plot(out / f"forecast_h{h}.png", windows,
                                                         title=f"{table.name}: horizon {h}, context {ctx}")
        if not routing and moe.config.use_dense is False:
            probe = torch.stack([test[i]["inputs"] for i in range(min(len(test), 16))]).reshape(-1, ctx)
            routing = save_expert_load(moe, probe, out / "expert_load.png",
                                       title=f"expert load, {probe.shape[0]} test series")
            if routing:
                plots["expert_load"] = str(out / "expert_load.png")

    for name, rec in records.items():
        if rec.get("train") and rec["train"].get("routing_plots"):
            plots[f"train_routing_{name}"] = rec["train"]["routing_plots"]
    result = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "mode": mode,
        "data": {"name": table.name, "rows": table.num_rows, "channels": table.columns, "protocol": base.protocol,
                 "season_length": season, "train_rows": int(base.train.shape[0]), "dates": base.dates},
        "train": {k: v["train"] for k, v in records.items() if v.get("train")},
        "results": rows, "plots": plots,
        "routing": {k: v for k, v in routing.items()} if routing else None,
        "seconds": round(time.time() - t_start, 1),
    }
    md = markdown_table(rows, title=f"{table.name} ({base.protocol} splits), mode: {mode}")
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    result["markdown"] = md
    printer(md)
    printer(f"wrote {out / 'results.md'}, {out / 'results.json'} and {len(plots)} plot entries "
            f"in {result['seconds']} s")
    return result


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _fmt_params(p: dict) -> str:
    def f(n):
        return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)

    if not p or not p.get("total"):
        return "0"
    return f(p["total"]) if p["total"] == p["active"] else f"{f(p['total'])} ({f(p['active'])} active)"


def markdown_table(rows: list[dict], title: str = "") -> str:
    """The results as a markdown table (one row per model and horizon; best MSE per horizon in bold)."""
    best = {}
    for r in rows:
        if not math.isnan(r["mse"]):
            best[r["horizon"]] = min(best.get(r["horizon"], math.inf), r["mse"])
    lines = [f"### {title}", ""] if title else []
    lines += ["| model | init | params | horizon | context | MSE | MAE | test windows | train steps | train s "
              "| eval s |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mse = f"{r['mse']:.4f}"
        if r["mse"] == best.get(r["horizon"]):
            mse = f"**{mse}**"
        lines.append(f"| {r['model']} | {r['init']} | {_fmt_params(r['params'])} | {r['horizon']} | {r['context']} | "
                     f"{mse} | {r['mae']:.4f} | {r['windows']} | {r['train_steps']} | {r['train_seconds']} | "
                     f"{r['eval_seconds']} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------- seeds
def aggregate_seeds(per_seed: list[list[dict]]) -> list[dict]:
    """Mean and sample std (ddof=1; 0 for one seed) over seeds of every (model, horizon) row's MSE / MAE."""
    groups: dict = {}
    for rows in per_seed:
        for r in rows:
            groups.setdefault((r["model"], r["horizon"]), []).append(r)
    out = []
    for (model, h), rs in groups.items():
        agg = {"model": model, "horizon": h, "seeds": len(rs), "init": rs[0]["init"], "mode": rs[0]["mode"],
               "context": rs[0]["context"], "windows": rs[0]["windows"], "params": rs[0]["params"],
               "train_steps": rs[0]["train_steps"],
               "train_seconds": round(float(np.mean([r["train_seconds"] for r in rs])), 1),
               "eval_seconds": round(float(np.mean([r["eval_seconds"] for r in rs])), 1)}
        for key in ("mse", "mae"):
            vals = [float(r[key]) for r in rs]
            agg[key], agg[f"{key}_std"] = mean_std(vals)
            agg[f"{key}_per_seed"] = vals
        out.append(agg)
    return out


def markdown_table_seeds(rows: list[dict], title: str = "") -> str:
    """:func:`aggregate_seeds` rows as a markdown table, MSE / MAE as mean ± std (best mean MSE per horizon bold)."""
    best = {}
    for r in rows:
        if not math.isnan(r["mse"]):
            best[r["horizon"]] = min(best.get(r["horizon"], math.inf), r["mse"])
    lines = [f"### {title}", ""] if title else []
    lines += ["| model | init | params | horizon | context | MSE | MAE | seeds | test windows | train steps | train s |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["horizon"]):
        mse = format_mean_std([r["mse"]] if r["seeds"] == 1 else {"mean": r["mse"], "std": r["mse_std"], "n": r["seeds"],
                                                                   "values": r["mse_per_seed"]}, 4)
        mae = format_mean_std([r["mae"]] if r["seeds"] == 1 else {"mean": r["mae"], "std": r["mae_std"], "n": r["seeds"],
                                                                   "values": r["mae_per_seed"]}, 4)
        if r["mse"] == best.get(r["horizon"]):
            mse = f"**{mse}**"
        init = r["init"].split(" (")[0]
        lines.append(f"| {r['model']} | {init} | {_fmt_params(r['params'])} | {r['horizon']} | {r['context']} | {mse} "
                     f"| {mae} | {r['seeds']} | {r['windows']} | {r['train_steps']} "
                     f"| {r['train_seconds']} |")
    return "\n".join(lines) + "\n"


def run_benchmark_seeds(cfg: BenchmarkConfig, seeds, printer=print) -> dict:
    """:func:`run_benchmark` once per seed (in ``output_dir/seed<k>``), then mean ± std over seeds."""
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct ints, got {seeds!r}")
    out = Path(cfg.output_dir)
    t0 = time.time()
    runs = []
    # a pretrained folder without {seed} gives the same forecasts every seed (no training, greedy decoding):
    # evaluate it in the first seed only and reuse its rows
    fixed = {k for k, v in cfg.pretrained.items() if "{seed}" not in str(v)}
    for i, s in enumerate(seeds):
        printer(f"===== seed {s} =====")
        pre = cfg.pretrained if i == 0 else {k: v for k, v in cfg.pretrained.items() if k not in fixed}
        runs.append(run_benchmark(dataclasses.replace(cfg, seed=s, output_dir=str(out / f"seed{s}"), pretrained=pre),
                                  printer))
    first_fixed = [r for r in runs[0]["results"] if r["model"] in fixed]
    rows = aggregate_seeds([r["results"] if i == 0 else r["results"] + first_fixed for i, r in enumerate(runs)])
    name = runs[0]["data"]["name"]
    md = markdown_table_seeds(rows, title=f"{name} ({runs[0]['data']['protocol']} splits), seeds {seeds}, mean ± std")
    result = {"seeds": seeds, "results": rows, "per_seed": [str(out / f"seed{s}") for s in seeds],
              "data": runs[0]["data"], "config": runs[0]["config"], "seconds": round(time.time() - t0, 1),
              "markdown": md}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({k: v for k, v in result.items() if k != "markdown"}, indent=2,
                                                 default=_json_default) + "\n")
    printer(md)
    printer(f"wrote {out / 'results.md'} and {out / 'results.json'} ({result['seconds']} s for {len(seeds)} seeds)")
    return result
