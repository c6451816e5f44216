"""Configuration of ``audio_moe``: a UniMoE-Audio-style decoder-only MoE language model over text and codec tokens."""
from __future__ import annotations

from ...core import MoELayerConfig
from ...modeling_utils import MoezooConfig, check_decoder_attention

MOE_TYPES = ("topp", "topk", "adamoe", "moepp")
TOPP_WEIGHTINGS = ("paper", "official")
AUX_COUNTERS = ("train", "official")


class MoezooAudioMoeConfig(MoezooConfig):
    """A decoder-only MoE LM whose sequence is text tokens followed by ``num_codebooks`` codec streams.

    One sequence position is either a text token or one audio frame (all codebooks). An audio frame is embedded as the
    SUM over codebooks of ``codec_embed_tokens[c](code_c)``; the output has one head per codebook (rows
    ``c * codec_vocab_size .. (c + 1) * codec_vocab_size - 1`` of ``codec_head``) and a text head ``lm_head``.
    Codebook ``c`` is delayed by ``delay_pattern[c]`` frames (MusicGen / UniMoE-Audio): frame 0 of an utterance is the
    BOS frame, codebook ``c`` holds BOS up to frame ``delay_pattern[c]``, then its codes, one EOS, then PAD.
    Codec ids per codebook: codes ``0 .. codebook_size - 1``, then EOS, PAD, BOS (``codec_vocab_size =
    codebook_size + 3``). In the flat token space that :meth:`~transformers.GenerationMixin.generate` sees, codec id
    ``v`` is token ``vocab_size + v``.

    Every decoder layer is Qwen2.5-style: RMSNorm -> GQA RoPE attention (q/k/v with bias by ``attention_bias``, o_proj
    without) -> residual -> RMSNorm -> :class:`moezoo.core.MoELayer` -> residual.

    MoE layer by ``moe_type``:
        ``"topp"``: dynamic capacity. Top-p routing (threshold ``router_top_p``) over the ``num_experts`` routed experts and
            ``num_null_experts`` null experts, plus ``num_shared_experts`` shared experts. ``topp_weighting="paper"``
            (default): each selected expert weighted by its own softmax probability (UniMoE-Audio paper Eq. 3 /
            "Harder Tasks Need More Experts"), shared experts always on with weight 1. ``"official"``: the released
            UniMoE-Audio code (deterministic SparseMixer multipliers times the dynamic group's masked-softmax mass,
            shared experts weighted by their own masked-softmax probability; see :class:`moezoo.core.routing.TopPRouter`).
            Balance loss: :func:`moezoo.core.losses.unimoe_audio_balance_loss` per layer, averaged over layers.
        ``"topk"``: top-k (``num_experts_per_tok``) + optional shared experts; switch balance + z-loss.
        ``"adamoe"``: AdaMoE top-k over routed + ``num_null_experts`` null experts (selected true experts renormalised).
        ``"moepp"``: MoE++ top-k over routed + zero / copy / constant experts with a gating residual between layers.

    Args (besides the MoE fields of :class:`moezoo.MoezooConfig`):
        vocab_size: text vocabulary size.
        hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim: transformer sizes.
        num_codebooks, codebook_size: K and the number of codes per codebook.
        delay_pattern: K non-negative ints (default ``[0, 1, ..., K-1]``).
        codebook_loss_weights: K weights of the per-codebook cross-entropies (default all 1; the loss is their
            weighted sum); ``text_loss_weight``: weight of the next-text-token loss (0: no text loss).
        codec_placeholder_id: text id that marks audio positions in the official input layout (``input_ids`` +
            ``codec_input_ids``); ``None`` disables that layout.
        router_top_p, topp_weighting, num_null_experts, sparsemixer_eps: top-p routing (see above); named
            ``router_top_p``, not ``top_p``, because transformers copies a config's ``top_p`` into the generation
            config as the nucleus-sampling threshold.
        num_zero_experts, num_copy_experts, num_constant_experts, gating_residual: MoE++ options.
        router_aux_loss_coef: weight of the balance loss; for ``"topp"`` it decays linearly to
            ``router_aux_loss_min_coef`` over ``router_aux_loss_decay_steps`` steps (0 = constant).
        aux_loss_counter: which forwards advance that step counter: ``"train"`` (default: training-mode forwards with
            labels and autograd on) or ``"official"`` (every forward with labels, as the released code: identical eval
            calls then return different losses).
        rope_theta, max_position_embeddings, rms_norm_eps, attention_bias, use_cache: as in Qwen2.
    """

    model_type = "moezoo_audio_moe"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }

    vocab_size: int = 256
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    attention_bias: bool = True
    attention_dropout: float = 0.0
    use_cache: bool = True
    tie_word_embeddings: bool = False

    num_codebooks: int = 4
    codebook_size: int = 1024
    delay_pattern: list[int] | None = None
    codebook_loss_weights: list[float] | None = None
    text_loss_weight: float = 0.0
    codec_placeholder_id: int | None = None

    moe_type: str = "topp"
    router_type: str = "topp"
    router_top_p: float = 0.7
    topp_weighting: str = "paper"
    num_null_experts: int = 1
    sparsemixer_eps: float = 0.01
    num_zero_experts: int = 0
    num_copy_experts: int = 0
    num_constant_experts: int = 0
    gating_residual: bool = True
    router_aux_loss_min_coef: float | None = None
    router_aux_loss_decay_steps: int = 0
    aux_loss_counter: str = "train"

    def __post_init__(self, **kwargs):
        check_decoder_attention(self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                       "num_codebooks", "codebook_size"))
        K = self.num_codebooks
        if self.delay_pattern is None:
            self.delay_pattern = list(range(K))
        self.delay_pattern = [int(d) for d in self.delay_pattern]
        if len(self.delay_pattern) != K or any(d < 0 for d in self.delay_pattern):
            raise ValueError(f"delay_pattern must hold num_codebooks={K} non-negative ints, got {self.delay_pattern}")
        if self.codebook_loss_weights is None:
            self.codebook_loss_weights = [1.0] * K
        self.codebook_loss_weights = [float(w) for w in self.codebook_loss_weights]
        if len(self.codebook_loss_weights) != K or any(w < 0 for w in self.codebook_loss_weights):
            raise ValueError(f"codebook_loss_weights must hold num_codebooks={K} non-negative numbers, "
                             f"got {self.codebook_loss_weights}")
        if self.text_loss_weight < 0:
            raise ValueError(f"text_loss_weight must be >= 0, got {self.text_loss_weight}")
        if self.moe_type not in MOE_TYPES:
            raise ValueError(f"moe_type must be one of {MOE_TYPES}, got {self.moe_type!r}")
        self.router_type = {"topp": "topp", "topk": "topk", "adamoe": "topk_null", "moepp": "moepp"}[self.moe_type]
        if self.topp_weighting not in TOPP_WEIGHTINGS:
            raise ValueError(f"topp_weighting must be one of {TOPP_WEIGHTINGS}, got {self.topp_weighting!r}")
        if self.aux_loss_counter not in AUX_COUNTERS:
            raise ValueError(f"aux_loss_counter must be one of {AUX_COUNTERS}, got {self.aux_loss_counter!r}")
        if isinstance(self.router_top_p, bool) or not 0.0 < float(self.router_top_p) <= 1.0:
            raise ValueError(f"router_top_p must be a number in (0, 1], got {self.router_top_p!r}")
        if self.moe_type == "adamoe" and self.num_null_experts < 1:
            raise ValueError("moe_type='adamoe' needs num_null_experts >= 1")
        if self.moe_type == "topp" and self.topp_weighting == "official" and self.num_shared_experts < 0:
            raise ValueError("num_shared_experts must be >= 0")
        if self.router_aux_loss_decay_steps < 0:
            raise ValueError(f"router_aux_loss_decay_steps must be >= 0, got {self.router_aux_loss_decay_steps}")
        if self.moe_type == "topp" and self.num_experts_per_tok > self.num_experts:
            self.num_experts_per_tok = self.num_experts  # unused by top-p; keep the base check happy
        super().__post_init__(**kwargs)

    # ------------------------------------------------------------------------------------------------ codec ids
    @property
    def codec_vocab_size(self) -> int:
        return self.codebook_size + 3

    @property
    def codec_eos_id(self) -> int:
        return self.codebook_size

    @property
    def codec_pad_id(self) -> int:
        return self.codebook_size + 1

    @property
    def codec_bos_id(self) -> int:
        return self.codebook_size + 2

    @property
    def flat_vocab_size(self) -> int:
        """Size of the flat token space ``generate`` works in: text ids, then codec ids offset by ``vocab_size``."""
        return self.vocab_size + self.codec_vocab_size

    @property
    def max_delay(self) -> int:
        return max(self.delay_pattern)

    # ------------------------------------------------------------------------------------------------ MoE layers
    def moe_layer_config(self, **overrides) -> MoELayerConfig:
        """The :class:`moezoo.core.MoELayerConfig` of ``moe_type`` (``build_moe_layer`` builds the layer from it)."""
        E, S, N = self.num_experts, self.num_shared_experts, self.num_null_experts
        # zero-FLOP experts only where moe_type asks for them; norm_topk_prob only for the top-k router
        extra: dict = dict(num_null_experts=0, num_zero_experts=0, num_copy_experts=0, num_constant_experts=0,
                           norm_topk_prob=self.norm_topk_prob if self.router_type == "topk" else None)
        if self.moe_type == "topp":
            if self.topp_weighting == "official":
                # shared experts are router-weighted, always-selected experts after the routed ones
                inter = max(self.moe_intermediate_size, self.shared_intermediate_size or self.moe_intermediate_size)
                extra.update(num_experts=E + S, num_experts_per_tok=E + S + N, moe_intermediate_size=inter,
                             num_null_experts=N, num_shared_experts=0,
                             router_kwargs={"top_p": float(self.router_top_p), "convention": "unimoe_audio",
                                            "fixed_expert_ids": list(range(E, E + S)),
                                            "sparsemixer_eps": float(self.sparsemixer_eps)})
            else:
                extra.update(num_experts_per_tok=E + N, num_null_experts=N,
                             router_kwargs={"top_p": float(self.router_top_p), "convention": "dynamic_moe"})
        elif self.moe_type == "adamoe":
            extra.update(num_null_experts=N, router_kwargs={"num_true_experts": E})
        elif self.moe_type == "moepp":
            extra.update(num_zero_experts=self.num_zero_experts, num_copy_experts=self.num_copy_experts,
                         num_constant_experts=self.num_constant_experts,
                         router_kwargs={"gating_residual": self.gating_residual})
        if "router_kwargs" in extra:
            extra["router_kwargs"] = {**(self.router_kwargs or {}), **extra["router_kwargs"]}
        return MoELayerConfig.from_config(self, **{**extra, **overrides})

    def expert_widths(self) -> list[int] | None:
        """Real intermediate width of each FFN expert when experts of two widths share one zero-padded 3-D tensor
        (official top-p: routed experts, then shared ones); ``None`` when all experts have the stored width."""
        if self.moe_type == "topp" and self.topp_weighting == "official" and self.num_shared_experts:
            s = self.shared_intermediate_size or self.moe_intermediate_size
            if s != self.moe_intermediate_size:
                return [self.moe_intermediate_size] * self.num_experts + [s] * self.num_shared_experts
        return None


__all__ = ["MoezooAudioMoeConfig", "MOE_TYPES"]
