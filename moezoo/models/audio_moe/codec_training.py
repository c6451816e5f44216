"""Train a small transformers codec (``DacModel`` or ``EncodecModel``, tiny configs) on real offline audio and measure
its reconstruction: log-mel L1 distance and SI-SNR on held-out clips.

Loss: waveform L1 + multi-resolution log-mel L1 + the codec's own VQ losses (DAC: commitment + codebook; Encodec: its
commitment loss). No adversarial losses (CPU budget), so quality is that of a reconstruction-only codec.
``python training/audio_moe/train_codec.py --kind dac --minutes 5 --out runs/audio_codec``.
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


def evaluate(model, kind: str, clips: list[torch.Tensor]) -> dict:
    from .codec import AudioCodec

    codec = AudioCodec(model.eval())
    md, snr = [], []
    for c in clips:
        rec = codec.decode(codec.encode(c, SR))[0]
        md.append(mel_distance(rec, c))
        snr.append(si_snr(rec, c))
    model.train()
    return {"mel_distance": sum(md) / len(md), "si_snr_db": sum(snr) / len(snr), "clips": len(clips)}


def train_codec(kind: str, items, held_out, *, minutes: float = 5.0, max_steps: int | None = None,
                segment: int = 4000, batch_size: int = 8, lr: float = 1e-3, seed: int = 0, log=print) -> dict:
    """Train ``tiny_codec(kind)`` on random ``segment``-sample crops of ``items`` for ``minutes`` of CPU time
    (or ``max_steps``); returns held-out metrics before / after and the model."""
    from .data_audio import load_audio

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = tiny_codec(kind).train()
    wavs = [w for w in (load_audio(it.path, SR)[0] for it in items) if w.numel() > segment and w.abs().max() > 1e-3]
    clips = [load_audio(it.path, SR)[0][: 2 * SR] for it in held_out]
    clips = [c for c in clips if c.abs().max() > 1e-3]
    if not wavs or not clips:
        raise ValueError("need training clips longer than one segment and non-silent held-out clips")
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


def compare_and_save(items, held_out, out: str | Path, *, minutes: float, kinds=("dac", "encodec"), log=print) -> dict:
    """Train every kind for the same CPU time, save the one with the lower held-out mel distance."""
    results = {k: train_codec(k, items, held_out, minutes=minutes, log=log) for k in kinds}
    best = min(results, key=lambda k: results[k]["after"]["mel_distance"])
    out = Path(out)
    results[best]["model"].save_pretrained(out)
    summary = {k: {kk: vv for kk, vv in r.items() if kk != "model"} for k, r in results.items()}
    summary["winner"] = best
    (out / "codec_comparison.json").write_text(json.dumps(summary, indent=1))
    return summary


__all__ = ["tiny_codec", "train_codec", "compare_and_save", "mel_distance", "si_snr", "evaluate"]
