"""Time-MoE evaluation: metrics vs numpy, seasonal naive, DLinear, the harness --fast end to end, the demo step."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moezoo.data.timeseries import ForecastWindowDataset, load_table, make_splits  # noqa: E402
from moezoo.metrics.timeseries import ForecastMetrics, mae, mse  # noqa: E402
from moezoo.models.time_moe.baselines import DLinear, dlinear_loss, seasonal_naive  # noqa: E402
from moezoo.models.time_moe.recipe import evaluate_forecaster, train_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
SHARED = Path(os.environ.get("MOEZOO_SHARED_DIR", ROOT.parent / "shared"))
ETTH1 = SHARED / "data" / "ett" / "ETTh1.csv"
needs_etth1 = pytest.mark.skipif(not ETTH1.is_file(), reason=f"ETTh1 not found at {ETTH1}")


@pytest.mark.parametrize("use_torchmetrics", [True, False])
def test_metrics_match_numpy(use_torchmetrics):
    if use_torchmetrics:
        pytest.importorskip("torchmetrics")
    rng = np.random.default_rng(0)
    pred, true = rng.normal(size=(10, 3, 7)), rng.normal(size=(10, 3, 7))
    m = ForecastMetrics(num_channels=3, use_torchmetrics=use_torchmetrics)
    for lo in (0, 4):                                            # two uneven batches
        hi = 4 if lo == 0 else 10
        m.update(torch.from_numpy(pred[lo:hi]).float(), torch.from_numpy(true[lo:hi]).float())
    r = m.compute()
    err = pred.astype(np.float32).astype(np.float64) - true.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(r["mse_per_channel"], (err ** 2).mean(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(r["mae_per_channel"], np.abs(err).mean(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose([r["mse"], r["mae"]], [(err ** 2).mean(), np.abs(err).mean()], rtol=1e-6)
    assert r["count"] == err.size
    assert mse(pred, true) == pytest.approx((err ** 2).mean(), rel=1e-6)
    assert mae(pred, true) == pytest.approx(np.abs(pred - true).mean())
    one = ForecastMetrics(num_channels=1, use_torchmetrics=use_torchmetrics)
    one.update(pred[:, 0], true[:, 0])                            # (batch, horizon) for one channel
    assert one.compute()["mse"] == pytest.approx(((pred[:, 0] - true[:, 0]) ** 2).mean(), rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        m.update(pred, true[:, :2])
    with pytest.raises(ValueError, match=r"\(batch, 3, horizon\)"):
        m.update(pred[:, :2], true[:, :2])
    with pytest.raises(RuntimeError, match="before any update"):
        ForecastMetrics(2, use_torchmetrics=use_torchmetrics).compute()


def test_seasonal_naive_is_exact():
    x = torch.arange(30.0).reshape(2, 15)
    out = seasonal_naive(x, 7, 4)
    assert out.shape == (2, 7)
    torch.testing.assert_close(out[0], torch.tensor([11.0, 12, 13, 14, 11, 12, 13]))
    np.testing.assert_array_equal(seasonal_naive(x.numpy(), 3, 1), np.repeat(x.numpy()[:, -1:], 3, 1))
    # a series with period m is forecast perfectly
    t = np.arange(200)
    s = np.sin(2 * np.pi * t / 24)
    np.testing.assert_allclose(seasonal_naive(s[:150], 50, 24), s[150:], atol=1e-12)
    with pytest.raises(ValueError, match="fewer than season_length"):
        seasonal_naive(x, 3, 20)
    with pytest.raises(ValueError, match="prediction_length"):
        seasonal_naive(x, 0, 2)


def test_dlinear_decomposition_and_training(tmp_path):
    dl = DLinear(48, 12, kernel_size=25)
    x = torch.randn(5, 48)
    seasonal, trend = dl.decompose(x)
    torch.testing.assert_close(seasonal + trend, x)
    torch.testing.assert_close(dl.decompose(torch.full((1, 48), 3.0))[1], torch.full((1, 48), 3.0))
    ramp = torch.arange(48.0)[None]
    torch.testing.assert_close(dl.decompose(ramp)[1][:, 12:36], ramp[:, 12:36])   # linear inside the edges
    assert dl(torch.randn(2, 3, 48)).shape == (2, 3, 12)
    with pytest.raises(ValueError, match="context_length=48"):
        dl(torch.randn(2, 40))
    # trains on (context, horizon) windows of a noisy daily cycle through the shared Trainer
    rng = np.random.default_rng(0)
    t = np.arange(1500)
    values = (np.sin(2 * np.pi * t / 24) + 0.05 * rng.normal(size=t.size)).astype(np.float32)[:, None]
    train = ForecastWindowDataset(values[:1200], 48, 12, channel_independent=True)
    test = ForecastWindowDataset(values[1200:], 48, 12, max_windows=32)
    torch.manual_seed(0)
    model = DLinear(48, 12)
    before, _ = evaluate_forecaster(model, test, progress=False)
    _, res = train_model(model, train, dict(output_dir=str(tmp_path / "dl"), max_steps=60, batch_size=32,
                                            learning_rate=1e-2, progress_bar=False, resume="never"),
                         loss_fn=dlinear_loss, routing_stats=False)
    after, _ = evaluate_forecaster(model, test, progress=False)
    assert res["step"] == 60 and after["mse"] < 0.05 < before["mse"]


@needs_etth1
def test_harness_fast_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("time_moe_eval_run", ROOT / "eval" / "time_moe" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    out = tmp_path / "bench"
    result = run.main(["--fast", "--tiny", "--csv", str(ETTH1), "--output-dir", str(out), "--steps", "2",
                       "--max-windows", "3", "--context", "48", "--train-window", "64", "--no-progress"])
    rows = {r["model"]: r for r in result["results"]}
    assert set(rows) == {"time_moe", "dense", "dlinear", "seasonal_naive"}
    assert all(r["horizon"] == 96 and r["context"] == 48 and r["windows"] == 3 for r in rows.values())
    assert all(np.isfinite(r["mse"]) and np.isfinite(r["mae"]) for r in rows.values())
    assert rows["time_moe"]["train_steps"] == rows["dense"]["train_steps"] == rows["dlinear"]["train_steps"] == 2
    assert abs(rows["dense"]["params"]["active"] - rows["time_moe"]["params"]["active"]) < 0.01 * \
        rows["time_moe"]["params"]["active"]
    # seasonal naive recomputed independently with numpy on the same 3 test windows
    table = load_table(ETTH1)
    test = make_splits(table, context_length=48).test
    starts = np.linspace(0, len(test) - 48 - 96, 3).round().astype(int)
    err = [test[s + 24: s + 48][np.arange(96) % 24] - test[s + 48: s + 144] for s in starts]
    assert rows["seasonal_naive"]["mse"] == pytest.approx(float(np.mean(np.square(err))), rel=1e-5)
    md = (out / "results.md").read_text()
    assert "| seasonal_naive |" in md and "| time_moe |" in md
    saved = json.loads((out / "results.json").read_text())
    assert saved["data"]["season_length"] == 24 and saved["data"]["protocol"] == "etth"
    assert len(saved["results"]) == 4 and saved["mode"] == "finetune"
    for name in ("forecast_h96.png", "expert_load.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "train" / "time_moe" / "routing_load_over_steps.png").is_file()
    # zero-shot on the folder just trained: no training, the same forecasts as in the fine-tuned run
    zs = run.main(["--model", result["train"]["time_moe"]["checkpoint"], "--csv", str(ETTH1), "--output-dir",
                   str(tmp_path / "zs"), "--horizons", "96", "--context", "48", "--max-windows", "3",
                   "--baselines", "seasonal_naive", "--plot-windows", "1", "--no-progress"])
    zrows = {r["model"]: r for r in zs["results"]}
    assert zs["mode"] == "zero_shot" and set(zrows) == {"time_moe", "seasonal_naive"}
    assert zrows["time_moe"]["train_steps"] == 0 and zrows["time_moe"]["init"] == "pretrained"
    assert zrows["time_moe"]["mse"] == pytest.approx(rows["time_moe"]["mse"], rel=1e-5)


def test_harness_config_errors(tmp_path):
    from moezoo.models.time_moe.benchmark import BenchmarkConfig, run_benchmark

    with pytest.raises(ValueError, match="unknown baseline"):
        BenchmarkConfig(csv="x.csv", baselines=("arima",))
    with pytest.raises(ValueError, match="no default context"):
        BenchmarkConfig(csv="x.csv", horizons=(48,))
    assert BenchmarkConfig(csv="x.csv").context_lengths == {96: 512, 192: 1024, 336: 2048, 720: 3072}
    if ETTH1.is_file():
        with pytest.raises(ValueError, match="zero-shot mode needs a save_pretrained folder"):
            run_benchmark(BenchmarkConfig(csv=str(ETTH1), output_dir=str(tmp_path), mode="zero_shot", horizons=(96,)),
                          printer=lambda *a: None)


def test_demo_step_quick(tmp_path):
    from moezoo.demo import run_demo
    from moezoo.models.time_moe.demo import demo_series

    name, table, *_ = demo_series()
    lines = []
    results = run_demo(tmp_path, steps=["time_moe"], quick=True, printer=lines.append)["time_moe"]
    if name is None:
        assert "skipped" in results and any("skipping" in line for line in lines)
        return
    assert results["steps"] == 10
    assert np.isfinite(results["time_moe_mse"]) and np.isfinite(results["seasonal_naive_mse"])
    assert Path(results["forecast_png"]).stat().st_size > 1000
    assert any("seasonal naive" in line for line in lines)
