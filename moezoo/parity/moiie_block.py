"""MoIIE modality-split MoE block (``phi3_moe_mm_s``) -> ``MoELayer(router_type="modality")``.

Modality 0 = language (official ``gate``), modality 1 = vision (official ``gate_vis``); both gates have width
``w`` (int(E/2 + E/4), read from the weights). Vision tokens use experts ``[0, w)``, language tokens ``[1, 1 + w)``
(the official ``index + 1`` shift). The official vision mask ``type == 1 and next type == 1`` is the router option
``next_token_modalities=(1,)`` (fallback language). Softmax fp32, top-k always renormalised (no epsilon).
Experts are Phi3MLP with a fused ``gate_up_proj`` [2I, H] (gate first) -> ``Experts`` unchanged.
Aux losses: ``modality_balance_loss`` (per-modality Switch loss in the pool, times the gate width).
"""
from __future__ import annotations


import torch
from torch import nn

from moezoo.core import MoELayer, build_moe_layer
from moezoo.checkpoints import count_experts
from moezoo.core.losses import modality_balance_loss

REPO = "AlenjandroWang/MoIIE"
EXACT = {"vision_token_mask"}
LANGUAGE, VISION = 0, 1
SHIFT = 1  # language expert id = local gate index + 1 (official)


def convert(config: dict, state_dict: dict) -> nn.Module:
    E = count_experts(state_dict, "experts.", "gate_up_proj.weight", config_value=config.get("num_experts"))
    two_i, H = state_dict["experts.0.gate_up_proj.weight"].shape
    w_lan, w_vis = state_dict["gate.weight"].shape[0], state_dict["gate_vis.weight"].shape[0]
    if w_vis > E or w_lan + SHIFT > E:
        raise ValueError(f"gate widths (language {w_lan}, vision {w_vis}) do not fit {E} experts with shift {SHIFT}")
    pools = [list(range(SHIFT, SHIFT + w_lan)), list(range(w_vis))]
    layer = build_moe_layer(hidden_size=H, num_experts=E, num_experts_per_tok=int(config["num_experts_per_tok"]),
                     moe_intermediate_size=two_i // 2, hidden_act=config.get("hidden_act", "silu"),
                     router_type="modality",
                     router_kwargs=dict(expert_pools=pools, norm_topk_prob=True, renorm_eps=0.0,
                                        next_token_modalities=(VISION,), fallback_modality=LANGUAGE,
                                        jitter_noise=float(config.get("router_jitter_noise", 0.0) or 0.0)))
    layer.gate.weight.data.copy_(torch.cat([state_dict["gate.weight"], state_dict["gate_vis.weight"]], 0))
    layer.experts.gate_up_proj.data.copy_(torch.stack([state_dict[f"experts.{e}.gate_up_proj.weight"] for e in range(E)]))
    layer.experts.down_proj.data.copy_(torch.stack([state_dict[f"experts.{e}.down_proj.weight"] for e in range(E)]))
    return layer


def run(module: nn.Module, config: dict, inputs: dict) -> dict:
    x = inputs["in.hidden_states"]
    y, ro = module(x, modality_ids=inputs["in.token_type_ids"])
    mask = inputs.get("in.attention_mask")
    aux = modality_balance_loss(ro, attention_mask=mask)
    return {
        "out.hidden_states": y,
        "out.vis_router_logits": ro.extras["pool_logits"][VISION],
        "out.lan_router_logits": ro.extras["pool_logits"][LANGUAGE],
        "out.vision_token_mask": (ro.extras["modality_ids"] == VISION).long().reshape(x.shape[:-1]),
        "out.aux_loss_vis": aux[VISION].reshape(1),
        "out.aux_loss_lan": aux[LANGUAGE].reshape(1),
    }
