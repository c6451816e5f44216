"""moezoo.data.timeseries: ETT reading, the standard split borders, train-only scaling, window/label alignment."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from moezoo.data.timeseries import (ForecastWindowDataset, StandardScaler, TimeSeriesTable, TimeSeriesWindowDataset,
                                    infer_season_length, load_table, make_splits, protocol_for, split_borders,
                                    table_from_frame)

SHARED = Path(os.environ.get("MOEZOO_SHARED_DIR", Path(__file__).resolve().parents[3].parent / "shared"))
ETTH1 = SHARED / "data" / "ett" / "ETTh1.csv"
needs_etth1 = pytest.mark.skipif(not ETTH1.is_file(), reason=f"ETTh1 not found at {ETTH1}")


@pytest.fixture(scope="module")
def etth1():
    return load_table(ETTH1)


@needs_etth1
def test_etth1_table_and_standard_split_rows(etth1):
    assert etth1.values.shape == (17420, 7) and etth1.values.dtype == np.float32
    assert etth1.columns == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]   # date column dropped
    assert str(etth1.dates[0]) == "2016-07-01 00:00:00" and protocol_for(etth1.name) == "etth"
    s0 = make_splits(etth1, context_length=0)
    assert [a.shape[0] for a in (s0.train, s0.val, s0.test)] == [8640, 2880, 2880]   # 12/4/4 months of hours
    s = make_splits(etth1, context_length=512)
    assert s.borders == [(0, 8640), (8640 - 512, 11520), (11520 - 512, 14400)]
    assert [a.shape[0] for a in (s.train, s.val, s.test)] == [8640, 3392, 3392]
    # the first target of the test split is row 11520: the same scaled values with or without the context shift
    np.testing.assert_array_equal(s.test[512], s0.test[0])
    np.testing.assert_allclose(s.test[512], (etth1.values[11520] - s.scaler.mean_) / s.scaler.scale_, rtol=1e-5)
    assert s0.dates == {"train": ("2016-07-01 00:00:00", "2017-06-25 23:00:00"),      # 360 + 120 + 120 days
                        "val": ("2017-06-26 00:00:00", "2017-10-23 23:00:00"),
                        "test": ("2017-10-24 00:00:00", "2018-02-20 23:00:00")}
    assert infer_season_length(etth1.dates) == 24


def test_split_borders_protocols_and_errors():
    assert split_borders(70000, 96, "ettm") == [(0, 34560), (34560 - 96, 46080), (46080 - 96, 57600)]
    n = 1000   # 70 / 10 / 20 with val/test starting one context early
    assert split_borders(n, 24, "ratio") == [(0, 700), (676, 800), (776, 1000)]
    assert protocol_for("data/ETTm2.csv") == "ettm" and protocol_for("weather.csv") == "ratio"
    with pytest.raises(ValueError, match="needs 14400 rows"):
        split_borders(10000, 96, "etth")
    with pytest.raises(ValueError, match="protocol"):
        split_borders(1000, 96, "monthly")
    with pytest.raises(ValueError, match="longer than the train split"):
        split_borders(100, 96, "ratio")


def test_scaler_is_fit_on_train_rows_only():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(1000, 3)).astype(np.float32) * [1, 5, 0.1] + [0, 10, -3]
    table = TimeSeriesTable(values.copy(), ["a", "b", "c"], name="synthetic.csv")
    s = make_splits(table, context_length=50)
    train_raw = values[:700].astype(np.float64)
    np.testing.assert_allclose(s.scaler.mean_, train_raw.mean(0))
    np.testing.assert_allclose(s.scaler.scale_, train_raw.std(0))                 # population std, like sklearn
    np.testing.assert_allclose(s.train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(s.train.std(0), 1, atol=1e-5)
    # changing val/test rows changes neither the scaler nor the scaled train rows
    changed = values.copy()
    changed[700:] *= 100
    s2 = make_splits(TimeSeriesTable(changed, ["a", "b", "c"], name="synthetic.csv"), context_length=50)
    np.testing.assert_array_equal(s2.scaler.mean_, s.scaler.mean_)
    np.testing.assert_array_equal(s2.train, s.train)
    np.testing.assert_allclose(s.scaler.inverse_transform(s.test), values[750:], rtol=1e-5, atol=1e-5)
    sk = pytest.importorskip("sklearn.preprocessing")
    ref = sk.StandardScaler().fit(train_raw)
    np.testing.assert_allclose(s.test, ref.transform(values[750:]), rtol=1e-5, atol=1e-5)
    const = StandardScaler().fit(np.ones((5, 1)))
    np.testing.assert_array_equal(const.transform(np.full((2, 1), 3.0)), [[2.0], [2.0]])   # std 0 -> only centred
    with pytest.raises(RuntimeError, match="not fitted"):
        StandardScaler().transform(values)
    with pytest.raises(ValueError, match="channels"):
        s.scaler.transform(np.zeros((2, 5)))


def test_table_reading_date_detection_and_errors(tmp_path):
    dates = pd.date_range("2020-01-01", periods=48, freq="15min")
    df = pd.DataFrame({"timestamp": dates.astype(str), "x": np.arange(48.0), "y": np.arange(48.0) * 2})
    p = tmp_path / "series.csv"
    df.to_csv(p, index=False)
    t = load_table(p)
    assert t.columns == ["x", "y"] and t.values.shape == (48, 2) and infer_season_length(t.dates) == 96
    # an unnamed first column holding dates is detected too; a DatetimeIndex is used as the dates
    t2 = table_from_frame(df.rename(columns={"timestamp": "when"}))
    assert t2.columns == ["x", "y"] and t2.dates is not None
    t3 = table_from_frame(df.set_index(dates)[["x"]], date_column=None)
    assert t3.dates is not None and t3.num_channels == 1
    bad = df.assign(label=["a"] * 48)
    with pytest.raises(ValueError, match=r"\['label'\] are not numeric"):
        table_from_frame(bad)
    holes = df.copy()
    holes.loc[[0, 5, 47], "x"] = np.nan
    with pytest.raises(ValueError, match="contain NaN"):
        table_from_frame(holes)
    filled = table_from_frame(holes, nan_policy="interpolate")
    np.testing.assert_allclose(filled.values[:, 0], [1, 1, 2, 3, 4, 5] + list(range(6, 47)) + [46])
    with pytest.raises(FileNotFoundError):
        load_table(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="expected a .csv"):
        (tmp_path / "x.json").write_text("{}")
        load_table(tmp_path / "x.json")
    with pytest.raises(ValueError, match="not found"):
        table_from_frame(df, columns=["z"])


def test_training_windows_labels_masks_and_channels():
    a = np.arange(100, dtype=np.float32)
    two = np.stack([a, 1000 + a], 1)                      # 2 channels -> 2 independent series
    ds = TimeSeriesWindowDataset([two, np.arange(5, dtype=np.float32)], window_length=16, stride=8)
    item = ds[0]
    assert set(item) == {"input_ids", "labels", "loss_masks"} and item["input_ids"].shape == (16,)
    for i in range(len(ds)):
        it = ds[i]
        m = it["loss_masks"].bool()
        torch.testing.assert_close(it["labels"][m], it["input_ids"][m] + 1)     # label t = value after input t
        base = it["input_ids"][0]
        assert (it["input_ids"][m] - base == torch.arange(int(m.sum())).float()).all()   # one series per window
    # 100 points, windows of 17: starts 0, 8, ..., 80 plus one aligned to the end (83); the 5-point series is padded
    starts = [int(o) for s, o in ds.index if s == 0]
    assert starts == list(range(0, 84, 8)) + [83]
    short = ds[len(ds) - 1]
    assert short["loss_masks"].tolist() == [1.0] * 4 + [0.0] * 12
    assert short["input_ids"][:5].tolist() == [0, 1, 2, 3, 4] and short["labels"][4:].abs().sum() == 0
    pad = TimeSeriesWindowDataset(a, window_length=16, tail="pad")   # official: non-overlapping + padded remainder
    assert [int(o) for _, o in pad.index] == [0, 16, 32, 48, 64, 80, 96]
    assert pad[6]["loss_masks"].sum() == 3
    normed = TimeSeriesWindowDataset(a * 10 + 5, window_length=16, normalize=True)[1]
    x = normed["input_ids"]
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-5
    with pytest.raises(ValueError, match="window_length"):
        TimeSeriesWindowDataset(a, window_length=0)
    with pytest.raises(ValueError, match="NaN"):
        TimeSeriesWindowDataset(np.array([1.0, np.nan, 2.0]), window_length=4)
    with pytest.raises(TypeError, match="not numeric"):
        TimeSeriesWindowDataset([np.array(["a", "b"])], window_length=4)


def test_forecast_windows_stride_one_and_subsets():
    rows, C = 60, 3
    values = (np.arange(rows)[:, None] * 10 + np.arange(C)).astype(np.float32)
    ds = ForecastWindowDataset(values, context_length=12, prediction_length=5)
    assert len(ds) == rows - 12 - 5 + 1
    last = ds[len(ds) - 1]
    assert last["inputs"].shape == (C, 12) and last["labels"].shape == (C, 5)
    assert last["labels"][1, -1] == values[-1, 1]                                # the final row is a target
    first = ds[0]
    torch.testing.assert_close(first["labels"][:, 0], torch.from_numpy(values[12]))
    torch.testing.assert_close(first["inputs"][2], torch.from_numpy(values[:12, 2]))
    sub = ForecastWindowDataset(values, 12, 5, max_windows=4)
    assert len(sub) == 4 and sub.starts[0] == 0 and sub.starts[-1] == len(ds) - 1
    ci = ForecastWindowDataset(values, 12, 5, channel_independent=True)
    assert len(ci) == len(ds) * C and ci[4]["inputs"].shape == (12,) and ci[4]["channel"] == 1
    torch.testing.assert_close(ci[4]["labels"], ds[1]["labels"][1])
    with pytest.raises(ValueError, match="fewer than context_length"):
        ForecastWindowDataset(values, 50, 20)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_infer_season_length_from_dates_and_values():
    assert infer_season_length(pd.date_range("2020", periods=10, freq="h")) == 24
    assert infer_season_length(pd.date_range("2020", periods=10, freq="D")) == 7
    assert infer_season_length(pd.date_range("2020", periods=10, freq="W")) == 52
    assert infer_season_length(pd.date_range("2020", periods=10, freq="MS")) == 12
    t = np.arange(2000)
    rng = np.random.default_rng(0)
    assert infer_season_length(values=np.sin(2 * np.pi * t / 24) + 0.1 * rng.normal(size=t.size)) == 24
    assert infer_season_length(values=np.arange(100.0)) == 1                       # a trend has no season
