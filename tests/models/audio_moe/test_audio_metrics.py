"""Harness metrics: DTW, mel-cepstral distortion, the music style classifier (accuracy, Fréchet distance)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moezoo.models.audio_moe.audio_metrics import StyleClassifier, dtw_path, mel_cepstral_distortion

SR = 8000


def _speechlike(seed, seconds=1.0, f0=140.0, rate=3.0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(SR * seconds)) / SR
    env = (torch.sin(2 * math.pi * rate * t).abs() + 0.1)
    x = sum(torch.sin(2 * math.pi * f0 * h * t) / h for h in range(1, 12))
    return 0.2 * env * x + 0.005 * torch.randn(t.shape, generator=g)


def test_dtw_path():
    cost = np.array([[0, 5, 5], [5, 0, 5], [5, 0, 5], [5, 5, 0]], dtype=float)
    assert dtw_path(cost) == [(0, 0), (1, 1), (2, 1), (3, 2)]
    with pytest.raises(ValueError, match="non-empty"):
        dtw_path(np.zeros((0, 3)))


def test_mcd_orders_and_aligns():
    ref = _speechlike(0)
    assert mel_cepstral_distortion(ref, ref, SR) == 0.0
    close = ref + 0.01 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    other = _speechlike(2, f0=230.0) * torch.linspace(1, 0.2, ref.numel())
    noise = 0.1 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    d_close, d_other, d_noise = (mel_cepstral_distortion(x, ref, SR) for x in (close, other, noise))
    assert d_close < d_other < d_noise
    # the same sound spoken 1.5x slower (same pitch): DTW realigns it, frame-by-frame comparison does not
    slow = _speechlike(0, seconds=1.5, rate=2.0)
    assert mel_cepstral_distortion(slow, ref, SR) < 0.6 * mel_cepstral_distortion(slow, ref, SR, align="none")
    with pytest.raises(ValueError, match="align"):
        mel_cepstral_distortion(ref, ref, SR, align="x")
    with pytest.raises(ValueError, match="empty"):
        mel_cepstral_distortion(ref[:0], ref, SR)
    assert mel_cepstral_distortion(ref[:100], ref, SR) > 0  # shorter than a window: padded, still scored


def _styles(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(SR) / SR
    wavs, labels = [], []
    for i in range(n):
        f = 300 + 80 * float(torch.rand(1, generator=g))
        wavs.append(0.3 * torch.sin(2 * math.pi * f * t))
        labels.append("tone")
        wavs.append(0.1 * torch.randn(SR, generator=g))
        labels.append("noise")
        clicks = torch.zeros(SR)
        clicks[:: 800 + 40 * i] = 0.9
        wavs.append(clicks + 0.001 * torch.randn(SR, generator=g))
        labels.append("click")
    return wavs, labels


def test_style_classifier_accuracy_and_frechet():
    wavs, labels = _styles(0)
    clf = StyleClassifier(SR, crops=2).fit(wavs, labels)
    test, test_labels = _styles(1, n=2)
    assert clf.accuracy(test, test_labels) == 1.0 and sorted(clf.classes) == ["click", "noise", "tone"]
    assert clf.features(test).shape == (6, 32)
    same = clf.frechet_distance(wavs, test)
    tones_only = [w for w, y in zip(test, test_labels) if y == "tone"] * 3
    assert 0 <= same < clf.frechet_distance(wavs, tones_only)
    with pytest.raises(ValueError, match=">= 2 clips"):
        clf.frechet_distance(wavs, test[:1])
    with pytest.raises(ValueError, match="not fitted"):
        StyleClassifier(SR).predict(test)
    with pytest.raises(ValueError, match=">= 2 styles"):
        StyleClassifier(SR).fit(wavs[:1], labels[:1])
