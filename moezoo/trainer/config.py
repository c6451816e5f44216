"""Trainer hyper-parameters, the learning-rate schedule (transformers' ``get_scheduler``) and YAML configs with
``key.sub=value`` command-line overrides."""
from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

__all__ = ["TrainerConfig", "lr_factor", "make_scheduler", "load_yaml_config", "add_config_args", "config_from_args",
           "parse_config_args", "apply_overrides", "seed_everything"]

_SCI_FLOAT_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+$")
_SCHEDULES = ("cosine", "linear", "constant")
_PRECISIONS = ("auto", "no", "fp32", "bf16", "fp16")




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
        warmup_steps: linear warm-up steps (transformers' convention: step ``s < warmup_steps`` uses
            ``s / warmup_steps`` of the peak, raised to ``min_lr_ratio``; see :func:`make_scheduler`).
        lr_schedule: ``"cosine"``, ``"linear"`` (decay to ``min_lr_ratio`` at ``max_steps``) or ``"constant"``.
        min_lr_ratio: final learning rate as a fraction of the peak.
        grad_clip: max global gradient norm (``None`` or 0: no clipping; the norm is still logged).
        gradient_accumulation_steps: micro-batches per optimizer step.
        mixed_precision: ``"auto"`` (bf16 on a CUDA GPU that supports it, else fp32), ``"no"``/``"fp32"``, ``"bf16"``,
            ``"fp16"``.
        save_every: checkpoint every this many steps (``None``: only at the end when ``save_final``).
        keep_last: checkpoints kept (``None``: all), as accelerate's ``ProjectConfiguration.total_limit``.
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


def make_scheduler(optimizer: torch.optim.Optimizer, *, max_steps: int, warmup_steps: int = 0,
                   schedule: str = "cosine", min_lr_ratio: float = 0.0):
    """transformers' scheduler for ``schedule``: a linear warm-up from ``min_lr_ratio`` (0 at step 0 by default) over
    ``warmup_steps``, then a cosine or linear decay to ``min_lr_ratio`` of the peak at ``max_steps``
    (``"warmup_stable_decay"`` with no stable phase), or a constant rate (``"constant_with_warmup"``)."""
    from transformers import get_scheduler

    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup_steps)
    return get_scheduler("warmup_stable_decay", optimizer, num_warmup_steps=warmup_steps,
                         scheduler_specific_kwargs={"num_stable_steps": 0,
                                                    "num_decay_steps": max(1, max_steps - warmup_steps),
                                                    "decay_type": schedule, "min_lr_ratio": min_lr_ratio})


def lr_factor(step: int, *, max_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate used for optimizer step ``step`` (0-based): the value of
    :func:`make_scheduler`'s schedule."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make_scheduler(opt, max_steps=max_steps, warmup_steps=warmup_steps, schedule=schedule,
                           min_lr_ratio=min_lr_ratio)
    return float(sched.lr_lambdas[0](step))


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
    ``null``, lists); intermediate dicts are created as needed, and an integer component indexes an existing list
    (``stages.1.trainer.max_steps=500``). Returns ``config``."""
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
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[:i]) or "the config"
            if isinstance(node, list):
                if not p.lstrip("-").isdigit() or not -len(node) <= int(p) < len(node):
                    raise ValueError(f"override {ov!r}: {where} is a list of {len(node)}; {p!r} is not an index in it")
                p = int(p)
            elif not isinstance(node, dict):
                raise ValueError(f"override {ov!r}: {where} is a {type(node).__name__}, not a mapping or a list")
            if last:
                node[p] = value
            else:
                if isinstance(node, dict) and node.get(p) is None:
                    node[p] = {}
                node = node[p]
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

