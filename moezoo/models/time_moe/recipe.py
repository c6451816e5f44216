"""The Time-MoE training recipe: YAML sections -> model, channel-independent windows, :class:`moezoo.trainer.Trainer`.

``training/time_moe/train.py`` is a thin wrapper around :func:`train_from_config`; the benchmark harness
(:mod:`moezoo.models.time_moe.benchmark`) and the demo call the same functions. A config has four sections::

    model:                       # what to train
      name: time_moe_tiny_e4k2   # registry name (fresh weights) ...
      tiny: false                # ... its tiny variant
      overrides: {}              # config fields to change
      init_from: null            # ... or a save_pretrained folder to fine-tune (e.g. ``moezoo convert`` output)
      dense: false               # train dense_config_like(config) instead: the dense model of equal active parameters
    data:                        # channel-independent next-point windows
      path: ../shared/data/ett/ETTh1.csv    # a CSV/parquet file or a list of them (ETT layout)
      protocol: auto             # etth | ettm | ratio | auto (from the file name)
      split: train               # train | train+val (scaler fit on train) | all (every row, z-scored per file)
      window_length: 288         # points per window (context + the longest horizon you will forecast)
      stride: 1                  # window start step (null: non-overlapping)
      normalize: false           # z-score every window by its input points (pair with eval.normalize: true)
    eval:                        # optional: validation MSE/MAE every trainer.eval_every steps
      context_length: 192
      prediction_length: 96
      max_windows: 64
      normalize: false           # per-window normalisation inside model.forecast
    trainer: {...}               # moezoo.trainer.TrainerConfig fields

The loss is the model's own: mean Huber loss over the horizon heads (``huber_delta``) + ``router_aux_loss_coef`` x
switch balance loss, with the windows' ``loss_masks`` excluding zero padding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ...data.timeseries import (ForecastSplits, ForecastWindowDataset, TimeSeriesWindowDataset, load_table,
                                make_splits)
from ...metrics.timeseries import ForecastMetrics

__all__ = ["MODEL_KEYS", "DATA_KEYS", "EVAL_KEYS", "build_model", "load_train_series", "build_train_dataset",
           "make_eval_fn", "evaluate_forecaster", "train_model", "train_from_config", "time_moe_predictor",
           "default_shared_dir"]

MODEL_KEYS = {"name": None, "tiny": False, "overrides": None, "init_from": None, "dense": False, "allow_pickle": False}
DATA_KEYS = {"path": None, "protocol": "auto", "split": "train", "window_length": 288, "stride": 1, "tail": "align",
             "columns": None, "nan_policy": "raise", "context_length": None, "normalize": False}
EVAL_KEYS = {"context_length": 192, "prediction_length": 96, "max_windows": 64, "batch_size": 64, "split": "val",
             "normalize": False}
SECTIONS = ("model", "data", "eval", "trainer")


def default_shared_dir() -> Path:
    """``../shared`` beside the repository checkout (where the offline data live), or ``$MOEZOO_SHARED_DIR``."""
    import os

    env = os.environ.get("MOEZOO_SHARED_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3].parent / "shared"


def _section(cfg: Mapping | None, defaults: dict, name: str) -> dict:
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the {name!r} section; valid keys are {sorted(defaults)}")
    return {**defaults, **cfg}


def build_model(model_cfg: Mapping) -> torch.nn.Module:
    """A :class:`MoezooTimeMoeForPrediction` from the ``model`` section (see the module docstring)."""
    from . import MoezooTimeMoeForPrediction, dense_config_like

    m = _section(model_cfg, MODEL_KEYS, "model")
    overrides = dict(m["overrides"] or {})
    if m["init_from"] is not None:
        if m["name"] is not None:
            raise ValueError("model: give either name (fresh weights) or init_from (a pretrained folder), not both")
        path = Path(m["init_from"])
        if not path.is_dir():
            raise FileNotFoundError(f"model.init_from {str(path)!r} is not a folder written by save_pretrained "
                                    "(convert official checkpoints with `moezoo convert time_moe SRC DST`)")
        model = MoezooTimeMoeForPrediction.from_pretrained(str(path), allow_pickle=bool(m["allow_pickle"]),
                                                           **overrides)
    elif m["name"] is not None:
        import moezoo

        model = moezoo.create_model(m["name"], tiny=bool(m["tiny"]), **overrides)
    else:
        raise ValueError("model: give name (a registry name such as time_moe_tiny_e4k2) or init_from (a folder)")
    if not isinstance(model, MoezooTimeMoeForPrediction):
        raise ValueError(f"model {m['name'] or m['init_from']!r} is a {type(model).__name__}, not a Time-MoE model")
    if m["dense"]:
        model = MoezooTimeMoeForPrediction(dense_config_like(model.config))
    return model


def _paths(path) -> list[Path]:
    if path is None:
        raise ValueError("data.path is required: a CSV/parquet file in the ETT layout or a list of them")
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths:
        raise ValueError("data.path is an empty list")
    return [Path(p) for p in paths]


def load_train_series(data_cfg: Mapping) -> tuple[list[np.ndarray], list[dict]]:
    """The scaled (rows, channels) arrays the ``data`` section selects, and one info dict per file."""
    d = _section(data_cfg, DATA_KEYS, "data")
    if d["split"] not in ("train", "train+val", "all"):
        raise ValueError(f"data.split must be 'train', 'train+val' or 'all', got {d['split']!r}")
    arrays, infos = [], []
    for p in _paths(d["path"]):
        table = load_table(p, columns=d["columns"], nan_policy=d["nan_policy"])
        if d["split"] == "all":
            v = table.values.astype(np.float64)
            std = v.std(0)
            arrays.append(((v - v.mean(0)) / np.where(std > 0, std, 1.0)).astype(np.float32))
            infos.append({"path": str(p), "rows": table.num_rows, "channels": table.columns, "split": "all"})
            continue
        ctx = d["context_length"] if d["context_length"] is not None else 0
        splits = make_splits(table, context_length=ctx, protocol=d["protocol"])
        arr = splits.train if d["split"] == "train" else np.concatenate([splits.train, splits.val[ctx:]])
        arrays.append(arr)
        infos.append({"path": str(p), **splits.summary(), "split": d["split"], "train_rows": int(arr.shape[0])})
    return arrays, infos


def build_train_dataset(data_cfg: Mapping) -> tuple[TimeSeriesWindowDataset, list[dict]]:
    """:class:`TimeSeriesWindowDataset` over every channel of every selected file."""
    d = _section(data_cfg, DATA_KEYS, "data")
    arrays, infos = load_train_series(d)
    return TimeSeriesWindowDataset(arrays, window_length=int(d["window_length"]), stride=d["stride"],
                                   tail=d["tail"], normalize=bool(d["normalize"])), infos


def time_moe_predictor(model, prediction_length: int, normalize: bool = False, batch_size: int = 256):
    """``predict(inputs (N, T)) -> (N, prediction_length)`` with ``model.forecast`` (KV-cached, multi-resolution).

    ``normalize=False`` feeds the (already standard-scaled) benchmark values as they are, as Time-MoE's own
    ``run_eval.py`` does; ``True`` adds the per-window normalisation of the paper's zero-shot inference.
    """
    def predict(x: torch.Tensor) -> np.ndarray:
        return model.forecast(x, prediction_length, normalize=normalize, batch_size=batch_size, progress=False)

    return predict


def evaluate_forecaster(predict, dataset: ForecastWindowDataset, *, batch_size: int = 64, keep: Sequence[int] = (),
                        desc: str = "eval", progress: bool = True) -> tuple[dict, dict]:
    """MSE/MAE (averaged over channels) of ``predict`` over every window of ``dataset``.

    ``predict(inputs (N, context)) -> (N, horizon)`` gets the channels of a batch of windows as independent series.
    Returns ``(metrics, kept)`` where ``kept[i]`` holds the forecast (channels, horizon) of window ``i`` for
    ``i in keep`` (for plots). A tqdm bar counts windows.
    """
    from tqdm.auto import tqdm

    if dataset.channel_independent:
        raise ValueError("evaluate_forecaster needs a ForecastWindowDataset with channel_independent=False")
    C, H = dataset.num_channels, dataset.prediction_length
    metrics = ForecastMetrics(num_channels=C)
    keep = set(int(k) for k in keep)
    kept = {}
    n = len(dataset)
    with torch.no_grad(), tqdm(total=n, desc=desc, unit="window", disable=not progress, mininterval=1.0) as bar:
        for lo in range(0, n, batch_size):
            idx = list(range(lo, min(n, lo + batch_size)))
            items = [dataset[i] for i in idx]
            x = torch.stack([it["inputs"] for it in items])          # (B, C, T)
            y = torch.stack([it["labels"] for it in items])          # (B, C, H)
            pred = predict(x.reshape(-1, x.shape[-1]))
            pred = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred)
            if tuple(pred.shape) != (x.shape[0] * C, H):
                raise ValueError(f"predict returned shape {tuple(pred.shape)}, expected {(x.shape[0] * C, H)}")
            pred = pred.detach().cpu().reshape(len(idx), C, H).double()
            metrics.update(pred, y)
            for j, i in enumerate(idx):
                if i in keep:
                    kept[i] = pred[j].numpy()
            bar.update(len(idx))
    return metrics.compute(), kept


def make_eval_fn(splits: ForecastSplits, eval_cfg: Mapping):
    """``eval_fn(model, step)`` for the Trainer: validation (or test) MSE/MAE of ``model.forecast`` on a few windows."""
    e = _section(eval_cfg, EVAL_KEYS, "eval")
    if e["split"] not in ("val", "test"):
        raise ValueError(f"eval.split must be 'val' or 'test', got {e['split']!r}")
    ctx, h = int(e["context_length"]), int(e["prediction_length"])
    values = splits.val if e["split"] == "val" else splits.test
    # splits carry ``splits.context_length`` rows of history; drop what this context does not need
    values = values[max(0, splits.context_length - ctx):]
    ds = ForecastWindowDataset(values, ctx, h, max_windows=e["max_windows"])

    def eval_fn(model, step):
        m, _ = evaluate_forecaster(time_moe_predictor(model, h, normalize=bool(e["normalize"])), ds,
                                   batch_size=int(e["batch_size"]), progress=False)
        return {f"{e['split']}_mse": m["mse"], f"{e['split']}_mae": m["mae"]}

    return eval_fn


def train_model(model, train_data, trainer_cfg: Mapping, *, eval_fn=None, loss_fn=None, routing_stats: bool = True):
    """Run :class:`moezoo.trainer.Trainer` and return ``(trainer, result)``."""
    from ...trainer import Trainer, TrainerConfig

    cfg = trainer_cfg if isinstance(trainer_cfg, TrainerConfig) else TrainerConfig.from_dict(trainer_cfg)
    trainer = Trainer(model, cfg, train_data=train_data, loss_fn=loss_fn, eval_fn=eval_fn,
                      routing_stats=routing_stats)
    return trainer, trainer.train()


def train_from_config(config: Mapping[str, Any]) -> dict:
    """The whole recipe: build the model and data from ``config`` and train; returns the Trainer's result dict plus
    ``model_dir`` (the last checkpoint, loadable with ``from_pretrained``), ``parameters`` and ``data``."""
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; valid sections are {list(SECTIONS)}")
    if "trainer" not in config:
        raise ValueError("the config needs a 'trainer' section (output_dir, max_steps, ...)")
    from ...trainer import seed_everything

    seed_everything(int((config["trainer"] or {}).get("seed", 0)))   # fresh weights are a function of the seed
    model = build_model(config.get("model") or {})
    data_cfg = dict(config.get("data") or {})
    dataset, infos = build_train_dataset(data_cfg)
    if int(_section(data_cfg, DATA_KEYS, "data")["window_length"]) > model.config.max_position_embeddings:
        raise ValueError(f"data.window_length exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    eval_fn = None
    if config.get("eval"):
        e = _section(config["eval"], EVAL_KEYS, "eval")
        d = _section(data_cfg, DATA_KEYS, "data")
        first = _paths(d["path"])[0]
        table = load_table(first, columns=d["columns"], nan_policy=d["nan_policy"])
        splits = make_splits(table, context_length=int(e["context_length"]), protocol=d["protocol"])
        eval_fn = make_eval_fn(splits, e)
    trainer, result = train_model(model, dataset, config["trainer"], eval_fn=eval_fn)
    result["model_dir"] = result.get("checkpoint")
    result["parameters"] = model.parameter_summary()
    result["data"] = {"windows": len(dataset), "series": len(dataset.series), "files": infos}
    return result

