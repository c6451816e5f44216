"""The shared training loop of every moezoo recipe (time series, diffusion, deweather, ...), on accelerate.

>>> from moezoo.trainer import Trainer, TrainerConfig, load_yaml_config
>>> cfg = TrainerConfig(output_dir="runs/x", max_steps=1000, batch_size=32, learning_rate=3e-4, warmup_steps=100,
...                     save_every=200, log_every=10, ema_decay=0.999)
>>> result = Trainer(model, cfg, train_data=dataset).train()          # doctest: +SKIP

Where things are:

- :mod:`~moezoo.trainer.config`: :class:`TrainerConfig`, the learning-rate schedule (transformers' ``get_scheduler``:
  linear warm-up, then cosine / linear decay to ``min_lr_ratio``, or constant) and YAML configs with ``key=value``
  overrides (:func:`parse_config_args`, :func:`load_yaml_config`).
- :mod:`~moezoo.trainer.data`: a map-style ``Dataset`` shuffled every epoch by a checkpointed ``torch.Generator``
  (process ``r`` of ``W`` takes batches ``r, r + W, ...`` of the global order; a resumed epoch skips its first batches
  with accelerate's ``skip_first_batches``), or a ``sample_batch(generator, batch_size)`` callable.
- :mod:`~moezoo.trainer.checkpointing`: ``checkpoint-<step>/`` folders written by ``Accelerator.save_state`` into a
  temporary folder and renamed when complete, rotated to ``keep_last``, loaded without pickle.
- :mod:`~moezoo.trainer.routing_log`: expert load of every MoE layer (jsonl log, ``routing_heatmap.png``,
  ``routing_load_over_steps.png``).
- :mod:`~moezoo.trainer.loop`: :class:`Trainer`: :class:`accelerate.Accelerator` for devices, DDP and mixed precision
  (``"auto"`` = bf16 on a CUDA GPU that supports it, else fp32), gradient accumulation (no all-reduce on intermediate
  micro-batches), AdamW without weight decay on 1-D parameters, gradient clipping, an fp32 EMA (diffusers'
  ``EMAModel``, constant decay) in :attr:`Trainer.ema_model`, a tqdm bar, a jsonl log and ``eval_fn`` calls that
  never change the training trajectory (RNG states restored).

``resume="auto"`` continues from the newest checkpoint, and the resumed run sees exactly the batches, dropout masks and
learning rates of an uninterrupted run (bit-identical on the same hardware; with ``num_workers > 0``, randomness
*inside* worker processes restarts on resume).  Single process and DDP (``accelerate launch`` / ``torchrun``);
FSDP through accelerate where accelerate offers it (GPU-type devices: on CPU processes accelerate ignores the FSDP
plugin, and the Trainer refuses ``ACCELERATE_USE_FSDP=true`` there instead of silently running DDP).
"""
from .checkpointing import (CHECKPOINT_PREFIX, TRAINER_CONFIG_NAME, TRAINER_STATE_NAME, find_checkpoints,
                            latest_checkpoint)
from .config import (TrainerConfig, add_config_args, apply_overrides, config_from_args, load_yaml_config, lr_factor,
                     make_scheduler, parse_config_args, seed_everything)
from .data import _DatasetSource  # noqa: F401  (tests build it directly)
from .loop import Trainer, TrainerCallback

__all__ = [
    "TrainerConfig", "Trainer", "TrainerCallback", "load_yaml_config", "add_config_args", "config_from_args",
    "parse_config_args", "apply_overrides", "seed_everything", "find_checkpoints", "latest_checkpoint", "lr_factor",
    "make_scheduler", "CHECKPOINT_PREFIX", "TRAINER_STATE_NAME", "TRAINER_CONFIG_NAME",
]
