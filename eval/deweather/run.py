"""Deweather benchmark: PSNR / SSIM per weather type (degraded input vs each model), triptych PNGs, and parameters +
CPU inference time of MoFME vs the conventional MoE at equal expert count (savings in %, as the MoFME paper reports).

    # train tiny MoFME and tiny conventional MoE at the same budget, then evaluate and compare (CPU, minutes)
    python eval/deweather/run.py --train --output-dir runs/deweather/bench
    # the same over 3 seeds: mean ± std per weather type
    python eval/deweather/run.py --train --seeds 0 1 2 --output-dir runs/deweather/bench3
    # evaluate trained folders (a recipe's <output_dir>/model or a checkpoint)
    python eval/deweather/run.py --model mofme=runs/deweather/tiny_mofme/model --model moe=runs/deweather/tiny_moe/model
    # on the All-Weather test sets (test_snow / test_rain / test_raindrop under ROOT), whole images resized
    python eval/deweather/run.py --model runs/x/model --data-root /data/allweather --resize 480 720
    # CI smoke test (seconds): tiny data, 2 training steps, parameter counts of the _s_ configs without timing them
    python eval/deweather/run.py --fast --output-dir /tmp/dew-fast

Outputs ``results.md`` + ``results.json`` + ``triptychs/*.png`` in ``--output-dir``. Logic:
:mod:`moezoo.models.deweather.harness`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "deweather" / "configs"
FAST = {  # CI: a few source photos, small crops, the registry's tiny= models, 2 steps
    "data": {"photo_size": 64, "crop_size": 32, "train_variants": 1, "train_crops": 4, "test_crops": 1,
             "max_photos": 2},
    "trainer": {"max_steps": 2, "batch_size": 4, "warmup_steps": 1, "save_every": None, "log_every": 1,
                "eval_every": None, "progress_bar": False},
    "eval": {"triptychs": 0},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], metavar="[LABEL=]DIR",
                   help="a trained model folder to evaluate (repeatable)")
    p.add_argument("--train", action="store_true",
                   help="train tiny MoFME and tiny conventional MoE at an equal budget first (see --train-config)")
    p.add_argument("--train-config", action="append", default=[], metavar="[LABEL=]YAML",
                   help=f"recipe configs for --train (default: {CONFIGS}/tiny_mofme.yaml and tiny_moe.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="key.sub=value",
                   help="override applied to every --train config, e.g. --set trainer.max_steps=100")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="train every --train config once per seed (trainer.seed) and report mean ± std")
    p.add_argument("--output-dir", default="runs/deweather/benchmark")
    p.add_argument("--data-root", default=None, help="All-Weather root (test_snow/, test_rain/, test_raindrop/ ...) "
                   "or, with --image-folder, a folder of clean photos; default: the built-in multi-weather set")
    p.add_argument("--image-folder", action="store_true", help="--data-root is a folder of clean photos to degrade")
    p.add_argument("--resize", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="resize All-Weather images first (MoFME: 480 720)")
    p.add_argument("--cache-dir", default=None, help="where the built-in set is cached (default ~/.cache/moezoo)")
    p.add_argument("--max-items", type=int, default=None, help="evaluate on at most this many test samples")
    p.add_argument("--speed-pairs", choices=["s", "tiny", "none"], default="s",
                   help="registered MoFME/MoE pairs to count and time (s: E=4/8/16 _s_ configs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the CPU timings")
    p.add_argument("--repeats", type=int, default=10, help="forwards per model for the median CPU time")
    p.add_argument("--triptychs", type=int, default=4)
    p.add_argument("--fast", action="store_true", help="CI mode: tiny data and models, 2 training steps, no _s_ timing")
    return p.parse_args(argv)


def _labelled(items: list[str], default_prefix: str) -> dict[str, str]:
    out = {}
    for i, it in enumerate(items):
        label, _, path = it.rpartition("=")
        out[label or (Path(path).parent.name if Path(path).name in ("model",) else Path(path).name) or
            f"{default_prefix}{i}"] = path
    return out


def main(argv=None) -> dict:
    from moezoo.models.deweather import harness
    from moezoo.trainer import apply_overrides, load_yaml_config

    a = parse_args(argv)
    if a.fast:
        a.train = a.train or not a.model
        a.repeats = min(a.repeats, 3)
        a.triptychs = min(a.triptychs, 2)
    train_cfgs = {}
    if a.train or a.train_config:
        paths = a.train_config or [f"mofme={CONFIGS / 'tiny_mofme.yaml'}", f"moe={CONFIGS / 'tiny_moe.yaml'}"]
        for label, path in _labelled(paths, "train").items():
            cfg = load_yaml_config(path)
            cfg.setdefault("trainer", {})["output_dir"] = str(Path(a.output_dir) / "train" / label)
            if a.cache_dir:
                cfg.setdefault("data", {})["cache_dir"] = a.cache_dir
            if a.fast:
                for sec, vals in harness_fast(cfg).items():
                    cfg.setdefault(sec, {}).update(vals)
            apply_overrides(cfg, a.set)
            train_cfgs[label] = cfg
    data = None
    if a.data_root:
        data = {"source": "folder" if a.image_folder else "allweather", "root": a.data_root,
                "resize": list(a.resize) if a.resize else None}
    elif a.fast or a.cache_dir:
        data = dict(next(iter(train_cfgs.values()))["data"]) if train_cfgs else dict(FAST["data"]) if a.fast else {}
        if a.cache_dir:
            data["cache_dir"] = a.cache_dir
    pairs = {"s": harness.S_PAIRS, "tiny": harness.TINY_PAIRS, "none": []}[a.speed_pairs]
    return harness.run_benchmark(output_dir=a.output_dir, models=_labelled(a.model, "model"),
                                 train_configs=train_cfgs, data=data, fast=a.fast, speed_pairs=pairs,
                                 speed_repeats=a.repeats, threads=a.threads, triptychs=a.triptychs,
                                 max_items=a.max_items, seeds=a.seeds)


def harness_fast(cfg: dict) -> dict:
    """The --fast overrides for one training config (the registry's tiny= model, tiny data, 2 steps)."""
    fast = {k: dict(v) for k, v in FAST.items()}
    fast["model"] = {"tiny": True}
    return fast


if __name__ == "__main__":
    main(sys.argv[1:])
