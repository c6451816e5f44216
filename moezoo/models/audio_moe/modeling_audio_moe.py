"""``audio_moe`` model: a UniMoE-Audio-style decoder-only MoE LM over text tokens and K delayed codec streams.

Token layouts
-------------
``forward`` / ``generate`` take the **flat layout** (what :class:`~transformers.GenerationMixin` works in, as MusicGen):
``input_ids`` of shape ``(B * K, T)``; rows ``b*K .. b*K+K-1`` belong to sample ``b``, row ``b*K + c`` to codebook ``c``.
At a text position all K rows hold the same text id (``< vocab_size``); at an audio position row ``c`` holds
``vocab_size + code_c`` (codes, EOS, PAD, BOS of codebook ``c``). ``logits`` are ``(B * K, T, vocab_size +
codec_vocab_size)``: the text logits followed by codebook ``c``'s logits, so greedy search / sampling pick one token per
row. The **official layout** of UniMoE-Audio (``input_ids`` (B, T) with ``config.codec_placeholder_id`` at audio
positions + ``codec_input_ids`` (#audio positions, K) in row-major order) is accepted too and converted with
:func:`official_to_flat`. Helpers: :func:`flat_from_parts`, :func:`split_flat`, :func:`apply_delay`, :func:`undo_delay`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ...cache_compat import cache_kwargs, causal_mask, output_cache, resolve_cache
from ...core import MoELayer, RouterOutput, build_moe_layer
from ...core.losses import CoefficientSchedule, unimoe_audio_balance_loss
from ...modeling_layers import RMSNorm, RotaryEmbedding, apply_rope, eager_attention
from ...modeling_utils import MoezooPreTrainedModel
from .configuration_audio_moe import MoezooAudioMoeConfig

IGNORE = -100


@dataclass
class MoezooAudioMoeModelOutput(MoeModelOutputWithPast):
    """:class:`~transformers.modeling_outputs.MoeModelOutputWithPast` + every MoE layer's :class:`RouterOutput`."""

    router_outputs: tuple[RouterOutput, ...] | None = None


@dataclass
class MoezooAudioMoeCausalLMOutput(MoeCausalLMOutputWithPast):
    """transformers' :class:`MoeCausalLMOutputWithPast` + per-codebook outputs.

    Attributes (besides the parent's ``loss``, ``aux_loss``, ``logits`` (flat layout), cache, ``hidden_states``,
    ``attentions``, ``router_logits``):
        codec_logits: (B, T, K, codec_vocab_size).
        text_logits: (B, T, vocab_size).
        codebook_losses: (K,) unweighted cross-entropy per codebook (NaN where a codebook has no label).
        router_outputs: every MoE layer's :class:`moezoo.core.RouterOutput`.
    """

    codec_logits: torch.Tensor | None = None
    text_logits: torch.Tensor | None = None
    codebook_losses: torch.Tensor | None = None
    router_outputs: tuple[RouterOutput, ...] | None = None


# ---------------------------------------------------------------------------------------------------------- layouts
def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens, ``cumsum(mask) - 1`` with padding at 1 (Qwen2.5-VL's text-only rope index)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def _check_ids(name: str, ids, dims: int):
    if not torch.is_tensor(ids) or ids.dtype not in (torch.int32, torch.int64) or ids.dim() != dims:
        got = f"{tuple(ids.shape)} {ids.dtype}" if torch.is_tensor(ids) else type(ids).__name__
        raise ValueError(f"{name} must be an int64 tensor with {dims} dims, got {got}")


def official_to_flat(config: MoezooAudioMoeConfig, input_ids: torch.Tensor, codec_input_ids: torch.Tensor | None):
    """Official layout (``input_ids`` (B, T) with ``codec_placeholder_id`` at audio positions, ``codec_input_ids``
    (#placeholders, K) in row-major order) -> flat ids (B*K, T)."""
    _check_ids("input_ids", input_ids, 2)
    K = config.num_codebooks
    if config.codec_placeholder_id is None:
        raise ValueError("codec_input_ids needs config.codec_placeholder_id (the text id marking audio positions)")
    audio = input_ids == config.codec_placeholder_id
    n = int(audio.sum())
    if codec_input_ids is None:
        codec_input_ids = input_ids.new_zeros(0, K)
    _check_ids("codec_input_ids", codec_input_ids, 2)
    if codec_input_ids.shape != (n, K):
        raise ValueError(f"codec_input_ids must have shape (#placeholders={n}, num_codebooks={K}), "
                         f"got {tuple(codec_input_ids.shape)}")
    codes = input_ids.new_zeros(*input_ids.shape, K)
    codes[audio] = codec_input_ids.to(codes.dtype)
    return flat_from_parts(config, input_ids, codes, audio)


def flat_from_parts(config: MoezooAudioMoeConfig, text_ids: torch.Tensor, codes: torch.Tensor, audio_mask: torch.Tensor):
    """(B, T) text ids, (B, T, K) codec ids and (B, T) bool audio mask -> flat ids (B*K, T)."""
    B, T = text_ids.shape
    K = config.num_codebooks
    if codes.shape != (B, T, K):
        raise ValueError(f"codes must have shape (batch, seq, num_codebooks)=({B}, {T}, {K}), got {tuple(codes.shape)}")
    bad = audio_mask & ((codes < 0) | (codes >= config.codec_vocab_size)).any(-1)
    if bad.any():
        raise ValueError(f"codec ids must lie in [0, codec_vocab_size={config.codec_vocab_size}) (codes "
                         f"0..{config.codebook_size - 1}, EOS, PAD, BOS); got values {codes[bad].unique().tolist()}")
    flat = torch.where(audio_mask.unsqueeze(-1), codes + config.vocab_size, text_ids.unsqueeze(-1).expand(B, T, K))
    return flat.permute(0, 2, 1).reshape(B * K, T)


def split_flat(config: MoezooAudioMoeConfig, input_ids: torch.Tensor):
    """Flat ids (B*K, T) -> (text ids (B, T), codec ids (B, T, K), audio mask (B, T)); checks the layout."""
    _check_ids("input_ids", input_ids, 2)
    K, V = config.num_codebooks, config.vocab_size
    if input_ids.shape[0] % K:
        raise ValueError(f"input_ids must have batch * num_codebooks rows (flat layout, num_codebooks={K}), got "
                         f"{input_ids.shape[0]} rows; pass codec_input_ids for the official (batch, seq) layout")
    B, T = input_ids.shape[0] // K, input_ids.shape[1]
    ids = input_ids.view(B, K, T)
    audio = ids[:, 0] >= V
    if ((ids >= V) != audio.unsqueeze(1)).any():
        raise ValueError("input_ids: at each position the num_codebooks rows of a sample must be all text ids "
                         f"(< vocab_size={V}) or all codec ids (>= vocab_size)")
    text_rows_differ = (~audio) & (ids != ids[:, :1]).any(1)
    if text_rows_differ.any():
        raise ValueError("input_ids: at a text position the num_codebooks rows of a sample must hold the same id")
    if (input_ids < 0).any() or (input_ids >= config.flat_vocab_size).any():
        raise ValueError(f"input_ids must lie in [0, vocab_size + codec_vocab_size = {config.flat_vocab_size})")
    text = torch.where(audio, torch.zeros_like(ids[:, 0]), ids[:, 0])
    codes = torch.where(audio.unsqueeze(1), ids - V, torch.zeros_like(ids)).permute(0, 2, 1)
    return text, codes, audio


def apply_delay(config: MoezooAudioMoeConfig, codes: torch.Tensor, *, add_bos: bool = True, add_eos: bool = True):
    """Undelayed codes (B, F, K) of one utterance -> delayed frames (B, F + max_delay + 1 + add_eos?, K):
    BOS frame, codebook c shifted by ``delay_pattern[c]`` (BOS before), one EOS after its last code, then PAD."""
    if codes.dim() != 3 or codes.shape[-1] != config.num_codebooks:
        raise ValueError(f"codes must be (batch, frames, num_codebooks={config.num_codebooks}), got {tuple(codes.shape)}")
    if ((codes < 0) | (codes >= config.codebook_size)).any():
        raise ValueError(f"codes must lie in [0, codebook_size={config.codebook_size})")
    B, Fr, K = codes.shape
    D = config.max_delay
    L = Fr + D + int(add_bos) + int(add_eos)
    out = torch.full((B, L, K), config.codec_pad_id, dtype=codes.dtype, device=codes.device)
    s0 = int(add_bos)
    for c, d in enumerate(config.delay_pattern):
        out[:, : s0 + d, c] = config.codec_bos_id
        out[:, s0 + d: s0 + d + Fr, c] = codes[..., c]
        if add_eos:
            out[:, s0 + d + Fr, c] = config.codec_eos_id
    return out


def undo_delay(config: MoezooAudioMoeConfig, frames: torch.Tensor) -> list[torch.Tensor]:
    """Delayed frames (B, L, K) starting with the BOS frame -> per sample the codes (F_b, K) up to the first EOS of
    codebook 0 (special ids removed)."""
    out = []
    for b in range(frames.shape[0]):
        f = frames[b]
        eos = (f[:, 0] == config.codec_eos_id).nonzero()
        end = int(eos[0]) if eos.numel() else f.shape[0]
        n = end - 1
        rows = []
        for c, d in enumerate(config.delay_pattern):
            col = f[1 + d: 1 + d + n, c]
            if col.shape[0] < n:
                col = torch.cat([col, col.new_full((n - col.shape[0],), config.codec_pad_id)])
            rows.append(col)
        codes = torch.stack(rows, -1) if n > 0 else f.new_zeros(0, config.num_codebooks)
        out.append(codes.clamp(max=config.codebook_size - 1) if codes.numel() else codes)
    return out


# ---------------------------------------------------------------------------------------------------------- modules
class MoezooAudioMoeAttention(nn.Module):
    """Grouped-query RoPE attention (q/k/v with bias when ``attention_bias``, o_proj without), any attention backend."""

    def __init__(self, config: MoezooAudioMoeConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        H, b = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(H, config.num_attention_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(H, config.num_key_value_heads * self.head_dim, bias=b)
        self.v_proj = nn.Linear(H, config.num_key_value_heads * self.head_dim, bias=b)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, H, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache: Cache | None = None, **kwargs):
        lead = hidden_states.shape[:-1]
        shape = (*lead, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = apply_rope(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        fn: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out, weights = fn(self, q, k, v, attention_mask, scaling=self.scaling,
                          dropout=0.0 if not self.training else self.config.attention_dropout, **kwargs)
        return self.o_proj(out.reshape(*lead, -1).contiguous()), weights


class MoezooAudioMoeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm attention + :class:`moezoo.core.MoELayer` (every layer is MoE, as in UniMoE-Audio)."""

    def __init__(self, config: MoezooAudioMoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MoezooAudioMoeAttention(config, layer_idx)
        self.mlp = build_moe_layer(config.moe_layer_config(), experts_config=config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, token_mask=None,
                gate_residual=None, **kwargs):
        h, attn = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache,
                                 **kwargs)
        hidden_states = hidden_states + h
        signals = {"attention_mask": token_mask}
        if gate_residual is not None:
            signals["gate_residual"] = gate_residual
        h, ro = self.mlp(self.post_attention_layernorm(hidden_states), **signals)
        return hidden_states + h, ro, attn


class MoezooAudioMoePreTrainedModel(MoezooPreTrainedModel):
    config_class = MoezooAudioMoeConfig
    config: MoezooAudioMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoezooAudioMoeDecoderLayer"]
    _can_compile_fullgraph = False
    _skip_keys_device_placement = ["past_key_values", "cache"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        widths = self.config.expert_widths()
        if widths is not None and isinstance(module, MoELayer):
            zero_expert_padding(module, widths)

    def post_init(self):
        super().post_init()
        widths = self.config.expert_widths()
        if widths is not None:
            for m in self.modules():
                if isinstance(m, MoELayer) and m.experts.down_proj.device.type != "meta":
                    zero_expert_padding(m, widths)


def zero_expert_padding(layer: MoELayer, widths: list[int]) -> None:
    """Zero the padded part of experts narrower than the stored width (exact: ``silu(0) * 0 = 0``; stays 0 in training)."""
    ex = layer.experts
    inter = ex.down_proj.shape[-1]
    with torch.no_grad():
        for e, w in enumerate(widths):
            if w < inter:
                ex.gate_up_proj[e, w:inter] = 0
                ex.gate_up_proj[e, inter + w:] = 0
                ex.down_proj[e, :, w:] = 0


class MoezooAudioMoeModel(MoezooAudioMoePreTrainedModel):
    """Embeddings (text + summed codec embeddings), the MoE decoder stack and the final norm."""

    def __init__(self, config: MoezooAudioMoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.codec_embed_tokens = nn.ModuleList(nn.Embedding(config.codec_vocab_size, config.hidden_size)
                                                for _ in range(config.num_codebooks))
        self.layers = nn.ModuleList(MoezooAudioMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, float(config.rope_theta))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def embed(self, text_ids: torch.Tensor, codes: torch.Tensor, audio_mask: torch.Tensor) -> torch.Tensor:
        """Text embedding, replaced at audio positions by the sum over codebooks of the codec embeddings."""
        x = self.embed_tokens(text_ids)
        if audio_mask.any():
            a = sum(emb(codes[..., c]) for c, emb in enumerate(self.codec_embed_tokens))
            x = torch.where(audio_mask.unsqueeze(-1), a.to(x.dtype), x)
        return x

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, output_router_logits=None,
                past_key_values=None, return_dict=None, codec_input_ids=None, **kwargs) -> MoezooAudioMoeModelOutput:
        """``input_ids`` in the flat layout (B*K, T) (or the official layout with ``codec_input_ids``), or
        ``inputs_embeds`` (B, T, H). ``attention_mask`` (B, past + T) or (B*K, past + T), 1 = real token."""
        cache = resolve_cache(cache, past_key_values)
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        output_attentions = output_attentions if output_attentions is not None else cfg.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        output_router_logits = output_router_logits if output_router_logits is not None else cfg.output_router_logits
        use_cache = use_cache if use_cache is not None else cfg.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if inputs_embeds is None:
            flat = official_to_flat(cfg, input_ids, codec_input_ids) if codec_input_ids is not None else input_ids
            inputs_embeds = self.embed(*split_flat(cfg, flat))
        B, T = inputs_embeds.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg)
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] not in (B, B * cfg.num_codebooks):
                raise ValueError(f"attention_mask must be (batch, past + seq) with batch={B} (or batch * num_codebooks "
                                 f"rows), got {tuple(attention_mask.shape)}")
            if attention_mask.shape[0] != B:
                attention_mask = attention_mask[:: cfg.num_codebooks]
            if attention_mask.shape[1] != past + T:
                raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions, expected past + seq = "
                                 f"{past + T}")
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens (padding -> 1, as Qwen2.5-VL)
                position_ids = position_ids_from_mask(attention_mask)[:, -T:]
            else:
                position_ids = (torch.arange(T, device=inputs_embeds.device) + past).unsqueeze(0).expand(B, -1)
        token_mask = attention_mask[:, -T:] if attention_mask is not None else None
        mask = causal_mask(cfg, inputs_embeds, attention_mask, cache, position_ids)
        h = inputs_embeds
        pe = self.rotary_emb(position_ids, h.dtype)
        hidden = (h,) if output_hidden_states else None
        attns = () if output_attentions else None
        router_outputs, residual = [], None
        for layer in self.layers:
            h, ro, attn = layer(h, attention_mask=mask, position_embeddings=pe, cache=cache, token_mask=token_mask,
                                gate_residual=residual if cfg.moe_type == "moepp" else None, **kwargs)
            router_outputs.append(ro)
            residual = ro.extras.get("gate_residual")
            if output_hidden_states:
                hidden += (h,)
            if output_attentions:
                attns += (attn,)
        h = self.norm(h)
        if output_hidden_states:
            hidden = hidden[:-1] + (h,)
        return MoezooAudioMoeModelOutput(
            last_hidden_state=h, hidden_states=hidden, attentions=attns,
            router_logits=tuple(ro.logits for ro in router_outputs) if output_router_logits else None,
            router_outputs=tuple(router_outputs), **cache_kwargs(cache if use_cache else None))


class MoezooAudioMoeForCausalLM(MoezooAudioMoePreTrainedModel, GenerationMixin):
    """:class:`MoezooAudioMoeModel` + text head + one head per codebook (fused in ``codec_head``).

    ``forward(..., labels=...)``: labels in the flat layout (B*K, T) (``-100`` ignored; shifted inside), or
    ``codec_labels`` (B, T, K) with optional text ``labels`` (B, T) in the official layout. Loss =
    ``sum_c codebook_loss_weights[c] * CE_c + text_loss_weight * CE_text + aux_loss``.
    """

    def __init__(self, config: MoezooAudioMoeConfig):
        super().__init__(config)
        self.model = MoezooAudioMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.codec_head = nn.Linear(config.hidden_size, config.num_codebooks * config.codec_vocab_size, bias=False)
        self.aux_loss_step = 0  # step of the balance-loss coefficient schedule (see config.aux_loss_counter)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def example_inputs(self, batch_size: int = 2, seq_len: int = 8, labels: bool = True,
                       generator: torch.Generator | None = None) -> dict:
        """A text prompt of ``seq_len // 2`` tokens + one delayed utterance (BOS frame, codes, EOS, PAD), flat layout;
        ``labels`` = the inputs (text positions are ignored by the loss unless ``text_loss_weight`` > 0)."""
        cfg = self.config
        n_text = max(1, seq_len // 2)
        n_frames = max(1, seq_len - n_text)
        text = torch.randint(0, cfg.vocab_size, (batch_size, n_text), generator=generator)
        codes = torch.randint(0, cfg.codebook_size, (batch_size, n_frames, cfg.num_codebooks), generator=generator)
        frames = apply_delay(cfg, codes)
        F_ = frames.shape[1]
        tid = torch.cat([text, text.new_zeros(batch_size, F_)], 1)
        cd = torch.cat([codes.new_zeros(batch_size, n_text, cfg.num_codebooks), frames], 1)
        audio = torch.arange(n_text + F_) >= n_text
        ids = flat_from_parts(cfg, tid, cd, audio.unsqueeze(0).expand(batch_size, -1))
        return {"input_ids": ids, "labels": ids.clone()} if labels else {"input_ids": ids}

    # ------------------------------------------------------------------------------------------------ losses
    def aux_loss_coef(self, step: int | None = None) -> float:
        """Balance-loss weight at ``step`` (default: :attr:`aux_loss_step`): linear decay from
        ``router_aux_loss_coef`` to ``router_aux_loss_min_coef`` over ``router_aux_loss_decay_steps``."""
        cfg = self.config
        step = self.aux_loss_step if step is None else step
        if not cfg.router_aux_loss_decay_steps or cfg.router_aux_loss_min_coef is None:
            return float(cfg.router_aux_loss_coef)
        return CoefficientSchedule(cfg.router_aux_loss_coef, "linear_decay", decay_steps=cfg.router_aux_loss_decay_steps,
                                   final_value=cfg.router_aux_loss_min_coef)(step)

    def balance_loss(self, router_outputs, attention_mask=None, aux_balance_weight=None) -> torch.Tensor | None:
        """Unweighted balance loss: for top-p the mean over layers of UniMoE-Audio's masked balance loss (per-token
        weights ``aux_balance_weight * attention_mask`` when ``aux_balance_weight`` is given); else the shared
        switch + z + router losses (already weighted by their config coefficients)."""
        ros = [ro for ro in router_outputs if ro is not None]
        if not ros:
            return None
        if self.config.moe_type == "topp":
            w = aux_balance_weight
            if w is not None and attention_mask is not None:
                w = w * attention_mask[:, -w.shape[-1]:].to(w.dtype)
            return torch.stack([unimoe_audio_balance_loss(ro, aux_balance_weight=w) for ro in ros]).mean()
        return self.compute_aux_loss(ros, attention_mask)

    def codebook_losses(self, codec_logits: torch.Tensor, codec_labels: torch.Tensor) -> torch.Tensor:
        """(K,) cross-entropy of ``codec_logits[:, :-1, c]`` against ``codec_labels[:, 1:, c]`` (NaN if no label)."""
        K, V = self.config.num_codebooks, self.config.codec_vocab_size
        lg = codec_logits[:, :-1].float()
        lb = codec_labels[:, 1:].to(lg.device)
        bad = (lb != IGNORE) & ((lb < 0) | (lb >= V))
        if bad.any():
            raise ValueError(f"codec labels must be -100 or lie in [0, codec_vocab_size={V}), got "
                             f"{lb[bad].unique().tolist()}")
        out = []
        for c in range(K):
            valid = lb[..., c] != IGNORE
            if not valid.any():
                out.append(lg.new_tensor(float("nan")))
                continue
            out.append(F.cross_entropy(lg[..., c, :].reshape(-1, V), lb[..., c].reshape(-1), ignore_index=IGNORE))
        return torch.stack(out)

    def _labels(self, labels, codec_labels, B, T):
        cfg = self.config
        K, V = cfg.num_codebooks, cfg.vocab_size
        if codec_labels is not None:
            if codec_labels.shape != (B, T, K):
                raise ValueError(f"codec_labels must be (batch, seq, num_codebooks)=({B}, {T}, {K}), got "
                                 f"{tuple(codec_labels.shape)}")
            if labels is not None and labels.shape != (B, T):
                raise ValueError(f"with codec_labels, labels are text labels of shape ({B}, {T}), got "
                                 f"{tuple(labels.shape)}")
            return labels, codec_labels
        if labels.shape != (B * K, T):
            raise ValueError(f"labels must be in the flat layout (batch * num_codebooks, seq)=({B * K}, {T}), got "
                             f"{tuple(labels.shape)} (or pass codec_labels (batch, seq, num_codebooks))")
        lab = labels.view(B, K, T)
        is_codec = lab >= V
        codec = torch.where(is_codec, lab - V, torch.full_like(lab, IGNORE)).permute(0, 2, 1)
        text = torch.where((lab[:, 0] >= 0) & (lab[:, 0] < V), lab[:, 0], torch.full_like(lab[:, 0], IGNORE))
        return text, codec

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, codec_labels=None, codec_input_ids=None, aux_balance_weight=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, output_router_logits=None,
                past_key_values=None, return_dict=None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> MoezooAudioMoeCausalLMOutput:
        cache = resolve_cache(cache, past_key_values)
        cfg = self.config
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
                         output_hidden_states=output_hidden_states, output_router_logits=output_router_logits,
                         codec_input_ids=codec_input_ids, **kwargs)
        h = out.last_hidden_state
        B, T = h.shape[:2]
        if labels is None and codec_labels is None:
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                h = h[:, -logits_to_keep:]
            elif isinstance(logits_to_keep, torch.Tensor):
                h = h[:, logits_to_keep]
        K, Vc = cfg.num_codebooks, cfg.codec_vocab_size
        text_logits = self.lm_head(h).float()
        codec_logits = self.codec_head(h).float().view(B, h.shape[1], K, Vc)
        logits = torch.cat([text_logits.unsqueeze(1).expand(B, K, *text_logits.shape[1:]),
                            codec_logits.permute(0, 2, 1, 3)], -1).reshape(B * K, h.shape[1], -1)
        loss = aux_loss = per_cb = None
        if labels is not None or codec_labels is not None:
            text_lab, codec_lab = self._labels(labels, codec_labels, B, T)
            per_cb = self.codebook_losses(codec_logits, codec_lab)
            w = torch.tensor(cfg.codebook_loss_weights, device=per_cb.device)
            used = ~torch.isnan(per_cb)
            loss = (torch.where(used, per_cb, torch.zeros_like(per_cb)) * w).sum()
            if cfg.text_loss_weight and text_lab is not None and (text_lab[:, 1:] != IGNORE).any():
                loss = loss + cfg.text_loss_weight * F.cross_entropy(
                    text_logits[:, :-1].reshape(-1, cfg.vocab_size), text_lab[:, 1:].reshape(-1).to(loss.device),
                    ignore_index=IGNORE)
            bal = self.balance_loss(out.router_outputs, attention_mask[::K] if attention_mask is not None and
                                    attention_mask.shape[0] == B * K else attention_mask, aux_balance_weight)
            if bal is not None:
                aux_loss = bal * self.aux_loss_coef() if cfg.moe_type == "topp" else bal
                loss = loss + aux_loss
            if cfg.aux_loss_counter == "official" or (self.training and torch.is_grad_enabled()):
                self.aux_loss_step += 1
        result = MoezooAudioMoeCausalLMOutput(
            loss=loss, aux_loss=aux_loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
            router_logits=out.router_logits, codec_logits=codec_logits, text_logits=text_logits,
            codebook_losses=per_cb, router_outputs=out.router_outputs,
            **cache_kwargs(output_cache(out)))
        return result if return_dict is not False else result.to_tuple()

    # ------------------------------------------------------------------------------------------------ generation
    def bos_frame(self, batch_size: int, device=None) -> torch.Tensor:
        """The flat-layout BOS frame column (B*K, 1) that starts an utterance."""
        cfg = self.config
        return torch.full((batch_size * cfg.num_codebooks, 1), cfg.vocab_size + cfg.codec_bos_id, dtype=torch.long,
                          device=device)

    def generate(self, input_ids: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                 codec_input_ids: torch.Tensor | None = None, max_new_tokens: int = 64, min_new_tokens: int = 0,
                 logits_processor: LogitsProcessorList | None = None, **kwargs) -> torch.Tensor:
        """:meth:`GenerationMixin.generate` over audio frames honouring the delay pattern.

        ``input_ids``: flat layout (B*K, T) prompt (or the official layout with ``codec_input_ids``); a BOS frame is
        appended unless the prompt already ends with one. Every generated position is one frame: codebook ``c`` is BOS
        up to frame ``delay_pattern[c]``, then free codes; when codebook 0 emits EOS (allowed after
        ``min_new_tokens`` frames, forced at frame ``max_new_tokens - max_delay``), codebook ``c`` emits EOS
        ``delay_pattern[c]`` frames later and PAD after (every codebook gets its EOS; with ``max_new_tokens <= max delay``
        no end is forced: the frames so far, to be continued). Returns the flat ids
        (B*K, T + 1 + generated frames); :func:`split_flat` + :func:`undo_delay` give the codes.
        Greedy and sampling work; beam search and ``num_return_sequences > 1`` do not (rows are grouped by sample).
        """
        cfg = self.config
        if kwargs.get("num_beams", 1) != 1 or kwargs.get("num_return_sequences", 1) != 1:
            raise ValueError("audio_moe generate supports num_beams=1 and num_return_sequences=1 only (the "
                             "num_codebooks rows of a sample must stay together)")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if input_ids is None:
            raise ValueError("generate needs input_ids (the prompt)")
        if codec_input_ids is not None:
            input_ids = official_to_flat(cfg, input_ids, codec_input_ids)
        split_flat(cfg, input_ids)  # layout check
        K = cfg.num_codebooks
        B = input_ids.shape[0] // K
        if attention_mask is None:
            attention_mask = torch.ones(B, input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        elif attention_mask.shape[0] == B * K:
            attention_mask = attention_mask[::K]
        bos = cfg.vocab_size + cfg.codec_bos_id
        if not bool((input_ids[:, -1] == bos).all()):
            input_ids = torch.cat([input_ids, self.bos_frame(B, input_ids.device)], 1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], 1)
        proc = DelayPatternLogitsProcessor(cfg, audio_start=input_ids.shape[1] - 1, max_frames=max_new_tokens,
                                           min_frames=min_new_tokens)
        processors = LogitsProcessorList([proc] + list(logits_processor or []))
        kwargs.setdefault("do_sample", False)
        return super().generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                logits_processor=processors, eos_token_id=cfg.vocab_size + cfg.codec_eos_id,
                                pad_token_id=cfg.vocab_size + cfg.codec_pad_id, **kwargs)


class DelayPatternLogitsProcessor(LogitsProcessor):
    """Keeps generation on the delay pattern (flat layout, rows ``b*K + c``); stateless, reads the ids so far.

    Frame ``n`` = position - ``audio_start`` (the BOS frame). Text ids and BOS/PAD are never sampled freely; codebook
    ``c`` is forced to BOS while ``n <= delay[c]``; EOS is allowed on codebook 0 only, from frame ``min_frames + 1``,
    and forced at frame ``max_frames - max_delay`` (so that every codebook ends within ``max_frames``); once codebook 0
    emitted EOS at frame ``s``, codebook ``c`` is forced to EOS at ``s + delay[c]`` (PAD after that comes from
    ``generate``'s finished-row padding).
    """

    def __init__(self, config: MoezooAudioMoeConfig, audio_start: int, max_frames: int, min_frames: int = 0):
        self.K, self.V = config.num_codebooks, config.vocab_size
        self.eos, self.pad, self.bos = (config.vocab_size + config.codec_eos_id, config.vocab_size + config.codec_pad_id,
                                        config.vocab_size + config.codec_bos_id)
        self.delay = torch.tensor(config.delay_pattern)
        self.max_delay = config.max_delay
        self.audio_start, self.max_frames, self.min_frames = audio_start, max_frames, min_frames

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        K, dev = self.K, scores.device
        B = input_ids.shape[0] // K
        n = input_ids.shape[1] - self.audio_start  # frame being generated
        delay = self.delay.to(dev).repeat(B)  # (B*K,)
        neg = torch.finfo(scores.dtype).min
        s = scores.clone()
        s[:, : self.V] = neg
        s[:, self.pad] = neg
        s[:, self.bos] = neg
        cb = torch.arange(K, device=dev).repeat(B)
        # EOS frame of codebook 0 so far (per sample), -1 if none
        gen0 = input_ids.view(B, K, -1)[:, 0, self.audio_start + 1:]
        hit = torch.cat([gen0 == self.eos, gen0.new_ones(B, 1, dtype=torch.bool)], 1)  # sentinel column: no EOS
        first = hit.float().argmax(1)
        s_eos = torch.where(first < gen0.shape[1], first + 1, torch.full_like(first, -1))
        s_eos = s_eos.repeat_interleave(K)
        allow_eos = (cb == 0) & (n > self.min_frames)
        s[:, self.eos] = torch.where(allow_eos, s[:, self.eos], torch.full_like(s[:, self.eos], neg))

        def force(rows, tok):
            if rows.any():
                s[rows] = neg
                s[rows, tok] = 0.0

        if self.max_frames > self.max_delay:  # else a short budget: frames only, no forced end
            force((cb == 0) & (s_eos < 0) & (n >= self.max_frames - self.max_delay), self.eos)
        force((s_eos >= 0) & (n == s_eos + delay), self.eos)
        force((s_eos >= 0) & (n > s_eos + delay), self.pad)
        force(n <= delay, self.bos)
        return s


__all__ = ["MoezooAudioMoeModel", "MoezooAudioMoeForCausalLM", "MoezooAudioMoePreTrainedModel",
           "MoezooAudioMoeCausalLMOutput", "MoezooAudioMoeModelOutput", "DelayPatternLogitsProcessor",
           "official_to_flat", "flat_from_parts", "position_ids_from_mask", "split_flat", "apply_delay", "undo_delay", "zero_expert_padding"]
