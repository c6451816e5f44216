"""The DiT-MoE training recipe behind ``training/dit_moe/train.py`` (YAML config -> :class:`moezoo.trainer.Trainer`).

Config sections (see ``training/dit_moe/configs/*.yaml``)::

    model:      {name: dit_moe_tiny_e4k2, overrides: {...}}          # a registry name (+ config overrides)
    objective:  {type: ddpm | rectified_flow, ...}                   # moezoo.models.dit_moe.objectives.build_objective
    data:       {dataset: fashion_mnist | digits | image_folder | latents, ...}   # moezoo.data.images
    vae:        null | {path: <AutoencoderKL folder or hub id>, scaling_factor: 0.18215}   # latent models
    sampling:   {scheduler: ddpm | ddim | flow_match_euler, num_inference_steps, guidance_scale, per_class,
                 cfg_channels}
    trainer:    TrainerConfig fields (output_dir, max_steps, batch_size, ema_decay, save_every, ...)

Class dropout, balance and routing-contrastive coefficients live in the model config (``model.overrides``):
``class_dropout_prob``, ``router_aux_loss_coef``, ``routing_contrastive_coef``. At the end the whole
:class:`DiTMoEPipeline` with the EMA weights (or the raw weights without EMA) is saved to ``<output_dir>/pipeline``
and a sample grid (one row per class) to ``<output_dir>/samples_grid.png``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

__all__ = ["KNOWN_SECTIONS", "build_model", "build_scheduler", "build_vae", "build_pipeline", "train", "sample_grid"]

KNOWN_SECTIONS = ("model", "objective", "data", "vae", "sampling", "trainer")


def _check_sections(config: dict) -> None:
    unknown = sorted(set(config) - set(KNOWN_SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; expected some of {list(KNOWN_SECTIONS)}")
    for key in ("model", "trainer"):
        if key not in config:
            raise ValueError(f"the config needs a '{key}:' section")


def build_model(spec: dict):
    """``{name, overrides, tiny}`` -> a fresh :class:`MoezooDiTMoeModel` from the registry."""
    import moezoo

    spec = dict(spec)
    name = spec.pop("name", None)
    if not name:
        raise ValueError("model.name (a registry name such as dit_moe_tiny_e4k2) is required")
    overrides = dict(spec.pop("overrides", None) or {})
    tiny = bool(spec.pop("tiny", False))
    if spec:
        raise ValueError(f"unknown model key(s) {sorted(spec)}; expected name, overrides, tiny")
    return moezoo.create_model(name, tiny=tiny, **overrides)


def build_scheduler(kind: str, objective_spec: dict | None = None, learn_sigma: bool = True):
    """The diffusers scheduler that samples what ``objective_spec`` trained (same betas / horizon)."""
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    obj = dict(objective_spec or {})
    otype = str(obj.get("type", "ddpm")).lower()
    T = int(obj.get("num_train_timesteps", 1000))
    betas = dict(num_train_timesteps=T, beta_schedule=obj.get("beta_schedule", "linear"),
                 beta_start=float(obj.get("beta_start", 1e-4)), beta_end=float(obj.get("beta_end", 0.02)))
    kind = kind.lower()
    if otype in ("rectified_flow", "rf", "flow"):
        if kind not in ("flow_match_euler", "flow"):
            raise ValueError(f"a rectified-flow model samples with sampling.scheduler=flow_match_euler, got {kind!r}")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=float(obj.get("shift", 1.0)))
    if kind == "ddpm":
        return DDPMScheduler(**betas, variance_type="learned_range" if learn_sigma else "fixed_small",
                             clip_sample=False)
    if kind == "ddim":
        return DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    raise ValueError(f"sampling.scheduler must be 'ddpm' or 'ddim' for a DDPM model, got {kind!r}")


def build_vae(spec: dict | None):
    """``{path, scaling_factor}`` -> a frozen ``AutoencoderKL`` (``None`` for pixel-space models)."""
    if not spec:
        return None
    from diffusers import AutoencoderKL

    spec = dict(spec)
    path = spec.pop("path", None)
    if path is None:
        raise ValueError("vae.path (a local AutoencoderKL folder or hub id) is required for a latent model")
    sf = spec.pop("scaling_factor", None)
    subfolder = spec.pop("subfolder", None)
    if spec:
        raise ValueError(f"unknown vae key(s) {sorted(spec)}; expected path, scaling_factor, subfolder")
    vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder) if subfolder else AutoencoderKL.from_pretrained(path)
    if sf is not None:
        vae.register_to_config(scaling_factor=float(sf))
    return vae.eval().requires_grad_(False)


def build_pipeline(transformer, config: dict, vae=None):
    from .pipeline_dit_moe import DiTMoEPipeline

    samp = dict(config.get("sampling") or {})
    obj = dict(config.get("objective") or {})
    default = "flow_match_euler" if str(obj.get("type", "ddpm")).lower() in ("rectified_flow", "rf", "flow") else "ddpm"
    sched = build_scheduler(samp.get("scheduler", default), obj, learn_sigma=bool(transformer.config.learn_sigma))
    return DiTMoEPipeline(transformer=transformer, scheduler=sched, vae=vae)


def sample_grid(pipe, path, per_class: int = 8, num_inference_steps: int = 50, guidance_scale: float = 2.0,
                seed: int = 0, cfg_channels=None, class_names=None, max_classes: int = 10) -> str:
    """Sample ``per_class`` images for each of the first ``max_classes`` classes and save a grid (one row per class)."""
    from moezoo.metrics.generation import generate_per_class, save_image_grid

    n_cls = min(int(pipe.transformer.config.num_classes), max_classes)
    images, _ = generate_per_class(pipe, n_cls, per_class, num_inference_steps, guidance_scale, seed=seed,
                                   cfg_channels=cfg_channels)
    return save_image_grid(images, path, nrow=per_class, row_labels=list(class_names)[:n_cls] if class_names else None,
                           title=f"{type(pipe.scheduler).__name__}, {num_inference_steps} steps, guidance "
                                 f"{guidance_scale}")


def train(config: dict, progress: bool = True, callbacks=None) -> dict:
    """Run the recipe described by ``config`` (see the module docstring); returns the trainer's summary plus
    ``pipeline_dir``, ``grid_png``, ``step_seconds`` and ``parameters``. ``callbacks`` go to the Trainer."""
    from moezoo.data.images import build_image_dataset
    from moezoo.trainer import Trainer, TrainerConfig

    from .objectives import build_objective

    config = json.loads(json.dumps(config))  # a private deep copy
    _check_sections(config)
    tcfg = dict(config["trainer"])
    tcfg.setdefault("progress_bar", progress)
    tconf = TrainerConfig.from_dict(tcfg)
    obj_spec = dict(config.get("objective") or {"type": "ddpm"})
    obj_type = obj_spec.pop("type", "ddpm")
    for k in ("shift",):  # sampling-only keys
        obj_spec.pop(k, None)
    objective = build_objective(obj_type, **obj_spec)
    # seed model init with the trainer seed (the trainer reseeds for training itself)
    torch.manual_seed(tconf.seed)
    model = build_model(config["model"])
    vae = build_vae(config.get("vae"))
    data_spec = dict(config.get("data") or {"dataset": "fashion_mnist"})
    dataset = build_image_dataset(data_spec, "train", vae=vae)
    item = dataset[0]["sample"]
    mc = model.config
    if tuple(item.shape) != (mc.in_channels, mc.sample_size, mc.sample_size):
        raise ValueError(f"data items are {tuple(item.shape)} but the model takes ({mc.in_channels}, {mc.sample_size}, "
                         f"{mc.sample_size}); set data.pad_to / model.overrides.sample_size / in_channels to match")
    trainer = Trainer(model, tconf, train_data=dataset, loss_fn=objective, callbacks=callbacks)
    t0 = time.time()
    start = trainer.step
    result = trainer.train()
    steps_run = max(1, result["step"] - start)
    result["step_seconds"] = (time.time() - t0) / steps_run
    result["parameters"] = model.parameter_summary()["total"]

    final = trainer.ema_model if trainer.ema_model is not None else trainer.unwrapped_model
    final = final.eval()
    out = Path(tconf.output_dir)
    if trainer.is_main:
        pipe = build_pipeline(final, config, vae=vae)
        pipe.set_progress_bar_config(disable=not progress)
        pipe_dir = out / "pipeline"
        pipe.save_pretrained(str(pipe_dir))
        samp = dict(config.get("sampling") or {})
        result["pipeline_dir"] = str(pipe_dir)
        result["weights"] = "ema" if trainer.ema_model is not None else "raw"
        if int(samp.get("per_class", 8)) > 0:
            result["grid_png"] = sample_grid(
                pipe, out / "samples_grid.png", per_class=int(samp.get("per_class", 8)),
                num_inference_steps=int(samp.get("num_inference_steps", 50)),
                guidance_scale=float(samp.get("guidance_scale", 2.0)), seed=tconf.seed,
                cfg_channels=samp.get("cfg_channels"), class_names=getattr(dataset, "class_names", None))
        summary = {k: v for k, v in result.items() if k not in ("losses",)}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return result
