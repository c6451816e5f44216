"""One interface over transformers' neural audio codecs (``EncodecModel``, ``DacModel``, ``MimiModel``) and the
offline log-mel residual-VQ codec (:class:`~moezoo.models.audio_moe.mel_codec.MelRVQCodecModel`).

``AudioCodec(model)`` or ``AudioCodec.from_pretrained(path)`` (class picked from the folder's ``config.json``):

- ``encode(wav, sr) -> codes`` (B, K, T) int64; ``wav`` is (T,), (B, T) or (B, 1, T) float in [-1, 1];
- ``decode(codes) -> wav`` (B, samples) float;
- ``sample_rate``, ``frame_rate`` (frames per second), ``num_codebooks`` (K), ``codebook_size``.

Bad input raises ``ValueError`` naming the argument: a sample rate other than the codec's (unless ``resample=True``,
which resamples with torchaudio), empty or silent audio, codes outside ``[0, codebook_size)`` or with the wrong number
of codebooks.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

SILENCE = 1e-6
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
BUNDLED_CODEC = "mel_rvq_8k_k4c128"  # shipped with the package: 8 kHz, 62.5 frames/s, 4 codebooks x 128 codes
KINDS = ("encodec", "dac", "mimi", "moezoo_mel_rvq")


class AudioCodec(nn.Module):
    """Wrapper giving every supported codec the same ``encode`` / ``decode`` and metadata.

    Args:
        model: a transformers ``EncodecModel``, ``DacModel`` or ``MimiModel``, or a ``MelRVQCodecModel``.
        bandwidth: Encodec only, the target bandwidth in kbps (default: the largest of ``config.target_bandwidths``);
            it fixes the number of codebooks.
        num_codebooks: DAC / Mimi / mel-RVQ only, use the first K quantizers (default: all).
    """

    def __init__(self, model: nn.Module, *, bandwidth: float | None = None, num_codebooks: int | None = None):
        super().__init__()
        kind = getattr(getattr(model, "config", None), "model_type", None)
        if kind not in KINDS:
            raise ValueError(f"model must be a transformers EncodecModel, DacModel or MimiModel or a MelRVQCodecModel, got "
                             f"{type(model).__name__} (model_type {kind!r})")
        self.model, self.kind = model.eval(), kind
        cfg = model.config
        if getattr(cfg, "audio_channels", 1) != 1:
            raise ValueError(f"only mono codecs are supported, this one has audio_channels={cfg.audio_channels}")
        if kind == "encodec":
            if num_codebooks is not None:
                raise ValueError("Encodec chooses its codebook count by bandwidth=; pass bandwidth, not num_codebooks")
            bws = list(cfg.target_bandwidths)
            self.bandwidth = float(bandwidth if bandwidth is not None else max(bws))
            if self.bandwidth not in [float(b) for b in bws]:
                raise ValueError(f"bandwidth must be one of the codec's target_bandwidths {bws}, got {bandwidth!r}")
            self._K = int(model.quantizer.get_num_quantizers_for_bandwidth(self.bandwidth))
        else:
            if bandwidth is not None:
                raise ValueError(f"bandwidth= is an Encodec option; {kind} takes num_codebooks=")
            total = int(getattr(cfg, {"dac": "n_codebooks", "mimi": "num_quantizers"}.get(kind, "num_codebooks")))
            k = total if num_codebooks is None else int(num_codebooks)
            if not 1 <= k <= total:
                raise ValueError(f"num_codebooks must be in [1, {total}], got {num_codebooks!r}")
            self._K = k
        if self._K < 1:
            raise ValueError(f"this codec config yields {self._K} codebooks; check target_bandwidths / frame rate")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, bandwidth: float | None = None, num_codebooks: int | None = None,
                        **kwargs) -> "AudioCodec":
        """Load an Encodec / DAC / Mimi / mel-RVQ ``save_pretrained`` folder (local; nothing is downloaded)."""
        from transformers import DacModel, EncodecModel, MimiModel, PretrainedConfig

        from .mel_codec import MelRVQCodecModel

        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"{str(path)!r} is not a codec folder (no config.json)")
        model_type = PretrainedConfig.get_config_dict(str(path))[0].get("model_type")
        classes = {"encodec": EncodecModel, "dac": DacModel, "mimi": MimiModel, "moezoo_mel_rvq": MelRVQCodecModel}
        if model_type not in classes:
            raise ValueError(f"{str(path)!r} holds a {model_type!r} model; expected one of {sorted(classes)}")
        return cls(classes[model_type].from_pretrained(path, **kwargs), bandwidth=bandwidth,
                   num_codebooks=num_codebooks)

    @classmethod
    def bundled(cls, name: str = BUNDLED_CODEC) -> "AudioCodec":
        """The codec shipped with moezoo (log-mel residual VQ fitted on the bundled speech + music, Griffin-Lim
        vocoder; see ``pretrained/<name>/NOTES.md``); works offline."""
        names = sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "config.json").is_file())
        if name not in names:
            raise ValueError(f"no bundled codec {name!r}; bundled: {names}")
        return cls.from_pretrained(PRETRAINED_DIR / name)

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)

    # ------------------------------------------------------------------------------------------------ metadata
    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    @property
    def frame_rate(self) -> float:
        cfg = self.model.config
        if self.kind in ("dac", "moezoo_mel_rvq"):
            return self.sample_rate / cfg.hop_length
        return float(cfg.frame_rate)

    @property
    def num_codebooks(self) -> int:
        return self._K

    @property
    def codebook_size(self) -> int:
        return int(self.model.config.codebook_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------------------ encode / decode
    def _check_wav(self, wav, sr: int, resample: bool) -> torch.Tensor:
        if not torch.is_tensor(wav):
            try:
                wav = torch.as_tensor(wav)
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"wav must be a tensor or array of samples, got {type(wav).__name__}") from exc
        if not wav.is_floating_point():
            raise ValueError(f"wav must hold float samples in [-1, 1], got dtype {wav.dtype}")
        if wav.dim() == 1:
            wav = wav[None, None]
        elif wav.dim() == 2:
            wav = wav[:, None]
        elif wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"wav must be (samples,), (batch, samples) or (batch, 1, samples) mono audio, got shape "
                             f"{tuple(wav.shape)}")
        if wav.shape[-1] == 0 or wav.shape[0] == 0:
            raise ValueError("wav is empty (no samples)")
        if not torch.isfinite(wav).all():
            raise ValueError("wav contains NaN or inf samples")
        if not isinstance(sr, int) or isinstance(sr, bool) or sr <= 0:
            raise ValueError(f"sr must be a positive int (Hz), got {sr!r}")
        if sr != self.sample_rate:
            if not resample:
                raise ValueError(f"sr={sr} Hz but this codec expects {self.sample_rate} Hz; resample the audio or pass "
                                 "resample=True")
            import torchaudio.functional as AF

            wav = AF.resample(wav, sr, self.sample_rate)
        silent = wav.abs().amax(dim=(1, 2)) < SILENCE
        if silent.any():
            raise ValueError(f"wav item(s) {silent.nonzero().flatten().tolist()} are silent (peak < {SILENCE}); "
                             "there is nothing to encode")
        return wav.to(self.device, next(self.model.parameters()).dtype)

    @torch.no_grad()
    def encode(self, wav, sr: int, *, resample: bool = False) -> torch.Tensor:
        """Audio -> codes (B, K, T) int64 (T = frames at :attr:`frame_rate`)."""
        x = self._check_wav(wav, sr, resample)
        if self.kind == "encodec":
            out = self.model.encode(x, bandwidth=self.bandwidth)
            if out.audio_scales is not None and any(s is not None for s in out.audio_scales):
                raise ValueError("Encodec checkpoints with normalize=True (per-chunk scales) are not supported; "
                                 "codes alone could not be decoded")
            codes = out.audio_codes  # (chunks, B, K, T)
            codes = codes.permute(1, 2, 0, 3).reshape(codes.shape[1], codes.shape[2], -1)
        elif self.kind == "dac":
            codes = self.model.encode(x).audio_codes
        elif self.kind == "moezoo_mel_rvq":
            codes = self.model.encode(x)
        else:
            codes = self.model.encode(x, num_quantizers=self._K).audio_codes
        return codes[:, : self._K].long()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, K, T) (or (K, T)) -> waveform (B, samples) at :attr:`sample_rate`."""
        if not torch.is_tensor(codes) or codes.is_floating_point():
            raise ValueError(f"codes must be an integer tensor (batch, num_codebooks, frames), got "
                             f"{codes.dtype if torch.is_tensor(codes) else type(codes).__name__}")
        if codes.dim() == 2:
            codes = codes[None]
        if codes.dim() != 3 or codes.shape[1] != self._K:
            raise ValueError(f"codes must be (batch, num_codebooks={self._K}, frames), got shape {tuple(codes.shape)}")
        if codes.shape[-1] == 0:
            raise ValueError("codes hold no frames")
        bad = (codes < 0) | (codes >= self.codebook_size)
        if bad.any():
            raise ValueError(f"codes must lie in [0, codebook_size={self.codebook_size}); got values "
                             f"{codes[bad].unique()[:8].tolist()}")
        codes = codes.to(self.device)
        if self.kind == "encodec":
            wav = self.model.decode(codes[None], [None]).audio_values
        elif self.kind == "dac":
            wav = self.model.decode(audio_codes=codes).audio_values
        elif self.kind == "moezoo_mel_rvq":
            wav = self.model.decode(codes)
        else:
            wav = self.model.decode(codes).audio_values
        return wav.reshape(codes.shape[0], -1).float()

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, sample_rate={self.sample_rate}, frame_rate={self.frame_rate:g}, "
                f"num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}")


__all__ = ["AudioCodec", "BUNDLED_CODEC", "PRETRAINED_DIR"]
