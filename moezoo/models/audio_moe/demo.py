"""``moezoo demo`` step ``audio_moe``: train a tiny dynamic-capacity audio MoE briefly on the codec tokens of real speech
(Asterisk prompts, with transcripts) and music (Sonic Pi samples), using the bundled mel-RVQ codec; report the held-out
codec-token loss per task against two trivial baselines (unigram and previous-code bigram, fitted on the same training
tokens), the dynamic-capacity statistics, and generate one speech and one music clip (wav + spectrogram PNG)."""
from __future__ import annotations

import json
import time

from ...demo import DemoContext, register_demo_step


def demo_config(ctx: DemoContext) -> dict:
    """Quick: 10 training clips per task, 24 frames (0.4 s), 12 steps. Full: every training clip (music repeated to
    balance the tasks), 100 frames (1.6 s), 600 steps of batch 16."""
    if ctx.quick:
        return {"train_per_task": 10, "test_per_task": 2, "max_frames": 24, "max_text": 24, "steps": 12,
                "batch_size": 8, "lr": 3e-3, "warmup": 2}
    return {"train_per_task": None, "test_per_task": 12, "max_frames": 100, "max_text": 48, "steps": 600,
            "batch_size": 16, "lr": 2e-3, "warmup": 30}


def _verdict(r: dict) -> str:
    best = min(("unigram", "bigram"), key=lambda k: r[k])
    if r["model"] < r[best]:
        return f"beats both trivial baselines (best: {best}, by {r[best] - r['model']:.3f} nats/code)"
    if r["model"] < max(r["unigram"], r["bigram"]):
        worse = max(("unigram", "bigram"), key=lambda k: r[k])
        return (f"WORSE than the {best} baseline by {r['model'] - r[best]:.3f} nats/code (beats only the {worse} "
                "baseline)")
    return f"WORSE than both trivial baselines (the {best} one by {r['model'] - r[best]:.3f} nats/code)"


@register_demo_step("audio_moe", order=60, description="tiny dynamic-capacity audio MoE on mel-RVQ codec tokens of real "
                    "speech + music: held-out token loss vs trivial baselines, capacity stats, one speech and one "
                    "music sample (wav + spectrogram)")
def audio_moe_demo(ctx: DemoContext) -> dict:
    import torch

    import moezoo

    from ...trainer import Trainer
    from .codec import BUNDLED_CODEC, AudioCodec
    from .data_audio import AudioTokenDataset, asterisk_speech, load_audio, sonic_pi_music, split_items
    from .harness import capacity_analytics, save_wav_and_spectrogram, token_loss_vs_baselines, trivial_baselines
    from .pipeline_audio_moe import AudioMoEPipeline

    d = demo_config(ctx)
    out = ctx.step_dir("audio_moe")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only spin on a shared machine
    try:
        torch.manual_seed(ctx.seed)
        codec = AudioCodec.bundled()
        tr_s, te_s = split_items(asterisk_speech(), 0.1, seed=ctx.seed)
        tr_m, te_m = split_items(sonic_pi_music(), 0.15, seed=ctx.seed)
        n = d["train_per_task"]
        tr_s, tr_m = tr_s[:n], tr_m[:n]
        if len(tr_m) < len(tr_s):  # task-balanced: repeat the smaller task
            tr_m = (tr_m * (len(tr_s) // len(tr_m) + 1))[: len(tr_s)]
        te_s, te_m = te_s[: d["test_per_task"]], te_m[: d["test_per_task"]]
        model = moezoo.create_model("audio_moe_tiny_e4k2", vocab_size=256, num_codebooks=codec.num_codebooks,
                                    codebook_size=codec.codebook_size, delay_pattern=list(range(codec.num_codebooks)))
        cfg = model.config
        train_items, test_items = tr_s + tr_m, te_s + te_m
        train_tasks, test_tasks = [it.task for it in train_items], [it.task for it in test_items]
        kw = dict(max_frames=d["max_frames"], max_text=d["max_text"])
        train_ds = AudioTokenDataset(train_items, codec, cfg, **kw)
        test_ds = AudioTokenDataset(test_items, codec, cfg, **kw)
        baselines = trivial_baselines(train_ds, train_tasks)
        before = token_loss_vs_baselines(model, test_ds, test_tasks, baselines)
        t0 = time.time()
        trainer = Trainer(model.train(), {
            "output_dir": str(out / "run"), "max_steps": d["steps"], "batch_size": d["batch_size"],
            "learning_rate": d["lr"], "warmup_steps": d["warmup"], "weight_decay": 0.01, "seed": ctx.seed,
            "log_every": max(1, d["steps"] // 10), "save_every": None, "save_final": False, "resume": "never",
            "overwrite_output_dir": True, "progress_bar": not ctx.quick, "mixed_precision": "no"},
            train_data=train_ds, collate_fn=train_ds.collate, routing_stats=not ctx.quick)
        trainer.train()
        train_s = time.time() - t0
        model.eval()
        after = token_loss_vs_baselines(model, test_ds, test_tasks, baselines)
        capacity = capacity_analytics(model, test_ds, test_tasks)
        model.save_pretrained(out / "model")

        ctx.print(f"held-out codec-token loss, nats per code (mean over {cfg.num_codebooks} codebooks; "
                  f"{len(train_items)} training clips, {d['steps']} steps, {train_s:.0f} s):")
        ctx.print("| task | before | after | unigram | bigram (prev. code) | verdict |")
        ctx.print("|---|---|---|---|---|---|")
        losses = {}
        for task in ("speech", "music"):
            r = after[task]
            verdict = _verdict(r)
            ctx.print(f"| {task} | {before[task]['model']:.3f} | {r['model']:.3f} | {r['unigram']:.3f} | "
                      f"{r['bigram']:.3f} | {verdict} |")
            losses[task] = {"before": round(before[task]["model"], 4), "after": round(r["model"], 4),
                            "unigram": round(r["unigram"], 4), "bigram": round(r["bigram"], 4), "verdict": verdict,
                            "tokens": r["tokens"], "clips": r["clips"]}
        ctx.print("dynamic capacity (held-out audio positions):")
        ctx.print("| task | real experts / token per layer | null-expert rate per layer | MoE-FFN FLOPs / token |")
        ctx.print("|---|---|---|---|")
        cap = {}
        for task in ("speech", "music"):
            c = capacity[task]
            ks = [round(v["real_experts_per_token"], 3) for v in c["layers"].values()]
            nulls = [round(v["null_rate"], 3) for v in c["layers"].values()]
            ctx.print(f"| {task} | {ks} | {nulls} | {c['ffn_flops_per_token']:.3g} |")
            cap[task] = {"real_experts_per_token": ks, "null_rate": nulls,
                         "ffn_flops_per_token": c["ffn_flops_per_token"]}

        pipe = AudioMoEPipeline(model, codec)
        frames = d["max_frames"]
        samples = {}
        for task, item in (("speech", te_s[0]), ("music", te_m[0])):
            text = item.text[: d["max_text"]]
            res = pipe(text, task=task, max_new_tokens=frames + cfg.num_codebooks, min_new_tokens=frames // 2,
                       seed=ctx.seed, progress=False)
            entry = {"text": text, "frames": int(res["codes"].shape[0])}
            if res["audio"].numel():
                w, p = save_wav_and_spectrogram(res["audio"], res["sampling_rate"], out / f"generated_{task}")
                entry.update(wav=str(w), png=str(p), seconds=round(res["audio"].numel() / res["sampling_rate"], 2))
            entry["reference"] = item.path
            if not ctx.quick:  # the held-out recording through the codec: what a perfect LM could at best give
                ref = load_audio(item.path, codec.sample_rate)[0][: int(frames * codec.sample_rate / codec.frame_rate)]
                rec = codec.decode(codec.encode(ref, codec.sample_rate))[0]
                w, p = save_wav_and_spectrogram(rec, codec.sample_rate, out / f"reference_{task}_through_codec")
                entry.update(reference_wav=str(w), reference_png=str(p))
            ctx.print(f"{task} sample ({entry['frames']} frames) for {text!r}: {entry.get('wav', 'no audio')}")
            samples[task] = entry
    finally:
        torch.set_num_threads(threads)
    result = {"model_dir": str(out / "model"), "codec": BUNDLED_CODEC, "steps": d["steps"],
              "train_clips": len(train_items), "test_clips": len(test_items), "train_seconds": round(train_s, 1),
              "token_loss": losses, "capacity": cap, "samples": samples}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result
