"""Image-restoration metrics: PSNR and SSIM per image (torchmetrics), aggregated per weather type and overall.

PSNR uses ``torchmetrics.functional.image.peak_signal_noise_ratio`` per image (an exact match gives 100 dB, not inf);
SSIM uses ``torchmetrics.functional.image.structural_similarity_index_measure`` (Gaussian window 11, sigma 1.5,
K=(0.01, 0.03)) and drops the padded border of its SSIM map, which matches ``skimage.metrics.structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1)``. Scores are averaged over images (the
usual way papers report them), on RGB by default or on the BT.601 luma channel (``y_channel=True``, the common
deraining convention).

    m = RestorationMetrics()
    m.update(restored, clean, weather=batch["weather"])       # (B,3,H,W) in [0,1]; weather ids or names
    m.compute()  # {"rain": {"psnr": .., "ssim": .., "count": ..}, ..., "overall": {...}}
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

__all__ = ["rgb_to_y", "psnr", "ssim", "RestorationMetrics", "format_metrics_table"]


_SSIM_PAD = 5           # (11 - 1) // 2
_PSNR_MAX = 100.0       # dB reported for an exact match (instead of inf, which would poison averages)


def _check(pred: torch.Tensor, target: torch.Tensor) -> None:
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a (B, C, H, W) tensor, got {got}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) RGB in [0,1] -> (B,1,H,W) ITU-R BT.601 luma in [0,1] (16..235 range scaled, as MATLAB's rgb2ycbcr)."""
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"img must be (B, 3, H, W), got {tuple(img.shape)}")
    w = img.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)
    return ((img * w).sum(1, keepdim=True) + 16.0) / 255.0


def _prep(pred, target, y_channel):
    _check(pred, target)
    pred, target = pred.detach().float().clamp(0, 1), target.detach().float().clamp(0, 1)
    if y_channel:
        pred, target = rgb_to_y(pred), rgb_to_y(target)
    return pred, target


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, y_channel: bool = False) -> torch.Tensor:
    """(B,) PSNR in dB of each image (inputs clamped to [0, data_range]; an exact match gives 100 dB, not inf)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    pred, target = _prep(pred / data_range, target / data_range, y_channel)
    out = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return out.clamp(max=_PSNR_MAX)


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, y_channel: bool = False) -> torch.Tensor:
    """(B,) SSIM of each image (Gaussian window 11, sigma 1.5), averaged over the windows inside the image.

    torchmetrics computes the SSIM map on a reflection-padded image; its border band (5 pixels) is dropped before
    averaging, as skimage and the original MATLAB code do (on 64-pixel crops the padded border alone moves SSIM by
    ~0.03).
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    pred, target = _prep(pred / data_range, target / data_range, y_channel)
    if min(pred.shape[-2:]) < 2 * _SSIM_PAD + 1:
        raise ValueError(f"SSIM needs images of at least {2 * _SSIM_PAD + 1} pixels a side, "
                         f"got {tuple(pred.shape[-2:])}")
    _, ssim_map = structural_similarity_index_measure(pred, target, gaussian_kernel=True, sigma=1.5, kernel_size=11,
                                                      data_range=1.0, reduction="none", return_full_image=True)
    inner = ssim_map[..., _SSIM_PAD:-_SSIM_PAD, _SSIM_PAD:-_SSIM_PAD]
    return inner.reshape(inner.shape[0], -1).mean(-1)


class RestorationMetrics:
    """Accumulates per-image PSNR / SSIM, grouped by weather type (ids are mapped through ``weather_names``)."""

    def __init__(self, weather_names: Sequence[str] | None = None, y_channel: bool = False):
        if weather_names is None:
            from moezoo.data.weather import WEATHER_TYPES

            weather_names = WEATHER_TYPES
        self.weather_names = tuple(weather_names)
        self.y_channel = y_channel
        self.reset()

    def reset(self) -> None:
        self._scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"psnr": [], "ssim": []})

    def _names(self, weather, n: int) -> list[str]:
        if weather is None:
            return ["all"] * n
        if isinstance(weather, torch.Tensor):
            weather = weather.reshape(-1).tolist()
        if isinstance(weather, (str, int)):
            weather = [weather] * n
        if len(weather) != n:
            raise ValueError(f"weather must give one label per image ({n}), got {len(weather)}")
        out = []
        for w in weather:
            if isinstance(w, str):
                out.append(w)
            elif 0 <= int(w) < len(self.weather_names):
                out.append(self.weather_names[int(w)])
            elif int(w) == -1:
                out.append("unknown")
            else:
                raise ValueError(f"weather id {w} is outside 0..{len(self.weather_names) - 1} ({self.weather_names})")
        return out

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, weather=None) -> dict[str, torch.Tensor]:
        """Add a batch; returns its per-image ``{"psnr": (B,), "ssim": (B,)}``."""
        p = psnr(pred, target, y_channel=self.y_channel)
        s = ssim(pred, target, y_channel=self.y_channel)
        for name, pv, sv in zip(self._names(weather, p.shape[0]), p.tolist(), s.tolist()):
            self._scores[name]["psnr"].append(pv)
            self._scores[name]["ssim"].append(sv)
        return {"psnr": p, "ssim": s}

    def compute(self) -> dict[str, dict[str, float]]:
        """{weather: {"psnr", "ssim", "count"}} in the order of ``weather_names``, plus "overall" (all images)."""
        order = [w for w in self.weather_names if w in self._scores] + sorted(
            w for w in self._scores if w not in self.weather_names)
        out = {}
        allp, alls = [], []
        for w in order:
            d = self._scores[w]
            out[w] = {"psnr": sum(d["psnr"]) / len(d["psnr"]), "ssim": sum(d["ssim"]) / len(d["ssim"]),
                      "count": len(d["psnr"])}
            allp += d["psnr"]
            alls += d["ssim"]
        if allp:
            out["overall"] = {"psnr": sum(allp) / len(allp), "ssim": sum(alls) / len(alls), "count": len(allp)}
        return out


def format_metrics_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: one row per system (e.g. "degraded input", model names), PSNR/SSIM per weather + overall."""
    weathers: list[str] = []
    for r in results.values():
        for w in r:
            if w not in weathers and w != "overall":
                weathers.append(w)
    cols = weathers + ["overall"]
    head = "| system | " + " | ".join(f"{w} PSNR / SSIM" for w in cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    rows = []
    for name, r in results.items():
        cells = [f"{r[w]['psnr']:.2f} / {r[w]['ssim']:.4f}" if w in r else "-" for w in cols]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *rows])
