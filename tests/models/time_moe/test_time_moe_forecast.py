"""``model.forecast``: every input kind, exact output lengths, de-normalisation, per-length batching == one-by-one,
KV cache == no cache, consistency with ``generate``, NaN policy and clear errors."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402

P = 13  # not a sum the heads [1, 4, 8] hit in one step


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return moezoo.create_model("time_moe_tiny_e4k2", tiny=True).eval()


@pytest.fixture(scope="module")
def series():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(3, 24, generator=g).cumsum(1) * 5 + 100).double()


def test_all_input_kinds_and_shapes(model, series):
    batch = model.forecast(series, P)
    assert isinstance(batch, np.ndarray) and batch.shape == (3, P) and batch.dtype == np.float64
    np.testing.assert_allclose(model.forecast(series.numpy(), P), batch, atol=1e-6)
    np.testing.assert_allclose(model.forecast(series.float(), P), batch, atol=1e-4)
    one = model.forecast(series[0], P)
    assert one.shape == (P,)
    np.testing.assert_allclose(one, batch[0], atol=1e-6)
    np.testing.assert_allclose(model.forecast(series[0].tolist(), P), one, atol=1e-6)
    np.testing.assert_allclose(model.forecast(pd.Series(series[0].numpy(), name="y"), P), one, atol=1e-6)
    df = pd.DataFrame({"a": series[0].numpy(), "b": series[1].numpy()})
    np.testing.assert_allclose(model.forecast(df, P), batch[:2], atol=1e-6)
    same = model.forecast([series[0], series[1].numpy(), pd.Series(series[2].numpy())], P)
    assert isinstance(same, np.ndarray) and same.shape == (3, P)
    np.testing.assert_allclose(same, batch, atol=1e-6)


def test_different_lengths_batched_equals_one_by_one(model, series):
    ctx = [series[0, :24], series[1, :17].numpy(), series[2, :9].tolist(), series[0, 3:20]]
    got = model.forecast(ctx, P, batch_size=2)
    assert isinstance(got, list) and len(got) == 4 and all(g.shape == (P,) for g in got)
    for c, g in zip(ctx, got):
        np.testing.assert_allclose(g, model.forecast(c, P), atol=1e-5, rtol=1e-5)


def test_kv_cache_equals_no_cache(model, series):
    np.testing.assert_allclose(model.forecast(series, P, use_cache=False), model.forecast(series, P),
                               atol=1e-4, rtol=1e-5)


def test_denormalisation_and_generate_consistency(model, series):
    x = series.float()
    mean, std = x.mean(1, keepdim=True), x.std(1, keepdim=True)
    with torch.no_grad():
        normed_pred = model.generate((x - mean) / std, max_new_tokens=P)[:, -P:]
    want = (normed_pred * std + mean).double().numpy()
    np.testing.assert_allclose(model.forecast(series, P), want, rtol=1e-5, atol=1e-3)
    # normalize=False feeds the values as given: identical to generate
    with torch.no_grad():
        raw = model.generate(x, max_new_tokens=P)[:, -P:].double().numpy()
    np.testing.assert_allclose(model.forecast(x, P, normalize=False), raw, atol=1e-5)
    # affine equivariance: a shifted and scaled series gets the shifted and scaled forecast
    np.testing.assert_allclose(model.forecast(series * 3 - 7, P), model.forecast(series, P) * 3 - 7, rtol=1e-5, atol=1e-3)
    # a constant series: std 1, finite forecast around the level
    flat = model.forecast(np.full(10, 5.0), 4)
    assert np.isfinite(flat).all() and flat.shape == (4,)


def test_max_context_length_and_position_limit(model, series):
    np.testing.assert_allclose(model.forecast(series, P, max_context_length=10), model.forecast(series[:, -10:], P),
                               atol=1e-6)
    long = np.random.default_rng(0).normal(size=model.config.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="max_position_embeddings.*max_context_length"):
        model.forecast(long, 2)
    assert model.forecast(long, 2, max_context_length=64).shape == (2,)
    with pytest.warns(UserWarning, match="never trained"):
        model.forecast(long[:500], 20)


def test_nan_policy(model, series):
    s = series[0].numpy().copy()
    s[[0, 5, 6, 23]] = np.nan
    with pytest.raises(ValueError, match=r"4 NaN.*nan_policy='interpolate'"):
        model.forecast(s, P)
    filled = s.copy()
    idx = np.arange(24)
    ok = ~np.isnan(s)
    filled[~ok] = np.interp(idx[~ok], idx[ok], s[ok])
    np.testing.assert_allclose(model.forecast(s, P, nan_policy="interpolate"), model.forecast(filled, P), atol=1e-6)
    with pytest.raises(ValueError, match="all NaN"):
        model.forecast(np.full(5, np.nan), P, nan_policy="interpolate")
    with pytest.raises(ValueError, match="nan_policy"):
        model.forecast(s, P, nan_policy="zero")


def test_errors_name_the_argument(model):
    with pytest.raises(ValueError, match="context series 1 is empty"):
        model.forecast([np.ones(4), np.array([])], P)
    with pytest.raises(ValueError, match="empty list"):
        model.forecast([], P)
    with pytest.raises(TypeError, match="real numbers"):
        model.forecast(np.array(["a", "b"]), P)
    with pytest.raises(TypeError, match="non-numeric dtype"):
        model.forecast(pd.DataFrame({"date": pd.date_range("2020", periods=4), "y": [1.0, 2, 3, 4]}), P)
    with pytest.raises(TypeError, match="mixes numbers"):
        model.forecast([1.0, [2.0, 3.0]], P)
    with pytest.raises(TypeError, match="not supported"):
        model.forecast({"a": 1}, P)
    with pytest.raises(ValueError, match="infinite"):
        model.forecast([1.0, np.inf, 2.0], P)
    with pytest.raises(ValueError, match="one-dimensional"):
        model.forecast([np.ones((2, 3))], P)
    with pytest.raises(ValueError, match="1-D .* or 2-D"):
        model.forecast(torch.ones(2, 3, 4), P)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="prediction_length"):
            model.forecast(np.ones(5), bad)
    with pytest.raises(ValueError, match="batch_size"):
        model.forecast(np.ones(5), 3, batch_size=0)
