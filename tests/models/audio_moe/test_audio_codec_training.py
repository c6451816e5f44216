"""Codec training: a few steps of the tiny DAC and Encodec on real speech reduce the held-out mel distance; metrics."""
from __future__ import annotations

import math

import torch

from moezoo.models.audio_moe.codec_training import mel_distance, si_snr, train_codec
from moezoo.models.audio_moe.data_audio import asterisk_speech, split_items


def test_metrics():
    t = torch.arange(8000) / 8000
    x = torch.sin(2 * math.pi * 300 * t)[None]
    assert mel_distance(x, x) == 0.0 and si_snr(x, x) > 60
    assert si_snr(x + 0.1 * torch.randn_like(x), x) < si_snr(x + 0.01 * torch.randn_like(x), x)


def test_training_improves_reconstruction():
    tr, te = split_items(asterisk_speech(), 0.05)
    for kind in ("dac", "encodec"):
        r = train_codec(kind, tr[:8], te[:2], max_steps=3, batch_size=2, log=lambda m: None)
        assert r["steps"] == 3 and r["after"]["mel_distance"] < r["before"]["mel_distance"]
