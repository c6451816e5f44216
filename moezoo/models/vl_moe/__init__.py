"""``vl_moe``: MoE-LLaVA / MoIIE vision-language models (timm or CLIP/SigLIP tower + projector + upcycled causal LM)."""
from ...registry import register_family, register_model
from .configuration_vl_moe import MoezooVlMoeConfig, moe_layer_indices, moiie_expert_pools
from .modeling_vl_moe import (MoezooVlMoeCausalLMOutput, MoezooVlMoeForConditionalGeneration, MoezooVlMoeModel,
                              MoezooVlMoeModelOutput, MoezooVlMoePreTrainedModel)
from .processing_vl_moe import MoezooVlMoeProcessor, image_processor_for

register_family("vl_moe", config_class=MoezooVlMoeConfig, model_class=MoezooVlMoeModel,
                task_classes={"AutoModelForImageTextToText": MoezooVlMoeForConditionalGeneration}, card="vl_moe",
                description="LLaVA-layout VLM: timm/CLIP tower + MLP projector + causal LM upcycled to MoE (MoE-LLaVA, MoIIE)")

try:  # AutoProcessor.from_pretrained on a saved model + processor folder
    from transformers import AutoProcessor

    AutoProcessor.register(MoezooVlMoeConfig, MoezooVlMoeProcessor, exist_ok=True)
except Exception:  # noqa: BLE001 - older transformers without exist_ok
    pass

# tiny tower (ViT 32px, 16 patches) + tiny decoder (4 layers: MoE at 0 and 2 with moe_mode "sparse")
_TINY_TOWER = dict(vision_tower="vit_tiny_patch16_224",
                   vision_tower_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))
_TINY_LLAMA = dict(model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
_TINY = dict(_TINY_TOWER, text_config=_TINY_LLAMA, num_experts=4, num_experts_per_tok=2, image_token_id=255)

# SmolLM2-135M-sized decoder (Llama architecture, tied embeddings) + CLIP-B/16-sized timm ViT at 224px
_SMOL = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
             tie_word_embeddings=True, rope_theta=100000.0)
_SMOL_BASE = dict(vision_tower="vit_base_patch16_clip_224", text_config=_SMOL, image_token_id=49151)


@register_model(family="vl_moe", tiny=dict(_TINY, router_type="top2_capacity"),
                config=dict(_SMOL_BASE, num_experts=4, num_experts_per_tok=2, router_type="top2_capacity",
                            moe_mode="sparse"))
def vl_moe_smol_e4k2(config):
    """MoE-LLaVA on a SmolLM2-135M-sized LM: top-2 of 4 with capacity 1.5 / 2.0, MoE every other layer."""
    return MoezooVlMoeForConditionalGeneration(config)


@register_model("vl_moe_smol_e4k2.moiie", family="vl_moe", tiny=dict(_TINY, router_type="modality"),
                config=dict(_SMOL_BASE, num_experts=4, num_experts_per_tok=2, router_type="modality",
                            moe_mode="dense", moiie_num_intra_experts=1))
def vl_moe_smol_e4k2_moiie(config):
    """MoIIE on a SmolLM2-135M-sized LM: image-only, text-only and shared experts (pools of 3 of 4), top-2."""
    return MoezooVlMoeForConditionalGeneration(config)


__all__ = ["MoezooVlMoeConfig", "MoezooVlMoeModel", "MoezooVlMoeForConditionalGeneration", "MoezooVlMoePreTrainedModel",
           "MoezooVlMoeCausalLMOutput", "MoezooVlMoeModelOutput", "MoezooVlMoeProcessor", "image_processor_for",
           "moe_layer_indices", "moiie_expert_pools"]
