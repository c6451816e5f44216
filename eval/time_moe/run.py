"""Time-MoE long-horizon benchmark: Time-MoE vs dense (same active parameters) vs DLinear vs seasonal naive.

Standard protocol (Informer / Time-MoE): ETT splits 12/4/4 months (other files 70/10/20), scaler fit on train, every
stride-1 test window, MSE / MAE averaged over channels on the scaled data; horizons 96/192/336/720 with Time-MoE's
contexts 512/1024/2048/3072. Works on any CSV in the ETT layout (date column + one numeric column per channel).

Zero-shot (a save_pretrained folder, e.g. ``moezoo convert time_moe Maple728-TimeMoE-50M/ ./time_moe_50m``)::

    python eval/time_moe/run.py --model ./time_moe_50m --csv ../shared/data/ett/ETTh1.csv --steps 1000

Fine-tuned (train with the recipe code for a budget, then evaluate; a registry name starts from scratch)::

    python eval/time_moe/run.py --model time_moe_tiny_e4k2 --horizons 96 --context 96 --train-window 192 \
        --steps 400 --batch-size 32 --max-windows 700 --threads 1

CI / smoke test (seconds): ``python eval/time_moe/run.py --fast --tiny``.

Measured here (ETTh1, horizon 96, context 96, 700 evenly spaced test windows x 7 channels, every model trained from
scratch for 400 steps x 32 windows, one CPU thread, seed 0; Time-MoE/dense peak LR 3e-3, DLinear 5e-3):

    model                        params (active)   MSE (raw)  MSE (--normalize)
    time_moe_tiny_e4k2           0.37M (0.27M)     0.670      0.430
    dense, same active params    0.27M             0.668      0.467
    DLinear                      18.6k             0.389      -
    seasonal naive (24)          0                 0.512      0.512

Baselines (``--baselines``) are trained with the same ``--steps`` and ``--batch-size``. Writes ``results.md``,
``results.json``, ``forecast_h<H>.png`` and ``expert_load.png`` to ``--output-dir``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from moezoo.models.time_moe.benchmark import (BASELINES, BenchmarkConfig, fast_config, run_benchmark,  # noqa: E402
                                              run_benchmark_seeds)

DEFAULT_CSV = ROOT.parent / "shared" / "data" / "ett" / "ETTh1.csv"


def _contexts(text: str | None):
    """``512`` (every horizon) or ``96=512,192=1024``."""
    if text is None:
        return None
    if "=" not in text:
        return int(text)
    out = {}
    for part in text.split(","):
        h, c = part.split("=")
        out[int(h)] = int(c)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", default=None, help=f"ETT-layout CSV/parquet, e.g. ETTh1.csv of the ETDataset repository "
                   f"(zhouhaoyi/ETDataset, ETT-small/); default {DEFAULT_CSV}")
    p.add_argument("--model", default="time_moe_tiny_e4k2", help="registry name or save_pretrained folder")
    p.add_argument("--tiny", action="store_true", help="use the registry name's tiny variant")
    p.add_argument("--mode", choices=("auto", "zero_shot", "finetune"), default="auto",
                   help="auto: zero-shot for a folder, fine-tune for a registry name")
    p.add_argument("--horizons", type=int, nargs="+", default=None, help="default 96 192 336 720")
    p.add_argument("--context", default=None, help="context for every horizon (e.g. 512) or per horizon "
                   "(96=512,192=1024); default Time-MoE's 96->512, 192->1024, 336->2048, 720->3072")
    p.add_argument("--baselines", default=",".join(BASELINES), help=f"comma list from {','.join(BASELINES)} ('' none)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every trained model (default 400)")
    p.add_argument("--batch-size", type=int, default=None, help="training windows per step (default 32)")
    p.add_argument("--lr", type=float, default=None, help="Time-MoE / dense peak learning rate (default 3e-3)")
    p.add_argument("--dlinear-lr", type=float, default=None, help="DLinear learning rate (default 5e-3)")
    p.add_argument("--dlinear-steps", type=int, default=None, help="DLinear training steps (default --steps)")
    p.add_argument("--dlinear-batch-size", type=int, default=None, help="DLinear batch (default --batch-size)")
    p.add_argument("--train-window", type=int, default=None, help="Time-MoE training window length")
    p.add_argument("--train-stride", type=int, default=None, help="stride between Time-MoE training windows")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate this many evenly spaced test windows")
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--normalize", action="store_true",
                   help="z-score Time-MoE/dense training windows and forecast contexts per window")
    p.add_argument("--season-length", type=int, default=None, help="seasonal-naive period (default from the dates)")
    p.add_argument("--plot-windows", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run once per seed (output-dir/seed<k>) and report mean ± std over seeds")
    p.add_argument("--pretrained", nargs="*", default=[], metavar="LABEL=FOLDER",
                   help="save_pretrained folders evaluated zero-shot in the same run ({seed} -> the run's seed)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest for tiny models)")
    p.add_argument("--output-dir", default="outputs/eval_time_moe")
    p.add_argument("--fast", action="store_true", help="CI subset: horizon 96, context 96, 16 windows, 10 steps")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    csv = Path(args.csv) if args.csv else DEFAULT_CSV
    if not csv.is_file():
        raise SystemExit(f"error: --csv {str(csv)!r} does not exist. Pass an ETT-layout CSV (a 'date' column then the "
                         f"variables, e.g. ETT-small/ETTh1.csv from the ETDataset repository, zhouhaoyi/ETDataset on "
                         f"GitHub); beside a moezoo clone it is at ../shared/data/ett/ETTh1.csv")
    kw = {"model": args.model, "tiny": args.tiny, "mode": args.mode, "normalize": args.normalize,
          "seed": args.seed, "progress": not args.no_progress, "threads": args.threads,
          "baselines": tuple(b for b in args.baselines.split(",") if b), "pretrained": tuple(args.pretrained)}
    for key, val in (("horizons", args.horizons), ("context_lengths", _contexts(args.context)),
                     ("steps", args.steps), ("batch_size", args.batch_size), ("learning_rate", args.lr),
                     ("dlinear_learning_rate", args.dlinear_lr), ("dlinear_steps", args.dlinear_steps),
                     ("dlinear_batch_size", args.dlinear_batch_size), ("train_window", args.train_window),
                     ("train_stride", args.train_stride), ("max_windows", args.max_windows),
                     ("eval_batch_size", args.eval_batch_size), ("season_length", args.season_length),
                     ("plot_windows", args.plot_windows)):
        if val is not None:
            kw[key] = tuple(val) if key == "horizons" else val
    if args.fast:
        cfg = fast_config(str(csv), args.output_dir, **kw)
    else:
        cfg = BenchmarkConfig(csv=str(csv), output_dir=args.output_dir, **kw)
    if args.seeds:
        return run_benchmark_seeds(cfg, args.seeds)
    return run_benchmark(cfg)


if __name__ == "__main__":
    main()
