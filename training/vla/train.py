"""Train a VLA policy: driving (Drive-π0, DriveMoE or one MoE alone) on highway-env demonstrations, or, with
``task: robots``, HiMoE-VLA (or a comparison variant: dense / topk / as_only / hb_only) on MuJoCo robot demonstrations.

    python training/vla/train.py --config training/vla/configs/drivemoe_tiny.yaml
    python training/vla/train.py --config training/vla/configs/drivemoe_tiny.yaml model.variant=drive_pi0
    MUJOCO_GL=egl python training/vla/train.py --config training/vla/configs/robots_himoe_tiny.yaml

Demonstrations are collected with the IDM expert into ``data.dir`` when missing. Stage 1 teacher-forces the camera
router with the labelled view; stage 2 trains it with Gumbel-softmax (DriveMoE's two stages). Trailing
``key.sub=value`` arguments override the YAML. The logic lives in :mod:`moezoo.models.vla.recipe`.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> dict:
    from moezoo.models.vla.recipe import train, train_robots
    from moezoo.trainer import parse_config_args

    config = parse_config_args(argv, description=__doc__.splitlines()[0])
    task = config.pop("task", "driving")
    if task not in ("driving", "robots"):
        raise ValueError(f"task must be 'driving' or 'robots', got {task!r}")
    result = train_robots(config) if task == "robots" else train(config)
    print(json.dumps({"model_dir": result["model_dir"], "samples": result["samples"]}, indent=2))
    return result


if __name__ == "__main__":
    main()
