"""``audio_moe``: UniMoE-Audio-style dynamic-capacity MoE language models over text and audio-codec tokens."""
from ...registry import register_family, register_model
from .codec import AudioCodec
from .configuration_audio_moe import MoezooAudioMoeConfig
from .modeling_audio_moe import (DelayPatternLogitsProcessor, MoezooAudioMoeCausalLMOutput, MoezooAudioMoeForCausalLM,
                                 MoezooAudioMoeModel, MoezooAudioMoeModelOutput, MoezooAudioMoePreTrainedModel,
                                 apply_delay, flat_from_parts, official_to_flat, split_flat, undo_delay)

register_family("audio_moe", config_class=MoezooAudioMoeConfig, model_class=MoezooAudioMoeModel,
                task_classes={"AutoModelForCausalLM": MoezooAudioMoeForCausalLM},
                default_class=MoezooAudioMoeForCausalLM, card="audio_moe",
                description="UniMoE-Audio-style dynamic-capacity MoE LM over text + delayed codec streams")

# tiny variants: >= 2 MoE layers, num_experts > top_k, CPU-test sized
_TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_intermediate_size=16,
             num_shared_experts=1, num_null_experts=1, num_codebooks=4, codebook_size=16,
             delay_pattern=[0, 1, 2, 3], max_position_embeddings=256)


@register_model(family="audio_moe", tiny=_TINY, config=dict(
    vocab_size=256, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512, num_shared_experts=2, shared_intermediate_size=256,
    num_null_experts=1, router_top_p=0.7, num_codebooks=4, codebook_size=1024, delay_pattern=[0, 1, 2, 3],
    max_position_embeddings=4096))
def audio_moe_small_e8k2(config):
    """~25M-parameter dynamic-capacity audio MoE (8 routed + 1 null + 2 shared experts, top-p 0.7: the number of
    experts varies per token; e8k2 names the top-k=2 budget it is compared with), byte-level text, 4 codebooks of 1024
    codes (Encodec/DAC-sized)."""
    return MoezooAudioMoeForCausalLM(config)


@register_model(family="audio_moe", tiny=_TINY, config=dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, num_shared_experts=1, shared_intermediate_size=64,
    num_null_experts=1, router_top_p=0.7, num_codebooks=4, codebook_size=64, delay_pattern=[0, 1, 2, 3],
    max_position_embeddings=1024))
def audio_moe_tiny_e4k2(config):
    """~0.3M-parameter dynamic-capacity audio MoE (4 routed + 1 null + 1 shared expert, top-p 0.7) for CPU demos."""
    return MoezooAudioMoeForCausalLM(config)


@register_model(name="audio_moe_small_e8k2.official", family="audio_moe", tiny=dict(
    _TINY, topp_weighting="official", num_shared_experts=2, delay_pattern=[0, 2, 3, 4],
    router_aux_loss_coef=0.025, router_aux_loss_min_coef=0.001, router_aux_loss_decay_steps=10000),
    config=dict(vocab_size=256, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512, num_shared_experts=2,
                shared_intermediate_size=256, num_null_experts=1, router_top_p=0.7, topp_weighting="official",
                num_codebooks=4, codebook_size=1024, delay_pattern=[0, 2, 3, 4], router_aux_loss_coef=0.025,
                router_aux_loss_min_coef=0.001, router_aux_loss_decay_steps=10000, max_position_embeddings=4096))
def audio_moe_small_e8k2_official(config):
    """``audio_moe_small_e8k2`` with the released UniMoE-Audio weighting (SparseMixer multipliers x group mass,
    router-weighted shared experts) and its linearly decaying aux-loss weight 0.025 -> 0.001 over 10k steps."""
    return MoezooAudioMoeForCausalLM(config)


__all__ = ["AudioCodec", "MoezooAudioMoeConfig", "MoezooAudioMoeModel", "MoezooAudioMoeForCausalLM", "MoezooAudioMoePreTrainedModel",
           "MoezooAudioMoeCausalLMOutput", "MoezooAudioMoeModelOutput", "DelayPatternLogitsProcessor",
           "official_to_flat", "flat_from_parts", "split_flat", "apply_delay", "undo_delay"]
