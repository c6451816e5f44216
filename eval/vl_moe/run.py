"""vl_moe harness: easy-VQA accuracy, POPE-style probe, routing figures by modality, tokens/s with the KV cache.

    python eval/vl_moe/run.py runs/vl_moe_tiny/moe/final [more model folders ...] --limit 500 --out runs/vl_moe_eval
    python eval/vl_moe/run.py MODEL --llava-json test.json --image-folder images/   # LLaVA-format questions instead

Each model folder is a save_pretrained folder with its processor (what training/vl_moe/train.py writes). Prints one
table row per model; several folders of the same variant (training seeds: run the recipe with ``trainer.seed=S
output_dir=RUN_S``) given as VARIANT=DIR1,DIR2,DIR3 are reported as mean ± std (sample std).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import moezoo  # noqa: E402,F401 - registers the family
from moezoo.models.vl_moe.data import load_easy_vqa, load_llava_json, pope_probe  # noqa: E402
from moezoo.metrics.seeds import format_mean_std  # noqa: E402
from moezoo.models.vl_moe.harness import blind_prior, evaluate_model  # noqa: E402


def _fmt(values):
    return format_mean_std(list(values))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model folders, or VARIANT=DIR1,DIR2 (seeds of one variant)")
    ap.add_argument("--limit", type=int, default=500, help="test questions (random subset, seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--llava-json", default=None)
    ap.add_argument("--image-folder", default=None)
    ap.add_argument("--out", default="runs/vl_moe_eval")
    args = ap.parse_args(argv)
    if args.llava_json:
        samples = load_llava_json(args.llava_json, args.image_folder, limit=args.limit)
    else:
        samples = load_easy_vqa("test", limit=args.limit, seed=args.seed)
    probe = pope_probe(samples)
    variants = {}
    for spec in args.models:
        name, _, dirs = spec.rpartition("=") if "=" in spec else (Path(spec).parent.parent.name or spec, "", spec)
        variants.setdefault(name, []).extend(d for d in dirs.split(",") if d)
    report = {}
    print(f"| variant | runs | VQA acc | POPE acc | POPE yes-ratio | tokens/s | params (active) |")
    print("|---|---|---|---|---|---|---|")
    if not args.llava_json:  # the language-only baseline: each question template's most frequent training answer
        prior = blind_prior(load_easy_vqa("train"), samples, probe)
        report["blind prior (no image)"] = prior
        print(f"| blind prior (no image) | - | {prior['vqa']['accuracy']:.3f} | {prior['pope']['accuracy']:.3f} | "
              f"{prior['pope']['yes_ratio']:.3f} | - | - |")
    for name, dirs in variants.items():
        runs = [evaluate_model(d, samples, probe, Path(args.out) / name / str(i), batch_size=args.batch_size)
                for i, d in enumerate(dirs)]
        report[name] = runs
        print(f"| {name} | {len(runs)} | {_fmt([r['vqa']['accuracy'] for r in runs])} | "
              f"{_fmt([r['pope']['accuracy'] for r in runs])} | {_fmt([r['pope']['yes_ratio'] for r in runs])} | "
              f"{_fmt([r['speed']['tokens_per_s'] for r in runs])} | {runs[0]['params']} ({runs[0]['active_params']}) |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
