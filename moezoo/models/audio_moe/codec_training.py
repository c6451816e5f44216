"""Build the small codecs that work offline on the bundled audio and measure their reconstruction on held-out clips:
log-mel L1 distance (at the analysis the metric has always used, 512-point FFT / 64 mels, and averaged over 256- and
1024-point FFTs so that the mel-RVQ codec, which quantises 512-point frames, is not judged only at its own
resolution) and SI-SNR, per task.

Kinds:
- ``mel_rvq``: residual VQ over log-mel frames (k-means, no gradient training) + Griffin-Lim
  (:mod:`moezoo.models.audio_moe.mel_codec`);
- ``dac`` / ``encodec``: a tiny transformers ``DacModel`` / ``EncodecModel`` trained with waveform L1 +
  multi-resolution log-mel L1 + the codec's own VQ losses. No adversarial losses (CPU budget), so quality is that of a
  reconstruction-only codec.

``python training/audio_moe/train_codec.py --kinds mel_rvq dac encodec --minutes 0.5 --out runs/audio_codec``.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SR = 8000


def tiny_codec(kind: str, codebook_size: int = 256, num_codebooks: int = 4):
    from transformers import DacConfig, DacModel, EncodecConfig, EncodecModel

    if kind == "dac":
        return DacModel(DacConfig(encoder_hidden_size=16, downsampling_ratios=[2, 4, 5], decoder_hidden_size=128,
                                  n_codebooks=num_codebooks, codebook_size=codebook_size, codebook_dim=8,
                                  hidden_size=128, upsampling_ratios=[5, 4, 2], sampling_rate=SR))
    if kind == "encodec":
        # frame rate 8000 / 40 = 200 Hz; bandwidth b kbps -> b * 1000 / (200 * log2(codebook_size)) codebooks
        bw = num_codebooks * 200 * (codebook_size.bit_length() - 1) / 1000
        return EncodecModel(EncodecConfig(sampling_rate=SR, audio_channels=1, num_filters=16, num_residual_layers=1,
                                          upsampling_ratios=[5, 4, 2], hidden_size=64, codebook_size=codebook_size,
                                          codebook_dim=64, target_bandwidths=[bw], num_lstm_layers=1,
                                          normalize=False))
    raise ValueError(f"kind must be 'dac' or 'encodec', got {kind!r}")


def log_mel(x: torch.Tensor, n_fft: int = 512, n_mels: int = 64) -> torch.Tensor:
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(SR, n_fft=n_fft, hop_length=n_fft // 4, n_mels=n_mels).to(x.device)
    return torch.log(mel(x) + 1e-5)


def mel_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    n = min(a.shape[-1], b.shape[-1])
    return float((log_mel(a[..., :n]) - log_mel(b[..., :n])).abs().mean())


def mel_distance_multires(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean log-mel L1 over 256- and 1024-point FFT analyses (32 / 64 mels)."""
    n = min(a.shape[-1], b.shape[-1])
    return sum(float((log_mel(a[..., :n], f, m) - log_mel(b[..., :n], f, m)).abs().mean())
               for f, m in ((256, 32), (1024, 64))) / 2


def si_snr(est: torch.Tensor, ref: torch.Tensor) -> float:
    n = min(est.shape[-1], ref.shape[-1])
    est, ref = est[..., :n] - est[..., :n].mean(-1, keepdim=True), ref[..., :n] - ref[..., :n].mean(-1, keepdim=True)
    s = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + 1e-8) * ref
    return float((10 * torch.log10(s.pow(2).sum(-1) / ((est - s).pow(2).sum(-1) + 1e-8) + 1e-8)).mean())


def _reconstruct(model, kind: str, x: torch.Tensor):
    if kind == "dac":
        out = model(x[:, None])
        return out.audio_values.reshape(x.shape[0], -1), out.loss
    enc = model.encode(x[:, None], bandwidth=model.config.target_bandwidths[-1])
    # straight-through: Encodec's forward quantises without a gradient path; train on the continuous latent + VQ
    emb = model.encoder(x[:, None])
    q = model.quantizer.decode(enc.audio_codes[0].transpose(0, 1))
    q_st = emb + (q - emb).detach()
    wav = model.decoder(q_st).reshape(x.shape[0], -1)
    commit = F.mse_loss(emb, q.detach()) + F.mse_loss(q, emb.detach())
    return wav, commit


def evaluate(model, kind: str, clips) -> dict:
    """Held-out reconstruction of ``clips`` (a list of 1-D tensors at :data:`SR`, or ``{task: list}``): mean log-mel
    distance, multi-resolution log-mel distance and SI-SNR (overall, and per task for a dict)."""
    from .codec import AudioCodec

    was_training = model.training
    codec = AudioCodec(model.eval())
    groups = clips if isinstance(clips, dict) else {"all": clips}
    rows: dict[str, list] = {}
    for task, cs in groups.items():
        for c in cs:
            rec = codec.decode(codec.encode(c, SR))[0]
            rows.setdefault(task, []).append((mel_distance(rec, c), mel_distance_multires(rec, c), si_snr(rec, c)))
    model.train(was_training)

    def summary(r):
        return {"mel_distance": sum(x[0] for x in r) / len(r), "mel_distance_multires": sum(x[1] for x in r) / len(r),
                "si_snr_db": sum(x[2] for x in r) / len(r), "clips": len(r)}

    out = summary([x for r in rows.values() for x in r])
    if isinstance(clips, dict):
        out["by_task"] = {t: summary(r) for t, r in rows.items()}
    return out


def fit_mel_codec(items, held_out, *, seed: int = 0, config: dict | None = None, max_frames: int = 40000) -> dict:
    """Fit the mel-RVQ codec on ``items`` (AudioItem list) and evaluate it on ``held_out`` (list or ``{task: list}``
    of AudioItems); same result layout as :func:`train_codec`, plus ``vocoder_only``: log-mel distance of Griffin-Lim
    on the unquantised frames (the floor the quantiser cannot go below)."""
    from .data_audio import load_audio
    from .mel_codec import MelRVQConfig, fit_mel_rvq

    t0 = time.process_time()
    wavs = [load_audio(it.path, SR)[0] for it in items]
    model, rep = fit_mel_rvq(wavs, MelRVQConfig(sampling_rate=SR, **(config or {})), seed=seed, max_frames=max_frames)
    cpu = time.process_time() - t0
    clips = _held_out_clips(held_out)
    flat = [c for cs in clips.values() for c in cs] if isinstance(clips, dict) else clips
    with torch.no_grad():
        voc = [mel_distance(model.vocode(model.features(c[None]))[0], c[None]) for c in flat]
    return {"kind": "mel_rvq", "steps": 0, "cpu_seconds": cpu, "fit": rep, "vocoder_only_mel_distance":
            sum(voc) / len(voc), "after": evaluate(model, "mel_rvq", clips), "model": model}


def _held_out_clips(held_out):
    """First 2 s of every non-silent held-out item, as a list or ``{task: list}``."""
    from .data_audio import load_audio

    def load(its):
        cs = [load_audio(it.path, SR)[0][: 2 * SR] for it in its]
        return [c for c in cs if c.abs().max() > 1e-3]

    clips = {t: load(v) for t, v in held_out.items()} if isinstance(held_out, dict) else load(held_out)
    if not (any(clips.values()) if isinstance(clips, dict) else clips):
        raise ValueError("no non-silent held-out clips")
    return clips


def train_codec(kind: str, items, held_out, *, minutes: float = 5.0, max_steps: int | None = None,
                segment: int = 4000, batch_size: int = 8, lr: float = 1e-3, seed: int = 0, log=print) -> dict:
    """Train ``tiny_codec(kind)`` on random ``segment``-sample crops of ``items`` for ``minutes`` of CPU time
    (or ``max_steps``); returns held-out metrics before / after and the model."""
    from .data_audio import load_audio

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = tiny_codec(kind).train()
    wavs = [w for w in (load_audio(it.path, SR)[0] for it in items) if w.numel() > segment and w.abs().max() > 1e-3]
    if not wavs:
        raise ValueError("need training clips longer than one segment")
    clips = _held_out_clips(held_out)
    before = evaluate(model, kind, clips)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    t0, step = time.process_time(), 0
    while (max_steps is None and time.process_time() - t0 < minutes * 60) or (max_steps is not None and step < max_steps):
        batch = []
        for _ in range(batch_size):
            w = rng.choice(wavs)
            s = rng.randrange(0, w.numel() - segment)
            batch.append(w[s: s + segment] / (w.abs().max() + 1e-5) * 0.9)
        x = torch.stack(batch)
        rec, vq = _reconstruct(model, kind, x)
        n = min(rec.shape[-1], x.shape[-1])
        rec, x = rec[..., :n], x[..., :n]
        loss = F.l1_loss(rec, x) + sum((log_mel(rec, n) - log_mel(x, n)).abs().mean() for n in (256, 512, 1024)) / 3
        loss = loss + (vq.mean() if vq is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"{kind} step {step} loss {loss.item():.4f} cpu {time.process_time() - t0:.0f}s")
    after = evaluate(model, kind, clips)
    return {"kind": kind, "steps": step, "cpu_seconds": time.process_time() - t0, "before": before, "after": after,
            "model": model}


def compare_and_save(items, held_out, out: str | Path, *, minutes: float, kinds=("mel_rvq", "dac", "encodec"),
                     log=print) -> dict:
    """Build every kind (the neural codecs train for ``minutes`` of CPU time each; the mel-RVQ codec fits in however
    long k-means takes, reported), save the one with the lowest held-out log-mel distance, write
    ``codec_comparison.json``. ``held_out``: a list or ``{task: list}`` of AudioItems."""
    results = {}
    for k in kinds:
        results[k] = fit_mel_codec(items, held_out) if k == "mel_rvq" else train_codec(k, items, held_out,
                                                                                     minutes=minutes, log=log)
        log(f"{k}: {results[k]['cpu_seconds']:.0f} CPU s, held-out {json.dumps(results[k]['after'])}")
    best = min(results, key=lambda k: results[k]["after"]["mel_distance"])
    out = Path(out)
    results[best]["model"].save_pretrained(out)
    summary = {k: {kk: vv for kk, vv in r.items() if kk != "model"} for k, r in results.items()}
    summary["winner"] = best
    (out / "codec_comparison.json").write_text(json.dumps(summary, indent=1))
    return summary


__all__ = ["tiny_codec", "train_codec", "fit_mel_codec", "compare_and_save", "mel_distance", "mel_distance_multires",
           "si_snr", "evaluate"]
