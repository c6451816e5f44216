"""``time_moe``: Time-MoE, a decoder-only Mixture-of-Experts forecaster on the shared backbone.

Point embedding -> N x [RMSNorm -> RoPE attention -> RMSNorm -> MoELayer (or a dense SwiGLU MLP)] -> RMSNorm ->
one linear head per horizon length. Attention goes through transformers' attention interface (sdpa / eager / ...),
masks through ``transformers.masking_utils``, the KV cache is transformers' ``DynamicCache`` (``generate`` pre-allocates
it: :class:`moezoo.cache_compat.PreallocatedCache`). The FFN is
:class:`moezoo.core.MoELayer` (softmax top-k router without renormalisation, 3-D SwiGLU experts, one sigmoid-gated
shared expert); its experts follow ``model.set_experts_implementation(...)``.

Forecasting: :meth:`MoezooTimeMoeForPrediction.generate` is the official ``TSGenerationMixin`` loop (each step predicts
as many points as the selected head gives, KV cache between steps) and :meth:`MoezooTimeMoeForPrediction.forecast`
wraps it with per-series normalisation and input handling (see :mod:`moezoo.models.time_moe.forecasting`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from ...cache_compat import PreallocatedCache, cache_kwargs, causal_mask, output_cache, resolve_cache
from ...core.experts import SharedExpert, get_activation
from ...core import build_moe_layer
from ...core.losses import switch_balance_loss
from ...core import RouterOutput, data_check
from ...modeling_utils import MoezooPreTrainedModel
from ...modeling_layers import RMSNorm as MoezooTimeMoeRMSNorm, RotaryEmbedding, apply_rope, eager_attention
from .configuration_time_moe import MoezooTimeMoeConfig


@dataclass
class MoezooTimeMoeModelOutput(MoeModelOutputWithPast):
    """transformers' ``MoeModelOutputWithPast``: ``last_hidden_state`` (B, T, H) after the final norm, the KV cache
    under transformers' current name, ``hidden_states`` (embeddings + each layer's output, the last one after the final
    norm: official convention), ``attentions``, ``router_logits`` (one (B*T, E) tensor per MoE layer), plus:

    Attributes:
        router_outputs: the :class:`moezoo.core.RouterOutput` of every MoE layer.
    """

    router_outputs: tuple[RouterOutput, ...] | None = None


@dataclass
class MoezooTimeMoeOutput(MoeCausalLMOutputWithPast):
    """transformers' ``MoeCausalLMOutputWithPast`` for forecasting:

    - ``loss``: mean over the horizon heads of the Huber loss + ``aux_loss`` (only when ``labels`` are given);
    - ``aux_loss``: ``router_aux_loss_coef`` x switch balance loss over the MoE layers (None for dense models);
    - ``logits``: (B, T, h * input_size): the first head's predictions when ``labels`` are given (official), else the
      head chosen for ``max_horizon_length`` (position t predicts points t+1..t+h, horizon-major);
    - the KV cache under transformers' current name, ``hidden_states``, ``attentions``, ``router_logits``;

    Attributes:
        router_outputs: the full :class:`moezoo.core.RouterOutput` of every MoE layer.
    """

    router_outputs: tuple[RouterOutput, ...] | None = None


class MoezooTimeMoeInputEmbedding(nn.Module):
    """Point embedding ``act(gate_layer(x)) * emb_layer(x)`` (two bias-free ``Linear(input_size, hidden)``)."""

    def __init__(self, input_size: int, hidden_size: int, hidden_act: str = "silu"):
        super().__init__()
        self.emb_layer = nn.Linear(input_size, hidden_size, bias=False)
        self.gate_layer = nn.Linear(input_size, hidden_size, bias=False)
        self.emb_layer._point_embedding = self.gate_layer._point_embedding = True  # config.embedding_initializer_range
        self.act_fn = get_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_fn(self.gate_layer(x)) * self.emb_layer(x)


class MoezooTimeMoeAttention(nn.Module):
    """Grouped-query RoPE self-attention (q/k/v with bias, o_proj without), through ``ALL_ATTENTION_FUNCTIONS``."""

    def __init__(self, config: MoezooTimeMoeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache: Cache | None = None, keep_last: int = 0, **kwargs):
        """``keep_last`` > 0: queries (and the output) for the last ``keep_last`` positions only; keys and values
        (and the cache) still cover every position."""
        B, T, _ = hidden_states.shape
        k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)
        if keep_last and keep_last < T:
            cos, sin = position_embeddings
            q = self.q_proj(hidden_states[:, -keep_last:]).view(B, keep_last, -1, self.head_dim).transpose(1, 2)
            q, _ = apply_rope(q, q, cos[:, -keep_last:], sin[:, -keep_last:])
            _, k = apply_rope(k, k, cos, sin)
            if attention_mask is not None:
                attention_mask = attention_mask[..., -keep_last:, :]
            elif keep_last > 1:  # the backend would align a causal mask top-left: spell it out
                past = cache.get_seq_length() if cache is not None else 0
                attention_mask = torch.ones(keep_last, past + T, dtype=torch.bool, device=k.device).tril(
                    past + T - keep_last)[None, None]
            T = keep_last
        else:
            q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                              eager_attention)
        out, weights = attention_interface(self, q, k, v, attention_mask,
                                           dropout=self.config.attention_dropout if self.training else 0.0,
                                           scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(B, T, -1).contiguous()), weights


class MoezooTimeMoeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm attention + FFN; the FFN is a :class:`MoELayer` (or a dense SwiGLU MLP with ``use_dense``)."""

    def __init__(self, config: MoezooTimeMoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MoezooTimeMoeAttention(config, layer_idx)
        self.is_moe = not config.use_dense
        if self.is_moe:
            self.mlp = build_moe_layer(config)
        else:
            self.mlp = SharedExpert(config.hidden_size, config.dense_intermediate_size, config.hidden_act)
        self.input_layernorm = MoezooTimeMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MoezooTimeMoeRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: Cache | None = None, keep_last: int = 0, **kwargs):
        """``keep_last`` > 0: outputs for the last ``keep_last`` positions only (the KV cache still gets all)."""
        h, attn = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask,
                                 cache=cache, keep_last=keep_last, **kwargs)
        if keep_last:
            hidden_states = hidden_states[:, -keep_last:]
        hidden_states = hidden_states + h
        h = self.post_attention_layernorm(hidden_states)
        router_output = None
        if self.is_moe:
            h, router_output = self.mlp(h)
        else:
            h = self.mlp(h)
        return hidden_states + h, router_output, attn


def as_series_tensor(x, input_size: int, name: str = "input_ids", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Check a (B, T) or (B, T, input_size) real tensor and return it as (B, T, input_size) float (a new tensor; the
    caller's tensor is never modified in place)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, time) or (batch, time, input_size), "
                        f"got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must hold real numbers (float or int), got dtype {x.dtype}")
    if x.dim() == 2:
        if input_size != 1:
            raise ValueError(f"{name} of shape {tuple(x.shape)} is (batch, time) but input_size={input_size}; pass "
                             f"(batch, time, {input_size})")
        x = x.unsqueeze(-1)
    elif x.dim() != 3 or x.shape[-1] != input_size:
        raise ValueError(f"{name} must be (batch, time) or (batch, time, input_size={input_size}), got shape "
                         f"{tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no time steps (shape {tuple(x.shape)})")
    return x.to(dtype or (x.dtype if x.is_floating_point() else torch.float32))


class MoezooTimeMoePreTrainedModel(MoezooPreTrainedModel):
    config_class = MoezooTimeMoeConfig
    config: MoezooTimeMoeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MoezooTimeMoeDecoderLayer"]
    _can_compile_fullgraph = False
    _supports_flash_attn = False
    _supports_flex_attn = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = getattr(self.config, "embedding_initializer_range", None)
        # on the Linear layers themselves: transformers skips parameter-less container modules in custom code
        if std is not None and getattr(module, "_point_embedding", False):
            init.normal_(module.weight, mean=0.0, std=std)


class MoezooTimeMoeModel(MoezooTimeMoePreTrainedModel):
    """The Time-MoE decoder stack (no horizon heads)."""

    def __init__(self, config: MoezooTimeMoeConfig):
        super().__init__(config)
        self.embed_layer = MoezooTimeMoeInputEmbedding(config.input_size, config.hidden_size, config.hidden_act)
        self.layers = nn.ModuleList([MoezooTimeMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MoezooTimeMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_layer

    def set_input_embeddings(self, value):
        self.embed_layer = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.FloatTensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                output_router_logits: bool | None = None, return_dict: bool | None = None,
                past_key_values: Cache | None = None, logits_to_keep: int = 0,
                **kwargs) -> MoezooTimeMoeModelOutput:
        """``input_ids``: (B, T) or (B, T, input_size) real values (not token ids). ``attention_mask`` (B, past + T):
        1 = real point, 0 = padding; without ``position_ids`` positions count real points only (left padding).
        ``cache``: a transformers ``Cache`` (``past_key_values`` is accepted as its old name, not both).
        ``logits_to_keep`` > 0: the last layer runs its queries and FFN on the last ``logits_to_keep`` positions only
        (``last_hidden_state``, its hidden state and its router output cover those; every layer's keys and values, so
        the cache, still cover all positions): what decoding needs."""
        cache = resolve_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cfg = self.config
        output_attentions = output_attentions if output_attentions is not None else cfg.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        output_router_logits = output_router_logits if output_router_logits is not None else cfg.output_router_logits
        use_cache = use_cache if use_cache is not None else cfg.use_cache
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg)
        if inputs_embeds is None:
            x = as_series_tensor(input_ids, cfg.input_size, dtype=self.embed_layer.emb_layer.weight.dtype)
            data_check(torch.isfinite(x).all(), "input_ids contains NaN or inf values; fill or interpolate them first "
                       "(model.forecast(..., nan_policy='interpolate') does this)")
            inputs_embeds = self.embed_layer(x)
        B, T = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B \
                    or attention_mask.shape[1] not in (T, past + T):
                raise ValueError(f"attention_mask must be (batch={B}, past+time={past + T}), got shape "
                                 f"{tuple(attention_mask.shape)}")
            if attention_mask.shape[1] == T and past:
                attention_mask = torch.cat([attention_mask.new_ones(B, past), attention_mask], dim=1)
        if position_ids is None:
            if attention_mask is not None:  # counts real points (equals past + arange(T) without padding; no sync)
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
            else:
                position_ids = (torch.arange(T, device=inputs_embeds.device) + past).unsqueeze(0).expand(B, -1)
        mask = causal_mask(cfg, inputs_embeds, attention_mask, cache, position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(position_ids, hidden_states.dtype)
        if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0 = all positions), got {logits_to_keep!r}")
        last = len(self.layers) - 1
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        router_outputs = []
        for i, layer in enumerate(self.layers):
            hidden_states, ro, attn = layer(hidden_states, attention_mask=mask,
                                            position_embeddings=position_embeddings, cache=cache,
                                            keep_last=logits_to_keep if i == last else 0, **kwargs)
            if ro is not None:
                router_outputs.append(ro)
            if output_attentions:
                all_attn += (attn,)
            if output_hidden_states:
                all_hidden += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:  # the official tuple ends with the normed output instead of the raw last layer
            all_hidden = all_hidden[:-1] + (hidden_states,)
        result = MoezooTimeMoeModelOutput(
            last_hidden_state=hidden_states,
            **cache_kwargs(cache if use_cache else None),
            hidden_states=all_hidden,
            attentions=all_attn,
            router_logits=tuple(ro.logits for ro in router_outputs) if output_router_logits else None,
            router_outputs=tuple(router_outputs),
        )
        return result if return_dict is not False else result.to_tuple()


def horizon_targets(values: torch.Tensor, horizon_length: int) -> torch.Tensor:
    """(B, T, C) -> (B, T, h, C): entry [b, t, j] = values[b, t + j], zero past the end (the official padding)."""
    padded = F.pad(values, (0, 0, 0, horizon_length - 1))
    return padded.unfold(1, horizon_length, 1).permute(0, 1, 3, 2)


def ts_decode(model, input_ids: torch.Tensor, logits_processor=None, stopping_criteria=None, generation_config=None,
              synced_gpus: bool = False, streamer=None, ts_streamer=None, **model_kwargs) -> torch.Tensor:
    """The decoding loop ``GenerationMixin.generate`` runs for Time-MoE (``custom_generate``): official
    ``TSGenerationMixin`` semantics (see :meth:`MoezooTimeMoeForPrediction.generate`). Stops at the stopping criteria's
    ``max_length``; ``logits_processor`` (identity by default) sees (sequence, last-position predictions).
    ``ts_streamer``: the streamer (transformers does not forward ``streamer`` to callable ``custom_generate``)."""
    streamer = streamer if streamer is not None else ts_streamer
    max_length = getattr(stopping_criteria, "max_length", None) or generation_config.max_length
    C = model.config.input_size
    seq = input_ids if input_ids.dim() == 3 else input_ids.unsqueeze(-1)
    B, T = seq.shape[:2]
    if max_length <= T:
        raise ValueError(f"nothing to forecast: max_length={max_length} <= context length {T}; pass max_new_tokens")
    use_cache = model_kwargs.get("use_cache")
    use_cache = model.config.use_cache if use_cache is None else use_cache
    cache = resolve_cache(model_kwargs.get("cache"), model_kwargs.get("past_key_values")) if use_cache else None
    if use_cache and cache is None:  # the final length is known: keys and values are written in place, never concatenated
        cache = PreallocatedCache(model.config.num_hidden_layers, max_length)
    mask = model_kwargs.get("attention_mask")
    past = cache.get_seq_length() if cache is not None else 0
    if past >= T:
        raise ValueError(f"the cache already holds {past} positions but the context has only {T}: pass the whole "
                         f"context the cache was built from plus at least one new point")
    # the whole output and its mask are allocated once; each step writes its points into them
    full = seq.new_empty(B, max_length, C)
    full[:, :T] = seq
    full_mask = None
    if mask is not None:
        full_mask = mask.new_ones(B, max_length)
        full_mask[:, :T] = mask
    done = T
    step_in = seq[:, past:]  # a cache built on a prefix of the context: feed only what it lacks
    while done < max_length:
        remaining = max_length - done
        out = model(input_ids=step_in if use_cache else full[:, :done], attention_mask=None if mask is None
                    else full_mask[:, :done], cache=cache, use_cache=use_cache, max_horizon_length=remaining,
                    output_router_logits=False, logits_to_keep=1)
        scores = out.logits[:, -1, :]
        if logits_processor:
            scores = logits_processor(full[:, :done], scores)
        nxt = scores.reshape(B, -1, C)[:, :remaining]
        if streamer is not None:
            streamer.put(nxt.cpu())
        n = nxt.shape[1]
        full[:, done:done + n] = nxt
        step_in = full[:, done:done + n]
        done += n
        cache = output_cache(out) if use_cache else None
    seq = full
    if streamer is not None:
        streamer.end()
    return seq if input_ids.dim() == 3 else seq[..., 0]


class MoezooTimeMoeForPrediction(MoezooTimeMoePreTrainedModel, GenerationMixin):
    """:class:`MoezooTimeMoeModel` + one linear head per horizon; Huber loss over all heads + balance loss.

    ``labels[b, t]`` is the value that follows ``input_ids[b, t]`` (official window format: ``input_ids = seq[:-1]``,
    ``labels = seq[1:]``); the head of horizon h at position t is trained on ``labels[t : t + h]``.
    """

    _tp_plan = {}
    _pp_plan = {}

    def __init__(self, config: MoezooTimeMoeConfig):
        super().__init__(config)
        self.model = MoezooTimeMoeModel(config)
        self.lm_heads = nn.ModuleList([nn.Linear(config.hidden_size, config.input_size * h, bias=False)
                                       for h in config.horizon_lengths])
        self.post_init()

    def get_decoder(self):
        return self.model

    def set_decoder(self, decoder):
        self.model = decoder

    # ------------------------------------------------------------------------------------------------ heads / loss
    def select_horizon(self, max_horizon_length: int | None = None) -> tuple[int, int]:
        """(head index, horizon) the official rule picks: the first head when ``max_horizon_length`` is None, else the
        largest ``h <= max_horizon_length`` scanning ``horizon_lengths`` in order (stopping at the first larger one;
        the first head when even it is larger - its output is then truncated to ``max_horizon_length`` points)."""
        hl = self.config.horizon_lengths
        idx = 0
        if max_horizon_length is not None:
            if not isinstance(max_horizon_length, int) or isinstance(max_horizon_length, bool) \
                    or max_horizon_length < 1:
                raise ValueError(f"max_horizon_length must be a positive int or None, got {max_horizon_length!r}")
            for i, h in enumerate(hl[1:], start=1):
                if h > max_horizon_length:
                    break
                idx = i
        return idx, hl[idx]

    def ar_loss(self, predictions: torch.Tensor, labels: torch.Tensor, loss_masks: torch.Tensor | None,
                horizon_length: int) -> torch.Tensor:
        """Huber loss of one head: predictions (B, T, h*C) against ``labels[t:t+h]`` (B, T) or (B, T, C).

        ``loss_masks`` (B, T) (1 = keep) masks target points; padded targets past the end follow
        ``config.label_padding`` (see :class:`MoezooTimeMoeConfig`).
        """
        C = self.config.input_size
        B, T = predictions.shape[:2]
        y = as_series_tensor(labels, C, "labels", dtype=predictions.dtype)
        if y.shape[:2] != (B, T):
            raise ValueError(f"labels must have (batch, time) = {(B, T)} like input_ids, got {tuple(labels.shape)}")
        pred = predictions.view(B, T, horizon_length, C)
        target = horizon_targets(y, horizon_length)
        losses = F.huber_loss(pred, target, reduction="none", delta=self.config.huber_delta)
        mask = None
        if loss_masks is not None:
            m = loss_masks
            if m.dim() == 3 and m.shape[-1] == 1:
                m = m[..., 0]
            if m.dim() != 2 or tuple(m.shape) != (B, T):
                raise ValueError(f"loss_masks must be (batch, time) = {(B, T)}, got {tuple(loss_masks.shape)}")
            mask = horizon_targets(m.to(pred.dtype).unsqueeze(-1), horizon_length)  # (B, T, h, 1)
        if self.config.label_padding == "official":
            if mask is None:
                return losses.mean()
            return (losses * mask).sum() / mask.sum()
        valid = (torch.arange(T, device=pred.device)[:, None] + torch.arange(horizon_length, device=pred.device)) < T
        w = valid[None, :, :, None].to(pred.dtype)
        if mask is not None:
            w = w * mask
        w = w.expand_as(losses)
        return (losses * w).sum() / w.sum().clamp_min(1.0)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.FloatTensor | None = None, labels: torch.Tensor | None = None,
                loss_masks: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                output_router_logits: bool | None = None, return_dict: bool | None = None,
                max_horizon_length: int | None = None, past_key_values: Cache | None = None,
                logits_to_keep: int = 0, **kwargs) -> MoezooTimeMoeOutput:
        """Forward pass; see :class:`MoezooTimeMoeOutput`.

        Args:
            input_ids: (B, T) or (B, T, input_size) float series values.
            attention_mask: (B, T) (or (B, past + T) with a cache), 0 at padding.
            labels: (B, T) or (B, T, input_size): ``labels[t]`` = the value after ``input_ids[t]``.
            loss_masks: (B, T), 1 where a label counts (``attention_mask`` only keeps padding out of the attention and
                the balance loss: mask padded labels here too, as the official window datasets do).
            max_horizon_length: without labels, pick the head for this many points (official rule,
                :meth:`select_horizon`).
            cache: a transformers ``Cache`` (``past_key_values`` is accepted as its old name, not both).
            logits_to_keep: > 0 computes the last layer and the head for the last this-many positions only (decoding;
                not with ``labels``).
        """
        cache = resolve_cache(cache, past_key_values)
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep prunes positions the loss needs: pass it without labels")
        output_router_logits = (output_router_logits if output_router_logits is not None
                                else self.config.output_router_logits)
        if use_cache is None and (labels is not None or self.training):
            use_cache = False  # no KV cache while training
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         output_router_logits=output_router_logits, logits_to_keep=logits_to_keep, **kwargs)
        h = out.last_hidden_state
        loss = aux_loss = None
        if labels is not None or (output_router_logits and not logits_to_keep):  # pruned: layers route unequal
            aux_loss = self.compute_aux_loss(list(out.router_outputs), attention_mask)  # token counts, no aux loss
        if labels is not None:
            total = 0.0
            logits = None
            for head, hl in zip(self.lm_heads, self.config.horizon_lengths):
                pred = head(h)
                total = total + self.ar_loss(pred, labels, loss_masks, hl)
                if logits is None:
                    logits = pred
            loss = total / len(self.lm_heads)
            if aux_loss is not None:
                loss = loss + aux_loss.to(loss.device, loss.dtype)
        else:
            idx, hl = self.select_horizon(max_horizon_length)
            logits = self.lm_heads[idx](h)
            if max_horizon_length is not None and hl > max_horizon_length:
                logits = logits[..., : self.config.input_size * max_horizon_length]
        result = MoezooTimeMoeOutput(loss=loss, aux_loss=aux_loss, logits=logits, **cache_kwargs(output_cache(out)),
                                     hidden_states=out.hidden_states, attentions=out.attentions,
                                     router_logits=out.router_logits, router_outputs=out.router_outputs)
        return result if return_dict is not False else result.to_tuple()

    def balance_loss(self, router_outputs, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Unscaled switch balance loss over all MoE layers (the official ``load_balancing_loss_func`` value).

        The official function hard-codes top-2 when an attention mask is given (it only runs for k=2); this one
        masks padding for any k and equals the official value for k=2.
        """
        ros = [ro for ro in router_outputs if ro is not None]
        if not ros:
            return None
        mask = attention_mask
        if mask is not None and mask.numel() != ros[0].logits.shape[0]:
            mask = None
        return switch_balance_loss(ros, attention_mask=mask)

    # ------------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs) -> torch.Tensor:
        """Autoregressive forecast with the official ``TSGenerationMixin`` semantics, run by transformers'
        ``GenerationMixin.generate`` (generation config, ``max_new_tokens`` / ``max_length``, attention mask,
        ``DynamicCache``, streamer) with :func:`ts_decode` as its decoding loop.

        ``inputs`` / ``input_ids``: (B, T) (or (B, T, input_size)) float values, used as given (normalise them first;
        ``model.forecast`` does). Returns (B, T + n) (or (B, T + n, input_size)) = context followed by the forecast.
        Each step asks for the points still missing, takes the head :meth:`select_horizon` picks for that number,
        appends ALL its points (the last position's output) and feeds only them next step (KV cache; ``use_cache=False``
        re-runs the whole sequence). ``attention_mask`` (B, T): 0 marks left padding. Greedy only (no sampling/beams).
        ``autocast``: a dtype (``torch.bfloat16``) to decode under ``torch.autocast`` (matmuls in that dtype; routers,
        norms and softmax stay fp32; the returned values are fp32), or None.
        """
        autocast = kwargs.pop("autocast", None)
        if autocast is not None:
            if autocast not in (torch.bfloat16, torch.float16):
                raise ValueError(f"autocast must be torch.bfloat16, torch.float16 or None, got {autocast!r}")
            with torch.autocast(self.device.type, dtype=autocast):
                return self.generate(inputs, generation_config=generation_config, **kwargs).float()
        if "input_ids" in kwargs:
            if inputs is not None:
                raise ValueError("pass input_ids or inputs, not both")
            inputs = kwargs.pop("input_ids")
        if inputs is None:
            raise ValueError("generate needs input_ids (batch, time) float series")
        for key, ok in (("do_sample", (None, False)), ("num_beams", (None, 1))):
            v = kwargs.get(key)
            if not any(v is o or (type(v) is int and v == o) for o in ok):
                raise ValueError(f"{key}={v!r} is not supported: Time-MoE decoding is deterministic (greedy)")
        n = kwargs.get("max_new_tokens")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"max_new_tokens must be a positive int, got {n!r}")
        x = as_series_tensor(inputs, self.config.input_size, dtype=self.dtype).to(self.device)
        squeeze = inputs.dim() == 2
        if kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        elif tuple(kwargs["attention_mask"].shape) != tuple(x.shape[:2]):
            raise ValueError(f"attention_mask must be (batch, time) = {tuple(x.shape[:2])}, got "
                             f"{tuple(kwargs['attention_mask'].shape)}")
        if kwargs.get("streamer") is not None:  # GenerationMixin streams the prompt; ts_decode the forecast chunks
            kwargs["ts_streamer"] = kwargs["streamer"]
        out = super().generate(x[..., 0] if squeeze else x, generation_config=generation_config,
                               custom_generate=ts_decode, **kwargs)
        return out

    def forecast(self, context, prediction_length: int, **kwargs):
        """De-normalised forecasts of ``prediction_length`` points per series; see
        :func:`moezoo.models.time_moe.forecasting.forecast` for the accepted inputs and options."""
        from .forecasting import forecast

        return forecast(self, context, prediction_length, **kwargs)

    # ------------------------------------------------------------------------------------------------ tests
    def example_inputs(self, batch_size: int = 2, seq_len: int = 8, labels: bool = True,
                       generator: torch.Generator | None = None) -> dict:
        """Random-walk series (B, T) (or (B, T, input_size)) and, with ``labels``, the next-point labels."""
        C = self.config.input_size
        seq = torch.randn(batch_size, seq_len + 1, C, generator=generator).cumsum(1)
        seq = (seq - seq.mean(1, keepdim=True)) / seq.std(1, keepdim=True).clamp_min(1e-3)
        if C == 1:
            seq = seq[..., 0]
        out = {"input_ids": seq[:, :-1].contiguous()}
        if labels:
            out["labels"] = seq[:, 1:].contiguous()
        return out


__all__ = ["MoezooTimeMoeModel", "MoezooTimeMoeForPrediction", "MoezooTimeMoePreTrainedModel",
           "MoezooTimeMoeOutput", "MoezooTimeMoeModelOutput", "horizon_targets", "as_series_tensor", "ts_decode"]
