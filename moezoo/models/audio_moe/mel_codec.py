"""A codec that works offline without training a network: residual VQ over log-mel frames + a Griffin-Lim vocoder.

- analysis: ``torchaudio.transforms.MelSpectrogram`` (magnitude, ``power=1``), ``log(mel + floor)``, standardised per
  mel bin with statistics of the fitting audio;
- quantiser: K residual codebooks fitted by k-means (scikit-learn ``KMeans``, seeded, so fitting is deterministic)
  on frames of the fitting audio, stage k on the residual left by stages < k;
- synthesis: ``torchaudio.transforms.InverseMelScale`` (least squares, clamped at 0) then
  ``torchaudio.functional.griffinlim`` with a fixed (zero) initial phase, so decoding is deterministic.

The codes carry only the mel magnitude; the phase is re-estimated by Griffin-Lim, so the waveform does not line up with
the input sample by sample and SI-SNR is near that of an unrelated signal even when the spectrogram (and the sound) is
close. ``MelRVQCodecModel`` is a transformers ``PreTrainedModel`` (``save_pretrained`` / ``from_pretrained``,
safetensors); use it through :class:`moezoo.models.audio_moe.codec.AudioCodec`.
"""
from __future__ import annotations

import time

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class MelRVQConfig(PretrainedConfig):
    """Args: sampling_rate (Hz), n_fft, hop_length (samples per frame; frame rate = sampling_rate / hop_length),
    n_mels, num_codebooks (K), codebook_size, log_floor (added before the log), griffin_lim_iters, momentum."""

    model_type = "moezoo_mel_rvq"

    def __init__(self, sampling_rate: int = 8000, n_fft: int = 512, hop_length: int = 128, n_mels: int = 64,
                 num_codebooks: int = 4, codebook_size: int = 128, log_floor: float = 1e-4,
                 griffin_lim_iters: int = 48, momentum: float = 0.99, audio_channels: int = 1, **kwargs):
        if n_fft < hop_length or hop_length < 1:
            raise ValueError(f"need 1 <= hop_length <= n_fft, got hop_length={hop_length}, n_fft={n_fft}")
        if num_codebooks < 1 or codebook_size < 2:
            raise ValueError(f"need num_codebooks >= 1 and codebook_size >= 2, got {num_codebooks}, {codebook_size}")
        self.sampling_rate, self.n_fft, self.hop_length, self.n_mels = sampling_rate, n_fft, hop_length, n_mels
        self.num_codebooks, self.codebook_size, self.log_floor = num_codebooks, codebook_size, log_floor
        self.griffin_lim_iters, self.momentum, self.audio_channels = griffin_lim_iters, momentum, audio_channels
        super().__init__(**kwargs)

    @property
    def frame_rate(self) -> float:
        return self.sampling_rate / self.hop_length


class MelRVQCodecModel(PreTrainedModel):
    """Log-mel residual-VQ codec. ``encode(wav (B, 1, N)) -> codes (B, K, N // hop)``; ``decode(codes) -> (B, 1, T*hop)``.

    Untrained (``MelRVQCodecModel(config)``) the codebooks are zero; fit them with :meth:`fit` or
    :func:`fit_mel_rvq`."""

    config_class = MelRVQConfig
    base_model_prefix = "mel_rvq"
    main_input_name = "input_values"

    def __init__(self, config: MelRVQConfig):
        super().__init__(config)
        M, K, C = config.n_mels, config.num_codebooks, config.codebook_size
        self.mean = nn.Parameter(torch.zeros(M), requires_grad=False)
        self.std = nn.Parameter(torch.ones(M), requires_grad=False)
        self.codebooks = nn.Parameter(torch.zeros(K, C, M), requires_grad=False)
        self.post_init()

    def _init_weights(self, module):  # the statistics and codebooks come from fit(), not from an initialiser
        pass

    def _dsp(self, device: torch.device):
        """(MelSpectrogram, InverseMelScale) on ``device``; built from the config, kept out of the state dict."""
        import torchaudio

        cache = self.__dict__.setdefault("_dsp_cache", {})
        if device not in cache:
            cfg = self.config
            cache[device] = (
                torchaudio.transforms.MelSpectrogram(cfg.sampling_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
                                                     n_mels=cfg.n_mels, power=1.0).to(device),
                torchaudio.transforms.InverseMelScale(cfg.n_fft // 2 + 1, n_mels=cfg.n_mels,
                                                      sample_rate=cfg.sampling_rate).to(device))
        return cache[device]

    # ------------------------------------------------------------------------------------------------ analysis
    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, 1, N) or (B, N) -> standardised log-mel frames (B, N // hop, n_mels)."""
        cfg = self.config
        x = wav.reshape(wav.shape[0], -1).to(self.mean)
        T = x.shape[-1] // cfg.hop_length
        if T < 1:
            raise ValueError(f"wav has {x.shape[-1]} samples, fewer than one frame (hop_length={cfg.hop_length})")
        if x.shape[-1] <= cfg.n_fft // 2:  # too short for the centred (reflect-padded) STFT: pad with silence
            x = torch.nn.functional.pad(x, (0, cfg.n_fft // 2 + 1 - x.shape[-1]))
        m = self._dsp(x.device)[0](x)[..., :T]  # center=True: frame t is centred on sample t * hop
        return ((torch.log(m + cfg.log_floor).transpose(1, 2)) - self.mean) / self.std

    def quantize(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, T, n_mels) -> codes (B, K, T): nearest codeword per stage on the running residual."""
        r = feats.reshape(-1, feats.shape[-1])
        codes = []
        for cb in self.codebooks:
            idx = torch.cdist(r, cb).argmin(-1)
            codes.append(idx)
            r = r - cb[idx]
        return torch.stack(codes, 0).view(len(codes), feats.shape[0], feats.shape[1]).transpose(0, 1)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, K, T) -> standardised log-mel frames (B, T, n_mels)."""
        return sum(self.codebooks[k][codes[:, k]] for k in range(codes.shape[1]))

    # ------------------------------------------------------------------------------------------------ synthesis
    def vocode(self, feats: torch.Tensor) -> torch.Tensor:
        """Standardised log-mel frames (B, T, n_mels) -> waveform (B, 1, T * hop) by Griffin-Lim."""
        import torchaudio.functional as AF

        cfg = self.config
        mel = (torch.exp(feats * self.std + self.mean) - cfg.log_floor).clamp_min(0).transpose(1, 2)
        spec = self._dsp(mel.device)[1](mel).clamp_min(0)
        window = torch.hann_window(cfg.n_fft, device=spec.device)
        T = feats.shape[1]
        spec = torch.cat([spec, spec[..., -1:]], -1)  # T frames + a copy of the last: stft of T * hop samples has T + 1
        wav = AF.griffinlim(spec, window, cfg.n_fft, cfg.hop_length, cfg.n_fft, 1.0, cfg.griffin_lim_iters,
                            cfg.momentum, T * cfg.hop_length, False)
        return wav[:, None]

    def _check_fitted(self) -> None:
        if not bool(self.codebooks.abs().sum() > 0):
            raise ValueError("this MelRVQCodecModel is not fitted (all codebooks are zero): call fit(wavs) or load a "
                             "fitted folder with from_pretrained")

    @torch.no_grad()
    def encode(self, input_values: torch.Tensor, num_quantizers: int | None = None) -> torch.Tensor:
        self._check_fitted()
        codes = self.quantize(self.features(input_values))
        return codes if num_quantizers is None else codes[:, :num_quantizers]

    @torch.no_grad()
    def decode(self, audio_codes: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return self.vocode(self.dequantize(audio_codes))

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        """Reconstruction: encode then decode."""
        return self.decode(self.encode(input_values))

    # ------------------------------------------------------------------------------------------------ fitting
    @torch.no_grad()
    def fit(self, wavs: list[torch.Tensor], *, max_frames: int = 60000, seed: int = 0, log=None) -> dict:
        """Fit mean / std and the K codebooks by k-means on frames of ``wavs`` (1-D tensors at ``sampling_rate``).

        Each clip contributes at most ``max_frames / len(wavs)`` frames (evenly spaced), so long clips do not dominate;
        silent frames (no energy above the log floor in every bin) are dropped. Deterministic for a given ``seed``."""
        from sklearn.cluster import KMeans

        cfg = self.config
        t0 = time.process_time()
        if not wavs:
            raise ValueError("fit needs at least one clip")
        per_clip = max(1, max_frames // len(wavs))
        frames = []
        self.mean.zero_()
        self.std.fill_(1.0)
        for w in wavs:
            if w.numel() <= cfg.n_fft // 2 or w.abs().max() < 1e-6:
                continue
            f = self.features(w[None])[0]
            f = f[f.max(-1).values > torch.log(torch.tensor(cfg.log_floor)) + 1.0]
            if len(f) > per_clip:
                f = f[torch.linspace(0, len(f) - 1, per_clip).long()]
            frames.append(f)
        if not frames:
            raise ValueError("no usable (long enough, non-silent) clips to fit the codec on")
        x = torch.cat(frames).double()
        if len(x) < cfg.codebook_size:
            raise ValueError(f"only {len(x)} frames to fit {cfg.codebook_size} codewords; give more audio")
        self.mean.copy_(x.mean(0).float())
        self.std.copy_(x.std(0).clamp_min(1e-3).float())
        r = ((x - self.mean.double()) / self.std.double()).numpy()
        errs = []
        for k in range(cfg.num_codebooks):
            km = KMeans(cfg.codebook_size, n_init=1, max_iter=50, random_state=seed + k).fit(r)
            cb = torch.from_numpy(km.cluster_centers_)
            self.codebooks[k].copy_(cb.float())
            r = r - km.cluster_centers_[km.labels_]
            errs.append(float((r ** 2).mean()))
            if log:
                log(f"mel-RVQ stage {k + 1}/{cfg.num_codebooks}: residual mse {errs[-1]:.4f}")
        return {"frames": len(x), "residual_mse": errs, "cpu_seconds": time.process_time() - t0}


def fit_mel_rvq(wavs: list[torch.Tensor], config: MelRVQConfig | None = None, *, seed: int = 0, max_frames: int = 60000,
                log=None):
    """A fitted :class:`MelRVQCodecModel` and its fit report."""
    model = MelRVQCodecModel(config or MelRVQConfig()).eval()
    report = model.fit(wavs, seed=seed, max_frames=max_frames, log=log)
    return model, report


__all__ = ["MelRVQConfig", "MelRVQCodecModel", "fit_mel_rvq"]
