"""The ``audio_moe`` evaluation harness (``eval/audio_moe/run.py``): per-task codec-token loss, dynamic-capacity
analytics, generated wav files and spectrogram PNGs.

Analytics (teacher-forced over the held-out clips): real experts per token by task and layer (audio positions),
null-expert rate (share of a token's selections that hit a null expert), and MoE-FFN FLOPs per token
(``6 * H * I`` per real routed expert + the shared experts' ``6 * H * I_shared``).
Generation metrics (one clip generated per held-out item's text, ``generate_per_task`` per task):

- speech: mel-cepstral distortion (:func:`~moezoo.models.audio_moe.audio_metrics.mel_cepstral_distortion`, DTW) of
  the generated utterance against the held-out recording of the same transcript, beside two reference points: the
  recording through the codec (the best a perfect token model could score) and a different held-out utterance
  (unrelated speech);
- music: a :class:`~moezoo.models.audio_moe.audio_metrics.StyleClassifier` trained on the real training clips gives
  the style accuracy of the generated clips (prompted style = the held-out item's label) and the Fréchet distance of
  the generated clips to the real held-out clips in its feature space, beside the same numbers for the real held-out
  clips themselves and for them through the codec.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


@torch.no_grad()
def capacity_analytics(model, dataset, tasks: list[str], batch_size: int = 4) -> dict:
    """Per-task loss and per-task / per-layer dynamic-capacity statistics over ``dataset`` (an AudioTokenDataset)."""
    cfg = model.config
    E = cfg.num_experts + (cfg.num_shared_experts if cfg.moe_type == "topp" and cfg.topp_weighting == "official" else 0)
    null_lo = E
    null_hi = E + (cfg.num_null_experts if cfg.moe_type in ("topp", "adamoe") else 0)
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    shared_flops = 0
    if cfg.num_shared_experts and not (cfg.moe_type == "topp" and cfg.topp_weighting == "official"):
        shared_flops = 6 * H * cfg.num_shared_experts * (cfg.shared_intermediate_size or I)
    acc: dict = {}
    model.eval()
    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(start + batch_size, len(dataset))))
        batch = dataset.collate([dataset[i] for i in idx])
        out = model(**batch)
        K = cfg.num_codebooks
        audio = (batch["input_ids"][::K] >= cfg.vocab_size) & batch["attention_mask"].bool()  # (B, T)
        for j, i in enumerate(idx):
            task = tasks[i]
            a = acc.setdefault(task, {"loss": [], "k": {}, "null": {}, "widths": {}})
            one = model(input_ids=batch["input_ids"][j * K:(j + 1) * K], labels=batch["labels"][j * K:(j + 1) * K],
                        attention_mask=batch["attention_mask"][j:j + 1])
            a["loss"].append(float((one.loss - (one.aux_loss if one.aux_loss is not None else 0)).item()))
            for layer, ro in enumerate(out.router_outputs):
                ind = ro.indices.view(len(idx), -1, ro.indices.shape[-1])[j][audio[j]]
                real = (ind < E).sum(-1).float()
                null = ((ind >= null_lo) & (ind < null_hi)).sum(-1).float()
                sel = (ind < ro.num_experts).sum(-1).float().clamp_min(1)
                a["k"].setdefault(layer, []).append(real)
                a["null"].setdefault(layer, []).append(null / sel)
    report = {}
    for task, a in acc.items():
        layers = {}
        for layer in sorted(a["k"]):
            k = torch.cat(a["k"][layer])
            layers[layer] = {"real_experts_per_token": float(k.mean()), "null_rate": float(torch.cat(a["null"][layer]).mean()),
                             "ffn_flops_per_token": float(k.mean()) * 6 * H * I + shared_flops}
        report[task] = {"codec_token_loss": sum(a["loss"]) / len(a["loss"]), "clips": len(a["loss"]),
                        "layers": layers,
                        "real_experts_per_token": sum(v["real_experts_per_token"] for v in layers.values()) / len(layers),
                        "ffn_flops_per_token": sum(v["ffn_flops_per_token"] for v in layers.values())}
    return report


def _label_pairs(dataset, i: int, vocab_size: int):
    """(context, label) pairs per codebook of item ``i``: label = codec id at position t (the loss's targets), context =
    the same codebook's codec id at t - 1, or -1 when t - 1 is a text position."""
    item = dataset[i]
    ids, lab = item["input_ids"], item["labels"]
    tgt = lab[:, 1:]
    prev = ids[:, :-1]
    valid = tgt >= vocab_size
    ctx = torch.where(prev >= vocab_size, prev - vocab_size, torch.full_like(prev, -1))
    return [(ctx[c][valid[c]], tgt[c][valid[c]] - vocab_size) for c in range(ids.shape[0])]


def trivial_baselines(train_ds, train_tasks: list[str], *, alpha: float = 0.5, backoff: float = 5.0):
    """Per task and codebook, two trivial predictors of the next codec token fitted on ``train_ds``: a unigram (code
    frequencies, add-``alpha`` smoothing) and a bigram on the previous code of the same codebook, interpolated with the
    unigram (``(n(prev, next) + backoff * p_uni(next)) / (n(prev) + backoff)``). Returns ``{task: (uni (K, V),
    bi (K, V + 1, V))}`` log-probabilities; bigram row ``V`` is the "previous position is text" context."""
    cfg = train_ds.config
    K, V = cfg.num_codebooks, cfg.codec_vocab_size
    counts: dict = {}
    for i, task in enumerate(train_tasks):
        uni, bi = counts.setdefault(task, (torch.zeros(K, V), torch.zeros(K, V + 1, V)))
        for c, (ctx, tgt) in enumerate(_label_pairs(train_ds, i, cfg.vocab_size)):
            uni[c].index_put_((tgt,), torch.ones(len(tgt)), accumulate=True)
            bi[c].index_put_((ctx.where(ctx >= 0, torch.full_like(ctx, V)), tgt), torch.ones(len(tgt)), accumulate=True)
    out = {}
    for task, (uni, bi) in counts.items():
        p_uni = (uni + alpha) / (uni + alpha).sum(-1, keepdim=True)
        p_bi = (bi + backoff * p_uni[:, None]) / (bi.sum(-1, keepdim=True) + backoff)
        out[task] = (p_uni.log(), p_bi.log())
    return out


@torch.no_grad()
def token_loss_vs_baselines(model, test_ds, test_tasks: list[str], baselines) -> dict:
    """Held-out codec-token cross-entropy (nats per code, averaged over codebooks, token-weighted over clips) of the
    model and of :func:`trivial_baselines`, per task, on exactly the positions the model's loss scores."""
    cfg = model.config
    K, V = cfg.num_codebooks, cfg.codec_vocab_size
    model.eval()
    acc: dict = {}
    for i, task in enumerate(test_tasks):
        a = acc.setdefault(task, {"model": torch.zeros(K), "unigram": torch.zeros(K), "bigram": torch.zeros(K),
                                  "tokens": torch.zeros(K)})
        item = test_ds[i]
        out = model(input_ids=item["input_ids"], labels=item["labels"])
        pairs = _label_pairs(test_ds, i, cfg.vocab_size)
        lp_uni, lp_bi = baselines[task]
        for c, (ctx, tgt) in enumerate(pairs):
            n = len(tgt)
            a["tokens"][c] += n
            a["model"][c] += float(out.codebook_losses[c]) * n
            a["unigram"][c] -= float(lp_uni[c][tgt].sum())
            a["bigram"][c] -= float(lp_bi[c][ctx.where(ctx >= 0, torch.full_like(ctx, V)), tgt].sum())
    report = {}
    for task, a in acc.items():
        per_cb = {k: (a[k] / a["tokens"]).tolist() for k in ("model", "unigram", "bigram")}
        report[task] = {k: sum(v) / K for k, v in per_cb.items()}
        report[task].update(per_codebook=per_cb, tokens=int(a["tokens"].sum()), clips=test_tasks.count(task))
    return report


def save_wav_and_spectrogram(wav: torch.Tensor, sr: int, stem: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import soundfile as sf

    stem.parent.mkdir(parents=True, exist_ok=True)
    wav_path, png_path = stem.with_suffix(".wav"), stem.with_suffix(".png")
    x = wav.detach().float().clamp(-1, 1).cpu().numpy()
    sf.write(str(wav_path), x, sr)
    fig, ax = plt.subplots(figsize=(6, 2.5))
    if x.size >= 256:
        ax.specgram(x, NFFT=256, Fs=sr, noverlap=128)
    ax.set_xlabel("s")
    ax.set_ylabel("Hz")
    ax.set_title(stem.name)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return wav_path, png_path


def _generate(pipe, text: str, task: str, max_new_tokens: int, seed: int) -> torch.Tensor:
    out = pipe(text, task=task, max_new_tokens=max_new_tokens, min_new_tokens=max(1, max_new_tokens // 2), seed=seed,
               progress=False)
    return out["audio"]


def speech_mcd(pipe, items, *, max_new_tokens: int, max_text: int = 96, seed: int = 0) -> dict:
    """MCD (dB) of speech generated from each item's transcript against its recording (cut to the generated
    duration's budget, ``max_new_tokens`` frames), with the codec-reconstruction and unrelated-utterance references."""
    from .audio_metrics import mel_cepstral_distortion
    from .data_audio import load_audio

    codec = pipe.codec
    sr, n = codec.sample_rate, int(max_new_tokens * codec.sample_rate / codec.frame_rate)
    refs = [load_audio(it.path, sr)[0][:n] for it in items]
    gen, rec, other = [], [], []
    for i, (it, ref) in enumerate(zip(items, refs)):
        wav = _generate(pipe, it.text[:max_text], "speech", max_new_tokens, seed + i)
        if wav.numel() > 256:
            gen.append(mel_cepstral_distortion(wav, ref, sr))
        rec.append(mel_cepstral_distortion(codec.decode(codec.encode(ref, sr))[0], ref, sr))
        if len(refs) > 1:
            other.append(mel_cepstral_distortion(refs[(i + 1) % len(refs)], ref, sr))
    mean = lambda v: float(sum(v) / len(v)) if v else float("nan")  # noqa: E731
    return {"mcd_db": mean(gen), "codec_reconstruction_mcd_db": mean(rec), "other_utterance_mcd_db": mean(other),
            "clips": len(items), "generated_with_audio": len(gen)}


def music_style(pipe, classifier, items, *, max_new_tokens: int, max_text: int = 96, seed: int = 0) -> dict:
    """Style accuracy and Fréchet distance (to the real held-out clips) of music generated from each item's text."""
    from .data_audio import load_audio

    codec = pipe.codec
    sr, n = codec.sample_rate, int(max_new_tokens * codec.sample_rate / codec.frame_rate)
    real = [load_audio(it.path, sr)[0][:n] for it in items]
    labels = [it.label for it in items]
    gen, gen_labels = [], []
    for i, it in enumerate(items):
        wav = _generate(pipe, it.text[:max_text], "music", max_new_tokens, seed + i)
        if wav.numel():
            gen.append(wav)
            gen_labels.append(it.label)
    recon = [codec.decode(codec.encode(w, sr))[0] for w in real]
    out = {"styles": len(classifier.classes), "clips": len(items), "generated_with_audio": len(gen),
           "style_accuracy": classifier.accuracy(gen, gen_labels) if gen else float("nan"),
           "real_style_accuracy": classifier.accuracy(real, labels),
           "codec_reconstruction_style_accuracy": classifier.accuracy(recon, labels),
           "chance_accuracy": 1 / len(classifier.classes)}
    if len(real) >= 2:
        out["codec_reconstruction_frechet"] = classifier.frechet_distance(real, recon)
        out["frechet"] = classifier.frechet_distance(real, gen) if len(gen) >= 2 else float("nan")
    return out


def run_harness(model, codec, items, out_dir: str | Path, *, prompts=None, max_frames: int = 100,
                max_new_tokens: int = 100, seed: int = 0, style_classifier=None, generate_per_task: int = 0) -> dict:
    """Analytics over ``items`` (AudioItem list) + one generated clip per prompt ``(text, task)``; writes
    ``results.json``, ``<task>_<n>.wav`` / ``.png`` to ``out_dir``. With ``generate_per_task`` > 0, also the speech
    MCD (:func:`speech_mcd`) and, given a fitted ``style_classifier``, the music style metrics (:func:`music_style`)
    over the first ``generate_per_task`` items of each task."""
    from .data_audio import AudioTokenDataset
    from .pipeline_audio_moe import AudioMoEPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = AudioTokenDataset(items, codec, model.config, max_frames=max_frames)
    report = {"tasks": capacity_analytics(model, ds, [it.task for it in items])}
    pipe = AudioMoEPipeline(model, codec)
    gen = []
    for n, (text, task) in enumerate(prompts or [("hello", "speech"), ("drum loop", "music")]):
        out = pipe(text, task=task, max_new_tokens=max_new_tokens, seed=seed + n, progress=False)
        entry = {"text": text, "task": task, "frames": int(out["codes"].shape[0])}
        if out["audio"].numel():
            w, p = save_wav_and_spectrogram(out["audio"], out["sampling_rate"], out_dir / f"{task}_{n}")
            entry.update(wav=str(w), png=str(p), seconds=out["audio"].numel() / out["sampling_rate"])
        gen.append(entry)
    report["generated"] = gen
    if generate_per_task > 0:
        speech = [it for it in items if it.task == "speech"][:generate_per_task]
        music = [it for it in items if it.task == "music"][:generate_per_task]
        if speech:
            report["speech_mcd"] = speech_mcd(pipe, speech, max_new_tokens=max_new_tokens, seed=seed)
        if music and style_classifier is not None:
            report["music_style"] = music_style(pipe, style_classifier, music, max_new_tokens=max_new_tokens,
                                                seed=seed)
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    return report


__all__ = ["capacity_analytics", "speech_mcd", "music_style", "trivial_baselines", "token_loss_vs_baselines", "save_wav_and_spectrogram", "run_harness"]
