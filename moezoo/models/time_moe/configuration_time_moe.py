"""Configuration of ``time_moe``: Time-MoE, a decoder-only MoE forecaster with multi-resolution horizon heads."""
from __future__ import annotations

import copy

from ...core.parallel import base_model_ep_plan
from ...modeling_utils import MoezooConfig

LABEL_PADDING = ("exclude", "official")


class MoezooTimeMoeConfig(MoezooConfig):
    """Time-MoE (Shi et al., 2024) on the shared backbone.

    A series point (``input_size`` channels) is one token: SwiGLU-like point embedding
    ``silu(gate_layer(x)) * emb_layer(x)`` -> N x [RMSNorm -> RoPE attention (q/k/v bias, no o bias) -> RMSNorm ->
    FFN] -> RMSNorm -> one linear head per horizon in ``horizon_lengths`` (position t predicts points t+1..t+h).
    The FFN is a :class:`moezoo.core.MoELayer`: softmax top-k router whose weights are NOT renormalised (official),
    ``num_experts`` SwiGLU experts of width ``moe_intermediate_size`` and one shared SwiGLU expert of width
    ``intermediate_size`` scaled by ``sigmoid(shared_expert_gate(x))``. With ``use_dense=True`` the FFN is a dense
    SwiGLU MLP of width ``dense_intermediate_size`` (the official ``use_dense``, and the "dense model with the same
    active parameters" baseline of :func:`dense_config_like`).

    Args (besides the MoE fields of :class:`moezoo.MoezooConfig`):
        input_size: channels per token (1 in the released models: channel-independent).
        hidden_size, num_hidden_layers, num_attention_heads: transformer sizes.
        num_key_value_heads: KV heads (grouped-query attention); ``None`` = ``num_attention_heads``.
        intermediate_size: width of the shared expert (the official ``intermediate_size``).
        moe_intermediate_size: width of each routed expert; ``None`` = ``intermediate_size // num_experts_per_tok``
            (the official rule).
        horizon_lengths: output horizons, one head each (strictly increasing; the official head choice scans them in
            order).
        max_position_embeddings, rope_theta: RoPE (forecast contexts are checked against the former).
        rms_norm_eps, attention_dropout, attention_bias (q/k/v only; o_proj never has a bias): as in the official code.
        huber_delta: delta of the Huber loss of every head (2.0).
        label_padding: the h > 1 heads see targets t+1..t+h, past the end of the labels for the last h-1 positions.
            ``"exclude"`` (default) leaves those padded targets out of the loss; ``"official"`` zero-pads them and
            counts them in the mean when no ``loss_masks`` are given (the released code; converted checkpoints use it
            so that ``moezoo parity`` reproduces the official loss). With ``loss_masks`` both agree.
        use_dense, dense_intermediate_size: dense SwiGLU FFN instead of MoE (width default ``intermediate_size``).
        router_aux_loss_coef: weight of the switch balance loss (the official ``router_aux_loss_factor`` = 0.02).
        embedding_initializer_range: std of the normal init of the point embedding's two ``Linear(input_size,
            hidden)`` layers (default 1.0 = 1/sqrt(fan_in) for one channel); ``None`` uses ``initializer_range`` as the
            official code does. Only fresh weights depend on it. With the official 0.02 the embedding
            ``silu(a x) * b x ~ (a b / 2) x^2`` is almost blind to the sign of x at init (the odd term is ~100x
            smaller), so small-budget training sits for many steps on the context-mean forecast.
        context_window: the longest sequence (context + points forecast so far) that ``model.forecast`` lets the
            model attend over; longer forecasts roll on, re-encoding only the most recent points (see
            :func:`moezoo.models.time_moe.forecasting.forecast`). ``None`` (official, default): no limit. Models
            trained here on windows of W points store W: beyond W the model meets query-key distances it never saw.

    Defaults are the released Time-MoE-50M (``time_moe_50m``).
    """

    model_type = "moezoo_time_moe"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
    }
    base_model_ep_plan = base_model_ep_plan("layers.*.mlp")  # SwiGLU experts without biases (moezoo.core.parallel)

    input_size: int = 1
    hidden_size: int = 384
    intermediate_size: int = 1536
    moe_intermediate_size: int | None = None
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    horizon_lengths: list[int] | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    attention_bias: bool = True
    huber_delta: float = 2.0
    label_padding: str = "exclude"
    use_dense: bool = False
    dense_intermediate_size: int | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = False
    # MoE defaults of the released models (override the MoezooConfig base values)
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.02
    router_z_loss_coef: float = 0.0
    num_shared_experts: int = 1
    shared_intermediate_size: int | None = None
    shared_expert_gate: bool = True
    embedding_initializer_range: float | None = 1.0
    context_window: int | None = None

    def __post_init__(self, **kwargs):
        for name in ("input_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "num_experts", "num_experts_per_tok"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.horizon_lengths is None:
            self.horizon_lengths = [1, 8, 32, 64]
        if isinstance(self.horizon_lengths, int):
            self.horizon_lengths = [self.horizon_lengths]
        hl = list(self.horizon_lengths)
        if not hl or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hl):
            raise ValueError(f"horizon_lengths must be a non-empty list of positive ints, got {self.horizon_lengths!r}")
        if any(b <= a for a, b in zip(hl, hl[1:])):
            raise ValueError(f"horizon_lengths must be strictly increasing, got {hl}")
        self.horizon_lengths = hl
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_attention_heads="
                             f"{self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"head dim hidden_size/num_attention_heads must be even for RoPE, got "
                             f"{self.hidden_size // self.num_attention_heads}")
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be divisible by "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = max(1, self.intermediate_size // self.num_experts_per_tok)
        if self.shared_intermediate_size is None:
            self.shared_intermediate_size = self.intermediate_size
        if self.dense_intermediate_size is None:
            self.dense_intermediate_size = self.intermediate_size
        if not isinstance(self.dense_intermediate_size, int) or self.dense_intermediate_size <= 0:
            raise ValueError(f"dense_intermediate_size must be a positive int, got {self.dense_intermediate_size!r}")
        if self.label_padding not in LABEL_PADDING:
            raise ValueError(f"label_padding must be one of {LABEL_PADDING}, got {self.label_padding!r}")
        cw = self.context_window
        if cw is not None and (isinstance(cw, bool) or not isinstance(cw, int) or cw < 2):
            raise ValueError(f"context_window must be an int >= 2 or None, got {cw!r}")
        eir = self.embedding_initializer_range
        if eir is not None and (isinstance(eir, bool) or not isinstance(eir, (int, float)) or not eir > 0):
            raise ValueError(f"embedding_initializer_range must be a positive number or None, got {eir!r}")
        if not self.huber_delta > 0:
            raise ValueError(f"huber_delta must be > 0, got {self.huber_delta!r}")
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_horizon_length(self) -> int:
        return max(self.horizon_lengths)


def _ffn_active_params(config: MoezooTimeMoeConfig) -> int:
    """Parameters one token uses in one FFN layer (router + k routed experts + shared expert + its gate)."""
    H = config.hidden_size
    if config.use_dense:
        return 3 * H * config.dense_intermediate_size
    shared = config.num_shared_experts * config.shared_intermediate_size
    gate = H if (config.shared_expert_gate and config.num_shared_experts) else 0
    return config.num_experts * H + 3 * H * (config.num_experts_per_tok * config.moe_intermediate_size + shared) + gate


def dense_config_like(config: MoezooTimeMoeConfig) -> MoezooTimeMoeConfig:
    """The dense Time-MoE whose active parameter count matches ``config`` (the "same active parameters" baseline).

    Everything but the FFN is shared, so only the FFN width changes. One MoE FFN layer uses per token
    ``E*H`` (router) ``+ 3*H*(k*I_moe + S*I_shared)`` (k routed + shared SwiGLU experts) ``+ H`` (shared-expert gate);
    a dense SwiGLU FFN of width D uses ``3*H*D``. Hence
    ``D = k*I_moe + S*I_shared + round((E + 1) / 3)``: exact when ``E + 1`` is divisible by 3 (e.g. 8 experts),
    otherwise within ``H`` parameters per layer. Already-dense configs are returned as a copy.
    """
    if not isinstance(config, MoezooTimeMoeConfig):
        raise TypeError(f"config must be a MoezooTimeMoeConfig, got {type(config).__name__}")
    if config.use_dense:
        return copy.deepcopy(config)
    per_layer = _ffn_active_params(config)
    width = int(round(per_layer / (3 * config.hidden_size)))
    kwargs = config.to_dict()
    for k in ("model_type", "transformers_version", "architectures", "_name_or_path", "moezoo_model_name"):
        kwargs.pop(k, None)
    kwargs.update(use_dense=True, dense_intermediate_size=width)
    dense = MoezooTimeMoeConfig(**kwargs)
    name = getattr(config, "moezoo_model_name", None)
    if name:
        dense.moezoo_model_name = f"{name}.dense"
    return dense


__all__ = ["MoezooTimeMoeConfig", "dense_config_like", "LABEL_PADDING"]
