"""Parity: Dynamic-MoE top-p routing block ("Harder Tasks Need More Experts", ``SwitchMLP``).

Official layout (one MoE layer): ``router.weight`` (E, H) and ``experts.<e>.{gate,up,down}_proj.weight`` (LLaMA
SwiGLU MLPs, no biases, each with the full ``intermediate_size``); a full checkpoint prefixes them with
``model.layers.<i>.mlp.`` (the prefix is stripped here).  moezoo: a :class:`~moezoo.core.MoELayer` with the
``"topp"`` router in its ``"dynamic_moe"`` convention (raw softmax weights, as the official code).
"""
from __future__ import annotations

import re

import torch

from moezoo.parity import strip_prefix
from moezoo.core import MoELayer, build_moe_layer

REPO = "ZhenweiAn/Dynamic_MoE"
EXACT = {"expert_mask", "num_experts_per_token", "topp_sorted_indices"}


def matches(config: dict) -> bool:
    return (config.get("_reference") or {}).get("class", "SwitchMLP") == "SwitchMLP"


def convert(config: dict, state_dict: dict[str, torch.Tensor]) -> MoELayer:
    sd = strip_prefix(state_dict, "router.weight", "one MoE layer")
    router = sd["router.weight"]
    num_experts, hidden = router.shape
    ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"experts\.(\d+)\.", k))})
    if ids != list(range(num_experts)):
        raise ValueError(f"router has {num_experts} experts but the state_dict holds experts {ids}")
    inter = sd["experts.0.gate_proj.weight"].shape[0]
    top_p = config.get("top_p_threshold")
    if top_p is None:
        raise ValueError("config.json lacks 'top_p_threshold' (the Dynamic-MoE top-p threshold)")
    layer = build_moe_layer(hidden_size=hidden, num_experts=num_experts, num_experts_per_tok=num_experts,
                     moe_intermediate_size=inter, hidden_act=config.get("hidden_act", "silu"), router_type="topp",
                     router_kwargs={"top_p": float(top_p), "convention": "dynamic_moe", "norm_topp_prob": False})
    gate_up = torch.stack([torch.cat([sd[f"experts.{e}.gate_proj.weight"], sd[f"experts.{e}.up_proj.weight"]], 0)
                           for e in range(num_experts)])
    down = torch.stack([sd[f"experts.{e}.down_proj.weight"] for e in range(num_experts)])
    with torch.no_grad():
        layer.gate.weight.copy_(router)
        layer.experts.gate_up_proj.copy_(gate_up)
        layer.experts.down_proj.copy_(down)
    return layer


def run(module: MoELayer, config: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    x = inputs["in.hidden_states"]
    lead = x.shape[:-1]
    out, ro = module(x)
    R = ro.num_experts
    sorted_idx = torch.where(ro.indices < R, ro.indices, torch.full_like(ro.indices, -1))
    return {
        "out.output": out,
        "out.router_logits": ro.logits.reshape(*lead, R),
        "out.router_probs": ro.probs.reshape(*lead, R),
        "out.topp_sorted_weights": ro.weights.reshape(*lead, -1),
        "out.topp_sorted_indices": sorted_idx.reshape(*lead, -1),
        "out.expert_mask": ro.expert_mask().reshape(*lead, R),
        "out.combine_weights": ro.combine_weights().reshape(*lead, R),
        "out.num_experts_per_token": ro.experts_per_token.reshape(lead),
    }
