"""Evaluate a saved DiT-MoE pipeline: samples per class, offline FID / IS / precision-recall in the feature space of a
classifier trained on the real training set, class-conditional accuracy, the real-vs-real reference line, Inception
FID / IS when the weights are available locally, sample grids and routing heatmaps (expert usage vs timestep and vs
patch position per MoE layer).

    python eval/dit_moe/run.py --pipeline runs/dit_moe/tiny_fmnist/pipeline --output-dir runs/dit_moe/eval
    python eval/dit_moe/run.py --pipeline runs/dit_moe/tiny_fmnist_rf/pipeline --per-class 100 --steps 30
    python eval/dit_moe/run.py --pipeline ... --scheduler ddim --steps 25     # swap the sampler
    python eval/dit_moe/run.py --pipeline ... --seeds 0 1 2                   # mean ± std over sampling seeds

Writes ``metrics.json``, ``metrics.md``, ``samples_grid.png``, ``routing_vs_timestep.png``,
``routing_vs_position.png`` and the cached classifier (``eval_classifier.safetensors``) to ``--output-dir``.
Data: Fashion-MNIST from the Debian package (``--dataset fashion_mnist``) or scikit-learn's 8x8 digits
(``--dataset digits``), padded to the model's sample size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    from moezoo.metrics.seeds import add_seeds_argument

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True, help="folder written by DiTMoEPipeline.save_pretrained")
    p.add_argument("--output-dir", default="runs/dit_moe/eval")
    p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "digits"])
    p.add_argument("--per-class", type=int, default=50, help="generated images per class")
    p.add_argument("--steps", type=int, default=50, help="scheduler inference steps")
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--cfg-channels", type=int, default=None, help="guide only the first N channels (3 = official)")
    p.add_argument("--scheduler", default=None, choices=[None, "ddpm", "ddim", "flow_match_euler"],
                   help="replace the saved scheduler (same training horizon / betas)")
    p.add_argument("--classifier-epochs", type=int, default=2)
    p.add_argument("--classifier-max-train", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds N)")
    add_seeds_argument(p, help="sampling seeds: the pipeline samples and is scored once per seed; the table prints "
                               "mean ± std (the evaluation classifier is trained once, with the first seed)")
    p.add_argument("--no-routing", action="store_true", help="skip the routing heatmaps")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.seed is not None:
        args.seeds = [args.seed]
    return args


def main(argv=None) -> dict:
    import torch
    import torch.nn.functional as F

    from moezoo.data.images import Digits, FashionMNIST
    from moezoo.metrics.generation import evaluate_generation, results_markdown
    from moezoo.metrics.seeds import summarize_runs
    from moezoo.models.dit_moe.pipeline_dit_moe import DiTMoEPipeline

    args = parse_args(argv)
    pipe = DiTMoEPipeline.from_pretrained(args.pipeline)
    if args.scheduler is not None:
        from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

        cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "flow_match_euler": FlowMatchEulerDiscreteScheduler}
        pipe.scheduler = cls[args.scheduler].from_config(pipe.scheduler.config)
    cfg = pipe.transformer.config
    if args.dataset == "fashion_mnist":
        tr, te = FashionMNIST("train"), FashionMNIST("test")
    else:
        tr, te = Digits("train"), Digits("test")
    size = int(cfg.sample_size) if pipe.vae is None else None

    def fit(x):
        if size is None or x.shape[-1] == size:
            return x
        if x.shape[-1] < size:  # pad with the background value
            lo = (size - x.shape[-1]) // 2
            return F.pad(x, (lo, size - x.shape[-1] - lo) * 2, value=-1.0)
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)

    runs = []
    for seed in args.seeds:
        # one output folder: the evaluation classifier cached there by the first seed scores every seed
        res = evaluate_generation(
            pipe, (fit(tr.images), tr.labels), (fit(te.images), te.labels), args.output_dir, per_class=args.per_class,
            num_inference_steps=args.steps, guidance_scale=args.guidance_scale, class_names=tr.class_names,
            seed=seed, classifier_epochs=args.classifier_epochs, routing=not args.no_routing and seed == args.seeds[0],
            cfg_channels=args.cfg_channels, progress=not args.no_progress,
            classifier_max_train=args.classifier_max_train)
        runs.append(res)
    if len(runs) > 1:
        res = summarize_runs(runs) | {"seeds": list(args.seeds), "runs": runs,
                                      "grid_png": runs[0].get("grid_png"), "routing_pngs": runs[0].get("routing_pngs")}
        (Path(args.output_dir) / "metrics.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        (Path(args.output_dir) / "metrics.md").write_text(results_markdown(res) + "\n")
    print(f"seeds: {list(args.seeds)}")
    print(results_markdown(res))
    print(json.dumps({k: res[k] for k in ("grid_png",) if k in res} | {"routing_pngs": res.get("routing_pngs")},
                     indent=2))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
