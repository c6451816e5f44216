"""``deweather``: MoFME multi-weather restoration (FME experts + uncertainty-aware router) and its conventional-MoE twin.

Registry names: ``deweather_mofme_<size>_e<E>k<K>`` (FME experts) and ``deweather_moe_<size>_e<E>k<K>`` (the same
backbone with GELU FFN experts).  ``_s_``: the official MoWE defaults (256-wide tokens, patch 8, 4 heads x 64, mlp x4,
conv head 32 channels x out_ch_scale 4; depth 4 as the paper's "origin" setting) with a residual output
(``output_mode="residual"``: input + correction, starts near the identity).  ``_tiny_``: a CPU-sized model.
"""
from ...registry import register_family, register_model
from .configuration_deweather import MoezooDeweatherConfig
from .modeling_deweather import (DeweatherTransformerBlock, MoezooDeweatherForImageRestoration, MoezooDeweatherModel,
                                 MoezooDeweatherModelOutput, MoezooDeweatherPreTrainedModel,
                                 MoezooDeweatherRestorationOutput)

register_family("deweather", config_class=MoezooDeweatherConfig, model_class=MoezooDeweatherModel,
                task_classes={"AutoModelForImageToImage": MoezooDeweatherForImageRestoration}, card="deweather",
                description="MoWE-layout restoration transformer with MoFME (FiLM-modulated shared FFN) or FFN experts")

_S = dict(image_size=256, patch_size=8, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=64,
          mlp_ratio=4.0, head_channels=32, out_ch_scale=4, num_head_resblocks=2, dropout=0.1, output_mode="residual")
_TINY = dict(image_size=16, patch_size=4, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, head_dim=16,
             mlp_ratio=2.0, head_channels=8, out_ch_scale=2, num_head_resblocks=1, dropout=0.0, output_mode="residual")
_TINY_CFG = dict(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                 mlp_ratio=2.0, head_channels=16, out_ch_scale=2, num_head_resblocks=2, dropout=0.0,
                 output_mode="residual")


def _entry(name: str, expert_type: str, base: dict, E: int, K: int, doc: str):
    def build(config):
        return MoezooDeweatherForImageRestoration(config)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    register_model(name, family="deweather", config=dict(base, expert_type=expert_type, num_experts=E,
                                                          num_experts_per_tok=K), tiny=dict(_TINY))(build)


for _E, _K in ((4, 2), (8, 2), (16, 4)):
    _entry(f"deweather_mofme_s_e{_E}k{_K}", "fme", _S, _E, _K,
           f"MoFME-S: {_E} FiLM experts (top-{_K}) on a shared basenet per layer, official MoWE sizes.")
    _entry(f"deweather_moe_s_e{_E}k{_K}", "ffn", _S, _E, _K,
           f"Conventional MoE-S: {_E} GELU FFN experts (top-{_K}) per layer, same backbone as deweather_mofme_s.")
_entry("deweather_mofme_tiny_e4k2", "fme", _TINY_CFG, 4, 2,
       "Tiny MoFME (64 px, patch 8, 64-wide, 2 layers, 4 FiLM experts top-2) that trains on a CPU in minutes.")
_entry("deweather_moe_tiny_e4k2", "ffn", _TINY_CFG, 4, 2,
       "Tiny conventional MoE twin of deweather_mofme_tiny_e4k2 (4 GELU FFN experts top-2).")

__all__ = ["MoezooDeweatherConfig", "MoezooDeweatherModel", "MoezooDeweatherForImageRestoration",
           "MoezooDeweatherPreTrainedModel", "MoezooDeweatherModelOutput", "MoezooDeweatherRestorationOutput",
           "DeweatherTransformerBlock"]
