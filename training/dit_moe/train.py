"""Train a DiT-MoE / ProMoE diffusion transformer (DDPM with learned sigma, or rectified flow).

    python training/dit_moe/train.py --config training/dit_moe/configs/tiny_fmnist.yaml
    python training/dit_moe/train.py --config training/dit_moe/configs/tiny_fmnist_rf.yaml trainer.max_steps=500
    accelerate launch training/dit_moe/train.py --config training/dit_moe/configs/s2_imagenet.yaml \
        data.train_root=/data/imagenet/train vae.path=/models/sd-vae-ft-ema

Trailing ``key.sub=value`` arguments override the YAML. Re-running the same command resumes from the newest checkpoint
in ``trainer.output_dir`` (``trainer.resume=never`` starts over). At the end the whole pipeline (EMA weights) is saved
with ``save_pretrained`` to ``<output_dir>/pipeline`` (load with ``DiTMoEPipeline.from_pretrained``) with a sample
grid ``samples_grid.png``. The logic lives in :mod:`moezoo.models.dit_moe.recipe`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> dict:
    from moezoo.models.dit_moe.recipe import train
    from moezoo.trainer import parse_config_args

    config = parse_config_args(argv, description=__doc__.split("\n\n")[0])
    result = train(config)
    print(json.dumps({k: result.get(k) for k in ("step", "loss", "step_seconds", "pipeline_dir", "grid_png",
                                                 "checkpoint")}, indent=2, default=str))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
