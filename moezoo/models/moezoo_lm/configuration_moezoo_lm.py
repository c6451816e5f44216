"""Configuration of ``moezoo_lm``: a small decoder-only Mixture-of-Experts causal language model."""
from __future__ import annotations

from ...core.parallel import base_model_ep_plan
from ...modeling_utils import MoezooConfig, check_decoder_attention


class MoezooLMConfig(MoezooConfig):
    """A decoder-only MoE language model built from the shared backbone.

    Every layer is pre-norm RMSNorm -> RoPE attention (grouped-query, optional q/k RMSNorm) -> RMSNorm -> FFN, where the
    FFN is a :class:`moezoo.core.MoELayer` (top-k router, 3-D SwiGLU experts, optional shared experts) except in the
    first ``first_k_dense_replace`` layers and layers not on the ``decoder_sparse_step`` grid, which use a dense SwiGLU
    MLP of width ``intermediate_size``.

    Args (besides the MoE fields of :class:`moezoo.MoezooConfig`):
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads: the transformer sizes.
        num_key_value_heads: KV heads (grouped-query attention); ``None`` = ``num_attention_heads``.
        head_dim: per-head width; ``None`` = ``hidden_size // num_attention_heads``.
        intermediate_size: width of the dense MLP layers (``None`` = ``4 * moe_intermediate_size``).
        first_k_dense_replace, decoder_sparse_step: which layers are dense (layer i is MoE iff
            ``i >= first_k_dense_replace`` and ``(i + 1) % decoder_sparse_step == 0``).
        max_position_embeddings, rope_parameters: RoPE (``{"rope_type": "default", "rope_theta": 10000.0}``).
        qk_norm: RMSNorm on queries and keys per head (Qwen3 / OLMoE style).
        rms_norm_eps, attention_bias, attention_dropout, tie_word_embeddings, use_cache: as in Llama.
    """

    model_type = "moezoo_lm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    default_theta = 10000.0

    # tensor / expert / pipeline parallel plans, mirroring transformers' Qwen3-MoE / Mixtral (transformers 5.23)
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_ep_plan = base_model_ep_plan("layers.*.mlp")  # SwiGLU experts without biases (moezoo.core.parallel)
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int | None = None
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rope_parameters: dict | None = None
    rms_norm_eps: float = 1e-6
    qk_norm: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    first_k_dense_replace: int = 0
    decoder_sparse_step: int = 1
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        check_decoder_attention(self)
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.moe_intermediate_size
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        if self.first_k_dense_replace < 0:
            raise ValueError(f"first_k_dense_replace must be >= 0, got {self.first_k_dense_replace}")
        super().__post_init__(**kwargs)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and (layer_idx + 1) % self.decoder_sparse_step == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))


__all__ = ["MoezooLMConfig"]
