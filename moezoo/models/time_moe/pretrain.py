"""Pretrain a Time-MoE on the offline corpus (:mod:`moezoo.models.time_moe.corpus`); what
``training/time_moe/pretrain.py`` runs.

The corpus is every offline series that is not ETT (ETT files given in ``exclude_csv`` are removed by content too).
A fixed 2 % of the series (whole series) is held out for the validation curve. Training: packed, per-chunk z-scored
windows, Huber loss over every horizon head with packing-boundary masking (:func:`packed_loss`) + balance loss,
AdamW with warm-up and cosine decay, the shared :class:`moezoo.trainer.Trainer`.

Outputs in ``output_dir``: ``model/`` (``save_pretrained``: config.json + model.safetensors), ``curve.json`` (train
loss per step, validation loss every ``eval_every`` steps, seconds, tokens), ``curve.png``, ``corpus.json`` (what
was used and dropped), ``train/`` (Trainer log and routing plots).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .corpus import SOURCES, PackedWindowDataset, build_corpus, kernel_synth, packed_loss, split_corpus

__all__ = ["PretrainConfig", "run_pretrain", "validation_loss", "save_curves_plot", "default_exclude"]


def default_exclude() -> list[str]:
    """Every ETT csv in ``../shared/data/ett`` (the evaluation sets)."""
    from .recipe import default_shared_dir

    d = default_shared_dir() / "data" / "ett"
    return sorted(str(p) for p in d.glob("ETT*.csv")) if d.is_dir() else []


@dataclass
class PretrainConfig:
    """Settings of :func:`run_pretrain` (the flags of ``training/time_moe/pretrain.py``)."""

    output_dir: str = "outputs/time_moe_pretrain"
    model: str = "time_moe_tiny_e4k2"
    tiny: bool = False
    overrides: dict = field(default_factory=dict)
    sources: tuple = tuple(SOURCES)
    exclude_csv: tuple | None = None          # None: default_exclude()
    window_length: int = 512
    stride: int | None = None
    steps: int = 600
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    val_fraction: float = 0.02
    eval_every: int = 50
    max_val_windows: int = 64
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    synthetic_series: int = 0                 # KernelSynth series added to the training part only (never held out)
    synthetic_length: int = 1026
    synthetic_seed: int = 0
    stats_fraction: float = 1.0               # z-score each chunk by its first fraction (PackedWindowDataset)
    save_every: int | None = None             # also keep a checkpoint (train/checkpoint-<step>/) every this many steps

    def __post_init__(self):
        if not isinstance(self.synthetic_series, int) or self.synthetic_series < 0:
            raise ValueError(f"synthetic_series must be an int >= 0, got {self.synthetic_series!r}")
        for name in ("window_length", "steps", "batch_size", "eval_every", "max_val_windows"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        unknown = sorted(set(self.sources) - set(SOURCES))
        if unknown:
            raise ValueError(f"unknown source(s) {unknown}; choose from {sorted(SOURCES)}")


def validation_loss(model, dataset, batch_size: int = 32, max_windows: int | None = None) -> dict:
    """Mean :func:`packed_loss` (Huber over the heads, no balance term) over the first ``max_windows`` windows."""
    n = len(dataset) if max_windows is None else min(len(dataset), max_windows)
    was = model.training
    model.eval()
    tot, count, per = 0.0, 0, {}
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            items = [dataset[i] for i in range(lo, min(n, lo + batch_size))]
            batch = {k: torch.stack([it[k] for it in items]).to(model.device) for k in items[0]}
            _, logs = packed_loss(model, batch)
            huber = [v for k, v in logs.items() if k.startswith("huber_")]
            tot += float(np.mean(huber)) * len(items)
            count += len(items)
            for k, v in logs.items():
                if k.startswith("huber_"):
                    per[k] = per.get(k, 0.0) + v * len(items)
    model.train(was)
    return {"val_loss": tot / max(count, 1), **{f"val_{k}": v / max(count, 1) for k, v in per.items()}}


def _smooth(y, k: int = 20):
    y = np.asarray(y, dtype=np.float64)
    if len(y) < k:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    return np.concatenate([y[: k - 1], (c[k:] - c[:-k]) / k])


def save_curves_plot(curves: dict, path, title: str = "") -> str:
    """PNG of training (smoothed) and validation loss against training points seen, one colour per run
    (``curves``: label -> curve.json dict)."""
    from .benchmark import _figure

    fig = _figure(figsize=(9, 4))
    ax = fig.subplots()
    for i, (label, c) in enumerate(curves.items()):
        col = f"C{i}"
        tok = c["tokens_per_step"]
        steps = np.arange(1, len(c["train_loss"]) + 1)
        ax.plot(steps * tok, _smooth(c["train_loss"]), color=col, lw=0.8, alpha=0.5, label=f"{label} train")
        if c["val"]:
            ax.plot([v["step"] * tok for v in c["val"]], [v["val_loss"] for v in c["val"]], color=col, lw=1.8,
                    marker="o", ms=3, label=f"{label} held-out series")
    ax.set_xlabel("training points seen")
    ax.set_ylabel("Huber loss (mean over horizon heads)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return str(path)


def run_pretrain(cfg: PretrainConfig, printer=print) -> dict:
    """Build the corpus, pretrain, save ``model/``, the curves and the corpus report; returns the summary dict."""
    import moezoo
    from ...data.timeseries import load_table
    from ...trainer import seed_everything
    from .recipe import train_model

    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        exclude_paths = list(cfg.exclude_csv) if cfg.exclude_csv is not None else default_exclude()
        exclude = [load_table(p).values for p in exclude_paths]
        corpus = build_corpus(sources=cfg.sources, exclude=exclude, printer=printer)
        train_c, val_c = split_corpus(corpus, cfg.val_fraction, seed=0)   # fixed held-out series for every run
        synth = kernel_synth(cfg.synthetic_series, cfg.synthetic_length, seed=cfg.synthetic_seed)
        if synth:
            printer(f"kernelsynth: {len(synth)} synthetic series x {cfg.synthetic_length} points added to training "
                    f"({time.time() - t0:.0f} s)")
        train_ds = PackedWindowDataset(list(train_c.series) + synth, cfg.window_length, stride=cfg.stride,
                                       stats_fraction=cfg.stats_fraction)
        val_ds = PackedWindowDataset(val_c.series, cfg.window_length)
        printer(f"corpus built in {time.time() - t0:.0f} s: {len(train_c.series)} train series -> {len(train_ds)} "
                f"packed windows of {cfg.window_length} (fill {train_ds.fill:.3f}); {len(val_c.series)} held-out "
                f"series -> {len(val_ds)} windows; excluded files {exclude_paths}")
        info = {"summary": corpus.summary(), "exclude_csv": exclude_paths,
                "train_series": len(train_c.series), "val_series": [s.name for s in val_c.series],
                "synthetic": {"source": "kernelsynth", "series": len(synth), "length": cfg.synthetic_length,
                              "points": int(sum(len(s) for s in synth)), "seed": cfg.synthetic_seed,
                              "train_only": True},
                "train_windows": len(train_ds), "val_windows": len(val_ds), "fill": train_ds.fill}
        (out / "corpus.json").write_text(json.dumps(info, indent=1) + "\n")

        seed_everything(cfg.seed)
        model = moezoo.create_model(cfg.model, tiny=cfg.tiny, **dict(cfg.overrides))
        if cfg.window_length > model.config.max_position_embeddings:
            raise ValueError(f"window_length {cfg.window_length} exceeds max_position_embeddings "
                             f"{model.config.max_position_embeddings}")
        params = model.parameter_summary()
        printer(f"model {cfg.model}{' (tiny)' if cfg.tiny else ''} {dict(cfg.overrides)}: {params['total']} params "
                f"({params['active']} active); {cfg.steps} steps x {cfg.batch_size} windows")

        def eval_fn(m, step):
            r = validation_loss(m, val_ds, max_windows=cfg.max_val_windows)
            printer(f"  step {step}: held-out loss {r['val_loss']:.4f} ({time.time() - t0:.0f} s)")
            return r

        tcfg = dict(output_dir=str(out / "train"), max_steps=cfg.steps, batch_size=cfg.batch_size,
                    learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, adam_beta2=0.95,
                    warmup_steps=cfg.warmup_steps, lr_schedule="cosine", min_lr_ratio=cfg.min_lr_ratio,
                    grad_clip=1.0, mixed_precision="auto", save_every=cfg.save_every, keep_last=1, save_final=False,
                    log_every=max(1, min(25, cfg.steps // 10)), eval_every=cfg.eval_every, seed=cfg.seed,
                    resume="never", overwrite_output_dir=True, progress_bar=cfg.progress)
        t1 = time.time()
        _, res = train_model(model, train_ds, tcfg, eval_fn=eval_fn, loss_fn=packed_loss)
        seconds = time.time() - t1
        model.eval()
        model.config.context_window = cfg.window_length   # forecasts roll on within the trained window length
        model.save_pretrained(str(out / "model"))
        curve = {"label": f"{cfg.model} {params['total'] / 1e6:.2f}M", "params": {k: int(params[k]) for k in
                                                                                   ("total", "active")},
                 "tokens_per_step": cfg.batch_size * cfg.window_length, "train_loss": res["losses"],
                 "val": res["eval_history"], "train_seconds": round(seconds, 1),
                 "config": dataclasses.asdict(cfg), "torch_threads": torch.get_num_threads()}
        (out / "curve.json").write_text(json.dumps(curve, indent=1, default=str) + "\n")
        save_curves_plot({curve["label"]: curve}, out / "curve.png", title=f"pretraining {cfg.model}")
        printer(f"pretrained in {seconds:.0f} s; final held-out loss {res['eval_history'][-1]['val_loss']:.4f}; "
                f"saved {out / 'model'}")
        return {"model_dir": str(out / "model"), "curve": curve, "corpus": info, "output_dir": str(out)}
    finally:
        torch.set_num_threads(threads)
