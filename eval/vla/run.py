"""Closed-loop VLA benchmarks.

Driving (default): Drive-π0 vs DriveMoE vs each MoE alone (+ IDM expert and idle baselines) in highway-env, per
scenario, mean ± std over training seeds; GIFs, camera-selection and expert-by-skill heatmaps.

    python eval/vla/run.py --out runs/vla_bench --steps 800 --train-seeds 0 1 2 --eval-seeds 100 101

Robots (``--robots``): HiMoE-VLA on heterogeneous MuJoCo embodiments (Reacher 2-D / Pusher arm 7-D torques): dense vs
plain top-k vs HiMoE vs AS-MoE only vs HB-MoE only action experts at equal active parameters and budget (+ scripted
expert and idle baselines), success per embodiment / task on held-out seeds, mean ± std over training seeds; GIFs and
AS / HB expert-use heatmaps by embodiment and task.

    MUJOCO_GL=egl python eval/vla/run.py --robots --out runs/vla_robots --steps 100 --train-seeds 0 1 2

Re-evaluation (``--evaluate RUN_DIR``): the driving policies a benchmark saved, on other held-out seeds, no training:

    python eval/vla/run.py --evaluate runs/vla_bench --eval-seeds 100 101 102 103 104 105 106 107

The logic lives in :mod:`moezoo.models.vla.harness` and :mod:`moezoo.models.vla.robot_harness`.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> dict:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--robots", action="store_true", help="HiMoE-VLA on heterogeneous MuJoCo robots instead of driving")
    p.add_argument("--out", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--full", action="store_true", help="the full registry config instead of its tiny variant")
    p.add_argument("--variants", nargs="+", default=None)
    p.add_argument("--scenarios", nargs="+", default=["highway", "merge", "roundabout", "intersection"])
    p.add_argument("--embodiments", nargs="+", default=["reacher", "pusher"])
    p.add_argument("--train-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--demo-seeds", nargs="+", type=int, default=None)
    p.add_argument("--eval-seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--evaluate", default=None, metavar="RUN_DIR",
                   help="driving: evaluate the policies saved in RUN_DIR/runs/ again (with --eval-seeds), no training")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.robots:
        from moezoo.models.vla.robot_harness import run_robot_benchmark

        return run_robot_benchmark(output_dir=a.out or "runs/vla_robots", model=a.model or "himoe_vla_tiny_e8k2",
                                   tiny=not a.full, variants=a.variants or ["dense", "topk", "himoe", "as_only",
                                                                            "hb_only"],
                                   train_seeds=a.train_seeds, steps=a.steps or 100, batch_size=a.batch_size or 8,
                                   data_dir=a.data_dir, embodiments=a.embodiments,
                                   demo_seeds=a.demo_seeds or list(range(8)), eval_seeds=a.eval_seeds or [100, 101])
    if a.evaluate:
        from moezoo.models.vla.harness import evaluate_runs

        return evaluate_runs(a.evaluate, eval_seeds=a.eval_seeds or [100, 101], scenarios=a.scenarios,
                             output_dir=a.out)
    from moezoo.models.vla.harness import run_benchmark

    a.out, a.model = a.out or "runs/vla_bench", a.model or "drivemoe_tiny_e6k1"
    a.variants = a.variants or ["drive_pi0", "drivemoe", "camera_moe", "action_moe"]
    a.demo_seeds, a.eval_seeds = a.demo_seeds or [0, 1, 2, 3], a.eval_seeds or [100, 101]
    a.steps, a.batch_size = a.steps or 800, a.batch_size or 8
    return run_benchmark(output_dir=a.out, model=a.model, tiny=not a.full, variants=a.variants,
                         train_seeds=a.train_seeds, steps=a.steps, batch_size=a.batch_size, data_dir=a.data_dir,
                         scenarios=a.scenarios, demo_seeds=a.demo_seeds, eval_seeds=a.eval_seeds)


if __name__ == "__main__":
    main()
