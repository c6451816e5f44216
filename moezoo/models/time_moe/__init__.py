"""``time_moe``: Time-MoE decoder-only MoE forecasters (point tokens, multi-resolution horizon heads, Huber loss)."""
from pathlib import Path

from ...registry import register_family, register_model
from .configuration_time_moe import MoezooTimeMoeConfig, dense_config_like
from .modeling_time_moe import (MoezooTimeMoeForPrediction, MoezooTimeMoeModel, MoezooTimeMoeModelOutput,
                                MoezooTimeMoeOutput, MoezooTimeMoePreTrainedModel)

register_family("time_moe", config_class=MoezooTimeMoeConfig, model_class=MoezooTimeMoeModel,
                task_classes={"AutoModelForTimeSeriesPrediction": MoezooTimeMoeForPrediction,
                              "AutoModelForCausalLM": MoezooTimeMoeForPrediction},
                default_class=MoezooTimeMoeForPrediction, card="time_moe",
                description="Time-MoE: decoder-only MoE forecaster with multi-resolution horizon heads")

# tiny variants: >= 2 MoE layers, num_experts > top_k, CPU-test sized
_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             num_experts=4, num_experts_per_tok=2, horizon_lengths=[1, 4, 8], max_position_embeddings=512)


@register_model(family="time_moe", tiny=_TINY, config=dict(
    hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
    num_experts=8, num_experts_per_tok=2, horizon_lengths=[1, 8, 32, 64], max_position_embeddings=4096))
def time_moe_50m(config):
    """Time-MoE-50M (Maple728/TimeMoE-50M layout): 113M total / 50M active parameters, 8 experts top-2."""
    return MoezooTimeMoeForPrediction(config)


@register_model(family="time_moe", tiny=_TINY, config=dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
    num_experts=8, num_experts_per_tok=2, horizon_lengths=[1, 8, 32, 64], max_position_embeddings=4096))
def time_moe_200m(config):
    """Time-MoE-200M (Maple728/TimeMoE-200M layout): 453M total / 200M active parameters, 8 experts top-2."""
    return MoezooTimeMoeForPrediction(config)


@register_model(family="time_moe", tiny=_TINY, config=dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    num_experts=4, num_experts_per_tok=2, horizon_lengths=[1, 8, 32, 64], max_position_embeddings=4096))
def time_moe_tiny_e4k2(config):
    """~0.4M-parameter Time-MoE (4 experts top-2) for CPU training, the recipe and the demo."""
    return MoezooTimeMoeForPrediction(config)


#: weights stored in the project (``save_pretrained`` folders, a few MB), rebuilt by the commands in their model card
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


@register_model("time_moe_tiny_e4k2.corpus", family="time_moe", tiny=_TINY, config=dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    num_experts=4, num_experts_per_tok=2, horizon_lengths=[1, 8, 32, 64], max_position_embeddings=4096),
    pretrained=(str(PRETRAINED_DIR / "time_moe_tiny_e4k2.corpus"),))
def time_moe_tiny_e4k2_corpus(config):
    """time_moe_tiny_e4k2 pretrained here on every offline series but ETT (``pretrained=True`` loads the stored
    weights; forecast with ``normalize=True``)."""
    return MoezooTimeMoeForPrediction(config)


__all__ = ["MoezooTimeMoeConfig", "MoezooTimeMoeModel", "MoezooTimeMoeForPrediction", "MoezooTimeMoePreTrainedModel",
           "MoezooTimeMoeOutput", "MoezooTimeMoeModelOutput", "dense_config_like"]
