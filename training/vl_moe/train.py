"""MoE-tuning of a vl_moe model (MoE-LLaVA's three stages, or MoIIE's two) with the shared Trainer.

    python training/vl_moe/train.py --config training/vl_moe/configs/tiny.yaml
    python training/vl_moe/train.py --config training/vl_moe/configs/tiny.yaml trainer.max_steps=100 data.train_limit=4000
    python training/vl_moe/train.py --config training/vl_moe/configs/moiie_two_stage.yaml

Each stage writes ``<output_dir>/<stage>/final`` and is skipped when re-run; an interrupted stage resumes from its last
checkpoint. See :mod:`moezoo.models.vl_moe.recipe` for every key (LLaVA-format JSON data, a pretrained LM, LoRA).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from moezoo.models.vl_moe.recipe import run_stages  # noqa: E402
from moezoo.trainer import parse_config_args  # noqa: E402


def main(argv=None) -> dict:
    config = parse_config_args(argv, description=__doc__.split("\n\n")[0])
    result = run_stages(config)
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
