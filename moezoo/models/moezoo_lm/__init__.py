"""``moezoo_lm``: a small decoder-only MoE causal LM built only from the shared backbone (no extra family needed)."""
from ...registry import register_family, register_model
from .configuration_moezoo_lm import MoezooLMConfig
from .modeling_moezoo_lm import (MoezooLMCausalLMOutput, MoezooLMForCausalLM, MoezooLMModel, MoezooLMModelOutput,
                                 MoezooLMPreTrainedModel)

register_family("moezoo_lm", config_class=MoezooLMConfig, model_class=MoezooLMModel,
                task_classes={"AutoModelForCausalLM": MoezooLMForCausalLM}, card="moezoo_lm",
                description="decoder-only MoE causal LM (RoPE attention + MoELayer FFNs)")

_TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=128)


@register_model(family="moezoo_lm", tiny=_TINY, config=dict(
    vocab_size=1024, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, max_position_embeddings=512))
def lm_tiny_e8k2(config):
    """2M-parameter MoE LM (8 experts, top-2), trains on a CPU in a minute (``moezoo demo``)."""
    return MoezooLMForCausalLM(config)


@register_model(family="moezoo_lm", tiny=dict(_TINY, num_hidden_layers=3, first_k_dense_replace=1, num_shared_experts=1),
                config=dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=4, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=512,
                            first_k_dense_replace=1, num_shared_experts=1, max_position_embeddings=2048))
def lm_small_e16k2(config):
    """~130M-parameter MoE LM (16 experts top-2 + 1 shared expert, first layer dense)."""
    return MoezooLMForCausalLM(config)


__all__ = ["MoezooLMConfig", "MoezooLMModel", "MoezooLMForCausalLM", "MoezooLMPreTrainedModel",
           "MoezooLMCausalLMOutput", "MoezooLMModelOutput"]
