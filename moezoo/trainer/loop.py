"""The training loop: :class:`Trainer` over one model, on one CPU core or under ``accelerate launch`` / ``torchrun``."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpointing import (CHECKPOINT_PREFIX, TRAINER_CONFIG_NAME, TRAINER_STATE_NAME, check_rng_restored, find_checkpoints, load_model,
                            publish_checkpoint, remove_leftovers, save_model, temp_folder, to_jsonable, truncate_log)
from .config import TrainerConfig, make_scheduler, seed_everything
from .data import make_data_source
from .routing_log import RoutingLog

__all__ = ["Trainer", "TrainerCallback"]


def _make_accelerator(mixed_precision: str):
    """An Accelerator; in a single process a different mixed precision than an earlier Trainer's is allowed."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    # under torchrun on a machine without CUDA, accelerate only goes multi-process (gloo) when told cpu=True;
    # the scheduler steps once per optimizer step (accelerate would step it once per process otherwise)
    kw = {"cpu": True} if world > 1 and not torch.cuda.is_available() else {}
    kw["step_scheduler_with_optimizer"] = False
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
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and acc.distributed_type != DistributedType.FSDP:
        # accelerate 1.x turns FSDP on only for multi-GPU/NPU/XPU/... process groups; on CPU (MULTI_CPU, gloo) it
        # ignores the FSDP plugin and wraps the model in DDP without a word
        raise RuntimeError(f"FSDP was requested (ACCELERATE_USE_FSDP=true), but accelerate set up "
                           f"{acc.distributed_type.value}: accelerate shards with FSDP only on GPU-type devices, "
                           "not on CPU processes")
    return acc


@contextlib.contextmanager
def _isolated_rng():
    """Python, NumPy and torch (CPU + CUDA) RNG states restored on exit."""
    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


class TrainerCallback:
    """Base class of callbacks; override what you need. A plain callable is treated as ``on_step_end``."""

    def on_step_end(self, trainer: "Trainer", step: int, logs: dict) -> None: ...

    def on_log(self, trainer: "Trainer", step: int, logs: dict) -> None: ...

    def on_evaluate(self, trainer: "Trainer", step: int, metrics: dict) -> None: ...

    def on_save(self, trainer: "Trainer", step: int, path: str) -> None: ...

    def on_train_end(self, trainer: "Trainer", result: dict) -> None: ...


class Trainer:
    """A resumable training loop over one model (see :mod:`moezoo.trainer`).

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
        self.log_file = (self.output_dir / config.log_to) if config.log_to else None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self.output_dir)
        acc.wait_for_everyone()
        resume_path = self._resume_path()
        self._data = make_data_source(train_data, config=config, rank=acc.process_index,
                                      world_size=acc.num_processes, collate_fn=collate_fn,
                                      pin_memory=acc.device.type == "cuda")

        # model, EMA, optimizer, schedule
        model.to(acc.device)
        self.unwrapped_model = model
        self.ema_model, self._ema = None, None
        if config.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            if self._sharded():  # each process holds only a shard of the weights
                raise ValueError("ema_decay is not supported with FSDP / DeepSpeed sharding; set ema_decay=None")

            self.ema_model = copy.deepcopy(model).float().eval().requires_grad_(False)
            # a constant decay from the first step: diffusers' warm-up ((1 + n) / (10 + n)) is capped from below by
            # min_decay, and update_after_step=-1 makes the first update already an average (not a copy)
            self._ema = EMAModel(self.ema_model.parameters(), decay=config.ema_decay, min_decay=config.ema_decay,
                                 update_after_step=-1, foreach=True)
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
        scheduler = make_scheduler(optimizer, max_steps=config.max_steps, warmup_steps=config.warmup_steps,
                                   schedule=config.lr_schedule, min_lr_ratio=config.min_lr_ratio)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._hooks = [acc.register_save_state_pre_hook(self._save_models_hook),
                       acc.register_load_state_pre_hook(self._load_models_hook)]

        self.loss_fn = loss_fn if loss_fn is not None else self._default_loss
        self.eval_fn = eval_fn
        self.callbacks = list(callbacks or [])
        self._routing = RoutingLog(model) if routing_stats else None

        # progress state
        self.step = 0
        self.loss_history: list[float] = []
        self.eval_history: list[dict] = []
        self.last_checkpoint: str | None = None
        self.resumed_from: str | None = None
        self._pending: list[torch.Tensor] = []
        self._metric_sums: dict[str, float | torch.Tensor] = {}
        self._metric_counts: dict[str, int] = {}
        self._last_log_step = 0
        self._last_grad_norm: float | None = None
        self._step_lr = self.current_lr()

        if resume_path is not None:
            self._load_checkpoint(resume_path)
        else:
            if self.is_main and self.log_file is not None and self.log_file.is_file():
                truncate_log(self.log_file, 0)  # lines of an earlier attempt that died before its first checkpoint
            seed_everything(config.seed)

    # ------------------------------------------------------------------------------------------ routing (read-only)

    @property
    def routing(self):
        """The :class:`moezoo.core.RoutingStats` of the run (``None`` with ``routing_stats=False``)."""
        return self._routing.stats if self._routing is not None else None

    @property
    def routing_history(self) -> list[dict]:
        return self._routing.history if self._routing is not None else []

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

    def _sharded(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def _save_models_hook(self, models, weights, output_dir) -> None:
        """accelerate ``save_state`` pre-hook: the model (and EMA) as model folders instead of accelerate's file."""
        if self._sharded():
            return  # accelerate writes the sharded model itself
        if self.is_main:
            save_model(self.unwrapped_model, Path(output_dir))
            if self.ema_model is not None:
                save_model(self.ema_model, Path(output_dir) / "ema")
        weights.clear()  # (``models`` is accelerate's own list of prepared models: left alone)

    def _load_models_hook(self, models, input_dir) -> None:
        if self._sharded():
            return
        load_model(self.unwrapped_model, Path(input_dir))
        models.clear()

    def _trainer_state(self) -> dict:
        self._flush_losses()
        return {
            "format_version": 2,
            "step": self.step,
            "data": self._data.state_dict(),
            "ema_step": self._ema.optimization_step if self._ema is not None else None,
            "loss_history": torch.tensor(self.loss_history, dtype=torch.float64),
            "eval_history": [to_jsonable(e) for e in self.eval_history],
            "routing": self._routing.state_dict() if self._routing is not None else None,
            "log_accumulator": {"sums": {k: float(v) for k, v in self._metric_sums.items()},
                                "counts": dict(self._metric_counts), "last_log_step": self._last_log_step},
            "world_size": self.accelerator.num_processes,
        }

    def save_checkpoint(self) -> str:
        """Write ``output_dir/checkpoint-<step>/`` atomically (every process must call it); returns its path."""
        acc = self.accelerator
        tmp = temp_folder(self.output_dir, self.step)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        state = self._trainer_state()
        acc.save_state(str(tmp))  # every process: its RNG states (+ shards under FSDP); the hook writes the model
        if self.is_main:
            torch.save(state, tmp / TRAINER_STATE_NAME)
            (tmp / TRAINER_CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        else:
            torch.save({"data": state["data"]}, tmp / f"rank_state_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if self.is_main:
            publish_checkpoint(self.output_dir, self.step, self.config.keep_last)
            self.save_routing_plots()
        acc.wait_for_everyone()
        self.last_checkpoint = str(self.output_dir / f"{CHECKPOINT_PREFIX}{self.step}")
        self._callback("on_save", self.step, self.last_checkpoint)
        return self.last_checkpoint

    def _load_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        state = torch.load(path / TRAINER_STATE_NAME, map_location="cpu", weights_only=True)
        if state.get("format_version") != 2:
            raise ValueError(f"checkpoint {str(path)!r} was written by an older moezoo trainer (format "
                             f"{state.get('format_version')}); it cannot be resumed by this one")
        if state["world_size"] != acc.num_processes:
            warnings.warn(f"resuming a run of {state['world_size']} process(es) with {acc.num_processes}: "
                          "the data order will differ from the original run", stacklevel=3)
        acc.load_state(str(path))  # model (hook), optimizer, scheduler, scaler, RNG of this process
        check_rng_restored(path, acc.process_index)
        # the saved lr belongs to the saved schedule; a resumed run with another max_steps / warm-up / schedule uses its
        # own from the first resumed step (identical when nothing changed)
        sched = self.scheduler.scheduler
        for group, base_lr, fn in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base_lr * fn(sched.last_epoch)
        if self.ema_model is not None:
            if (path / "ema").is_dir():
                load_model(self.ema_model, path / "ema")
            else:
                warnings.warn(f"checkpoint {str(path)!r} has no EMA weights: EMA restarts from the loaded weights",
                              stacklevel=3)
                self.ema_model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                                for k, v in self.unwrapped_model.state_dict().items()})
            self._ema.shadow_params = [p.detach().clone() for p in self.ema_model.parameters()]
            self._ema.optimization_step = int(state["ema_step"] or state["step"])
        self.step = int(state["step"])
        self.loss_history = state["loss_history"].tolist()
        self.eval_history = list(state["eval_history"])
        if self._routing is not None and state.get("routing") is not None:
            self._routing.load_state_dict(state["routing"])
        la = state["log_accumulator"]
        self._metric_sums, self._metric_counts = dict(la["sums"]), dict(la["counts"])
        self._last_log_step = int(la["last_log_step"])
        data_state = state["data"]
        if not self.is_main:
            rank_file = path / f"rank_state_{acc.process_index}.pt"
            if not rank_file.is_file():
                raise FileNotFoundError(f"{str(rank_file)!r} is missing: checkpoint of a run with fewer processes")
            data_state = torch.load(rank_file, map_location="cpu", weights_only=True)["data"]
        self._data.load_state_dict(data_state)
        if self.is_main and self.log_file is not None and self.log_file.is_file():
            truncate_log(self.log_file, self.step)
        self.last_checkpoint = str(path)
        self.resumed_from = str(path)

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
        if self._routing is not None:
            self._routing.add_model_output(out)
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
        self._ema.step(self.unwrapped_model.parameters())
        self._ema.copy_to(self.ema_model.parameters())
        with torch.no_grad():
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
        last = self._routing.last if self._routing is not None else None
        if last is not None:
            entry["routing/max_load"] = dict(last)
            entry["routing/max_load_mean"] = sum(last.values()) / len(last)
            self._routing.last = None
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
                f.write(json.dumps(to_jsonable(entry)) + "\n")

    def evaluate(self, step: int | None = None) -> dict:
        """Run ``eval_fn(model, step)`` now (eval mode, no_grad, RNG states restored afterwards)."""
        if self.eval_fn is None:
            return {}
        step = self.step if step is None else step
        model = self.unwrapped_model
        was_training = model.training
        model.eval()
        try:
            with _isolated_rng(), torch.no_grad():
                metrics = self.eval_fn(model, step)
        finally:
            model.train(was_training)
        if metrics is None:
            metrics = {}
        if not isinstance(metrics, Mapping):
            raise TypeError(f"eval_fn must return a dict of metrics, got {type(metrics).__name__}")
        metrics = {str(k): to_jsonable(v) for k, v in metrics.items()}
        self.eval_history.append({"step": step, **metrics})
        if self.is_main:
            self._write_log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        self._callback("on_evaluate", step, metrics)
        return metrics

    def _train_step(self, step: int, capture: bool):
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns (mean loss, grad norm)."""
        from accelerate.utils import send_to_device

        cfg, acc = self.config, self.accelerator
        G = cfg.gradient_accumulation_steps
        rec = self._routing.capture if capture else None
        step_loss = None
        for micro in range(G):
            batch = send_to_device(self._data.next(), acc.device)
            sync = micro == G - 1 or acc.num_processes == 1
            with (contextlib.nullcontext() if sync else acc.no_sync(self.model)):
                if rec is not None:
                    rec.set_batch(batch)
                    rec.active = True
                try:
                    loss, logs = self._compute_loss(batch)
                finally:
                    if rec is not None:
                        rec.active = False
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
        if self._ema is not None:
            self._update_ema()
        return step_loss / G, gn

    def train(self) -> dict:
        """Train up to ``max_steps`` (from the resumed step) and return a summary dict."""
        from tqdm.auto import tqdm

        cfg = self.config
        routing_every = cfg.routing_every or cfg.log_every
        self._t0 = time.time()
        start = self.step
        pbar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                    disable=not (self.is_main and cfg.progress_bar))
        self.model.train()
        try:
            while self.step < cfg.max_steps:
                step = self.step + 1
                capture = self._routing is not None and (step % routing_every == 0 or step == cfg.max_steps)
                loss, gn = self._train_step(step, capture)
                self.step = step
                self._pending.append(loss)
                if capture:
                    self._routing.record(step)
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
            "routing_summary": self._routing.summary() if self._routing is not None else None,
            "train_time_s": time.time() - self._t0,
        }
        self._callback("on_train_end", result)
        return result

    def save_routing_plots(self) -> list[str]:
        """Write ``routing_heatmap.png`` and ``routing_load_over_steps.png`` to ``output_dir`` (if any MoE data)."""
        return self._routing.save_plots(self.output_dir, self.step) if self._routing is not None else []
