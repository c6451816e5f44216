"""``model.forecast(context, prediction_length)``: zero-shot forecasting with a Time-MoE model.

Accepted contexts (univariate series, ``input_size == 1``):

- a 1-D tensor / ndarray / list of numbers / ``pandas.Series``: one series -> a ``(prediction_length,)`` array;
- a 2-D tensor / ndarray ``(N, T)``: N series of one length -> ``(N, prediction_length)``;
- a ``pandas.DataFrame``: every column is a series (channel-independent, as Time-MoE is used) -> ``(n_columns,
  prediction_length)``; every column must be numeric (drop or index a date column first);
- a list/tuple of series (each 1-D, any of the types above): -> ``(N, prediction_length)`` when they share a length,
  else a list of ``(prediction_length,)`` arrays.

Series of different lengths are batched **per length** (no padding: each forecast equals the one-by-one forecast).
Each series is normalised with its own mean and standard deviation (unbiased, as the paper's/README's inference; a
constant or one-point series uses std 1), forecast autoregressively with :meth:`generate` (KV cache; each step uses
the largest horizon head that does not overshoot), and de-normalised. Results are float64 numpy arrays.

**Rolling window** (``context_window``, default ``model.config.context_window``; None = off, the official
behaviour): a model trained on windows of W points has never attended over a query-key distance of W or more. When
context + prediction_length exceeds W, the forecast is made in rounds of ``rolling_step`` points (default W // 4):
each round forecasts from the last ``W - rolling_step`` points (the context, then the points already forecast), so
the sequence the model sees never exceeds W. Normalisation statistics stay those of the given context. The default
step is the multiple of the largest horizon head nearest below W / 4 (at least one head): shorter steps mean more,
shorter autoregressive steps and more error build-up.

Bad input raises a ValueError/TypeError naming the series: empty series, non-numeric values, infinities, NaNs (with
``nan_policy="raise"``, the default; ``"interpolate"`` fills interior NaNs linearly and leading/trailing ones with the
nearest value), or a context longer than ``max_position_embeddings`` (pass ``max_context_length`` to keep only the
last points).
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch

NAN_POLICIES = ("raise", "interpolate")


def _is_pandas(obj, name: str) -> bool:
    mod = type(obj).__module__ or ""
    return mod.startswith("pandas") and type(obj).__name__ == name


def _to_array(obj, where: str) -> np.ndarray:
    """One series -> 1-D float64 array (NaN kept), with clear errors for non-numeric data."""
    if isinstance(obj, torch.Tensor):
        if obj.dtype == torch.bool or obj.is_complex():
            raise TypeError(f"{where} must hold real numbers, got a tensor of dtype {obj.dtype}")
        arr = obj.detach().cpu().double().numpy()
    elif _is_pandas(obj, "Series"):
        import pandas as pd

        if not (pd.api.types.is_numeric_dtype(obj.dtype) and not pd.api.types.is_bool_dtype(obj.dtype)):
            raise TypeError(f"{where} (pandas Series {obj.name!r}) has non-numeric dtype {obj.dtype}")
        arr = obj.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        raw = np.asarray(obj)
        if raw.dtype == bool or raw.dtype.kind in "cUSMmV":
            raise TypeError(f"{where} must hold real numbers, got values of dtype {raw.dtype}")
        try:
            arr = raw.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{where} must hold real numbers; could not convert it to float ({exc})") from None
    if arr.ndim != 1:
        raise ValueError(f"{where} must be one-dimensional (a single series), got shape {arr.shape}")
    return arr


def parse_context(context) -> tuple[list[np.ndarray], str]:
    """Context -> (list of 1-D float64 arrays, kind) with kind ``"single"``, ``"batch"`` (2-D input / DataFrame) or
    ``"list"``."""
    if isinstance(context, (str, bytes)) or context is None:
        raise TypeError(f"context must be a series (tensor, ndarray, list, pandas Series/DataFrame) or a list of "
                        f"series, got {type(context).__name__}")
    if _is_pandas(context, "DataFrame"):
        if context.shape[1] == 0:
            raise ValueError("context DataFrame has no columns")
        return [_to_array(context[c], f"context column {c!r}") for c in context.columns], "batch"
    if isinstance(context, (torch.Tensor, np.ndarray)):
        nd = context.dim() if isinstance(context, torch.Tensor) else context.ndim
        if nd == 1:
            return [_to_array(context, "context")], "single"
        if nd == 2:
            return [_to_array(row, f"context[{i}]") for i, row in enumerate(context)], "batch"
        raise ValueError(f"context must be 1-D (one series) or 2-D (series, time), got {nd} dimensions")
    if _is_pandas(context, "Series"):
        return [_to_array(context, "context")], "single"
    if isinstance(context, (list, tuple)):
        if len(context) == 0:
            raise ValueError("context is an empty list: expected a series or a list of series")
        if all(isinstance(v, numbers.Number) and not isinstance(v, bool) for v in context):
            return [_to_array(list(context), "context")], "single"
        if any(isinstance(v, (numbers.Number, str, bytes)) for v in context):
            raise TypeError("context mixes numbers and other objects: pass one series (numbers only) or a list of "
                            "series")
        return [_to_array(s, f"context[{i}]") for i, s in enumerate(context)], "list"
    raise TypeError(f"context of type {type(context).__name__} is not supported: pass a tensor, ndarray, list, "
                    "pandas Series/DataFrame or a list of series")


def fill_nans(arr: np.ndarray, policy: str, where: str) -> np.ndarray:
    nan = np.isnan(arr)
    if not nan.any():
        return arr
    if policy == "raise":
        raise ValueError(f"{where} has {int(nan.sum())} NaN value(s) (first at index {int(np.argmax(nan))}); fill them "
                         "or pass nan_policy='interpolate'")
    if nan.all():
        raise ValueError(f"{where} is all NaN; nothing to interpolate from")
    idx = np.arange(arr.size)
    out = arr.copy()
    out[nan] = np.interp(idx[nan], idx[~nan], arr[~nan])  # np.interp holds the edge values outside the valid range
    return out


def prepare_series(context, *, max_context_length: int | None, max_position_embeddings: int,
                   nan_policy: str = "raise") -> tuple[list[np.ndarray], str]:
    """Parsed, checked, NaN-filled and truncated series (see the module docstring)."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if max_context_length is not None and (not isinstance(max_context_length, int)
                                           or isinstance(max_context_length, bool) or max_context_length < 1):
        raise ValueError(f"max_context_length must be a positive int or None, got {max_context_length!r}")
    series, kind = parse_context(context)
    out = []
    for i, arr in enumerate(series):
        where = "context" if kind == "single" else f"context series {i}"
        if arr.size == 0:
            raise ValueError(f"{where} is empty: every series needs at least one point")
        if np.isinf(arr).any():
            raise ValueError(f"{where} contains infinite values")
        if max_context_length is not None:
            arr = arr[-max_context_length:]
        arr = fill_nans(arr, nan_policy, where)
        if arr.size > max_position_embeddings:
            raise ValueError(f"{where} has {arr.size} points, more than the model's max_position_embeddings="
                             f"{max_position_embeddings}; pass max_context_length (e.g. {max_position_embeddings}) "
                             "to keep only the most recent points")
        out.append(arr)
    return out, kind


def _check_window(context_window, rolling_step, max_horizon: int) -> tuple[int | None, int | None]:
    if context_window is None:
        return None, None
    if isinstance(context_window, bool) or not isinstance(context_window, int) or context_window < 2:
        raise ValueError(f"context_window must be an int >= 2 or None, got {context_window!r}")
    if rolling_step is None:   # a multiple of the largest head (fewer, longer autoregressive steps), ~ W / 4
        rolling_step = max(max_horizon, context_window // 4 // max_horizon * max_horizon)
        rolling_step = min(rolling_step, context_window - 1)
    if isinstance(rolling_step, bool) or not isinstance(rolling_step, int) or not 1 <= rolling_step < context_window:
        raise ValueError(f"rolling_step must be an int in [1, context_window={context_window}), got {rolling_step!r}")
    return context_window, rolling_step


def decode(model, x: torch.Tensor, prediction_length: int, *, context_window: int | None = None,
           rolling_step: int | None = None, use_cache: bool = True, autocast: torch.dtype | None = None
           ) -> torch.Tensor:
    """(B, T) normalised contexts -> (B, prediction_length) forecasts with :meth:`generate`; with ``context_window``
    W, in rounds of ``rolling_step`` points that each see at most W points (see the module docstring)."""
    window, step = _check_window(context_window, rolling_step, model.config.max_horizon_length)
    if window is None or x.shape[1] + prediction_length <= window:
        return model.generate(x, max_new_tokens=prediction_length, use_cache=use_cache,
                              autocast=autocast)[:, -prediction_length:]
    hist, out, done = x, [], 0
    while done < prediction_length:
        k = min(step, prediction_length - done)
        new = model.generate(hist[:, -(window - k):], max_new_tokens=k, use_cache=use_cache,
                             autocast=autocast)[:, -k:].to(hist.dtype)
        hist = torch.cat([hist[:, -window:], new], dim=1)
        out.append(new)
        done += k
    return torch.cat(out, dim=1)


def forecast(model, context, prediction_length: int, *, normalize: bool = True, batch_size: int = 32,
             max_context_length: int | None = None, nan_policy: str = "raise", use_cache: bool = True,
             progress: bool | None = None, autocast: torch.dtype | None = None, context_window="config",
             rolling_step: int | None = None):
    """Forecast ``prediction_length`` points after each series of ``context`` (see the module docstring).

    Args:
        model: a :class:`~moezoo.models.time_moe.MoezooTimeMoeForPrediction` with ``input_size == 1``.
        context: the series (formats in the module docstring).
        prediction_length: points to forecast per series (> 0).
        normalize: z-normalise each series with its own mean/std before the model and undo it after (the paper's
            inference); ``False`` feeds the values as given.
        batch_size: series per forward batch (series are grouped by length first).
        max_context_length: keep only the last this-many points of each series.
        nan_policy: ``"raise"`` or ``"interpolate"``.
        use_cache: KV-cached decoding (``False`` recomputes the whole sequence each step; same result).
        progress: tqdm bar over batches (default: when there is more than one batch).
        autocast: ``torch.bfloat16`` runs the model under ``torch.autocast`` (about 2x faster matmuls on CPUs with
            avx512_bf16 / AMX and on GPUs; routers and softmax stay fp32), None = the model's own dtype.
        context_window: the longest sequence the model attends over (rolling forecast beyond it, see the module
            docstring); default ``model.config.context_window``; None = no limit.
        rolling_step: points forecast per round of the rolling forecast (default: the multiple of the largest horizon
            head nearest below ``context_window // 4``).
    Returns:
        ``(prediction_length,)`` for one series, ``(N, prediction_length)`` for a 2-D input, a DataFrame or a list of
        equal-length series, else a list of ``(prediction_length,)`` arrays (float64).
    """
    if not isinstance(prediction_length, int) or isinstance(prediction_length, bool) or prediction_length < 1:
        raise ValueError(f"prediction_length must be a positive int, got {prediction_length!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    cfg = model.config
    if cfg.input_size != 1:
        raise ValueError(f"forecast() handles univariate models (input_size=1); this model has input_size="
                         f"{cfg.input_size}: call model.generate on (batch, time, input_size) tensors instead")
    series, kind = prepare_series(context, max_context_length=max_context_length,
                                  max_position_embeddings=cfg.max_position_embeddings, nan_policy=nan_policy)
    if isinstance(context_window, str) and context_window == "config":
        context_window = getattr(cfg, "context_window", None)
    context_window, rolling_step = _check_window(context_window, rolling_step, cfg.max_horizon_length)
    longest = max(s.size for s in series)
    if context_window is None and longest + prediction_length > cfg.max_position_embeddings:
        warnings.warn(f"context ({longest}) + prediction_length ({prediction_length}) exceeds max_position_embeddings="
                      f"{cfg.max_position_embeddings}: positions beyond it were never trained", stacklevel=2)
    stats = []
    normed = []
    for s in series:
        if normalize:
            mean = float(s.mean())
            std = float(s.std(ddof=1)) if s.size > 1 else 0.0
            if not np.isfinite(std) or std < 1e-8:
                std = 1.0
        else:
            mean, std = 0.0, 1.0
        stats.append((mean, std))
        normed.append((s - mean) / std)
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(normed):
        by_len.setdefault(s.size, []).append(i)
    batches = [idx[j:j + batch_size] for idx in by_len.values() for j in range(0, len(idx), batch_size)]
    results: list[np.ndarray | None] = [None] * len(series)
    from tqdm.auto import tqdm

    show = progress if progress is not None else len(batches) > 1
    was_training = model.training
    model.eval()
    try:
        dtype = next(model.parameters()).dtype
        for idx in tqdm(batches, desc="forecast", unit="batch", disable=not show):
            x = torch.as_tensor(np.stack([normed[i] for i in idx]), dtype=torch.float32).to(dtype)
            out = decode(model, x, prediction_length, context_window=context_window, rolling_step=rolling_step,
                         use_cache=use_cache, autocast=autocast)
            pred = out.double().cpu().numpy()
            for row, i in zip(pred, idx):
                mean, std = stats[i]
                results[i] = row * std + mean
    finally:
        model.train(was_training)
    if kind == "single":
        return results[0]
    if kind == "batch" or len({s.size for s in series}) == 1:
        return np.stack(results)
    return results


__all__ = ["forecast", "decode", "parse_context", "prepare_series", "fill_nans", "NAN_POLICIES"]
