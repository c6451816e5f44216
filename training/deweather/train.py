"""Train a deweather model (MoFME or conventional MoE) on the multi-weather set; evaluate PSNR / SSIM per weather.

    python training/deweather/train.py --config training/deweather/configs/tiny_mofme.yaml
    python training/deweather/train.py --config training/deweather/configs/tiny_moe.yaml trainer.max_steps=50
    accelerate launch training/deweather/train.py --config training/deweather/configs/allweather_mofme_s.yaml \
        data.root=/data/allweather

Trailing ``key.sub=value`` arguments override the YAML. Re-running the same command resumes from the newest
checkpoint in ``trainer.output_dir`` (``trainer.resume=never`` starts over). The logic lives in
:mod:`moezoo.models.deweather.recipe`.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> dict:
    from moezoo.models.deweather.recipe import train
    from moezoo.trainer import parse_config_args

    config = parse_config_args(argv, description=__doc__.splitlines()[0])
    result = train(config)
    print(json.dumps({"model_dir": result["model_dir"], "step": result["step"],
                      "test_after": result["metrics"]["after"].get("overall")}, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
