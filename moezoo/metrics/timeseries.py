"""Forecasting metrics: MSE and MAE per channel and averaged over channels, on the scaled series (as papers report).

:class:`ForecastMetrics` accumulates over batches of ``(batch, channels, horizon)`` forecasts with torchmetrics'
``MeanSquaredError`` / ``MeanAbsoluteError`` (one output per channel) when torchmetrics is installed, and with
float64 running sums otherwise (same numbers)::

    m = ForecastMetrics(num_channels=7)
    for batch in loader:
        m.update(model_forecast, batch["labels"])
    m.compute()    # {"mse": ..., "mae": ..., "mse_per_channel": [...], "mae_per_channel": [...], "count": ...}

With every channel evaluated on the same windows, the channel average equals the mean over all points, which is the
number the long-horizon benchmarks (and Time-MoE's ``run_eval.py``) report.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["mse", "mae", "ForecastMetrics"]


def _pair(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).detach().double()
    t = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor) else target).detach().double()
    if p.shape != t.shape:
        raise ValueError(f"pred has shape {tuple(p.shape)} but target has shape {tuple(t.shape)}")
    if p.numel() == 0:
        raise ValueError("pred and target are empty")
    return p, t.to(p.device)


def mse(pred, target) -> float:
    """Mean squared error over all elements."""
    p, t = _pair(pred, target)
    return float(((p - t) ** 2).mean())


def mae(pred, target) -> float:
    """Mean absolute error over all elements."""
    p, t = _pair(pred, target)
    return float((p - t).abs().mean())


class ForecastMetrics:
    """Streaming MSE / MAE per channel for forecasts shaped ``(batch, channels, horizon)`` (or ``(batch, horizon)``
    with ``num_channels=1``); :meth:`compute` averages the per-channel values."""

    def __init__(self, num_channels: int = 1, use_torchmetrics: bool | None = None):
        if not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        self.num_channels = num_channels
        if use_torchmetrics is None:   # optional (the ``metrics`` extra)
            import importlib.util

            use_torchmetrics = importlib.util.find_spec("torchmetrics") is not None
        self.use_torchmetrics = use_torchmetrics
        self.reset()

    def reset(self) -> None:
        self.count = 0
        if self.use_torchmetrics:
            from torchmetrics import MeanAbsoluteError, MeanSquaredError

            self._mse = MeanSquaredError(num_outputs=self.num_channels).double()
            self._mae = MeanAbsoluteError(num_outputs=self.num_channels).double()
        else:
            self._sq = torch.zeros(self.num_channels, dtype=torch.float64)
            self._abs = torch.zeros(self.num_channels, dtype=torch.float64)

    def update(self, pred, target) -> None:
        p, t = _pair(pred, target)
        if p.dim() == 2 and self.num_channels == 1:
            p, t = p[:, None], t[:, None]
        if p.dim() != 3 or p.shape[1] != self.num_channels:
            raise ValueError(f"pred must be (batch, {self.num_channels}, horizon), got shape {tuple(p.shape)}")
        # (batch, channels, horizon) -> (batch * horizon, channels): one output per channel
        p2 = p.cpu().transpose(1, 2).reshape(-1, self.num_channels)
        t2 = t.cpu().transpose(1, 2).reshape(-1, self.num_channels)
        if self.use_torchmetrics:
            a, b = (p2[:, 0], t2[:, 0]) if self.num_channels == 1 else (p2, t2)
            self._mse.update(a, b)
            self._mae.update(a, b)
        else:
            self._sq += ((p2 - t2) ** 2).sum(0)
            self._abs += (p2 - t2).abs().sum(0)
        self.count += p2.shape[0]

    def compute(self) -> dict:
        if self.count == 0:
            raise RuntimeError("ForecastMetrics.compute() called before any update()")
        if self.use_torchmetrics:
            mse_c = self._mse.compute().reshape(-1)
            mae_c = self._mae.compute().reshape(-1)
        else:
            mse_c, mae_c = self._sq / self.count, self._abs / self.count
        return {"mse": float(mse_c.mean()), "mae": float(mae_c.mean()),
                "mse_per_channel": [float(x) for x in mse_c], "mae_per_channel": [float(x) for x in mae_c],
                "count": int(self.count) * self.num_channels}
