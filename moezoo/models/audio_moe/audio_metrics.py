"""Audio metrics of the ``audio_moe`` harness.

- :func:`mel_cepstral_distortion`: MCD in dB between a generated and a reference utterance, on mel-cepstra
  c_1..c_D from ``torchaudio.transforms.MFCC`` (natural-log mel power, orthonormal DCT, halved to log-amplitude
  cepstra), ``MCD = 10 / ln 10 * sqrt(2 * sum_d (c_d - c'_d)^2)`` averaged over the frames of a DTW alignment
  (:func:`dtw_path`; used when the lengths differ, or always with ``align="dtw"``). Frames more than ``trim_db`` below
  the loudest frame are dropped first (leading / trailing / inter-word silence).
- :class:`StyleClassifier`: a small MLP (scikit-learn ``MLPClassifier``) on clip-level log-mel statistics, trained on
  real Sonic Pi clips whose file-name prefix is the style label. It gives the style accuracy of generated clips, and
  its hidden layer is the feature space of :meth:`StyleClassifier.frechet_distance` (torchmetrics'
  ``FrechetInceptionDistance`` with this feature extractor, as ``moezoo.metrics.generation.classifier_fid`` does for
  images).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn


# ------------------------------------------------------------------------------------------------ MCD
def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """Minimum-cost monotone alignment of a (N, M) cost matrix (steps (1,0), (0,1), (1,1)); list of (i, j)."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or 0 in cost.shape:
        raise ValueError(f"cost must be a non-empty (N, M) matrix, got shape {cost.shape}")
    N, M = cost.shape
    acc = np.full((N + 1, M + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, N + 1):
        row, prev = acc[i], acc[i - 1]
        c = cost[i - 1]
        diag_up = np.minimum(prev[:-1], prev[1:])  # from (i-1, j-1) or (i-1, j)
        for j in range(1, M + 1):  # left neighbour depends on this row: a scan
            row[j] = c[j - 1] + min(diag_up[j - 1], row[j - 1])
    i, j, path = N, M, []
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        step = int(np.argmin([acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]]))
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    return path[::-1]


def mel_cepstra(wav: torch.Tensor, sr: int, n_cep: int = 13, n_fft: int = 512, hop_length: int = 80,
                n_mels: int = 40, trim_db: float | None = 40.0) -> torch.Tensor:
    """(frames, n_cep) log-amplitude mel-cepstra c_1..c_n_cep of a mono wav (T,); quiet frames trimmed."""
    import torchaudio

    wav = torch.as_tensor(wav, dtype=torch.float32).reshape(-1)
    if wav.numel() == 0:
        raise ValueError("wav is empty (no samples)")
    if not torch.isfinite(wav).all():
        raise ValueError("wav contains NaN or inf samples")
    if wav.numel() < n_fft // 2 + 1:  # shorter than half a window: pad with silence
        wav = torch.nn.functional.pad(wav, (0, n_fft // 2 + 1 - wav.numel()))
    mfcc = torchaudio.transforms.MFCC(sr, n_mfcc=n_cep + 1, log_mels=True,
                                      melkwargs=dict(n_fft=n_fft, hop_length=hop_length, n_mels=n_mels))
    c = mfcc(wav).T / 2  # ln(power) -> ln(amplitude)
    if trim_db is not None:
        energy = 10 * torch.log10(torchaudio.transforms.MelSpectrogram(
            sr, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)(wav).sum(0) + 1e-10)
        keep = energy > energy.max() - trim_db
        c = c[keep]
    return c[:, 1:]


def mel_cepstral_distortion(generated: torch.Tensor, reference: torch.Tensor, sr: int, *, align: str = "auto",
                            n_cep: int = 13) -> float:
    """MCD (dB) of ``generated`` against ``reference`` (mono, same ``sr``); ``align``: ``"auto"`` (DTW when the
    frame counts differ), ``"dtw"`` or ``"none"`` (frame by frame over the shorter)."""
    if align not in ("auto", "dtw", "none"):
        raise ValueError(f"align must be 'auto', 'dtw' or 'none', got {align!r}")
    a, b = mel_cepstra(generated, sr, n_cep), mel_cepstra(reference, sr, n_cep)
    k = 10 / math.log(10) * math.sqrt(2)
    if align == "none" or (align == "auto" and a.shape[0] == b.shape[0]):
        n = min(a.shape[0], b.shape[0])
        return float(k * (a[:n] - b[:n]).pow(2).sum(-1).sqrt().mean())
    dist = torch.cdist(a.double(), b.double())
    path = dtw_path(dist.numpy())
    return float(k * np.mean([dist[i, j].item() for i, j in path]))


# ------------------------------------------------------------------------------------------------ style classifier
@functools.lru_cache(maxsize=8)
def _mel(sr: int, n_mels: int):
    import torchaudio

    return torchaudio.transforms.MelSpectrogram(sr, n_fft=512, hop_length=128, n_mels=n_mels)


def clip_features(wav: torch.Tensor, sr: int, n_mels: int = 64) -> torch.Tensor:
    """Clip-level features: mean and std over time of the log-mel spectrogram (2 * n_mels,)."""
    wav = torch.as_tensor(wav, dtype=torch.float32).reshape(-1)
    if wav.numel() == 0:
        raise ValueError("wav is empty (no samples)")
    if wav.numel() < 512:  # shorter than one analysis window: pad with silence
        wav = torch.nn.functional.pad(wav, (0, 512 - wav.numel()))
    with torch.no_grad():
        m = torch.log(_mel(sr, n_mels)(wav) + 1e-5)
    return torch.cat([m.mean(-1), m.std(-1, unbiased=False)])


class _HiddenFeatures(nn.Module):
    """The MLP's hidden activations as a torchmetrics FID ``feature`` module (input: standardised clip features)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float64))
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float64))
        self.num_features = int(self.weight.shape[1])

    def forward(self, x):
        return torch.relu(x.double() @ self.weight + self.bias)


class StyleClassifier:
    """Music style classifier on real clips (see the module docstring).

    ``fit(wavs, labels)`` trains on random ``crop_seconds`` crops (``crops`` per clip) of the training clips;
    ``predict(wavs)``, ``accuracy(wavs, labels)``, ``features(wavs)`` (hidden layer), ``frechet_distance(real, fake)``.
    """

    def __init__(self, sample_rate: int = 8000, hidden: int = 32, crop_seconds: float = 1.0, crops: int = 8,
                 seed: int = 0):
        self.sr, self.hidden, self.crop, self.crops, self.seed = sample_rate, hidden, crop_seconds, crops, seed
        self.clf = self.scaler = None

    def _x(self, wavs) -> np.ndarray:
        if not len(wavs):
            raise ValueError("wavs is empty")
        return np.stack([clip_features(w, self.sr).numpy() for w in wavs])

    def fit(self, wavs: list[torch.Tensor], labels: list[str]) -> "StyleClassifier":
        from sklearn.neural_network import MLPClassifier
        from sklearn.preprocessing import StandardScaler

        if len(wavs) != len(labels) or len(set(labels)) < 2:
            raise ValueError(f"need one label per clip and >= 2 styles, got {len(wavs)} clips, {len(labels)} labels, "
                             f"{len(set(labels))} styles")
        rng = np.random.default_rng(self.seed)
        n = int(self.crop * self.sr)
        xs, ys = [], []
        for w, y in zip(wavs, labels):
            w = torch.as_tensor(w).reshape(-1)
            starts = [0] + [int(rng.integers(0, w.numel() - n)) for _ in range(self.crops - 1)] if w.numel() > n else [0]
            for s in starts:
                xs.append(w[s: s + n])
                ys.append(y)
        x = self._x(xs)
        self.scaler = StandardScaler().fit(x)
        self.clf = MLPClassifier((self.hidden,), solver="lbfgs", alpha=1e-2, max_iter=500, random_state=self.seed)
        self.clf.fit(self.scaler.transform(x), ys)
        return self

    def _z(self, wavs) -> np.ndarray:
        if self.clf is None:
            raise ValueError("the StyleClassifier is not fitted: call fit(wavs, labels) first")
        return self.scaler.transform(self._x(wavs))

    @property
    def classes(self) -> list[str]:
        return list(self.clf.classes_)

    def predict(self, wavs) -> list[str]:
        z = self._z(wavs)
        return list(self.clf.predict(z))

    def accuracy(self, wavs, labels: list[str]) -> float:
        return float(np.mean([p == y for p, y in zip(self.predict(wavs), labels)]))

    def feature_module(self) -> _HiddenFeatures:
        return _HiddenFeatures(self.clf.coefs_[0], self.clf.intercepts_[0])

    def features(self, wavs) -> torch.Tensor:
        return self.feature_module()(torch.as_tensor(self._z(wavs)))

    def frechet_distance(self, real_wavs, fake_wavs) -> float:
        """Fréchet distance between the hidden-layer features of two sets of clips (>= 2 each)."""
        from torchmetrics.image.fid import FrechetInceptionDistance

        if len(real_wavs) < 2 or len(fake_wavs) < 2:
            raise ValueError(f"the Fréchet distance needs >= 2 clips per set, got {len(real_wavs)} / {len(fake_wavs)}")
        fid = FrechetInceptionDistance(feature=self.feature_module(), normalize=True)
        fid.update(torch.as_tensor(self._z(real_wavs)), real=True)
        fid.update(torch.as_tensor(self._z(fake_wavs)), real=False)
        return float(fid.compute())


__all__ = ["dtw_path", "mel_cepstra", "mel_cepstral_distortion", "clip_features", "StyleClassifier"]
