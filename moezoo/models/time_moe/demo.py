"""Demo step ``time_moe``: train the tiny Time-MoE briefly on a real series and compare it with seasonal naive.

The series is the first of these that is available offline (``../shared/DATA.md``):

1. ``pmdarima.datasets.load_taylor()``: half-hourly electricity demand (4,032 points; season 48), if pmdarima is
   installed;
2. ``statsmodels`` ``co2`` (weekly Mauna Loa CO2, 2,284 points with gaps interpolated; season 52), if statsmodels is
   installed;
3. ETTh1 (7 hourly channels, the standard 12/4/4-month splits; season 24) from ``../shared/data/ett/ETTh1.csv``
   beside the checkout (or ``$MOEZOO_SHARED_DIR/data/ett/ETTh1.csv``);

otherwise the step is skipped with the reason printed. Training goes through :class:`moezoo.trainer.Trainer`
(checkpoints, expert-load plots) on the train split, every window z-scored by its own context (as
``model.forecast(normalize=True)`` does at inference); the test MSE (scaled data) of the Time-MoE forecasts is printed
next to seasonal naive's, and a forecast PNG is written.
"""
from __future__ import annotations

import time

import numpy as np

from ...demo import DemoContext, register_demo_step


def demo_series(printer=print):
    """``(name, TimeSeriesTable, protocol, season_length, horizon)`` of the first available real series, or
    ``(None, reason, ...)``."""
    from ...data.timeseries import infer_season_length, load_table, table_from_frame
    from .recipe import default_shared_dir

    tried = []
    try:
        from pmdarima.datasets import load_taylor

        y = np.asarray(load_taylor(), dtype=np.float64)
        import pandas as pd

        table = table_from_frame(pd.DataFrame({"demand": y}), date_column=None, name="taylor")
        return "pmdarima taylor (half-hourly electricity demand)", table, "ratio", 48, 48
    except ImportError:
        tried.append("pmdarima (not installed)")
    try:
        import statsmodels.api as sm

        df = sm.datasets.co2.load_pandas().data
        table = table_from_frame(df, date_column=None, nan_policy="interpolate", name="co2")
        return "statsmodels co2 (weekly Mauna Loa CO2)", table, "ratio", infer_season_length(table.dates), 52
    except ImportError:
        tried.append("statsmodels (not installed)")
    csv = default_shared_dir() / "data" / "ett" / "ETTh1.csv"
    if csv.is_file():
        table = load_table(csv)
        return "ETTh1 (hourly electricity transformer data)", table, "etth", infer_season_length(table.dates), 96
    tried.append(f"ETTh1 (no file at {csv})")
    return None, "no real series available: tried " + ", ".join(tried), None, None, None


@register_demo_step("time_moe", order=20, description="train the tiny Time-MoE on a real series (pmdarima / "
                    "statsmodels / ETTh1), forecast MSE vs seasonal naive, forecast PNG")
def time_moe_demo(ctx: DemoContext) -> dict:
    import torch

    name, table, protocol, season, horizon = demo_series(ctx.print)
    if name is None:
        ctx.print(f"skipping the time_moe step: {table}")
        return {"skipped": table}
    threads = torch.get_num_threads()
    try:
        # a 64-wide model is faster on one intra-op thread than on several (thread overhead dominates)
        torch.set_num_threads(1)
        return _run(ctx, name, table, protocol, season, horizon)
    finally:
        torch.set_num_threads(threads)


def _run(ctx: DemoContext, name, table, protocol, season, horizon) -> dict:
    import torch

    import moezoo
    from ...data.timeseries import ForecastWindowDataset, TimeSeriesWindowDataset, make_splits
    from .baselines import seasonal_naive
    from .benchmark import save_forecast_plot
    from .recipe import evaluate_forecaster, time_moe_predictor, train_model

    out = ctx.step_dir("time_moe")
    torch.manual_seed(ctx.seed)
    context = horizon if ctx.quick else 2 * horizon
    splits = make_splits(table, context_length=context, protocol=protocol)
    ctx.print(f"series: {name}: {table.num_rows} rows x {table.num_channels} channel(s), {protocol} splits "
              f"{splits.borders}, scaler fit on the train rows; context {context}, horizon {horizon}, season {season}")
    steps, batch = (10, 8) if ctx.quick else (400, 32)
    model = moezoo.create_model("time_moe_tiny_e4k2")
    s = model.parameter_summary()
    ctx.print(f"model: time_moe_tiny_e4k2, {s['total']:,} parameters ({s['active']:,} active), "
              f"{model.config.num_experts} experts top-{model.config.num_experts_per_tok}, horizons "
              f"{model.config.horizon_lengths}")
    # every window z-scored by its own context, as model.forecast(normalize=True) does (robust to level shifts)
    train_ds = TimeSeriesWindowDataset(splits.train, window_length=context + horizon, stride=1, normalize=True)
    t0 = time.time()
    trainer, res = train_model(model, train_ds, dict(
        output_dir=str(out / "train"), max_steps=steps, batch_size=batch, learning_rate=3e-3, weight_decay=0.1,
        adam_beta2=0.95, warmup_steps=max(1, steps // 10), min_lr_ratio=0.1, grad_clip=1.0, log_every=5,
        save_every=None, keep_last=1, seed=ctx.seed, resume="never", overwrite_output_dir=True))
    train_s = time.time() - t0
    test = ForecastWindowDataset(splits.test, context, horizon, max_windows=8 if ctx.quick else 256)
    keep = [0, len(test) // 2, len(test) - 1]
    moe_m, moe_kept = evaluate_forecaster(time_moe_predictor(model, horizon, normalize=True), test, keep=keep,
                                          desc="time_moe")
    sn = lambda x: seasonal_naive(x, horizon, min(season, x.shape[-1]))  # noqa: E731
    sn_m, sn_kept = evaluate_forecaster(sn, test, keep=keep, desc="seasonal naive")
    ch = table.num_channels - 1
    windows = [{"context": test[i]["inputs"][ch].numpy(), "truth": test[i]["labels"][ch].numpy(),
                "forecasts": {"time_moe": moe_kept[i][ch], "seasonal naive": sn_kept[i][ch]},
                "label": f"test window {i}, channel {table.columns[ch]}"} for i in sorted(set(keep))]
    png = save_forecast_plot(out / "forecast.png", windows, title=f"{name}: Time-MoE vs seasonal naive")
    ctx.print(f"trained {steps} steps x {batch} windows in {train_s:.0f} s (loss {res['losses'][0]:.3f} -> "
              f"{res['losses'][-1]:.3f})")
    ctx.print(f"test MSE / MAE over {len(test)} windows (scaled): time_moe {moe_m['mse']:.4f} / {moe_m['mae']:.4f}, "
              f"seasonal naive {sn_m['mse']:.4f} / {sn_m['mae']:.4f}")
    ctx.print(f"forecast plot: {png}; expert load plots: {', '.join(res['routing_plots']) or '-'}")
    return {"series": name, "rows": table.num_rows, "channels": table.num_channels, "context": context,
            "horizon": horizon, "season_length": season, "steps": steps, "train_seconds": round(train_s, 1),
            "loss_first": res["losses"][0], "loss_last": res["losses"][-1], "test_windows": len(test),
            "time_moe_mse": moe_m["mse"], "time_moe_mae": moe_m["mae"], "seasonal_naive_mse": sn_m["mse"],
            "seasonal_naive_mae": sn_m["mae"], "forecast_png": png, "routing_plots": res["routing_plots"],
            "checkpoint": res["checkpoint"]}
