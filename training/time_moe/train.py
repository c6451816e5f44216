"""Train or fine-tune a Time-MoE forecaster with the shared :class:`moezoo.trainer.Trainer`.

    python training/time_moe/train.py --config training/time_moe/configs/tiny.yaml
    python training/time_moe/train.py --config training/time_moe/configs/tiny.yaml trainer.max_steps=50 data.stride=4
    accelerate launch training/time_moe/train.py --config training/time_moe/configs/time_moe_50m.yaml \
        model.init_from=./time_moe_50m          # fine-tune a converted official checkpoint

Loss: mean Huber loss over the horizon heads + balance loss (computed by the model); AdamW + warm-up/cosine, bf16 on
GPUs that support it, atomic checkpoints every ``trainer.save_every`` steps, exact resume (``trainer.resume: auto``),
expert-load logging and plots in ``trainer.output_dir``. See :mod:`moezoo.models.time_moe.recipe` for every key.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from moezoo.models.time_moe.recipe import train_from_config  # noqa: E402
from moezoo.trainer import parse_config_args  # noqa: E402


def main(argv=None) -> dict:
    config = parse_config_args(argv, description=__doc__.split("\n\n")[0])
    result = train_from_config(config)
    summary = {k: result.get(k) for k in ("step", "loss", "model_dir", "output_dir", "log_file", "routing_plots",
                                         "eval_history", "train_time_s")}
    summary["parameters"] = {k: result["parameters"][k] for k in ("total", "active")}
    summary["windows"] = result["data"]["windows"]
    print(json.dumps(summary, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
