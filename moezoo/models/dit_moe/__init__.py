"""``dit_moe``: class-conditional diffusion transformers with MoE FFNs - DiT-MoE and ProMoE on the shared backbone.

Registry: DiT-MoE S/B/L/XL/G (patch 2/4/8, the paper's expert counts), ProMoE S/B/L/XL (12 routed experts top-1 +
unconditional + shared expert, MoE in odd blocks) and two pixel-space tiny models for Fashion-MNIST on a CPU
(``dit_moe_tiny_e4k2``, ``promoe_tiny_e4k1``).
"""
from ...registry import register_family, register_model
from .configuration_dit_moe import MoezooDiTMoeConfig
from .modeling_dit_moe import MoezooDiTMoeModel, MoezooDiTMoeOutput, MoezooDiTMoePreTrainedModel

register_family("dit_moe", config_class=MoezooDiTMoeConfig, model_class=MoezooDiTMoeModel, card="dit_moe",
                default_class=MoezooDiTMoeModel,
                description="class-conditional diffusion transformer with MoE FFNs (DiT-MoE, ProMoE)")

# DiT sizes (hidden, depth, heads); G from DiT-MoE's models.py
_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16), "g": (1408, 40, 16)}
# latent ImageNet 256 (32x32x4 SD-VAE latents), 1000 classes
_LATENT = dict(sample_size=32, in_channels=4, num_classes=1000, learn_sigma=True, class_dropout_prob=0.1)


def _dit_moe(size: str, patch: int, experts: int, top_k: int = 2) -> dict:
    hidden, depth, heads = _SIZES[size]
    return dict(_LATENT, patch_size=patch, hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
                mlp_ratio=4.0, num_experts=experts, num_experts_per_tok=top_k, num_shared_experts=2,
                shared_intermediate_size=hidden, router_type="topk", norm_topk_prob=False,
                router_aux_loss_coef=0.01, balance_loss_normalize="slots")


def _promoe(size: str, patch: int = 2, experts: int = 12, top_k: int = 1) -> dict:
    hidden, depth, heads = _SIZES[size]
    return dict(_LATENT, patch_size=patch, hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
                mlp_ratio=4.0, moe_every=2, num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=2 * hidden, router_type="prototype", router_kwargs={"weight_mode": "identity"},
                norm_topk_prob=False, hidden_act="gelu_tanh", gated_experts=False, expert_bias=True,
                num_shared_experts=1, shared_intermediate_size=2 * hidden, shared_gated=False,
                unconditional_expert=True, router_aux_loss_coef=0.0, routing_contrastive_coef=1.0,
                routing_contrastive_tau=0.07, routing_contrastive_top_k=True)


# registry-test variants: >= 2 MoE layers, E > k, non-zero init so one backward step reaches every expert
_TINY = dict(sample_size=8, in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2, num_classes=10,
             num_experts=4, adaln_zero_init=False, frequency_embedding_size=32)
_TINY_DIT = dict(_TINY, num_hidden_layers=2, num_experts_per_tok=2, moe_intermediate_size=64,
                 shared_intermediate_size=32)
_TINY_PRO = dict(_TINY, num_hidden_layers=4, num_experts_per_tok=1, moe_intermediate_size=64,
                 shared_intermediate_size=64)


@register_model(family="dit_moe", config=_dit_moe("s", 2, 8), tiny=_TINY_DIT)
def dit_moe_s2_e8k2(config):
    """DiT-MoE-S/2-8E2A (latent 32x32x4): 8 SwiGLU experts top-2 + 2 shared experts in every block."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_dit_moe("s", 2, 16), tiny=_TINY_DIT)
def dit_moe_s2_e16k2(config):
    """DiT-MoE-S/2-16E2A (latent 32x32x4): 16 experts top-2 + 2 shared experts."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_dit_moe("s", 4, 8), tiny=_TINY_DIT)
def dit_moe_s4_e8k2(config):
    """DiT-MoE-S/4-8E2A (latent 32x32x4, patch 4)."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_dit_moe("b", 2, 8), tiny=_TINY_DIT)
def dit_moe_b2_e8k2(config):
    """DiT-MoE-B/2-8E2A (latent 32x32x4)."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_dit_moe("b", 4, 8), tiny=_TINY_DIT)
def dit_moe_b4_e8k2(config):
    """DiT-MoE-B/4-8E2A (latent 32x32x4, patch 4)."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_dit_moe("l", 2, 8), tiny=_TINY_DIT)
def dit_moe_l2_e8k2(config):
    """DiT-MoE-L/2-8E2A (latent 32x32x4)."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_dit_moe("xl", 2, 8), tiny=_TINY_DIT)
def dit_moe_xl2_e8k2(config):
    """DiT-MoE-XL/2-8E2A (latent 32x32x4), the paper's main ImageNet-256 model."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_dit_moe("g", 2, 16), tiny=_TINY_DIT)
def dit_moe_g2_e16k2(config):
    """DiT-MoE-G/2-16E2A (hidden 1408, depth 40; ~16.5B parameters), the paper's largest model."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_dit_moe("s", 8, 8), tiny=_TINY_DIT)
def dit_moe_s8_e8k2(config):
    """DiT-MoE-S/8-8E2A (latent 32x32x4, patch 8: 16x fewer tokens than patch 2)."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_dit_moe("b", 8, 8), tiny=_TINY_DIT)
def dit_moe_b8_e8k2(config):
    """DiT-MoE-B/8-8E2A (latent 32x32x4, patch 8: 16x fewer tokens than patch 2)."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_dit_moe("l", 4, 8), tiny=_TINY_DIT)
def dit_moe_l4_e8k2(config):
    """DiT-MoE-L/4-8E2A (latent 32x32x4, patch 4: 4x fewer tokens than patch 2)."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_dit_moe("l", 8, 8), tiny=_TINY_DIT)
def dit_moe_l8_e8k2(config):
    """DiT-MoE-L/8-8E2A (latent 32x32x4, patch 8: 16x fewer tokens than patch 2)."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_dit_moe("xl", 4, 8), tiny=_TINY_DIT)
def dit_moe_xl4_e8k2(config):
    """DiT-MoE-XL/4-8E2A (latent 32x32x4, patch 4: 4x fewer tokens than patch 2)."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_dit_moe("xl", 8, 8), tiny=_TINY_DIT)
def dit_moe_xl8_e8k2(config):
    """DiT-MoE-XL/8-8E2A (latent 32x32x4, patch 8: 16x fewer tokens than patch 2)."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_promoe("s"), tiny=_TINY_PRO)
def promoe_s2_e12k1(config):
    """ProMoE-S/2: 12 prototype-routed experts top-1 + unconditional + shared expert in odd blocks, RCL."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_promoe("b"), tiny=_TINY_PRO)
def promoe_b2_e12k1(config):
    """ProMoE-B/2 (12 routed experts top-1, latent 32x32x4)."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_promoe("l"), tiny=_TINY_PRO)
def promoe_l2_e12k1(config):
    """ProMoE-L/2 (12 routed experts top-1, latent 32x32x4)."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=_promoe("xl"), tiny=_TINY_PRO)
def promoe_xl2_e12k1(config):
    """ProMoE-XL/2 (12 routed experts top-1, latent 32x32x4)."""
    return MoezooDiTMoeModel(config)


# pixel-space Fashion-MNIST (28x28x1, 10 classes) models that train on a CPU in minutes
_FMNIST = dict(sample_size=28, in_channels=1, patch_size=4, hidden_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_classes=10, learn_sigma=True, class_dropout_prob=0.1)


@register_model(family="dit_moe", config=dict(_FMNIST, num_experts=4, num_experts_per_tok=2, mlp_ratio=2.0,
                                              num_shared_experts=2, shared_intermediate_size=64),
                tiny=_TINY_DIT)
def dit_moe_tiny_e4k2(config):
    """Pixel-space DiT-MoE for Fashion-MNIST (28x28x1, patch 4, hidden 128, 4 blocks, 4 experts top-2)."""
    return MoezooDiTMoeModel(config)


@register_model(family="dit_moe", config=dict(_promoe("s"), **_FMNIST, num_experts=4, moe_intermediate_size=256,
                                              shared_intermediate_size=256),
                tiny=_TINY_PRO)
def promoe_tiny_e4k1(config):
    """Pixel-space ProMoE for Fashion-MNIST (28x28x1, patch 4, hidden 128, 4 blocks, MoE in blocks 1 and 3)."""
    return MoezooDiTMoeModel(config)


__all__ = ["MoezooDiTMoeConfig", "MoezooDiTMoeModel", "MoezooDiTMoeOutput", "MoezooDiTMoePreTrainedModel"]


# diffusers pipeline (importing it also lets diffusers' loader resolve MoezooDiTMoeModel components offline)
from .pipeline_dit_moe import DiTMoEPipeline  # noqa: E402

__all__ += ["DiTMoEPipeline"]
