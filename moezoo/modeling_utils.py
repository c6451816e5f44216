"""Hugging Face base classes of every moezoo model: :class:`MoezooConfig` and :class:`MoezooPreTrainedModel`.

What the bases give every family:

- the MoE config fields of the shared backbone (transformers' names) and :func:`moezoo.core.build_moe_layer`, which
  turns them into :class:`moezoo.core.MoELayer` keyword arguments with the config itself as ``experts_config`` (so
  ``model.set_experts_implementation(...)`` reaches every experts module);
- experts implementation switching that works for classes defined anywhere (transformers only allows it when the
  module defining the model class contains the text ``@use_experts_implementation``), with ``"moezoo"`` as default;
- weight init of the core modules (3-D experts, routers, zero-FLOP experts);
- safetensors-only loading: pickled checkpoints are refused unless ``allow_pickle=True``;
- :meth:`MoezooPreTrainedModel.push_to_hub` with a model card rendered from ``model_cards/<family>.md``;
- :meth:`MoezooPreTrainedModel.compute_aux_loss` (switch balance + z-loss + the routers' own losses) and
  :meth:`MoezooPreTrainedModel.parameter_summary` (total / active parameters, MoE layers, routers).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init

from .core.experts import DEFAULT_EXPERTS_IMPLEMENTATION, ZeroFlopExperts, _ExpertsBase
from .core.layer import MoELayer
from .core.losses import moe_aux_loss
from .core.routing import ROUTERS, Router, RouterOutput
from .safety import PickleCheckpointError, check_no_pickle, pickle_refusal_message

def check_decoder_attention(config, positive_ints=("vocab_size", "hidden_size", "num_hidden_layers",
                                                   "num_attention_heads")) -> None:
    """Validate a RoPE decoder config's sizes and fill in ``num_key_value_heads`` / ``head_dim`` when None:
    every field in ``positive_ints`` a positive int, heads divisible by key-value heads, an even head_dim."""
    for name in positive_ints:
        v = getattr(config, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if config.num_key_value_heads is None:
        config.num_key_value_heads = config.num_attention_heads
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"num_attention_heads={config.num_attention_heads} must be divisible by "
                         f"num_key_value_heads={config.num_key_value_heads}")
    if config.head_dim is None:
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size={config.hidden_size} must be divisible by num_attention_heads="
                             f"{config.num_attention_heads} (or set head_dim)")
        config.head_dim = config.hidden_size // config.num_attention_heads
    if config.head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {config.head_dim}")


class MoezooConfig(PretrainedConfig):
    """Base config of moezoo models: the MoE fields of the shared backbone, named as in transformers.

    Args (all keyword, all serialised in ``config.json``):
        num_experts, num_experts_per_tok, moe_intermediate_size: routed experts E, top-k, expert width I.
        norm_topk_prob: renormalise the k selected weights to sum 1 (top-k router).
        router_type: a name in :data:`moezoo.core.ROUTERS`; ``router_kwargs``: its extra constructor kwargs.
        router_aux_loss_coef, router_z_loss_coef: weights of the switch balance loss and the router z-loss.
        num_shared_experts, shared_intermediate_size, shared_expert_gate: always-on shared experts.
        capacity_factor, drop_policy: capacity mode (``None`` = dropless, the default).
        hidden_act: expert activation (SwiGLU with ``silu``).
        output_router_logits: return ``router_logits`` (one per MoE layer) from ``forward`` (default on).
        initializer_range: std of the normal init of linear, embedding, router and expert weights.
    """

    model_type = ""

    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    norm_topk_prob: bool = True
    router_type: str = "topk"
    router_kwargs: dict | None = None
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    num_shared_experts: int = 0
    shared_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    hidden_act: str = "silu"
    output_router_logits: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be <= num_experts={self.num_experts}")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be a non-negative int, got {self.num_shared_experts!r}")
        if self.router_type not in ROUTERS:
            raise ValueError(f"router_type={self.router_type!r} is unknown; expected one of {sorted(ROUTERS)}")
        if self.router_kwargs is not None and not isinstance(self.router_kwargs, dict):
            raise ValueError(f"router_kwargs must be a dict or None, got {type(self.router_kwargs).__name__}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {self.capacity_factor!r}")
        super().__post_init__(**kwargs)


class MoezooPreTrainedModel(PreTrainedModel):
    """Base of every moezoo model (see the module docstring)."""

    config_class = MoezooConfig
    config: MoezooConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = None

    # ------------------------------------------------------------------------------------------------ experts switch
    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers looks for the text "@use_experts_implementation" in the module that defines the model class;
        # moezoo's experts (moezoo.core.experts) carry the decorator wherever the model class lives.
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        requested = DEFAULT_EXPERTS_IMPLEMENTATION if requested_experts is None else requested_experts
        return super().get_correct_experts_implementation(requested)

    # ------------------------------------------------------------------------------------------------ init
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = getattr(self.config, "initializer_range", 0.02) or 0.02
        if isinstance(module, _ExpertsBase):
            init.normal_(module.in_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
            if module._bias:
                init.zeros_(module.in_proj_bias)
                init.zeros_(module.down_proj_bias)
        elif isinstance(module, Router):
            if isinstance(getattr(module, "weight", None), nn.Parameter):
                init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(getattr(module, "bias", None), nn.Parameter):
                init.zeros_(module.bias)
            if getattr(module, "e_score_correction_bias", None) is not None:
                init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, ZeroFlopExperts) and module.num_constant:
            init.normal_(module.constant, mean=0.0, std=std)
            init.normal_(module.constant_gate, mean=0.0, std=std)

    # ------------------------------------------------------------------------------------------------ loading / hub
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, allow_pickle: bool = False, **kwargs):
        """transformers' ``from_pretrained`` restricted to safetensors unless ``allow_pickle=True``.

        Pickled checkpoints (``pytorch_model.bin``, ``.pt``, ``.pth``) can run arbitrary code when loaded; they raise
        :class:`PickleCheckpointError` unless the caller opts in.
        """
        if not allow_pickle:
            if kwargs.get("use_safetensors") is False:
                raise PickleCheckpointError("use_safetensors=False loads pickled weights; pass allow_pickle=True as well "
                                            "if you trust the checkpoint")
            if pretrained_model_name_or_path is not None:
                check_no_pickle(pretrained_model_name_or_path, kwargs.get("subfolder", "") or "")
                kwargs["use_safetensors"] = True
            if kwargs.get("gguf_file") is not None:
                raise PickleCheckpointError("gguf_file loading is not allowed without allow_pickle=True")
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except OSError as exc:
            if not allow_pickle and "cannot be loaded with `safetensors`" in str(exc):
                raise PickleCheckpointError(pickle_refusal_message(f"{str(pretrained_model_name_or_path)!r}")) from exc
            raise

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None, dry_run: bool = False, staging_dir: str | None = None,
                    tokenizer=None, card_kwargs: dict | None = None, **kwargs):
        """Save this model (+ ``tokenizer``) with a rendered model card and upload it (see :func:`moezoo.hub.push_to_hub`).

        With ``dry_run=True`` nothing is uploaded: the exact folder is written (``staging_dir`` or a temp dir) and its
        path returned. The token comes from ``token``, ``HF_TOKEN`` or the Hugging Face login; it is never printed.
        """
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, private=private, token=token, commit_message=commit_message,
                           dry_run=dry_run, staging_dir=staging_dir, tokenizer=tokenizer, card_kwargs=card_kwargs,
                           **kwargs)

    # ------------------------------------------------------------------------------------------------ MoE helpers
    def moe_layers(self) -> list[tuple[str, MoELayer]]:
        """(qualified name, module) of every :class:`MoELayer` in the model, in order."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, MoELayer)]

    def aux_loss_options(self) -> dict:
        """Family hook: keyword arguments of :func:`moezoo.core.losses.moe_aux_loss` besides the coefficients
        (``per_layer_balance``, ``normalize``, ``select``); the default is transformers' convention."""
        return {}

    def aux_loss_terms(self, router_outputs: list[RouterOutput]) -> tuple:
        """Family hook: extra, already weighted auxiliary losses added to the aggregate (none by default)."""
        return ()

    def compute_aux_loss(self, router_outputs: list[RouterOutput], attention_mask: torch.Tensor | None = None,
                         ) -> torch.Tensor | None:
        """Weighted auxiliary loss over the MoE layers (:func:`moezoo.core.losses.moe_aux_loss`).

        ``router_aux_loss_coef * balance + router_z_loss_coef * z-loss + routers' own losses + aux_loss_terms``;
        ``attention_mask`` (B, S) excludes padding from the balance loss when it matches the routed tokens.
        """
        router_outputs = [ro for ro in router_outputs if ro is not None]
        if not router_outputs:
            return None
        n_tokens = router_outputs[0].probs.reshape(-1, router_outputs[0].probs.shape[-1]).shape[0]
        mask = attention_mask
        if mask is not None:
            if mask.dim() == 2 and mask.shape[0] * mask.shape[1] != n_tokens and mask.shape[0] and \
                    n_tokens % mask.shape[0] == 0 and n_tokens // mask.shape[0] <= mask.shape[1]:
                mask = mask[:, -(n_tokens // mask.shape[0]):]  # generation with a cache: keep the current tokens
            if mask.dim() != 2 or mask.numel() != n_tokens:
                mask = None
        return moe_aux_loss(router_outputs, balance_coef=getattr(self.config, "router_aux_loss_coef", 0.0) or 0.0,
                            z_coef=getattr(self.config, "router_z_loss_coef", 0.0) or 0.0, attention_mask=mask,
                            terms=self.aux_loss_terms(router_outputs), **self.aux_loss_options())

    def parameter_summary(self) -> dict:
        """Total and active (per token) parameters, and one row per MoE layer.

        Active parameters count every routed expert weight at ``num_experts_per_tok / num_experts`` (for dynamic-k
        routers this uses the maximum k, so it is an upper bound).
        """
        total = sum(p.numel() for p in self.parameters())
        inactive = 0.0
        layers = []
        for name, m in self.moe_layers():
            expert_params = sum(p.numel() for p in m.experts.parameters())
            k = m.num_experts_per_tok
            inactive += expert_params * (1.0 - min(k, m.num_experts) / m.num_experts)
            router = m.gate
            layers.append({
                "name": name, "num_experts": m.num_experts, "top_k": k, "routable": m.num_routable,
                "router": type(router).__name__, "router_type": getattr(m, "init_kwargs", {}).get("router_type"),
                "scoring": getattr(router, "scoring_func", None),
                "shared_experts": getattr(m, "init_kwargs", {}).get("num_shared_experts", 0),
                "expert_params": expert_params,
            })
        return {"total": total, "active": int(round(total - inactive)), "moe_layers": layers}

    def get_experts_implementation_name(self) -> str | None:
        return self.config._experts_implementation

    def example_inputs(self, batch_size: int = 2, seq_len: int = 8, labels: bool = True,
                       generator: torch.Generator | None = None) -> dict:
        """Small random inputs for ``forward`` (used by the registry tests for every registered model).

        Families whose forward does not take ``input_ids`` override this; with ``labels=True`` the inputs must make
        ``forward`` return a ``loss``.
        """
        vocab = getattr(self.config, "vocab_size", None)
        if not vocab:
            raise NotImplementedError(f"{type(self).__name__} must override example_inputs()")
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
        return {"input_ids": ids, "labels": ids.clone()} if labels else {"input_ids": ids}

