"""Time-series data: ETT-style tables, the standard long-horizon splits, scaling and window datasets.

The layout is the one the long-horizon benchmarks use (ETTh1/ETTh2/ETTm1/ETTm2, Weather, Electricity, ...): a CSV (or
parquet) file, one row per time step, an optional date column and one numeric column per channel::

    table = load_table("../shared/data/ett/ETTh1.csv")          # date column detected and dropped
    splits = make_splits(table, context_length=512)              # ETTh: 8640/2880/2880 rows, scaler fit on train
    train = TimeSeriesWindowDataset(splits.train, window_length=512)        # next-point training windows
    test = ForecastWindowDataset(splits.test, context_length=512, prediction_length=96)   # stride-1 evaluation

Conventions (Informer / Time-MoE protocol):

* ETTh*: train = first 12 months, val = next 4, test = next 4 (30-day months: 8640 / 2880 / 2880 hourly rows); ETTm*:
  the same in 15-minute rows (x4). Any other file: 70 % / 10 % / 20 % of the rows. The validation and test splits start
  ``context_length`` rows early, so the first evaluated target is the first row of the split.
* A per-channel standard scaler (mean, population std; a constant channel gets std 1) is fit on the train rows only and
  applied to every split; metrics are reported on the scaled values.
* Training is channel-independent: every channel of every table is one univariate series.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "TimeSeriesTable", "load_table", "table_from_frame", "split_borders", "StandardScaler", "ForecastSplits",
    "make_splits", "TimeSeriesWindowDataset", "ForecastWindowDataset", "infer_season_length", "HOURS_PER_MONTH",
]

HOURS_PER_MONTH = 30 * 24
_DATE_NAMES = ("date", "datetime", "time", "timestamp", "ds", "index")


@dataclass
class TimeSeriesTable:
    """A multivariate series: ``values`` (rows, channels) float32, channel names, optional timestamps."""

    values: np.ndarray
    columns: list
    dates: object = None          # pandas DatetimeIndex or None
    name: str = ""

    def __post_init__(self):
        v = np.asarray(self.values)
        if v.ndim == 1:
            v = v[:, None]
        if v.ndim != 2:
            raise ValueError(f"values must be (rows, channels), got shape {tuple(v.shape)}")
        self.values = v.astype(np.float32, copy=False)
        if len(self.columns) != v.shape[1]:
            raise ValueError(f"columns has {len(self.columns)} names for {v.shape[1]} channels")

    @property
    def num_rows(self) -> int:
        return self.values.shape[0]

    @property
    def num_channels(self) -> int:
        return self.values.shape[1]


def _find_date_column(df) -> str | None:
    import pandas as pd

    for c in df.columns:
        if str(c).strip().lower() in _DATE_NAMES and not pd.api.types.is_numeric_dtype(df[c]):
            return c
    for c in df.columns:
        s = df[c]
        if pd.api.types.is_datetime64_any_dtype(s):
            return c
        if pd.api.types.is_numeric_dtype(s):
            continue
        try:
            pd.to_datetime(s.head(20), errors="raise")
            return c
        except (ValueError, TypeError):
            continue
    return None


def table_from_frame(df, *, date_column: str | None = "auto", columns: Sequence[str] | None = None,
                     nan_policy: str = "raise", name: str = "") -> TimeSeriesTable:
    """A :class:`TimeSeriesTable` from a pandas DataFrame (or Series) in the wide layout (one column per channel).

    ``date_column``: ``"auto"`` (a column named date/datetime/time/timestamp/ds, or the first non-numeric column that
    parses as dates), a column name, or None (no dates). ``columns``: the channels to keep (default: every other
    column, which must then be numeric). ``nan_policy``: ``"raise"`` or ``"interpolate"`` (linear in time, then the
    nearest value at the ends).
    """
    import pandas as pd

    if isinstance(df, pd.Series):
        df = df.to_frame(name=df.name if df.name is not None else "value")
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame or Series, got {type(df).__name__}")
    if nan_policy not in ("raise", "interpolate"):
        raise ValueError(f"nan_policy must be 'raise' or 'interpolate', got {nan_policy!r}")
    if date_column == "auto":
        date_column = _find_date_column(df)
    elif date_column is not None and date_column not in df.columns:
        raise ValueError(f"date_column {date_column!r} is not a column; columns are {list(df.columns)}")
    dates = None
    if date_column is not None:
        dates = pd.DatetimeIndex(pd.to_datetime(df[date_column]))
    elif isinstance(df.index, pd.DatetimeIndex):
        dates = df.index
    if columns is None:
        columns = [c for c in df.columns if c != date_column]
    else:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise ValueError(f"columns {missing} not found; columns are {list(df.columns)}")
    if not columns:
        raise ValueError("the table has no value column besides the date column")
    bad = [c for c in columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise ValueError(f"columns {bad} are not numeric; pass columns=[...] to choose the value columns "
                         f"(or date_column= if one of them holds the timestamps)")
    if len(df) < 2:
        raise ValueError(f"the table has {len(df)} row(s); a series needs at least 2")
    frame = df[list(columns)].astype("float64")
    nan_cols = [c for c in columns if frame[c].isna().any()]
    if nan_cols:
        if nan_policy == "raise":
            raise ValueError(f"columns {nan_cols} contain NaN; pass nan_policy='interpolate' to fill them")
        frame = frame.interpolate(method="linear", limit_direction="both")
        if frame.isna().any().any():
            empty = [c for c in columns if frame[c].isna().all()]
            raise ValueError(f"columns {empty} are entirely NaN")
    return TimeSeriesTable(frame.to_numpy(dtype=np.float32), [str(c) for c in columns], dates, name)


def load_table(path: str | Path, *, date_column: str | None = "auto", columns: Sequence[str] | None = None,
               nan_policy: str = "raise") -> TimeSeriesTable:
    """Read a CSV (``.csv``/``.csv.gz``/``.txt``) or parquet (``.parquet``/``.pq``) file in the ETT layout."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"time-series file {str(p)!r} does not exist")
    suffixes = "".join(p.suffixes).lower()
    if suffixes.endswith((".parquet", ".pq")):
        df = pd.read_parquet(p)      # needs pyarrow or fastparquet
    elif suffixes.endswith((".csv", ".csv.gz", ".txt", ".tsv")):
        df = pd.read_csv(p, sep="\t" if suffixes.endswith(".tsv") else ",")
    else:
        raise ValueError(f"path {str(p)!r}: expected a .csv/.csv.gz/.tsv or .parquet/.pq file")
    return table_from_frame(df, date_column=date_column, columns=columns, nan_policy=nan_policy, name=p.name)


def split_borders(num_rows: int, context_length: int, protocol: str = "ratio") -> list[tuple[int, int]]:
    """``[(start, end)]`` row ranges of train / val / test under the standard long-horizon protocol.

    ``protocol``: ``"etth"`` (12/4/4 months of hourly rows), ``"ettm"`` (the same in 15-minute rows) or ``"ratio"``
    (70/10/20). Val and test start ``context_length`` rows before their first target row.
    """
    if context_length < 0:
        raise ValueError(f"context_length must be >= 0, got {context_length}")
    if protocol in ("etth", "ettm"):
        per = HOURS_PER_MONTH * (4 if protocol == "ettm" else 1)
        ends = [12 * per, 16 * per, 20 * per]
        if num_rows < ends[-1]:
            raise ValueError(f"protocol {protocol!r} needs {ends[-1]} rows, the table has {num_rows}")
    elif protocol == "ratio":
        n_train, n_test = int(num_rows * 0.7), int(num_rows * 0.2)
        ends = [n_train, num_rows - n_test, num_rows]
    else:
        raise ValueError(f"protocol must be 'etth', 'ettm' or 'ratio', got {protocol!r}")
    starts = [0, ends[0] - context_length, ends[1] - context_length]
    if starts[1] < 0:
        raise ValueError(f"context_length {context_length} is longer than the train split ({ends[0]} rows)")
    return list(zip(starts, ends))


def protocol_for(name: str) -> str:
    """``"etth"`` / ``"ettm"`` from a file name containing ETTh / ETTm (case-insensitive), else ``"ratio"``."""
    low = Path(str(name)).name.lower()
    return "etth" if "etth" in low else "ettm" if "ettm" in low else "ratio"


class StandardScaler:
    """Per-channel ``(x - mean) / std`` with the population std (ddof=0), like scikit-learn's StandardScaler.

    Statistics are computed in float64; a channel with std 0 is only centred (std replaced by 1).
    """

    def __init__(self):
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    def fit(self, values: np.ndarray) -> "StandardScaler":
        v = np.asarray(values, dtype=np.float64)
        if v.ndim != 2 or v.shape[0] == 0:
            raise ValueError(f"values must be a non-empty (rows, channels) array, got shape {v.shape}")
        self.mean_ = v.mean(0)
        std = v.std(0)
        self.scale_ = np.where(std > 0, std, 1.0)
        return self

    def _check(self, values):
        if self.mean_ is None:
            raise RuntimeError("StandardScaler is not fitted; call fit(train_values) first")
        v = np.asarray(values, dtype=np.float64)
        if v.shape[-1] != self.mean_.shape[0]:
            raise ValueError(f"values have {v.shape[-1]} channels, the scaler was fit on {self.mean_.shape[0]}")
        return v

    def transform(self, values: np.ndarray) -> np.ndarray:
        return ((self._check(values) - self.mean_) / self.scale_).astype(np.float32)

    def inverse_transform(self, values: np.ndarray) -> np.ndarray:
        return (self._check(values) * self.scale_ + self.mean_).astype(np.float32)

    def state_dict(self) -> dict:
        return {"mean": self.mean_.tolist(), "scale": self.scale_.tolist()}


@dataclass
class ForecastSplits:
    """Scaled train / val / test arrays (rows, channels) of one table, with the borders and the fitted scaler."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    borders: list
    scaler: StandardScaler
    columns: list
    context_length: int
    protocol: str
    dates: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"protocol": self.protocol, "context_length": self.context_length, "borders": self.borders,
                "rows": {k: int(getattr(self, k).shape[0]) for k in ("train", "val", "test")},
                "channels": self.columns}


def make_splits(table: TimeSeriesTable, context_length: int, protocol: str = "auto",
                scale: bool = True) -> ForecastSplits:
    """Split ``table`` with :func:`split_borders` and scale every split with a scaler fit on the train rows only."""
    if protocol == "auto":
        protocol = protocol_for(table.name)
    borders = split_borders(table.num_rows, context_length, protocol)
    scaler = StandardScaler().fit(table.values[borders[0][0]:borders[0][1]])
    parts = []
    for s, e in borders:
        v = table.values[s:e]
        parts.append(scaler.transform(v) if scale else v.copy())
    dates = {}
    if table.dates is not None:
        for k, (s, e) in zip(("train", "val", "test"), borders):
            dates[k] = (str(table.dates[s]), str(table.dates[e - 1]))
    return ForecastSplits(*parts, borders=borders, scaler=scaler, columns=list(table.columns),
                          context_length=context_length, protocol=protocol, dates=dates)


def _as_series_list(series) -> list[np.ndarray]:
    """Every channel of every array as one float32 1-D series."""
    if isinstance(series, TimeSeriesTable):
        series = [series.values]
    elif isinstance(series, (np.ndarray, torch.Tensor)):
        series = [series]
    out = []
    for i, s in enumerate(series):
        if isinstance(s, TimeSeriesTable):
            s = s.values
        a = s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s)
        if a.dtype.kind not in "fiu":
            raise TypeError(f"series {i} is not numeric (dtype {a.dtype})")
        if a.ndim == 1:
            a = a[:, None]
        if a.ndim != 2:
            raise ValueError(f"series {i} must be 1-D (time) or 2-D (time, channels), got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"series {i} contains NaN or inf; fill it first (table_from_frame(nan_policy=...))")
        out.extend(np.ascontiguousarray(a[:, c], dtype=np.float32) for c in range(a.shape[1]))
    if not out:
        raise ValueError("no series given")
    return out


class TimeSeriesWindowDataset(Dataset):
    """Channel-independent next-point training windows, the Time-MoE (pre-)training layout.

    Each item is ``window_length + 1`` consecutive points of one univariate series, returned as ``input_ids`` (points
    0..L-1), ``labels`` (points 1..L, the value following each input point) and ``loss_masks`` (1 where the label is
    real, 0 where it is zero padding), all float32 of length ``window_length``. Series shorter than the window give
    one zero-padded item. Windows start every ``stride`` points (default ``window_length``: non-overlapping); with
    ``tail="align"`` (default) one more window ends exactly at the series end so that no point is dropped without
    padding, with ``tail="pad"`` the remainder becomes a zero-padded window (the official dataset's behaviour).
    ``series``: an array (time,) / (time, channels), a :class:`TimeSeriesTable`, or a list of them.
    ``normalize=True`` z-scores every window with the mean and (unbiased) std of its input points (std 1 when below
    1e-8), the same statistics ``model.forecast(..., normalize=True)`` uses on a context; padding stays 0.
    """

    def __init__(self, series, window_length: int, stride: int | None = None, tail: str = "align",
                 min_points: int = 2, normalize: bool = False):
        if not isinstance(window_length, int) or window_length < 1:
            raise ValueError(f"window_length must be a positive int, got {window_length!r}")
        stride = window_length if stride is None else stride
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        if tail not in ("align", "pad"):
            raise ValueError(f"tail must be 'align' or 'pad', got {tail!r}")
        if min_points < 2:
            raise ValueError(f"min_points must be >= 2 (one input and one label), got {min_points}")
        self.series = _as_series_list(series)
        self.window_length = window_length
        self.stride = stride
        self.normalize = bool(normalize)
        span = window_length + 1
        index = []
        for si, s in enumerate(self.series):
            n = len(s)
            if n < min_points:
                continue
            if n <= span:
                index.append((si, 0))
                continue
            offs = list(range(0, n - span + 1, stride))
            if tail == "align" and offs[-1] != n - span:
                offs.append(n - span)
            elif tail == "pad":
                offs.extend(range(offs[-1] + stride, n - min_points + 1, stride))
            index.extend((si, o) for o in offs)
        if not index:
            raise ValueError(f"no series has at least {min_points} points")
        self.index = np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        si, off = (int(x) for x in self.index[i])
        seq = self.series[si][off: off + self.window_length + 1]
        n = len(seq) - 1
        x = np.zeros(self.window_length + 1, dtype=np.float32)
        if self.normalize:
            inp = seq[: self.window_length].astype(np.float64)
            mean = inp.mean()
            std = inp.std(ddof=1) if inp.size > 1 else 0.0
            seq = (seq - mean) / (std if std >= 1e-8 else 1.0)
        x[: len(seq)] = seq
        mask = np.zeros(self.window_length, dtype=np.float32)
        mask[:n] = 1.0
        return {"input_ids": torch.from_numpy(x[:-1].copy()), "labels": torch.from_numpy(x[1:].copy()),
                "loss_masks": torch.from_numpy(mask)}


class ForecastWindowDataset(Dataset):
    """(context, target) windows of a multivariate array for evaluation (stride 1) or direct-forecast training.

    Item ``i`` covers rows ``start .. start + context_length + prediction_length`` with ``start = starts[i]`` and
    returns ``inputs`` (channels, context_length) and ``labels`` (channels, prediction_length) float32 tensors plus
    ``start``. There are ``rows - context_length - prediction_length + 1`` windows at stride 1 (the Informer count;
    Time-MoE's benchmark loader stops one window earlier). ``max_windows`` keeps that many evenly spaced windows
    (first and last included) for quick runs. With ``channel_independent=True`` every (window, channel) pair is one
    item with 1-D ``inputs`` / ``labels`` (and ``channel``): the layout for training univariate models such as DLinear.
    """

    def __init__(self, values: np.ndarray, context_length: int, prediction_length: int, stride: int = 1,
                 max_windows: int | None = None, channel_independent: bool = False):
        v = values.values if isinstance(values, TimeSeriesTable) else np.asarray(values)
        if v.ndim == 1:
            v = v[:, None]
        if v.ndim != 2:
            raise ValueError(f"values must be (rows, channels), got shape {v.shape}")
        for name, val in (("context_length", context_length), ("prediction_length", prediction_length),
                          ("stride", stride)):
            if not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.values = np.ascontiguousarray(v, dtype=np.float32)
        self.context_length, self.prediction_length = int(context_length), int(prediction_length)
        last = v.shape[0] - self.context_length - self.prediction_length
        if last < 0:
            raise ValueError(f"{v.shape[0]} rows are fewer than context_length + prediction_length = "
                             f"{self.context_length + self.prediction_length}")
        starts = np.arange(0, last + 1, stride, dtype=np.int64)
        if max_windows is not None:
            if max_windows < 1:
                raise ValueError(f"max_windows must be >= 1, got {max_windows}")
            if max_windows < len(starts):
                starts = starts[np.unique(np.linspace(0, len(starts) - 1, max_windows).round().astype(np.int64))]
        self.starts = starts
        self.channel_independent = bool(channel_independent)

    @property
    def num_channels(self) -> int:
        return self.values.shape[1]

    def __len__(self) -> int:
        return len(self.starts) * (self.num_channels if self.channel_independent else 1)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        ch = None
        if self.channel_independent:
            i, ch = divmod(i, self.num_channels)
        s = int(self.starts[i])
        c = s + self.context_length
        w = self.values[s: c + self.prediction_length]
        if ch is not None:
            return {"inputs": torch.from_numpy(w[: self.context_length, ch].copy()),
                    "labels": torch.from_numpy(w[self.context_length:, ch].copy()), "start": s, "channel": ch}
        return {"inputs": torch.from_numpy(w[: self.context_length].T.copy()),
                "labels": torch.from_numpy(w[self.context_length:].T.copy()), "start": s}


def infer_season_length(dates=None, values: np.ndarray | None = None, max_lag: int = 400) -> int:
    """The seasonal period in steps: from the timestamps' median step, else the autocorrelation peak of ``values``.

    Sub-daily data: steps per day (hourly -> 24, 15 min -> 96, 30 min -> 48); daily -> 7; weekly -> 52; monthly -> 12;
    quarterly -> 4; anything coarser -> 1. Without dates: the lag in ``[2, max_lag)`` where the autocorrelation of the
    (channel-averaged, de-meaned) series has its highest positive local maximum (1 when there is none).
    """
    if dates is not None and len(dates) >= 3:
        import pandas as pd

        step = float(pd.Series(pd.DatetimeIndex(dates)).diff().dt.total_seconds().median())
        if step <= 0:
            raise ValueError("dates must be increasing to infer a season length")
        if step < 86400:
            return max(1, int(round(86400 / step)))
        days = step / 86400
        if days < 1.5:
            return 7
        if days < 10:
            return 52
        if days < 40:
            return 12
        if days < 120:
            return 4
        return 1
    if values is None:
        raise ValueError("infer_season_length needs dates or values")
    v = np.asarray(values, dtype=np.float64)
    v = v.mean(1) if v.ndim == 2 else v
    v = v - v.mean()
    max_lag = min(max_lag, len(v) // 2)
    if max_lag < 3:
        return 1
    denom = float((v * v).sum()) or 1.0
    acf = np.array([1.0] + [float((v[:-k] * v[k:]).sum()) / denom for k in range(1, max_lag + 1)])
    peaks = [k for k in range(2, max_lag) if acf[k] > acf[k - 1] and acf[k] >= acf[k + 1] and acf[k] > 0]
    return max(peaks, key=lambda k: acf[k]) if peaks else 1
