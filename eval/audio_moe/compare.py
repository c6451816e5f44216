"""The table the UniMoE-Audio / dynamic-MoE papers make, at a tiny CPU budget, on the bundled mel-RVQ codec tokens of
real speech (Asterisk) and music (Sonic Pi):

- dynamic-capacity top-p MoE vs top-2 MoE vs dense, with equal *nominal* active parameters (the dense FFN is as wide as
  two experts; all three keep the same shared expert; the top-p model's real experts per token is measured, not set);
- joint training on both tasks vs two separately trained specialists (the same top-p model, trained on one task each
  for the same number of steps).

Every variant trains ``--steps`` steps of batch ``--batch-size`` from the same seeds; held-out codec-token loss (nats
per code, mean over codebooks) per task, with the unigram / previous-code bigram baselines, as mean ± std over
``--seeds``.

    python eval/audio_moe/compare.py --seeds 0 1 2 --steps 120 --out runs/audio_moe_compare
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = ("dynamic_topp", "top2", "dense")


def variant_overrides(name: str, base) -> dict:
    """Config overrides of ``name`` on top of the registry model ``base`` config (equal nominal active params)."""
    if name == "dynamic_topp":
        return {}
    if name == "top2":
        return {"moe_type": "topk", "num_experts_per_tok": 2, "num_null_experts": 0}
    if name == "dense":
        return {"moe_type": "topk", "num_experts": 1, "num_experts_per_tok": 1, "num_null_experts": 0,
                "moe_intermediate_size": 2 * base.moe_intermediate_size}
    raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")


def build_model(name: str, codec, seed: int, registry: str = "audio_moe_tiny_e4k2"):
    import torch

    import moezoo

    kw = dict(vocab_size=256, num_codebooks=codec.num_codebooks, codebook_size=codec.codebook_size,
              delay_pattern=list(range(codec.num_codebooks)))
    torch.manual_seed(seed)
    base = moezoo.create_model(registry, **kw).config
    torch.manual_seed(seed)
    return moezoo.create_model(registry, **kw, **variant_overrides(name, base))


def train(model, dataset, *, steps: int, batch_size: int, lr: float, seed: int, out: Path) -> float:
    from moezoo.trainer import Trainer

    t0 = time.process_time()
    Trainer(model.train(), {"output_dir": str(out), "max_steps": steps, "batch_size": batch_size,
                            "learning_rate": lr, "warmup_steps": max(1, steps // 20), "weight_decay": 0.01,
                            "seed": seed, "log_every": max(1, steps // 5), "save_every": None, "save_final": False,
                            "resume": "never", "overwrite_output_dir": True, "progress_bar": False,
                            "mixed_precision": "no", "log_to": None},
            train_data=dataset, collate_fn=dataset.collate, routing_stats=False).train()
    return time.process_time() - t0


def run(seeds, *, steps: int, batch_size: int = 8, lr: float = 3e-3, train_per_task: int | None = 60,
        test_per_task: int = 12, max_frames: int = 40, max_text: int = 32, out: str | Path = "runs/audio_moe_compare",
        log=print) -> dict:
    import torch

    from moezoo.metrics.seeds import summarize_runs
    from moezoo.models.audio_moe.codec import AudioCodec
    from moezoo.models.audio_moe.data_audio import AudioTokenDataset, asterisk_speech, sonic_pi_music, split_items
    from moezoo.models.audio_moe.harness import capacity_analytics, token_loss_vs_baselines, trivial_baselines

    out = Path(out)
    torch.set_num_threads(1)
    codec = AudioCodec.bundled()
    tr_s, te_s = split_items(asterisk_speech(), 0.1)
    tr_m, te_m = split_items(sonic_pi_music(), 0.15)
    tr = {"speech": tr_s[:train_per_task], "music": tr_m[:train_per_task]}
    n = max(len(v) for v in tr.values())
    tr = {t: (v * (n // len(v) + 1))[:n] for t, v in tr.items()}  # task-balanced
    test = te_s[:test_per_task] + te_m[:test_per_task]
    test_tasks = [it.task for it in test]
    cfg0 = build_model("dynamic_topp", codec, 0).config
    kw = dict(max_frames=max_frames, max_text=max_text)
    joint_ds = AudioTokenDataset(tr["speech"] + tr["music"], codec, cfg0, **kw)
    task_ds = {t: AudioTokenDataset(tr[t], codec, cfg0, **kw) for t in tr}
    test_ds = AudioTokenDataset(test, codec, cfg0, **kw)
    baselines = trivial_baselines(joint_ds, [it.task for it in joint_ds.items])
    runs = []
    for seed in seeds:
        row = {}
        for name in VARIANTS:
            model = build_model(name, codec, seed)
            cpu = train(model, joint_ds, steps=steps, batch_size=batch_size, lr=lr, seed=seed, out=out / "tmp")
            model.eval()
            loss = token_loss_vs_baselines(model, test_ds, test_tasks, baselines)
            cap = capacity_analytics(model, test_ds, test_tasks)
            row[name] = {t: {"loss": loss[t]["model"], "real_experts_per_token": cap[t]["real_experts_per_token"],
                             "ffn_flops_per_token": cap[t]["ffn_flops_per_token"]} for t in ("speech", "music")}
            row[name]["train_cpu_s"] = cpu
            row[name]["parameters"] = sum(p.numel() for p in model.parameters())
            log(f"seed {seed} {name}: speech {loss['speech']['model']:.3f} music {loss['music']['model']:.3f} "
                f"({cpu:.0f} CPU s)")
        spec = {}
        for t in ("speech", "music"):  # specialists: the top-p model on one task, same steps and batch
            model = build_model("dynamic_topp", codec, seed)
            train(model, task_ds[t], steps=steps, batch_size=batch_size, lr=lr, seed=seed, out=out / "tmp")
            model.eval()
            idx = [i for i, x in enumerate(test_tasks) if x == t]
            sub = AudioTokenDataset([test[i] for i in idx], codec, cfg0, **kw)
            spec[t] = {"loss": token_loss_vs_baselines(model, sub, [t] * len(idx), baselines)[t]["model"]}
            log(f"seed {seed} specialist {t}: {spec[t]['loss']:.3f}")
        row["specialists"] = spec
        runs.append(row)
    base = token_loss_vs_baselines(build_model("dense", codec, 0).eval(), test_ds, test_tasks, baselines)
    summary = summarize_runs(runs)
    summary["baselines"] = {t: {"unigram": base[t]["unigram"], "bigram": base[t]["bigram"]} for t in base}
    summary["setup"] = {"seeds": list(seeds), "steps": steps, "batch_size": batch_size, "lr": lr,
                        "train_clips_per_task": n, "test_clips_per_task": test_per_task, "max_frames": max_frames}
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    return summary


def format_table(summary: dict) -> str:
    from moezoo.metrics.seeds import format_mean_std

    b = summary["baselines"]
    lines = ["| model | speech loss | music loss | real experts / token (speech, music) | MoE-FFN kFLOPs / token "
             "(speech, music) | params |", "|---|---|---|---|---|---|"]
    for name in VARIANTS:
        r = summary[name]
        lines.append(f"| {name} (joint) | {format_mean_std(r['speech']['loss'])} | {format_mean_std(r['music']['loss'])} "
                     f"| {r['speech']['real_experts_per_token']['mean']:.2f}, "
                     f"{r['music']['real_experts_per_token']['mean']:.2f} | "
                     f"{r['speech']['ffn_flops_per_token']['mean'] / 1e3:.0f}, "
                     f"{r['music']['ffn_flops_per_token']['mean'] / 1e3:.0f} | {int(r['parameters']['mean'])} |")
    s = summary["specialists"]
    lines.append(f"| dynamic_topp specialists (one per task) | {format_mean_std(s['speech']['loss'])} | "
                 f"{format_mean_std(s['music']['loss'])} | - | - | 2 models |")
    lines.append(f"| unigram baseline | {b['speech']['unigram']:.3f} | {b['music']['unigram']:.3f} | - | - | - |")
    lines.append(f"| previous-code bigram baseline | {b['speech']['bigram']:.3f} | {b['music']['bigram']:.3f} | - | - "
                 "| - |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-per-task", type=int, default=60)
    ap.add_argument("--test-per-task", type=int, default=12)
    ap.add_argument("--max-frames", type=int, default=40)
    ap.add_argument("--out", default="runs/audio_moe_compare")
    args = ap.parse_args(argv)
    summary = run(args.seeds, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                  train_per_task=args.train_per_task, test_per_task=args.test_per_task, max_frames=args.max_frames,
                  out=args.out, log=lambda m: print(m, flush=True))
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
