"""Closed-loop driving benchmark: Drive-π0 vs DriveMoE vs each MoE alone (+ IDM expert and idle baselines) in
highway-env, per scenario, mean ± std over training seeds; GIFs, camera-selection and expert-by-skill heatmaps.

    python eval/vla/run.py --out runs/vla_bench --steps 150 --train-seeds 0 1 2 --eval-seeds 100 101

The logic lives in :mod:`moezoo.models.vla.harness`.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> dict:
    import torch

    from moezoo.models.vla.harness import run_benchmark

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/vla_bench")
    p.add_argument("--model", default="drivemoe_tiny_e6k1")
    p.add_argument("--full", action="store_true", help="the full registry config instead of its tiny variant")
    p.add_argument("--variants", nargs="+", default=["drive_pi0", "drivemoe", "camera_moe", "action_moe"])
    p.add_argument("--scenarios", nargs="+", default=["highway", "merge", "roundabout", "intersection"])
    p.add_argument("--train-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--demo-seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--eval-seeds", nargs="+", type=int, default=[100, 101])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    return run_benchmark(output_dir=a.out, model=a.model, tiny=not a.full, variants=a.variants,
                         train_seeds=a.train_seeds, steps=a.steps, batch_size=a.batch_size, data_dir=a.data_dir,
                         scenarios=a.scenarios, demo_seeds=a.demo_seeds, eval_seeds=a.eval_seeds)


if __name__ == "__main__":
    main()
