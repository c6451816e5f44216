"""``DiTMoEPipeline``: class-conditional sampling from a moezoo DiT-MoE / ProMoE transformer with any diffusers scheduler.

>>> from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
>>> pipe = DiTMoEPipeline(transformer=model, scheduler=DDPMScheduler(variance_type="learned_range"))
>>> images = pipe(class_labels=[0, 1, 2], num_inference_steps=50, guidance_scale=4.0).images
>>> pipe.save_pretrained("out/pipe"); pipe = DiTMoEPipeline.from_pretrained("out/pipe")

Components: ``transformer`` (:class:`MoezooDiTMoeModel`), ``scheduler`` (any diffusers scheduler) and an optional
``vae`` (``AutoencoderKL``; without it the transformer works in pixel space and its samples are the images).

What the transformer predicts must match the scheduler:

* ``DDPMScheduler`` / ``DDIMScheduler`` (``prediction_type="epsilon"``): the first ``in_channels`` output channels are
  the noise ``eps``; a ``learn_sigma`` model's other ``in_channels`` channels are the variance interpolation ``v`` of
  diffusers' ``variance_type="learned_range"``. They go to the scheduler only when its ``variance_type`` is
  ``"learned"``/``"learned_range"``; otherwise they are dropped (as diffusers' ``DiTPipeline`` does).
* ``FlowMatchEulerDiscreteScheduler``: the output is the velocity ``v = noise - x_0`` (sign convention: ``sigma = 1``
  is noise, ``x_sigma = (1 - sigma) x_0 + sigma noise``, Euler ``x += (sigma_next - sigma) v``), timestep input
  ``sigma * 1000`` (see :mod:`moezoo.models.dit_moe.objectives`).

Classifier-free guidance runs the batch as ``[cond; uncond]`` (null class ``transformer.config.null_class_id``) and
guides the first ``cfg_channels`` prediction channels (``None`` = all ``in_channels``; ``3`` = the official DiT/DiT-MoE
behaviour on 4-channel latents). Variance channels are never guided.

``save_pretrained`` writes ``model_index.json`` + one folder per component; the transformer folder is a normal moezoo
model folder. :func:`register_with_diffusers` (called when a pipeline is built or loaded) lets diffusers' loader resolve moezoo classes
offline: it records the transformer under its module path and adds that module to diffusers' loadable libraries with
``from_pretrained`` as the load method.
"""
from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .modeling_dit_moe import classifier_free_guidance

__all__ = ["DiTMoEPipeline", "register_with_diffusers", "apply_cfg"]

_LOAD_METHODS = ["save_pretrained", "from_pretrained"]


def register_with_diffusers(model_class: type) -> None:
    """Make diffusers' pipeline loader accept ``model_class`` (a moezoo model) as a pipeline component, offline.

    diffusers stores a component as ``[library, class]`` and loads it only from libraries in its
    ``LOADABLE_CLASSES`` table (diffusers, transformers, ...); for anything else it looks up the module path and asks
    for a base class with a known load method in that module. This adds the model's module to the table with
    ``MoezooPreTrainedModel`` (whose ``from_pretrained`` refuses pickles) as the loadable base.
    """
    from diffusers.pipelines import pipeline_loading_utils as plu

    import importlib

    module_name = model_class.__module__
    module = importlib.import_module(module_name)
    base = next((b for b in ("MoezooPreTrainedModel", "PreTrainedModel") if hasattr(module, b)
                 and issubclass(model_class, getattr(module, b))), None)
    if base is None:
        raise TypeError(f"{model_class.__name__} is not a MoezooPreTrainedModel/PreTrainedModel defined in a module "
                        "that imports its base class; diffusers could not load it")
    plu.LOADABLE_CLASSES.setdefault(module_name, {})[base] = list(_LOAD_METHODS)
    plu.ALL_IMPORTABLE_CLASSES.setdefault(base, list(_LOAD_METHODS))
    try:  # pipeline_utils keeps its own list of library names (used by save/load bookkeeping)
        from diffusers.pipelines import pipeline_utils as pu

        if module_name not in pu.LIBRARIES:
            pu.LIBRARIES.append(module_name)
    except (ImportError, AttributeError):  # pragma: no cover - older/newer diffusers layouts
        pass


def apply_cfg(pred: torch.Tensor, guidance_scale: float, cfg_channels: int | None, in_channels: int) -> torch.Tensor:
    """Guide a ``[cond; uncond]`` prediction batch (2B, C_out, H, W) -> (B, C_out, H, W) with
    :func:`classifier_free_guidance`; the remaining channels (unguided eps channels, learned variance) keep the
    conditional half's values (the official ``forward_with_cfg`` keeps each half's own; only the cond half is used)."""
    guided, n = classifier_free_guidance(pred, guidance_scale, cfg_channels, in_channels)
    return torch.cat([guided, pred[: pred.shape[0] // 2, n:]], dim=1)


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


class DiTMoEPipeline(DiffusionPipeline):
    """Class-conditional image generation with a moezoo DiT-MoE transformer (see the module docstring).

    Args:
        transformer: a :class:`MoezooDiTMoeModel`.
        scheduler: a diffusers scheduler (``DDPMScheduler``, ``DDIMScheduler``, ``FlowMatchEulerDiscreteScheduler``,
            or any other that takes the same prediction type).
        vae: optional ``AutoencoderKL`` for latent models (``latents / vae.config.scaling_factor`` are decoded).
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer, scheduler, vae=None):
        super().__init__()
        register_with_diffusers(type(transformer))
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader, after registering the moezoo transformer class with it (nothing is registered at import
        time)."""
        from .modeling_dit_moe import MoezooDiTMoeModel

        register_with_diffusers(MoezooDiTMoeModel)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ---------------------------------------------------------------------------------------------- helpers
    @property
    def is_flow_matching(self) -> bool:
        """True for flow-matching schedulers (velocity prediction), judged by the scheduler's ``sigmas`` + ``shift``
        config (FlowMatch* schedulers) or ``prediction_type == "flow_prediction"``."""
        cfg = self.scheduler.config
        return type(self.scheduler).__name__.startswith("FlowMatch") or cfg.get("prediction_type") == "flow_prediction"

    def _scheduler_takes_variance(self) -> bool:
        # only schedulers that have the option (DDPM-like); a DDIM built from a DDPM config keeps the key but not the use
        if not _accepts(type(self.scheduler).__init__, "variance_type"):
            return False
        return self.scheduler.config.get("variance_type") in ("learned", "learned_range")

    def _check_class_labels(self, class_labels) -> torch.Tensor:
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        labels = torch.as_tensor(class_labels).reshape(-1)
        if labels.numel() == 0 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be a non-empty list/tensor of ints, got {class_labels!r}")
        n = int(self.transformer.config.num_classes)
        if labels.min() < 0 or labels.max() >= n:
            raise ValueError(f"class_labels must be in [0, {n - 1}] (num_classes={n}), got min {int(labels.min())} "
                             f"max {int(labels.max())}")
        return labels.long()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (identity without a VAE)."""
        if self.vae is None:
            return latents
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents).sample

    # ---------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale: float = 4.0, num_inference_steps: int = 50,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 cfg_channels: int | None = None, latents: torch.Tensor | None = None, return_dict: bool = True,
                 transformer_output_callback=None, autocast: torch.dtype | None = None):
        """Sample one image per entry of ``class_labels``.

        Args:
            class_labels: ints in ``[0, num_classes)``.
            guidance_scale: classifier-free guidance scale; ``<= 1`` runs the conditional model only.
            num_inference_steps: scheduler steps.
            generator: torch generator(s) for the initial noise and stochastic scheduler steps (determinism).
            output_type: ``"pil"`` (list of PIL images), ``"np"`` ((B, H, W, C) float in [0, 1]) or ``"pt"``
                ((B, C, H, W) float in [0, 1]).
            cfg_channels: guide only the first ``cfg_channels`` prediction channels (``None`` = the transformer
                config's ``cfg_channels``, whose ``None`` means all ``in_channels``; 3 = official).
            latents: starting noise (B, in_channels, S, S) instead of drawing it.
            transformer_output_callback: ``fn(step_index, timestep, output, num_cond)`` called with every
                transformer output (e.g. to collect ``router_logits`` per timestep; the first ``num_cond`` rows of
                the batch are the conditional ones).
            autocast: ``torch.bfloat16`` / ``torch.float16`` runs the transformer under ``torch.autocast`` (matmuls
                in that dtype; routers, norms and softmax stay fp32), or None; the scheduler, guidance and latents
                stay in the transformer's dtype.

        Returns:
            :class:`diffusers.ImagePipelineOutput` (or ``(images,)`` with ``return_dict=False``).
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be torch.bfloat16, torch.float16 or None, got {autocast!r}")
        labels = self._check_class_labels(class_labels)
        cfg = self.transformer.config
        B, C, S = labels.numel(), int(cfg.in_channels), int(cfg.sample_size)
        device, dtype = self._execution_device, self.transformer.dtype
        labels = labels.to(device)
        if latents is None:
            latents = randn_tensor((B, C, S, S), generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != (B, C, S, S):
                raise ValueError(f"latents must have shape {(B, C, S, S)}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=dtype)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        use_cfg = guidance_scale > 1.0
        cfg_ch = cfg_channels if cfg_channels is not None else getattr(cfg, "cfg_channels", None)
        null_id = int(getattr(cfg, "null_class_id", None) if getattr(cfg, "null_class_id", None) is not None
                      else cfg.num_classes)
        class_in = torch.cat([labels, torch.full_like(labels, null_id)]) if use_cfg else labels
        learned = int(getattr(cfg, "out_channels", C)) == 2 * C
        pass_variance = learned and self._scheduler_takes_variance() and not self.is_flow_matching
        step_kwargs = {"generator": generator} if _accepts(self.scheduler.step, "generator") else {}

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_in = torch.cat([latents, latents]) if use_cfg else latents
            if hasattr(self.scheduler, "scale_model_input"):
                model_in = self.scheduler.scale_model_input(model_in, t)
            t_batch = (t if torch.is_tensor(t) else torch.tensor(t)).to(device).reshape(1).expand(model_in.shape[0])
            with torch.autocast(torch.device(device).type, dtype=autocast or torch.bfloat16,
                                enabled=autocast is not None):
                out = self.transformer(sample=model_in, timestep=t_batch, class_labels=class_in)
            if transformer_output_callback is not None:
                transformer_output_callback(i, t, out, B)
            pred = out.sample.to(latents.dtype)
            pred = apply_cfg(pred, guidance_scale, cfg_ch, C) if use_cfg else pred
            model_output = pred if pass_variance else pred[:, :C]
            latents = self.scheduler.step(model_output, t, latents, **step_kwargs).prev_sample

        if output_type == "latent":
            images = latents
        else:
            images = (self.decode(latents).float() / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

