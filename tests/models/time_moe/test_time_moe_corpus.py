"""Time-MoE pretraining corpus: cleaning, ETT exclusion, dedupe, packing, the packed multi-head Huber loss, a tiny
pretraining run, and the seeds harness."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
from moezoo.models.time_moe.corpus import (KERNEL_SYNTH_PERIODS, CorpusSeries, PackedWindowDataset,  # noqa: E402
                                           build_corpus, kernel_synth, load_source, packed_loss, split_corpus)

ROOT = Path(__file__).resolve().parents[3]
SHARED = Path(os.environ.get("MOEZOO_SHARED_DIR", ROOT.parent / "shared"))
ETTH1 = SHARED / "data" / "ett" / "ETTh1.csv"


def _s(name, v, source="test"):
    return CorpusSeries(name, np.asarray(v, dtype=np.float64), source)


def test_build_corpus_excludes_ett_and_dedupes():
    rng = np.random.default_rng(0)
    ett = rng.normal(size=(300, 2)).cumsum(0)                      # stands in for an ETT file (2 channels)
    a = rng.normal(size=120).cumsum()
    zeros_then_noise = np.concatenate([np.zeros(40), rng.normal(size=60)])
    ett_with_zeros = ett.copy()
    ett_with_zeros[:40, 0] = 0.0                                   # a constant run shared with an unrelated series
    with_gap = rng.normal(size=50)
    with_gap[[0, 10, 11, 49]] = np.nan
    series = [
        _s("a", a),
        _s("a_scaled", 3.0 * a + 7.0),                             # duplicate after z-scoring
        _s("m3:ETTh2-copy", rng.normal(size=100)),                 # ETT by name
        _s("hidden_copy", np.concatenate([rng.normal(size=30), ett[100:140, 1], rng.normal(size=30)])),   # by content
        _s("short", rng.normal(size=10)),
        _s("flat", np.full(50, 3.0)),
        _s("zeros_then_noise", zeros_then_noise),                  # shares only a constant run: kept
        _s("gap", with_gap),
    ]
    c = build_corpus(series, exclude=[ett_with_zeros], exclude_run=16, min_length=16)
    assert [s.name for s in c.series] == ["a", "zeros_then_noise", "gap"]
    assert c.report["dropped"] == {"ett_name": 1, "ett_content": 1, "short": 1, "constant": 1, "duplicate": 1}
    gap = c.series[2].values
    assert len(gap) == 48 and np.isfinite(gap).all()               # edges trimmed, inner gap interpolated
    np.testing.assert_allclose(gap[8:12], np.linspace(with_gap[9], with_gap[12], 4))   # index shifted by the trim
    assert c.summary()["per_source"] == {"test": {"series": 3, "points": 120 + 100 + 48}}
    tr, va = split_corpus(c, val_fraction=0.34, seed=0)
    assert sorted(s.name for s in tr.series + va.series) == sorted(s.name for s in c.series) and len(va.series) == 1
    # without dedupe the scaled copy stays; a bad source name is a clear error
    assert len(build_corpus(series[:2], dedupe=False).series) == 2
    with pytest.raises(ValueError, match="unknown source"):
        load_source("m5")


def test_real_sources_are_clean_and_ett_free():
    sm = load_source("statsmodels")
    names = {s.name for s in sm}
    assert {"statsmodels:sunspots", "statsmodels:co2", "statsmodels:nile"} <= names
    c = build_corpus(sm)
    co2 = next(s for s in c.series if s.name == "statsmodels:co2")
    assert len(co2) > 2000 and np.isfinite(co2.values).all()       # weekly co2 has gaps, interpolated
    if ETTH1.is_file():
        from moezoo.data.timeseries import load_table

        ett = load_table(ETTH1).values
        leaked = [_s("leak", ett[5000:5200, 6])]
        assert build_corpus(sm + leaked, exclude=[ett]).report["dropped"]["ett_content"] == 1


def test_kernel_synth_series_are_seeded_periodic_and_separately_labelled():
    a = kernel_synth(24, 256, seed=3)
    b = kernel_synth(24, 256, seed=3)
    assert len(a) == 24 and all(s.source == "kernelsynth" and s.name.startswith("kernelsynth:") for s in a)
    assert all(np.array_equal(x.values, y.values) and x.name == y.name for x, y in zip(a, b))    # seeded
    assert not np.array_equal(a[0].values, kernel_synth(1, 256, seed=4)[0].values)
    assert all(len(s) == 256 and np.isfinite(s.values).all() and np.ptp(s.values) > 0 for s in a)
    # every series has some structure (not only constant / white-noise kernels) ...
    assert all(any(k.lstrip("+*") not in ("const", "white") for k in s.name.split(":")[2].replace("+", " +")
                   .replace("*", " *").split()) for s in a)
    # ... and a series drawn from a single periodic kernel repeats with its period
    per = [s for s in a if s.name.split(":")[2].startswith("per") and s.name.count("+") + s.name.count("*") == 0]
    assert per                                           # seed 3 draws one (per48)
    for s in per:
        p = int(float(s.name.split(":")[2][3:]))
        assert p in KERNEL_SYNTH_PERIODS
        v = s.values
        assert np.abs(v[p:] - v[:-p]).max() < 0.05 * np.ptp(v), s.name
    with pytest.raises(ValueError, match="length"):
        kernel_synth(2, 8)


def test_packed_windows_prefix_statistics():
    """stats_fraction=0.5 z-scores a chunk by its first half only, so its second half (what the last positions
    forecast) is not forced to mean 0 / std 1; the default uses the whole chunk."""
    rng = np.random.default_rng(0)
    v = np.cumsum(rng.standard_normal(65)) + 10.0
    full = PackedWindowDataset([v], 64)[0]
    half = PackedWindowDataset([v], 64, stats_fraction=0.5)[0]
    xf = np.concatenate([full["input_ids"][:1].numpy(), full["labels"].numpy()])
    xh = np.concatenate([half["input_ids"][:1].numpy(), half["labels"].numpy()])
    assert abs(xf.mean()) < 1e-5 and abs(xf.std(ddof=1) - 1) < 1e-5
    assert abs(xh[:33].mean()) < 1e-5 and abs(xh[:33].std(ddof=1) - 1) < 1e-5
    assert abs(xh[33:].mean()) > 0.5                      # a random walk drifts away from its first half
    assert np.allclose(xh, (v - v[:33].mean()) / v[:33].std(ddof=1), atol=1e-5)
    with pytest.raises(ValueError, match="stats_fraction"):
        PackedWindowDataset([v], 64, stats_fraction=0.0)


def test_packed_windows_keep_series_apart():
    rng = np.random.default_rng(1)
    lens = [30, 20, 45, 12, 5, 70]
    series = [rng.normal(loc=10 * i, scale=i + 1, size=n) for i, n in enumerate(lens)]
    ds = PackedWindowDataset(series, window_length=31, min_points=8)   # span 32
    seen = []
    for i in range(len(ds)):
        it = ds[i]
        seg = it["segment_ids"].numpy()
        x = np.concatenate([it["input_ids"].numpy()[:1], it["labels"].numpy()])
        assert it["input_ids"].shape == (31,) and seg.shape == (32,)
        assert (np.diff(seg[seg > 0]) >= 0).all() and (seg[seg == 0] == 0).all()
        for k in range(1, seg.max() + 1):
            v = x[seg == k]
            seen.append(len(v))
            assert abs(v.mean()) < 1e-5 and abs(v.std(ddof=1) - 1) < 1e-4     # each chunk z-scored on its own
        mask = it["loss_masks"].numpy()
        np.testing.assert_array_equal(mask, ((seg[1:] == seg[:-1]) & (seg[1:] > 0)).astype(np.float32))
    # 30, 20 and 12 whole; 45 -> starts 0, 13; 70 -> starts 0, 32, 38; the 5-point series is below min_points
    assert sorted(seen) == sorted([30, 20, 32, 32, 12, 32, 32, 32])
    assert len(ds) < len(seen) and ds.fill > 0.8                   # short chunks share windows
    with pytest.raises(ValueError, match="window_length"):
        PackedWindowDataset(series, window_length=1)


def _reference_packed_loss(model, batch):
    """Loops: head h at position t, target t+1+j counts iff it is inside the window and in t's segment."""
    out = model.model(input_ids=batch["input_ids"], attention_mask=(batch["segment_ids"][:, :-1] > 0).long())
    h = out.last_hidden_state
    seq = torch.cat([batch["input_ids"][:, :1], batch["labels"]], 1)
    seg = batch["segment_ids"]
    B, T = batch["input_ids"].shape
    total = 0.0
    for head, hl in zip(model.lm_heads, model.config.horizon_lengths):
        pred = head(h)
        num, den = 0.0, 0
        for b in range(B):
            for t in range(T):
                for j in range(hl):
                    u = t + 1 + j
                    if u <= T and seg[b, t] > 0 and seg[b, u] == seg[b, t]:
                        num = num + F.huber_loss(pred[b, t, j], seq[b, u], delta=model.config.huber_delta)
                        den += 1
        total = total + num / den
    return total / len(model.lm_heads)


def test_packed_loss_masks_packing_boundaries():
    torch.manual_seed(0)
    model = moezoo.create_model("time_moe_tiny_e4k2", tiny=True, router_aux_loss_coef=0.0).eval()
    rng = np.random.default_rng(2)
    ds = PackedWindowDataset([rng.normal(size=n).cumsum() for n in (9, 7, 12, 4)], window_length=15, min_points=3)
    batch = {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ds[0]}
    assert (batch["segment_ids"].max(1).values > 1).any()          # something is packed
    loss, logs = packed_loss(model, batch)
    torch.testing.assert_close(loss, _reference_packed_loss(model, batch), rtol=1e-5, atol=1e-6)
    assert set(logs) == {f"huber_h{h}" for h in model.config.horizon_lengths} | {"aux"} and logs["aux"] == 0.0
    # one series filling the window: the same as the model's own loss (loss_masks only drop targets past the end)
    one = PackedWindowDataset([rng.normal(size=16).cumsum()], window_length=15)
    b1 = {k: torch.stack([one[0][k]]) for k in one[0]}
    ref = model(input_ids=b1["input_ids"], labels=b1["labels"], loss_masks=b1["loss_masks"]).loss
    torch.testing.assert_close(packed_loss(model, b1)[0], ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    with pytest.raises(ValueError, match="segment_ids"):
        packed_loss(model, {**batch, "segment_ids": batch["segment_ids"][:, 1:]})


def test_pretrain_tiny_run(tmp_path):
    from moezoo.models.time_moe import MoezooTimeMoeForPrediction
    from moezoo.models.time_moe.pretrain import PretrainConfig, run_pretrain

    cfg = PretrainConfig(output_dir=str(tmp_path / "pt"), model="time_moe_tiny_e4k2", tiny=True,
                         sources=("statsmodels",), exclude_csv=(), window_length=64, steps=4, batch_size=4,
                         warmup_steps=1, eval_every=2, max_val_windows=4, val_fraction=0.2, progress=False,
                         threads=1, synthetic_series=3, synthetic_length=130)
    res = run_pretrain(cfg, printer=lambda *a: None)
    curve = json.loads((tmp_path / "pt" / "curve.json").read_text())
    assert len(curve["train_loss"]) == 4 and [v["step"] for v in curve["val"]] == [2, 4]
    assert (tmp_path / "pt" / "curve.png").stat().st_size > 1000
    info = json.loads((tmp_path / "pt" / "corpus.json").read_text())
    assert info["summary"]["per_source"].keys() == {"statsmodels"} and info["val_series"]
    assert info["synthetic"]["series"] == 3 and info["synthetic"]["points"] == 390            # counted apart,
    assert not any(n.startswith("kernelsynth") for n in info["val_series"])                  # never held out
    m = MoezooTimeMoeForPrediction.from_pretrained(res["model_dir"])
    assert m.config.context_window == 64                     # forecasts roll on within the trained window
    assert (tmp_path / "pt" / "model" / "model.safetensors").is_file()
    y = m.forecast(torch.randn(2, 40).cumsum(1), 10, normalize=True, progress=False)
    assert tuple(np.asarray(y).shape) == (2, 10)
    with pytest.raises(ValueError, match="steps"):
        PretrainConfig(steps=0)


@pytest.mark.skipif(not ETTH1.is_file(), reason=f"ETTh1 not found at {ETTH1}")
def test_harness_seeds_and_pretrained(tmp_path):
    import importlib.util

    from moezoo.models.time_moe.benchmark import BenchmarkConfig

    torch.manual_seed(0)
    pre = moezoo.create_model("time_moe_tiny_e4k2", tiny=True)
    for s in (3, 4):
        pre.save_pretrained(str(tmp_path / f"pre_s{s}"))
    spec = importlib.util.spec_from_file_location("time_moe_eval_run", ROOT / "eval" / "time_moe" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    out = tmp_path / "bench"
    res = run.main(["--fast", "--tiny", "--csv", str(ETTH1), "--output-dir", str(out), "--steps", "2",
                    "--max-windows", "2", "--context", "48", "--train-window", "64", "--no-progress", "--plot-windows",
                    "0", "--baselines", "dlinear,seasonal_naive", "--seeds", "3", "4",
                    "--pretrained", f"zs={tmp_path}/pre_s{{seed}}", f"fixed={tmp_path}/pre_s3"])
    rows = {r["model"]: r for r in res["results"]}
    assert set(rows) == {"time_moe", "zs", "fixed", "dlinear", "seasonal_naive"} and res["seeds"] == [3, 4]
    assert rows["fixed"]["mse_per_seed"] == [rows["zs"]["mse_per_seed"][0]] * 2     # evaluated once, reused
    for name, r in rows.items():
        if name == "fixed":
            continue
        per = [json.loads((out / f"seed{s}" / "results.json").read_text()) for s in (3, 4)]
        vals = [next(x["mse"] for x in p["results"] if x["model"] == name) for p in per]
        assert r["mse_per_seed"] == pytest.approx(vals)
        assert r["mse"] == pytest.approx(np.mean(vals)) and r["mse_std"] == pytest.approx(np.std(vals, ddof=1))
    assert rows["seasonal_naive"]["mse_std"] == 0.0 and rows["zs"]["mse_std"] == 0.0   # same weights both seeds
    assert rows["time_moe"]["mse_std"] > 0 and rows["zs"]["train_steps"] == 0          # fresh weights per seed
    md = (out / "results.md").read_text()
    assert "mean ± std" in md and f"| zs | pretrained |" in md and " ± " in md.split("| zs |")[1].split("\n")[0]
    with pytest.raises(ValueError, match="label=folder"):
        BenchmarkConfig(csv=str(ETTH1), pretrained=("no_label",))
    with pytest.raises(ValueError, match="differ from the built-in"):
        BenchmarkConfig(csv=str(ETTH1), pretrained={"dlinear": "x"})
