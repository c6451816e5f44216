"""Configuration of ``moezoo_dit_moe``: class-conditional diffusion transformers with MoE FFNs (DiT-MoE, ProMoE)."""
from __future__ import annotations

from ...core.parallel import base_model_ep_plan
from ...modeling_utils import MoezooConfig


class MoezooDiTMoeConfig(MoezooConfig):
    """A DiT (adaLN-Zero blocks over patch tokens) whose FFNs are :class:`moezoo.core.MoELayer` s.

    One config covers both papers:

    - **DiT-MoE** (Fei et al.): every block is MoE (``moe_every=1``), SwiGLU experts of width
      ``mlp_ratio * hidden_size`` without biases, softmax top-k router (un-renormalised), 2 always-on shared SwiGLU
      experts of width ``hidden_size`` each (one fused MLP of ``2 * hidden_size``), balance loss
      ``0.01 * E * sum_e P_e * f_e`` with ``f_e`` the share of the ``T * k`` routing slots (``"slots"``).
    - **ProMoE** (two-step router): MoE in odd blocks (``moe_every=2``; the others use a dense GELU-tanh MLP of width
      ``mlp_ratio * hidden_size``), prototypical router (``router_type="prototype"``, cosine to learnable prototypes,
      ``weight_mode="identity"``), an unconditional expert that takes every token of null-class samples
      (``unconditional_expert=True``), GELU-tanh experts with biases, one shared expert, and the routing contrastive
      loss (``routing_contrastive_coef``, ``routing_contrastive_tau``).

    Args (besides the MoE fields of :class:`moezoo.MoezooConfig`):
        sample_size: input height = width (latent or pixel), in_channels: input channels, patch_size: p.
        hidden_size, num_hidden_layers, num_attention_heads, head_dim (None = hidden / heads), mlp_ratio: the DiT sizes.
        num_classes: class labels ``[0, num_classes)``; null_class_id: the label of the null / CFG class (default
            ``num_classes``: the extra embedding row); use_null_class_embedding: the label table has the null row
            (default: when ``class_dropout_prob > 0``, as the official code).
        class_dropout_prob: label dropout in training (classifier-free guidance).
        learn_sigma: predict the variance too (``out_channels = 2 * in_channels``).
        frequency_embedding_size: width of the sinusoidal timestep features.
        qk_norm: LayerNorm on queries and keys (ProMoE option).
        moe_every / moe_layers: block i is MoE iff ``i % moe_every == moe_every - 1`` (1: all, 2: odd blocks), or
            ``i in moe_layers`` when that list is given.
        moe_intermediate_size: expert width (None = ``int(mlp_ratio * hidden_size)``).
        gated_experts, expert_bias, hidden_act: SwiGLU-style ``act(gate) * up`` (DiT-MoE) or plain ``act(up)``
            (ProMoE, with biases and ``gelu_tanh``).
        num_shared_experts, shared_intermediate_size (None = ``hidden_size``), shared_gated: shared expert(s).
        unconditional_expert: ProMoE's conditional routing (null-class tokens -> a dedicated expert, any router).
        router_aux_loss_coef, balance_loss_normalize: balance loss weight (summed over MoE layers) and its ``f_e``
            convention (``"slots"``: DiT-MoE / ProMoE; ``"tokens"``: transformers / Switch).
        routing_contrastive_coef, routing_contrastive_tau, routing_contrastive_top_k: ProMoE's RCL (``lambda``,
            temperature, assignment by any top-k slot or by the first one).
        cfg_channels: channels :meth:`forward_with_cfg` guides (None = all ``in_channels``; 3 = the official code).
        adaln_zero_init: the official adaLN-Zero init (modulations and output layer zero); False initialises them
            like the other linear layers (the output is then non-zero at step 0).
    """

    model_type = "moezoo_dit_moe"

    @property
    def base_model_ep_plan(self) -> dict[str, str]:
        """transformers' expert-parallel plan, derived from the expert layout (DiT-MoE: ``gate_up_proj``; ProMoE:
        ``up_proj`` with per-expert biases)."""
        return base_model_ep_plan("blocks.*.mlp", gated=self.gated_experts, bias=self.expert_bias)

    sample_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 384
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    head_dim: int | None = None
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    null_class_id: int | None = None
    use_null_class_embedding: bool | None = None
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    frequency_embedding_size: int = 256
    qk_norm: bool = False
    moe_every: int = 1
    moe_layers: list[int] | None = None
    # MoE (DiT-MoE defaults; transformers' names)
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = False
    router_type: str = "topk"
    router_kwargs: dict | None = None
    hidden_act: str = "silu"
    gated_experts: bool = True
    expert_bias: bool = False
    num_shared_experts: int = 2
    shared_intermediate_size: int | None = None
    shared_gated: bool = True
    unconditional_expert: bool = False
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    balance_loss_normalize: str = "slots"
    routing_contrastive_coef: float = 0.0
    routing_contrastive_tau: float = 0.07
    routing_contrastive_top_k: bool = True
    cfg_channels: int | None = None
    adaln_zero_init: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        for name in ("sample_size", "in_channels", "patch_size", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "num_classes", "frequency_embedding_size", "moe_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.sample_size % self.patch_size:
            raise ValueError(f"sample_size={self.sample_size} must be divisible by patch_size={self.patch_size}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_attention_heads="
                             f"{self.num_attention_heads} (or set head_dim)")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by 4 (2-D sin-cos positions)")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a number > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= float(self.class_dropout_prob) < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob!r}")
        if self.null_class_id is None:
            self.null_class_id = self.num_classes
        if not isinstance(self.null_class_id, int) or self.null_class_id < 0:
            raise ValueError(f"null_class_id must be a non-negative int, got {self.null_class_id!r}")
        if self.use_null_class_embedding is None:
            self.use_null_class_embedding = self.class_dropout_prob > 0
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = int(self.mlp_ratio * self.hidden_size)
        if self.shared_intermediate_size is None:
            self.shared_intermediate_size = self.hidden_size
        if self.moe_layers is not None:
            layers = [int(i) for i in self.moe_layers]
            if any(not 0 <= i < self.num_hidden_layers for i in layers) or len(set(layers)) != len(layers):
                raise ValueError(f"moe_layers must be distinct block ids in [0, {self.num_hidden_layers}), "
                                 f"got {self.moe_layers}")
            self.moe_layers = sorted(layers)
        if self.balance_loss_normalize not in ("slots", "tokens"):
            raise ValueError(f"balance_loss_normalize must be 'slots' or 'tokens', got {self.balance_loss_normalize!r}")
        if self.routing_contrastive_tau <= 0:
            raise ValueError(f"routing_contrastive_tau must be > 0, got {self.routing_contrastive_tau!r}")
        if self.cfg_channels is not None and not 1 <= int(self.cfg_channels) <= self.out_channels:
            raise ValueError(f"cfg_channels must be None or in [1, out_channels={self.out_channels}], "
                             f"got {self.cfg_channels!r}")
        super().__post_init__(**kwargs)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.sample_size // self.patch_size) ** 2

    @property
    def num_label_embeddings(self) -> int:
        """Rows of the label table: the classes (+ the null row when it is used)."""
        return max(self.num_classes, self.null_class_id + 1) if self.use_null_class_embedding else self.num_classes

    def is_moe_layer(self, layer_idx: int) -> bool:
        if self.moe_layers is not None:
            return layer_idx in self.moe_layers
        return layer_idx % self.moe_every == self.moe_every - 1

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))


__all__ = ["MoezooDiTMoeConfig"]
