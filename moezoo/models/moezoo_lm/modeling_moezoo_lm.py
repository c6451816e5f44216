"""``moezoo_lm``: a decoder-only Mixture-of-Experts causal LM on the shared backbone.

Embeddings -> N x [RMSNorm -> RoPE attention -> RMSNorm -> MoELayer (or a dense SwiGLU MLP)] -> RMSNorm -> LM head.
Attention goes through transformers' attention interface (sdpa / eager / flash / flex), masks through
``transformers.masking_utils``, the KV cache is transformers' ``DynamicCache`` and generation is ``GenerationMixin``.
The FFN is :class:`moezoo.core.MoELayer`; its experts follow ``model.set_experts_implementation(...)``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from ...core.experts import SharedExpert
from ...cache_compat import cache_kwargs, causal_mask, output_cache, resolve_cache
from ...core import RouterOutput, build_moe_layer
from ...modeling_utils import MoezooPreTrainedModel
from ...modeling_layers import RMSNorm as MoezooLMRMSNorm, apply_rope, eager_attention, rope_inv_freq
from .configuration_moezoo_lm import MoezooLMConfig


@dataclass
class MoezooLMModelOutput(MoeModelOutputWithPast):
    """transformers' ``MoeModelOutputWithPast`` (``last_hidden_state``, the KV cache under transformers' current name,
    ``hidden_states``, ``attentions``, ``router_logits`` (one (B*S, R) tensor per MoE layer)) plus:

    Attributes:
        router_outputs: the full :class:`moezoo.core.RouterOutput` of every MoE layer (used for the aux loss / stats).
    """

    router_outputs: tuple[RouterOutput, ...] | None = None


@dataclass
class MoezooLMCausalLMOutput(MoeCausalLMOutputWithPast):
    """transformers' ``MoeCausalLMOutputWithPast`` (``loss`` = next-token CE + ``aux_loss`` when ``labels`` are given;
    ``aux_loss`` = ``router_aux_loss_coef * switch balance + router_z_loss_coef * z-loss``; ``logits`` (B, S, V); the
    KV cache under transformers' current name; ``router_logits``) plus:

    Attributes:
        router_outputs: the full :class:`moezoo.core.RouterOutput` of every MoE layer.
    """

    router_outputs: tuple[RouterOutput, ...] | None = None


class MoezooLMRotaryEmbedding(nn.Module):
    """RoPE cos/sin from ``config.rope_parameters``: any rope type of ``transformers.modeling_rope_utils`` (scaled
    variants need transformers' frequency and ``dynamic_rope_update`` machinery, which the plain
    :class:`moezoo.modeling_layers.RotaryEmbedding` of the other families does not carry); the default frequencies are
    the shared :func:`moezoo.modeling_layers.rope_inv_freq`."""

    def __init__(self, config: MoezooLMConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: MoezooLMConfig, device=None, seq_len=None, **_) -> tuple[torch.Tensor, float]:
        return rope_inv_freq(config.head_dim, float(config.rope_parameters["rope_theta"]), device), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


class MoezooLMAttention(nn.Module):
    """Grouped-query RoPE self-attention dispatched through ``ALL_ATTENTION_FUNCTIONS``."""

    def __init__(self, config: MoezooLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        if config.qk_norm:
            self.q_norm = MoezooLMRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = MoezooLMRMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache: Cache | None = None, **kwargs):
        lead = hidden_states.shape[:-1]
        shape = (*lead, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                              eager_attention)
        out, weights = attention_interface(self, q, k, v, attention_mask,
                                           dropout=0.0 if not self.training else self.attention_dropout,
                                           scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*lead, -1).contiguous()), weights


class MoezooLMDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm attention + FFN block; the FFN is a :class:`MoELayer` on MoE layers, else a dense SwiGLU MLP."""

    def __init__(self, config: MoezooLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MoezooLMAttention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = build_moe_layer(config)
        else:
            self.mlp = SharedExpert(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = MoezooLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MoezooLMRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: Cache | None = None, use_cache: bool | None = False, **kwargs):
        residual = hidden_states
        h, attn = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask,
                                 cache=cache, **kwargs)
        hidden_states = residual + h
        residual = hidden_states
        h = self.post_attention_layernorm(hidden_states)
        router_output = None
        if self.is_moe:
            h, router_output = self.mlp(h)
        else:
            h = self.mlp(h)
        return residual + h, router_output, attn


class MoezooLMPreTrainedModel(MoezooPreTrainedModel):
    config_class = MoezooLMConfig
    config: MoezooLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoezooLMDecoderLayer"]
    _can_compile_fullgraph = False


class MoezooLMModel(MoezooLMPreTrainedModel):
    """The decoder stack without the LM head."""

    def __init__(self, config: MoezooLMConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MoezooLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MoezooLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = MoezooLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.FloatTensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                output_router_logits: bool | None = None, return_dict: bool | None = None,
                past_key_values: Cache | None = None, **kwargs) -> MoezooLMModelOutput:
        """``cache``: a transformers ``Cache`` to read and extend (``past_key_values`` is accepted as its old name)."""
        cache = resolve_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        output_router_logits = (output_router_logits if output_router_logits is not None
                                else self.config.output_router_logits)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        mask = causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        router_outputs = []
        for layer in self.layers:
            hidden_states, ro, attn = layer(hidden_states, attention_mask=mask,
                                            position_embeddings=position_embeddings, cache=cache,
                                            use_cache=use_cache, **kwargs)
            if ro is not None:
                router_outputs.append(ro)
            if output_attentions:
                all_attn += (attn,)
            if output_hidden_states:
                all_hidden += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden_states,)
        result = MoezooLMModelOutput(
            last_hidden_state=hidden_states,
            **cache_kwargs(cache if use_cache else None),
            hidden_states=all_hidden,
            attentions=all_attn,
            router_logits=tuple(ro.logits for ro in router_outputs) if output_router_logits else None,
            router_outputs=tuple(router_outputs),
        )
        return result if return_dict is not False else result.to_tuple()


class MoezooLMForCausalLM(MoezooLMPreTrainedModel, GenerationMixin):
    """:class:`MoezooLMModel` + LM head; loss = next-token CE + aux loss when ``labels`` are given."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MoezooLMConfig):
        super().__init__(config)
        self.model = MoezooLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.FloatTensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, output_router_logits: bool | None = None,
                return_dict: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                past_key_values: Cache | None = None, **kwargs) -> MoezooLMCausalLMOutput:
        """Next-token logits; with ``labels`` (B, S) (``-100`` ignored, shifted inside) also the loss.

        ``cache``: a transformers ``Cache`` (``past_key_values`` is accepted as its old name, not both)."""
        cache = resolve_cache(cache, past_key_values)
        output_router_logits = (output_router_logits if output_router_logits is not None
                                else self.config.output_router_logits)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         output_router_logits=output_router_logits, **kwargs)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:, :]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep, :]
        logits = self.lm_head(h)
        loss = aux_loss = None
        if labels is not None or output_router_logits:
            aux_loss = self.compute_aux_loss(list(out.router_outputs), attention_mask)
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            if aux_loss is not None:
                loss = loss + aux_loss.to(loss.device)
        result = MoezooLMCausalLMOutput(loss=loss, aux_loss=aux_loss, logits=logits,
                                        **cache_kwargs(output_cache(out)), hidden_states=out.hidden_states,
                                        attentions=out.attentions, router_logits=out.router_logits,
                                        router_outputs=out.router_outputs)
        return result if return_dict is not False else result.to_tuple()


__all__ = ["MoezooLMModel", "MoezooLMForCausalLM", "MoezooLMPreTrainedModel", "MoezooLMCausalLMOutput",
           "MoezooLMModelOutput"]
