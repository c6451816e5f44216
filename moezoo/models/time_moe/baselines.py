"""Forecasting baselines for the Time-MoE benchmark: seasonal naive and DLinear.

(The third baseline, the dense Time-MoE with the same active parameters, is ``dense_config_like(config)``.)

* :func:`seasonal_naive` repeats the last observed season: ``y[t] = x[T - m + (t mod m)]`` for period ``m``.
* :class:`DLinear` (Zeng et al., "Are Transformers Effective for Time Series Forecasting?", AAAI 2023): the context is
  split into a trend (moving average, edges padded by repeating the first / last value) and a remainder, each mapped
  to the horizon by one linear layer over time, and the two are summed. Channel-independent and shared across
  channels (the paper's default); train it with :func:`dlinear_loss` on (context, target) windows.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["seasonal_naive", "DLinear", "dlinear_loss"]


def seasonal_naive(context, prediction_length: int, season_length: int):
    """Forecast ``prediction_length`` points per series by repeating the last ``season_length`` points of ``context``.

    ``context``: (..., time) tensor or array; returns the same type with shape (..., prediction_length).
    ``season_length=1`` is the naive (last value) forecast.
    """
    if not isinstance(prediction_length, (int, np.integer)) or prediction_length < 1:
        raise ValueError(f"prediction_length must be a positive int, got {prediction_length!r}")
    if not isinstance(season_length, (int, np.integer)) or season_length < 1:
        raise ValueError(f"season_length must be a positive int, got {season_length!r}")
    T = context.shape[-1]
    if T < season_length:
        raise ValueError(f"context has {T} points, fewer than season_length={season_length}")
    idx = T - season_length + (np.arange(prediction_length) % season_length)
    if isinstance(context, torch.Tensor):
        return context[..., torch.as_tensor(idx, device=context.device)]
    return np.asarray(context)[..., idx]


class DLinear(nn.Module):
    """DLinear: moving-average decomposition + one linear map per component, ``(..., context) -> (..., horizon)``."""

    def __init__(self, context_length: int, prediction_length: int, kernel_size: int = 25):
        super().__init__()
        for name, v in (("context_length", context_length), ("prediction_length", prediction_length),
                        ("kernel_size", kernel_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.context_length, self.prediction_length, self.kernel_size = context_length, prediction_length, kernel_size
        self.linear_trend = nn.Linear(context_length, prediction_length)
        self.linear_seasonal = nn.Linear(context_length, prediction_length)

    def decompose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(seasonal, trend) of ``x`` (N, T): trend = moving average with replicated edges."""
        k = self.kernel_size
        front, back = (k - 1) // 2, k - 1 - (k - 1) // 2
        padded = torch.cat([x[:, :1].expand(-1, front), x, x[:, -1:].expand(-1, back)], dim=1)
        trend = F.avg_pool1d(padded[:, None], kernel_size=k, stride=1)[:, 0]
        return x - trend, trend

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape[-1] != self.context_length:
            raise ValueError(f"inputs must end with context_length={self.context_length} points, "
                             f"got shape {tuple(inputs.shape)}")
        lead = inputs.shape[:-1]
        x = inputs.reshape(-1, self.context_length).to(self.linear_trend.weight.dtype)
        seasonal, trend = self.decompose(x)
        y = self.linear_seasonal(seasonal) + self.linear_trend(trend)
        return y.reshape(*lead, self.prediction_length)


def dlinear_loss(model: DLinear, batch: dict) -> tuple[torch.Tensor, dict]:
    """MSE of ``model(batch["inputs"])`` against ``batch["labels"]`` (the DLinear training objective)."""
    pred = model(batch["inputs"])
    loss = F.mse_loss(pred, batch["labels"].to(pred.dtype))
    return loss, {"mse": float(loss.detach())}
