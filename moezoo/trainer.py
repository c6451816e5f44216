"""The shared training loop of every moezoo recipe (time series, diffusion, deweather, ...).

>>> from moezoo.trainer import Trainer, TrainerConfig, load_yaml_config
>>> cfg = TrainerConfig(output_dir="runs/x", max_steps=1000, batch_size=32, learning_rate=3e-4, warmup_steps=100,
...                     save_every=200, log_every=10, ema_decay=0.999)
>>> result = Trainer(model, cfg, train_data=dataset).train()          # doctest: +SKIP

What it does, on one CPU core or under ``accelerate launch`` / ``torchrun`` on many GPUs:

- :class:`accelerate.Accelerator` for devices, DDP and mixed precision (``"auto"`` = bf16 on a CUDA GPU that supports
  it, else fp32); gradient accumulation over ``gradient_accumulation_steps`` micro-batches (no gradient all-reduce on
  the intermediate ones).
- AdamW without weight decay on biases, norms and other 1-D parameters; linear warm-up then cosine / linear decay to
  ``min_lr_ratio * learning_rate`` (or constant); gradient clipping; an fp32 EMA copy of the weights
  (:attr:`Trainer.ema_model`) when ``ema_decay`` is set.
- Data: a map-style ``Dataset`` is shuffled every epoch with a ``torch.Generator`` whose state (and the position inside
  the epoch) is checkpointed, or ``train_data`` is a callable ``sample_batch(generator, batch_size) -> batch`` drawing
  from the trainer's CPU generator. With ``W`` processes every process builds the same permutation, cuts it into batches
  of ``batch_size`` (the per-process micro-batch) and takes batches ``rank, rank + W, ...``; a sampler callable gets a
  generator seeded with ``seed + rank``.
- Expert load: forward hooks on every :class:`moezoo.core.MoELayer` / :class:`moezoo.core.FMEMoELayer` (or, for models without one, the ``router_outputs``
  / ``router_logits`` RouterOutputs of the model output) feed a :class:`moezoo.core.RoutingStats` every
  ``routing_every`` steps; the per-layer ``max load x num_experts`` (1 = balanced) goes to the jsonl log, and
  ``routing_heatmap.png`` / ``routing_load_over_steps.png`` are written to ``output_dir`` at checkpoints and at the end.
- Checkpoints ``output_dir/checkpoint-<step>/`` (written into ``.checkpoint-<step>.tmp`` and renamed, so a kill never
  leaves a half checkpoint that looks complete): the model (``save_pretrained`` safetensors, or a safetensors state
  dict), ``ema/`` (same format), ``trainer_state.pt`` (optimizer, scheduler, grad scaler, step, data order, Python /
  NumPy / torch / CUDA RNG states, loss / eval / routing history; loadable with ``torch.load(weights_only=True)``),
  ``rank_state_<r>.pt`` for the RNG and data state of the other processes, and ``trainer_config.json``. Only the last
  ``keep_last`` are kept. ``resume="auto"`` continues from the newest one, and the resumed run sees exactly the
  batches, dropout masks and learning rates of an uninterrupted run (bit-identical on the same hardware; with
  ``num_workers > 0``, randomness *inside* worker processes restarts on resume, so derive augmentation randomness from
  the sample index when you need that bit-exact too).
- A tqdm bar with loss and learning rate, a jsonl log (``output_dir/log.jsonl``), ``eval_fn(model, step)`` every
  ``eval_every`` steps (under ``torch.no_grad`` and with the RNG states restored afterwards, so evaluation never
  changes the training trajectory).

Recipe scripts read a YAML file plus ``key=value`` overrides with :func:`parse_config_args` (or
:func:`add_config_args` + :func:`config_from_args`) and build :class:`TrainerConfig` with
:meth:`TrainerConfig.from_dict`, which rejects unknown keys.

Checkpointing supports single-process and DDP training (FSDP / DeepSpeed sharded states are not handled).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .core.layer import MoELayer
from .core.routing.output import RouterOutput
from .core.stats import RoutingStats

__all__ = [
    "TrainerConfig", "Trainer", "TrainerCallback", "load_yaml_config", "add_config_args", "config_from_args",
    "parse_config_args", "apply_overrides", "seed_everything", "find_checkpoints", "latest_checkpoint", "lr_factor",
    "CHECKPOINT_PREFIX", "TRAINER_STATE_NAME", "TRAINER_CONFIG_NAME",
]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.pt"
TRAINER_CONFIG_NAME = "trainer_config.json"
_TMP_RE = re.compile(r"^\.checkpoint-\d+\.(tmp|old)$")
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_SCI_FLOAT_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+$")
_SCHEDULES = ("cosine", "linear", "constant")
_PRECISIONS = ("auto", "no", "fp32", "bf16", "fp16")


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainerConfig:
    """Hyper-parameters of :class:`Trainer` (all serialised to ``trainer_config.json`` in each checkpoint).

    Args:
        output_dir: where checkpoints, the jsonl log and the routing plots go.
        max_steps: number of optimizer steps.
        batch_size: micro-batch size per process (the effective batch is ``batch_size * gradient_accumulation_steps
            * num_processes``).
        learning_rate, weight_decay: AdamW peak learning rate and decoupled weight decay (not applied to 1-D params).
        adam_beta1, adam_beta2, adam_eps: AdamW moments.
        warmup_steps: linear warm-up steps (step ``s < warmup_steps`` uses ``(s + 1) / warmup_steps`` of the peak).
        lr_schedule: ``"cosine"``, ``"linear"`` (decay to ``min_lr_ratio`` at ``max_steps``) or ``"constant"``.
        min_lr_ratio: final learning rate as a fraction of the peak.
        grad_clip: max global gradient norm (``None`` or 0: no clipping; the norm is still logged).
        gradient_accumulation_steps: micro-batches per optimizer step.
        mixed_precision: ``"auto"`` (bf16 on a CUDA GPU that supports it, else fp32), ``"no"``/``"fp32"``, ``"bf16"``,
            ``"fp16"``.
        save_every: checkpoint every this many steps (``None``: only at the end when ``save_final``).
        keep_last: checkpoints kept (``None``: all).
        log_every: jsonl log / progress bar update every this many steps.
        eval_every: call ``eval_fn`` every this many steps and at the end (``None``: only at the end).
        routing_every: record expert load every this many steps (default ``log_every``).
        seed: seeds Python, NumPy, torch and the data order.
        ema_decay: keep an fp32 EMA of the weights, ``ema = decay * ema + (1 - decay) * weights`` after every step,
            starting from the initial weights.
        resume: ``"auto"`` (newest complete checkpoint in ``output_dir``, else a fresh start), a checkpoint folder,
            or ``None`` / ``"never"`` (fresh; refuses an ``output_dir`` that already holds checkpoints unless
            ``overwrite_output_dir``).
        num_workers: DataLoader worker processes for a map-style dataset.
        drop_last: drop the last incomplete batch of every epoch (keeps every step's batch the same size).
        log_to: jsonl log file, relative to ``output_dir`` (``None``: no file).
        progress_bar: show a tqdm bar on the main process.
        save_final: write a checkpoint at the end of training.
        overwrite_output_dir: with ``resume`` ``None``/``"never"``, delete existing checkpoints instead of refusing.
    """

    output_dir: str
    max_steps: int
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"
    save_every: int | None = None
    keep_last: int | None = 2
    log_every: int = 10
    eval_every: int | None = None
    routing_every: int | None = None
    seed: int = 0
    ema_decay: float | None = None
    resume: str | None = "auto"
    num_workers: int = 0
    drop_last: bool = True
    log_to: str | None = "log.jsonl"
    progress_bar: bool = True
    save_final: bool = True
    overwrite_output_dir: bool = False

    def __post_init__(self):
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        _check_int("max_steps", self.max_steps, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _check_int("log_every", self.log_every, 1)
        _check_int("num_workers", self.num_workers, 0)
        _check_int("seed", self.seed, 0)
        for name in ("save_every", "eval_every", "routing_every", "keep_last"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        for name in ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "min_lr_ratio"):
            setattr(self, name, _check_float(name, getattr(self, name), 0.0))
        for name in ("adam_beta1", "adam_beta2", "min_lr_ratio"):
            if getattr(self, name) > 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.grad_clip is not None:
            self.grad_clip = _check_float("grad_clip", self.grad_clip, 0.0) or None
        if self.ema_decay is not None:
            self.ema_decay = _check_float("ema_decay", self.ema_decay, 0.0)
            if self.ema_decay >= 1.0:
                raise ValueError(f"ema_decay must be in [0, 1) or None, got {self.ema_decay!r}")
        if self.lr_schedule not in _SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {_SCHEDULES}, got {self.lr_schedule!r}")
        if self.mixed_precision not in _PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {_PRECISIONS}, got {self.mixed_precision!r}")
        if isinstance(self.resume, os.PathLike):
            self.resume = os.fspath(self.resume)
        if self.resume is not None and (not isinstance(self.resume, str) or not self.resume):
            raise ValueError(f"resume must be 'auto', 'never', None or a checkpoint folder, got {self.resume!r}")
        if self.log_to is not None and (not isinstance(self.log_to, str) or not self.log_to):
            raise ValueError(f"log_to must be a file name or None, got {self.log_to!r}")
        for name in ("drop_last", "progress_bar", "save_final", "overwrite_output_dir"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None = None, **overrides) -> "TrainerConfig":
        """Build from a dict (e.g. the ``trainer:`` section of a YAML config); unknown keys raise ``ValueError``."""
        if d is not None and not isinstance(d, Mapping):
            raise ValueError(f"TrainerConfig.from_dict expects a mapping, got {type(d).__name__}")
        merged = {**(dict(d) if d else {}), **overrides}
        names = [f.name for f in fields(cls)]
        unknown = sorted(k for k in merged if k not in names)
        if unknown:
            raise ValueError(f"unknown TrainerConfig key(s): {unknown}; valid keys are {names}")
        missing = [n for n in ("output_dir", "max_steps") if n not in merged]
        if missing:
            raise ValueError(f"TrainerConfig needs {missing}")
        return cls(**merged)

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved_mixed_precision(self) -> str:
        """``"no"``, ``"bf16"`` or ``"fp16"`` (``"auto"`` resolved for this machine)."""
        if self.mixed_precision == "auto":
            return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        return "no" if self.mixed_precision == "fp32" else self.mixed_precision


def _check_int(name, v, lo):
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def _check_float(name, v, lo):
    if isinstance(v, str) and _SCI_FLOAT_RE.match(v.strip()):
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
        raise ValueError(f"{name} must be a finite number >= {lo}, got {v!r}")
    return float(v)


def lr_factor(step: int, *, max_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate used for optimizer step ``step`` (0-based)."""
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


# ----------------------------------------------------------------------------------------------------------------------
# YAML configs and command-line overrides
# ----------------------------------------------------------------------------------------------------------------------


def _fix_scalars(x):
    """YAML 1.1 reads ``1e-3`` as a string; turn such scientific-notation strings into floats (recursively)."""
    if isinstance(x, dict):
        return {k: _fix_scalars(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_fix_scalars(v) for v in x]
    if isinstance(x, str) and _SCI_FLOAT_RE.match(x.strip()):
        return float(x)
    return x


def apply_overrides(config: dict, overrides) -> dict:
    """Apply ``"a.b.c=value"`` overrides in place (``value`` parsed with ``yaml.safe_load``: ints, floats, bools,
    ``null``, lists); intermediate dicts are created as needed. Returns ``config``."""
    import yaml

    for ov in overrides or ():
        if not isinstance(ov, str) or "=" not in ov:
            raise ValueError(f"override {ov!r} must look like key.subkey=value")
        key, raw = ov.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {ov!r} has an empty key component")
        try:
            value = _fix_scalars(yaml.safe_load(raw)) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(f"override {ov!r}: cannot parse value {raw!r} as YAML ({e})") from None
        node = config
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ValueError(f"override {ov!r}: {'.'.join(parts[:i + 1])} is a {type(nxt).__name__}, not a mapping")
            node = nxt
        node[parts[-1]] = value
    return config


def load_yaml_config(path: str | os.PathLike | None, overrides=None) -> dict:
    """Read a YAML config (nested dicts) and apply ``key.sub=value`` overrides; ``path=None`` starts from ``{}``."""
    import yaml

    config: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        with open(p, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {str(p)!r} must hold a mapping at the top level, got {type(loaded).__name__}")
        config = _fix_scalars(loaded or {})
    return apply_overrides(config, overrides)


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config FILE`` and trailing ``key.sub=value`` overrides to a recipe's argument parser."""
    parser.add_argument("--config", type=str, default=None, help="YAML config file")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key.sub=value",
                        help="config overrides, e.g. trainer.max_steps=100 trainer.learning_rate=1e-3")
    return parser


def config_from_args(args: argparse.Namespace) -> dict:
    """The config dict described by the arguments of :func:`add_config_args`."""
    return load_yaml_config(args.config, args.overrides)


def parse_config_args(argv=None, description: str | None = None) -> dict:
    """``--config FILE key=value ...`` -> config dict (for recipe scripts without arguments of their own)."""
    parser = add_config_args(argparse.ArgumentParser(description=description))
    return config_from_args(parser.parse_args(argv))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    from accelerate.utils import set_seed

    set_seed(seed)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint discovery and model (de)serialisation
# ----------------------------------------------------------------------------------------------------------------------


def find_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, folder)`` in ``output_dir``, oldest first."""
    out = []
    d = Path(output_dir)
    if d.is_dir():
        for p in d.iterdir():
            m = _CKPT_RE.match(p.name)
            if m and p.is_dir() and (p / TRAINER_STATE_NAME).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder in ``output_dir`` (``None`` if there is none)."""
    ckpts = find_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def _is_pretrained(model) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _save_model(model: nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if _is_pretrained(model):
        model.save_pretrained(folder)
    else:
        from safetensors.torch import save_model

        save_model(model, str(folder / "model.safetensors"))


def _load_model(model: nn.Module, folder: Path) -> None:
    """Load weights written by :func:`_save_model` into ``model`` in place (exact values)."""
    from safetensors.torch import load_file, load_model

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {str(folder)!r}")
    if not _is_pretrained(model):
        load_model(model, str(folder / "model.safetensors"), strict=True)
        return
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {str(folder)!r} has weights the model does not: {sorted(unexpected)[:10]}")
    if missing:  # tied weights are saved once; accept a missing key only if it shares storage with a loaded one
        own = model.state_dict()
        loaded_ptrs = {own[k].data_ptr() for k in sd if k in own}
        untied = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
        if untied:
            raise ValueError(f"checkpoint {str(folder)!r} lacks weights: {sorted(untied)[:10]}")


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                       float(np_state[4])),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"checkpoint has CUDA RNG states of {len(cuda)} devices, this machine has "
                          f"{torch.cuda.device_count()}: CUDA RNG not restored", stacklevel=3)


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _to_jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Mapping):
        return {str(k): _to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_to_jsonable(x) for x in v]
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return str(v)


# ----------------------------------------------------------------------------------------------------------------------
# Data sources
# ----------------------------------------------------------------------------------------------------------------------


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class _DatasetSource:
    """Epoch-wise shuffled batches of a map-style dataset; state = epoch, position and the generator at epoch start."""

    def __init__(self, dataset, *, batch_size, seed, rank, world_size, collate_fn, num_workers, drop_last, pin_memory):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.collate_fn, self.num_workers, self.drop_last, self.pin_memory = collate_fn, num_workers, drop_last, pin_memory
        n = len(dataset)
        n_batches = n // batch_size if drop_last else -(-n // batch_size)
        self.batches_per_epoch = n_batches // world_size  # per process; the remainder is dropped to keep ranks in step
        if self.batches_per_epoch < 1:
            raise ValueError(f"train_data has {n} samples: too few for batch_size={batch_size} x {world_size} "
                             f"process(es){' with drop_last' if drop_last else ''}")
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.pos = 0, 0
        self._epoch_state = None
        self._batches = None
        self._iter = None

    def _start_epoch(self):
        self._epoch_state = self.generator.get_state()
        perm = torch.randperm(len(self.dataset), generator=self.generator).tolist()
        batches = [perm[i:i + self.batch_size] for i in range(0, len(perm), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        self._batches = batches[self.rank::self.world_size][: self.batches_per_epoch]
        self._iter = None

    def _make_iter(self):
        from torch.utils.data import DataLoader

        loader_gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch * 7919 + self.rank) % 2**63)
        loader = DataLoader(self.dataset, batch_sampler=self._batches[self.pos:], collate_fn=self.collate_fn,
                            num_workers=self.num_workers, pin_memory=self.pin_memory, generator=loader_gen,
                            worker_init_fn=_seed_worker if self.num_workers else None)
        return iter(loader)

    def next(self):
        if self._batches is None:
            self._start_epoch()
        if self.pos >= len(self._batches):
            self.epoch, self.pos = self.epoch + 1, 0
            self._start_epoch()
        if self._iter is None:
            self._iter = self._make_iter()
        batch = next(self._iter)
        self.pos += 1
        return batch

    def state_dict(self) -> dict:
        if self._batches is None:
            self._start_epoch()
        return {"kind": "dataset", "epoch": self.epoch, "pos": self.pos, "epoch_generator_state": self._epoch_state,
                "batches_per_epoch": self.batches_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "dataset":
            raise ValueError("checkpoint was written for a sample_batch callable, but train_data is a Dataset")
        if state["batches_per_epoch"] != self.batches_per_epoch:
            warnings.warn(f"the dataset now gives {self.batches_per_epoch} batches per epoch, the checkpoint "
                          f"{state['batches_per_epoch']}: the data order will differ from the original run", stacklevel=3)
        self.generator.set_state(state["epoch_generator_state"])
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._start_epoch()


class _CallableSource:
    """``sample_batch(generator, batch_size)`` with a checkpointed CPU generator (seeded ``seed + rank``)."""

    def __init__(self, fn, *, batch_size, seed, rank):
        self.fn, self.batch_size = fn, batch_size
        self.generator = torch.Generator().manual_seed((seed + rank) % 2**63)
        self.calls = 0
        self.epoch = 0

    def next(self):
        self.calls += 1
        return self.fn(self.generator, self.batch_size)

    def state_dict(self) -> dict:
        return {"kind": "callable", "generator_state": self.generator.get_state(), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "callable":
            raise ValueError("checkpoint was written for a Dataset, but train_data is a sample_batch callable")
        self.generator.set_state(state["generator_state"])
        self.calls = int(state["calls"])


# ----------------------------------------------------------------------------------------------------------------------
# Routing capture
# ----------------------------------------------------------------------------------------------------------------------


def _short_names(names: list[str]) -> list[str]:
    """Strip the common dotted prefix and suffix: ``model.layers.3.mlp`` -> ``3``."""
    if len(names) < 2:
        return [n or "moe" for n in names]
    split = [n.split(".") for n in names]
    pre = 0
    while all(len(s) > pre + 1 for s in split) and len({s[pre] for s in split}) == 1:
        pre += 1
    suf = 0
    while all(len(s) > pre + suf + 1 for s in split) and len({s[-1 - suf] for s in split}) == 1:
        suf += 1
    short = [".".join(s[pre:len(s) - suf]) for s in split]
    return short if len(set(short)) == len(short) else names


class _RoutingCapture:
    """Collects the RouterOutputs of one optimizer step (all micro-batches), detached, per MoE layer."""

    def __init__(self, model: nn.Module):
        from .core.fme import FMEMoELayer

        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (MoELayer, FMEMoELayer))]
        self.names = _short_names([n for n, _ in layers])
        self.active = False
        self.mask = None
        self.records: dict[str, list] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, (_, m) in zip(self.names, layers)]

    @property
    def has_hooks(self) -> bool:
        return bool(self.handles)

    def _hook(self, name):
        def fn(module, args, output):
            if self.active and isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], RouterOutput):
                self.add(name, output[1])
        return fn

    def set_batch(self, batch) -> None:
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        self.mask = mask.detach().reshape(-1).float() if isinstance(mask, torch.Tensor) else None

    def add(self, name, ro: RouterOutput) -> None:
        R = ro.num_experts
        idx = ro.indices.detach().reshape(-1, ro.indices.shape[-1])
        T = idx.shape[0]
        mask = self.mask if self.mask is not None and self.mask.numel() == T else None
        drop = ro.extras.get("drop_rate") if ro.extras else None
        self.records.setdefault(name, []).append(
            (idx, ro.probs.detach().reshape(T, -1).float(), ro.experts_per_token.detach().reshape(-1), R,
             None if drop is None else float(drop), mask))

    def finish(self) -> dict:
        """``{layer: RouterOutput (+ mask)}`` concatenated over the step's forwards; clears the buffer."""
        out = {}
        for name, recs in self.records.items():
            R = recs[0][3]
            recs = [r for r in recs if r[3] == R]
            idx = torch.cat([r[0] for r in recs])
            probs = torch.cat([r[1] for r in recs])
            ept = torch.cat([r[2] for r in recs])
            masks = [r[5] if r[5] is not None else torch.ones(r[0].shape[0], device=r[0].device) for r in recs]
            mask = torch.cat(masks) if any(r[5] is not None for r in recs) else None
            drops = [r[4] for r in recs if r[4] is not None]
            extras = {"drop_rate": sum(drops) / len(drops)} if drops else {}
            out[name] = (RouterOutput(probs, probs, idx, torch.ones(idx.shape, device=idx.device), ept, R, None,
                                      extras), mask)
        self.records = {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ----------------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------------


def _make_accelerator(mixed_precision: str):
    """An Accelerator; in a single process a different mixed precision than an earlier Trainer's is allowed."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    # under torchrun on a machine without CUDA, accelerate only goes multi-process (gloo) when told cpu=True
    kw = {"cpu": True} if world > 1 and not torch.cuda.is_available() else {}
    try:
        acc = Accelerator(mixed_precision=mixed_precision, **kw)
    except ValueError as e:
        if "already been initialized" not in str(e) or PartialState().num_processes != 1:
            raise
        # accelerate keeps one global state per process; with a single process nothing else depends on it
        AcceleratorState._reset_state()
        acc = Accelerator(mixed_precision=mixed_precision, **kw)
    if acc.num_processes != world:
        raise RuntimeError(f"WORLD_SIZE={world} but accelerate set up {acc.num_processes} process(es); launch with "
                           "`accelerate launch` or `torchrun` so that the processes form one group")
    return acc


class TrainerCallback:
    """Base class of callbacks; override what you need. A plain callable is treated as ``on_step_end``."""

    def on_step_end(self, trainer: "Trainer", step: int, logs: dict) -> None: ...

    def on_log(self, trainer: "Trainer", step: int, logs: dict) -> None: ...

    def on_evaluate(self, trainer: "Trainer", step: int, metrics: dict) -> None: ...

    def on_save(self, trainer: "Trainer", step: int, path: str) -> None: ...

    def on_train_end(self, trainer: "Trainer", result: dict) -> None: ...


class Trainer:
    """A resumable training loop over one model (see the module docstring).

    Args:
        model: an ``nn.Module`` (a moezoo / transformers ``PreTrainedModel`` is saved with ``save_pretrained``).
        config: a :class:`TrainerConfig` (or a dict for :meth:`TrainerConfig.from_dict`).
        train_data: a map-style ``torch.utils.data.Dataset`` or a callable ``sample_batch(generator, batch_size)``.
        loss_fn: ``loss_fn(model, batch) -> loss`` or ``(loss, {"name": value, ...})``; the default calls
            ``model(**batch)`` (``model(*batch)`` for tuples) and uses ``.loss``, logging ``aux_loss`` when present.
        eval_fn: ``eval_fn(model, step) -> {"metric": value}`` on the unwrapped model in eval mode, under no_grad,
            every ``eval_every`` steps and at the end (use :attr:`ema_model` inside it for EMA evaluation).
        collate_fn: DataLoader collate function (default: torch's ``default_collate``).
        routing_stats: record expert load of the MoE layers.
        optimizer: use this optimizer instead of AdamW (the learning-rate schedule still applies to it).
        callbacks: :class:`TrainerCallback` objects or callables ``fn(trainer, step, logs)`` called after each step.
    """

    def __init__(self, model: nn.Module, config: TrainerConfig | Mapping, train_data, loss_fn: Callable | None = None,
                 eval_fn: Callable | None = None, collate_fn: Callable | None = None, routing_stats: bool = True,
                 optimizer: torch.optim.Optimizer | None = None, callbacks=None):
        if isinstance(config, Mapping):
            config = TrainerConfig.from_dict(config)
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig or a dict, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, fn in (("loss_fn", loss_fn), ("eval_fn", eval_fn), ("collate_fn", collate_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
        self.config = config
        self.accelerator = acc = _make_accelerator(config.resolved_mixed_precision())
        self.is_main = acc.is_main_process
        self.output_dir = Path(config.output_dir)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for p in self.output_dir.iterdir():  # leftovers of a checkpoint write that was killed
                if _TMP_RE.match(p.name) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
        acc.wait_for_everyone()
        resume_path = self._resume_path()

        # data
        self._callable_data = callable(train_data) and not hasattr(train_data, "__getitem__")
        if self._callable_data:
            self._data = _CallableSource(train_data, batch_size=config.batch_size, seed=config.seed,
                                         rank=acc.process_index)
        else:
            from torch.utils.data import IterableDataset

            if isinstance(train_data, IterableDataset) or not (hasattr(train_data, "__getitem__")
                                                               and hasattr(train_data, "__len__")):
                raise TypeError("train_data must be a map-style Dataset (with __getitem__ and __len__) or a callable "
                                f"sample_batch(generator, batch_size); got {type(train_data).__name__}")
            self._data = _DatasetSource(train_data, batch_size=config.batch_size, seed=config.seed,
                                        rank=acc.process_index, world_size=acc.num_processes, collate_fn=collate_fn,
                                        num_workers=config.num_workers, drop_last=config.drop_last,
                                        pin_memory=acc.device.type == "cuda")

        # model, EMA, optimizer, schedule
        model.to(acc.device)
        self.unwrapped_model = model
        self.ema_model = None
        if config.ema_decay is not None:
            self.ema_model = copy.deepcopy(model).float().eval().requires_grad_(False)
        if optimizer is None:
            decay, no_decay = [], []
            for name, p in model.named_parameters():
                if p.requires_grad:
                    (no_decay if p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() else decay).append(p)
            if not decay and not no_decay:
                raise ValueError("model has no trainable parameters")
            groups = [{"params": decay, "weight_decay": config.weight_decay},
                      {"params": no_decay, "weight_decay": 0.0}]
            optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate,
                                          betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
        elif not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        cfg = config
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
            s, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps, schedule=cfg.lr_schedule,
            min_lr_ratio=cfg.min_lr_ratio))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self._params = [p for p in model.parameters() if p.requires_grad]

        self.loss_fn = loss_fn if loss_fn is not None else self._default_loss
        self.eval_fn = eval_fn
        self.callbacks = list(callbacks or [])
        self._capture = _RoutingCapture(model) if routing_stats else None
        self.routing = RoutingStats(keep_history=False) if routing_stats else None

        # progress state
        self.step = 0
        self.loss_history: list[float] = []
        self.eval_history: list[dict] = []
        self.routing_history: list[dict] = []
        self.last_checkpoint: str | None = None
        self.resumed_from: str | None = None
        self._pending: list[torch.Tensor] = []
        self._metric_sums: dict[str, float | torch.Tensor] = {}
        self._metric_counts: dict[str, int] = {}
        self._last_log_step = 0
        self._last_grad_norm: float | None = None
        self._step_lr = self.current_lr()
        self._last_routing: dict | None = None
        self.log_file = (self.output_dir / config.log_to) if config.log_to else None

        if resume_path is not None:
            self._load_checkpoint(resume_path)
        else:
            if self.is_main and self.log_file is not None and self.log_file.is_file():
                self._truncate_log(0)  # lines of an earlier attempt that died before its first checkpoint
            seed_everything(config.seed)

    # -------------------------------------------------------------------------------------------- resume / checkpoints

    def _resume_path(self) -> Path | None:
        cfg = self.config
        existing = find_checkpoints(self.output_dir)
        if cfg.resume in (None, "never"):
            if existing:
                if not cfg.overwrite_output_dir:
                    raise ValueError(f"output_dir {str(self.output_dir)!r} already holds checkpoints "
                                     f"{[p.name for _, p in existing]}; pass resume='auto' to continue that run or "
                                     "overwrite_output_dir=True to delete them")
                self.accelerator.wait_for_everyone()
                if self.is_main:
                    for _, p in existing:
                        shutil.rmtree(p)
                    if self.log_file_path().is_file():
                        self.log_file_path().unlink()
                self.accelerator.wait_for_everyone()
            return None
        if cfg.resume == "auto":
            return existing[-1][1] if existing else None
        p = Path(cfg.resume)
        if not (p / TRAINER_STATE_NAME).is_file():
            raise ValueError(f"resume={cfg.resume!r} is not a checkpoint folder (no {TRAINER_STATE_NAME} in it); "
                             "pass 'auto', 'never', None or a checkpoint-<step> folder")
        return p

    def log_file_path(self) -> Path:
        return self.output_dir / (self.config.log_to or "log.jsonl")

    def _state_dict(self) -> dict:
        acc = self.accelerator
        self._flush_losses()
        return {
            "format_version": 1,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": acc.scaler.state_dict() if getattr(acc, "scaler", None) is not None else None,
            "data": self._data.state_dict(),
            "rng": _rng_state(),
            "loss_history": torch.tensor(self.loss_history, dtype=torch.float64),
            "eval_history": [_to_jsonable(e) for e in self.eval_history],
            "routing_history": [_to_jsonable(e) for e in self.routing_history],
            "routing_stats": self.routing.state_dict() if self.routing is not None else None,
            "log_accumulator": {"sums": {k: float(v) for k, v in self._metric_sums.items()},
                                "counts": dict(self._metric_counts), "last_log_step": self._last_log_step},
            "world_size": acc.num_processes,
        }

    def save_checkpoint(self) -> str:
        """Write ``output_dir/checkpoint-<step>/`` atomically (every process must call it); returns its path."""
        acc = self.accelerator
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        tmp = self.output_dir / f".{CHECKPOINT_PREFIX}{self.step}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        state = self._state_dict()
        if not self.is_main:
            torch.save({"rng": state["rng"], "data": state["data"]}, tmp / f"rank_state_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if self.is_main:
            _save_model(self.unwrapped_model, tmp)
            if self.ema_model is not None:
                _save_model(self.ema_model, tmp / "ema")
            torch.save(state, tmp / TRAINER_STATE_NAME)
            (tmp / TRAINER_CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            if final.exists():
                old = self.output_dir / f".{CHECKPOINT_PREFIX}{self.step}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            if self.config.keep_last is not None:
                for step, p in find_checkpoints(self.output_dir)[:-self.config.keep_last]:
                    if p != final:
                        shutil.rmtree(p, ignore_errors=True)
            self.save_routing_plots()
        acc.wait_for_everyone()
        self.last_checkpoint = str(final)
        self._callback("on_save", self.step, str(final))
        return str(final)

    def _load_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        state = torch.load(path / TRAINER_STATE_NAME, map_location="cpu", weights_only=True)
        if state.get("world_size", 1) != acc.num_processes:
            warnings.warn(f"resuming a run of {state.get('world_size')} process(es) with {acc.num_processes}: "
                          "the data order will differ from the original run", stacklevel=3)
        _load_model(self.unwrapped_model, path)
        if self.ema_model is not None:
            if (path / "ema").is_dir():
                _load_model(self.ema_model, path / "ema")
            else:
                warnings.warn(f"checkpoint {str(path)!r} has no EMA weights: EMA restarts from the loaded weights",
                              stacklevel=3)
                self.ema_model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                                for k, v in self.unwrapped_model.state_dict().items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # the saved lr belongs to the saved schedule; a resumed run with another max_steps / warm-up / schedule uses its
        # own from the first resumed step (identical when nothing changed)
        for group, base_lr, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base_lr * fn(self.scheduler.last_epoch)
        if state.get("scaler") is not None and getattr(acc, "scaler", None) is not None:
            acc.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.loss_history = torch.as_tensor(state["loss_history"], dtype=torch.float64).tolist()
        self.eval_history = list(state["eval_history"])
        self.routing_history = list(state["routing_history"])
        if self.routing is not None and state.get("routing_stats") is not None:
            self.routing.load_state_dict(state["routing_stats"])
        la = state["log_accumulator"]
        self._metric_sums, self._metric_counts = dict(la["sums"]), dict(la["counts"])
        self._last_log_step = int(la["last_log_step"])
        rank_state = {"rng": state["rng"], "data": state["data"]}
        if not self.is_main:
            rank_file = path / f"rank_state_{acc.process_index}.pt"
            if rank_file.is_file():
                rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
            else:
                warnings.warn(f"{str(rank_file)!r} is missing: process {acc.process_index} resumes with rank 0's "
                              "RNG state", stacklevel=3)
        self._data.load_state_dict(rank_state["data"])
        if self.is_main and self.log_file is not None and self.log_file.is_file():
            self._truncate_log(self.step)
        _set_rng_state(rank_state["rng"])
        self.last_checkpoint = str(path)
        self.resumed_from = str(path)

    def _truncate_log(self, step: int) -> None:
        """Drop log lines a killed run wrote after the checkpoint it is resumed from."""
        keep = []
        for line in self.log_file.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) > step:
                    continue
            except (json.JSONDecodeError, AttributeError):
                continue  # a line cut by the kill
            keep.append(line)
        tmp = self.log_file.with_suffix(self.log_file.suffix + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.log_file)

    # ---------------------------------------------------------------------------------------------------- training

    def _default_loss(self, model, batch):
        if isinstance(batch, Mapping):
            out = model(**batch)
        elif isinstance(batch, (tuple, list)):
            out = model(*batch)
        else:
            out = model(batch)
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise ValueError("the model output has no loss: put labels in the batch or give Trainer a "
                             "loss_fn(model, batch) -> (loss, logs)")
        logs = {}
        aux = out.get("aux_loss") if isinstance(out, Mapping) else getattr(out, "aux_loss", None)
        if isinstance(aux, torch.Tensor):
            logs["aux_loss"] = aux.detach()
        if self._capture is not None and self._capture.active and not self._capture.has_hooks:
            ros = out.get("router_outputs") if isinstance(out, Mapping) else getattr(out, "router_outputs", None)
            if not ros:
                ros = out.get("router_logits") if isinstance(out, Mapping) else getattr(out, "router_logits", None)
            for i, ro in enumerate(ros or ()):
                if isinstance(ro, RouterOutput):
                    self._capture.add(str(i), ro)
        return loss, logs

    def _compute_loss(self, batch):
        res = self.loss_fn(self.model, batch)
        if isinstance(res, torch.Tensor):
            loss, logs = res, {}
        elif isinstance(res, (tuple, list)) and len(res) == 2 and isinstance(res[0], torch.Tensor):
            loss, logs = res[0], dict(res[1] or {})
        else:
            raise TypeError("loss_fn must return a scalar loss tensor or (loss, {name: value}), "
                            f"got {type(res).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss_fn returned a loss of shape {tuple(loss.shape)}; expected a scalar")
        return loss.reshape(()), logs

    def _update_ema(self) -> None:
        d = self.config.ema_decay
        ema_p = [p for p in self.ema_model.parameters()]
        src_p = [p.detach().float() for p in self.unwrapped_model.parameters()]
        with torch.no_grad():
            torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
            for eb, b in zip(self.ema_model.buffers(), self.unwrapped_model.buffers()):
                eb.copy_(b)

    def _flush_losses(self) -> None:
        if self._pending:
            t = torch.stack(self._pending)
            if self.accelerator.num_processes > 1:
                t = self.accelerator.reduce(t, reduction="mean")
            self.loss_history.extend(t.tolist())
            self._pending = []

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _callback(self, event: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is None and event == "on_step_end" and callable(cb):
                fn = cb  # a plain function is an on_step_end callback
            if fn is not None:
                fn(self, *args)

    def _record_routing(self, step: int) -> None:
        ros = self._capture.finish()
        if not ros:
            return
        entry = {}
        for name, (ro, mask) in ros.items():
            self.routing.update(name, ro, mask)
            from .core.stats import expert_load

            load = expert_load(ro, mask)
            entry[name] = float(load.max() * ro.num_experts)
        self.routing_history.append({"step": step, "max_load": entry})
        self._last_routing = entry

    def _log(self, step: int, pbar) -> dict:
        self._flush_losses()
        losses = self.loss_history[self._last_log_step:step]
        if any(not math.isfinite(x) for x in losses):
            bad = self._last_log_step + next(i for i, x in enumerate(losses) if not math.isfinite(x)) + 1
            raise FloatingPointError(f"non-finite training loss at step {bad} ({losses}); lower learning_rate, "
                                     "enable grad_clip or check the data")
        entry = {"step": step, "epoch": self._data.epoch, "loss": sum(losses) / max(1, len(losses)),
                 "lr": self._step_lr}
        if self._last_grad_norm is not None:
            entry["grad_norm"] = self._last_grad_norm
        for k, v in self._metric_sums.items():
            entry[k] = float(v) / max(1, self._metric_counts[k])
        if self._last_routing is not None:
            entry["routing/max_load"] = dict(self._last_routing)
            entry["routing/max_load_mean"] = sum(self._last_routing.values()) / len(self._last_routing)
            self._last_routing = None
        entry["time"] = round(time.time() - self._t0, 3)
        self._metric_sums, self._metric_counts = {}, {}
        self._last_log_step = step
        if self.is_main:
            self._write_log(entry)
            if pbar is not None:
                pbar.set_postfix(loss=f"{entry['loss']:.4g}", lr=f"{entry['lr']:.2e}")
        self._callback("on_log", step, entry)
        return entry

    def _write_log(self, entry: dict) -> None:
        if self.log_file is not None:
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(_to_jsonable(entry)) + "\n")

    def evaluate(self, step: int | None = None) -> dict:
        """Run ``eval_fn(model, step)`` now (eval mode, no_grad, RNG states restored afterwards)."""
        if self.eval_fn is None:
            return {}
        step = self.step if step is None else step
        model = self.unwrapped_model
        was_training = model.training
        rng = _rng_state()
        model.eval()
        try:
            with torch.no_grad():
                metrics = self.eval_fn(model, step)
        finally:
            model.train(was_training)
            _set_rng_state(rng)
        if metrics is None:
            metrics = {}
        if not isinstance(metrics, Mapping):
            raise TypeError(f"eval_fn must return a dict of metrics, got {type(metrics).__name__}")
        metrics = {str(k): _to_jsonable(v) for k, v in metrics.items()}
        self.eval_history.append({"step": step, **metrics})
        if self.is_main:
            self._write_log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        self._callback("on_evaluate", step, metrics)
        return metrics

    def train(self) -> dict:
        """Train up to ``max_steps`` (from the resumed step) and return a summary dict."""
        from accelerate.utils import send_to_device
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        G = cfg.gradient_accumulation_steps
        routing_every = cfg.routing_every or cfg.log_every
        self._t0 = time.time()
        start = self.step
        pbar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                    disable=not (self.is_main and cfg.progress_bar))
        self.model.train()
        try:
            while self.step < cfg.max_steps:
                step = self.step + 1
                capture = self._capture is not None and (step % routing_every == 0 or step == cfg.max_steps)
                step_loss = None
                for micro in range(G):
                    batch = send_to_device(self._data.next(), acc.device)
                    sync = micro == G - 1 or acc.num_processes == 1
                    with (contextlib.nullcontext() if sync else acc.no_sync(self.model)):
                        if capture:
                            self._capture.set_batch(batch)
                            self._capture.active = True
                        try:
                            loss, logs = self._compute_loss(batch)
                        finally:
                            if self._capture is not None:
                                self._capture.active = False
                        acc.backward(loss / G)
                    ld = loss.detach().float()
                    step_loss = ld if step_loss is None else step_loss + ld
                    for k, v in logs.items():
                        v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                        self._metric_sums[k] = self._metric_sums.get(k, 0.0) + v
                        self._metric_counts[k] = self._metric_counts.get(k, 0) + 1
                gn = acc.clip_grad_norm_(self._params, cfg.grad_clip if cfg.grad_clip else float("inf"))
                self._step_lr = self.current_lr()
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema_model is not None:
                    self._update_ema()
                self.step = step
                self._pending.append(step_loss / G)
                if capture:
                    self._record_routing(step)
                logs = None
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    self._last_grad_norm = float(gn) if gn is not None else None
                    logs = self._log(step, pbar)
                pbar.update(1)
                self._callback("on_step_end", step, logs or {"step": step})
                if (cfg.eval_every and step % cfg.eval_every == 0) or (step == cfg.max_steps
                                                                        and self.eval_fn is not None):
                    if not self.eval_history or self.eval_history[-1].get("step") != step:
                        self.evaluate(step)
                if (cfg.save_every and step % cfg.save_every == 0) or (step == cfg.max_steps and cfg.save_final):
                    self.save_checkpoint()
        finally:
            pbar.close()
        self._flush_losses()
        plots = self.save_routing_plots() if self.is_main else []
        result = {
            "step": self.step,
            "start_step": start,
            "loss": self.loss_history[-1] if self.loss_history else None,
            "losses": list(self.loss_history),
            "eval_history": list(self.eval_history),
            "checkpoint": self.last_checkpoint,
            "output_dir": str(self.output_dir),
            "log_file": str(self.log_file) if self.log_file is not None else None,
            "routing_plots": plots,
            "routing_summary": self.routing.summary() if self.routing is not None and len(self.routing) else None,
            "train_time_s": time.time() - self._t0,
        }
        self._callback("on_train_end", result)
        return result

    # ------------------------------------------------------------------------------------------------------- plots

    def save_routing_plots(self) -> list[str]:
        """Write ``routing_heatmap.png`` and ``routing_load_over_steps.png`` to ``output_dir`` (if any MoE data)."""
        if self.routing is None or not len(self.routing):
            return []
        heat = self.routing.save_heatmap(self.output_dir / "routing_heatmap.png",
                                         title=f"load, steps 1-{self.step}")
        steps_png = self.output_dir / "routing_load_over_steps.png"
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        layers = list(self.routing.layers)
        for name in layers:
            pts = [(e["step"], e["max_load"][name]) for e in self.routing_history if name in e["max_load"]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None,
                        label=f"layer {name}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel("max expert load x num_experts")
        ax.set_title("load imbalance per MoE layer (1 = balanced)")
        if len(layers) <= 24:
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(steps_png, dpi=100)
        return [heat, str(steps_png)]
