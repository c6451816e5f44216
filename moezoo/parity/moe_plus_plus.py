"""Parity: MoE++ layer (``MOE`` / ``MOELayer`` / ``Router`` / ``gating`` with FFN, constant, copy and zero experts).

Official layout (prefix ``moe.``; a full checkpoint adds ``model.layers.<i>.mlp.``, stripped here):
``gate.wg.0.weight`` (8E, H) and ``gate.wg.2.weight`` (E, 8E) (2-layer tanh gate; ``gate.wg.weight`` (E, H) for the
1-layer gate), ``gate.gate_map.weight`` (E, E) (gating residual), FFN experts ``experts.experts.<e>.up_proj.weight``
(2I, H, gate half first) / ``down_proj.weight`` (H, I) for ``e < E-4``, constant experts ``E-4, E-3``
(``constant`` (H,), ``wg.weight`` (2, H)), then copy ``E-2`` and zero ``E-1`` (no parameters).

moezoo: a :class:`~moezoo.core.MoELayer` with ``E-4`` routed experts and (in the core's zero-FLOP order) one zero, one
copy and two constant experts, the ``"moepp"`` router (gating residual, zero-expert weight zeroed before
renormalisation as the released code does) and ``expert_input_scale = top_k``.  Router ids are therefore permuted:
moezoo ``[ffn..., zero, copy, const0, const1]`` = official ``[0..E-5, E-1, E-2, E-4, E-3]``; ``run`` maps inputs
(``gate_residual``) and outputs back to the official order.  The top-k is the official module constant
``MOE_TOP_K = 2`` unless the config carries ``num_experts_per_tok``.
"""
from __future__ import annotations

import torch

from moezoo.parity import strip_prefix
from moezoo.core import MoELayer, build_moe_layer

REPO = "SkyworkAI/MoE-plus-plus"
EXACT = {"expert_mask_nores", "expert_mask_res"}
MOE_TOP_K = 2
NUM_SPECIAL = 4  # 2 constant + 1 copy + 1 zero, hard-coded by the official layer


def matches(config: dict) -> bool:
    return (config.get("_reference") or {}).get("class", "MOE") == "MOE"


def official_order(num_experts: int) -> list[int]:
    """``official_order(E)[moezoo_id]`` = official expert index."""
    n_ffn = num_experts - NUM_SPECIAL
    return list(range(n_ffn)) + [num_experts - 1, num_experts - 2, num_experts - 4, num_experts - 3]


def convert(config: dict, state_dict: dict[str, torch.Tensor]) -> MoELayer:
    if config.get("moe_use_mixtral_gating", False):
        raise ValueError("moe_use_mixtral_gating=True is not supported by this converter (only MoE++ gating)")
    if config.get("moe_use_logits_norm", False):
        raise ValueError("moe_use_logits_norm=True is not supported by this converter")
    sd = strip_prefix(state_dict, "gate.gate_map.weight", "one MoE++ layer")
    gate_map = sd["gate.gate_map.weight"]
    E = gate_map.shape[0]
    n_ffn = E - NUM_SPECIAL
    if n_ffn < 1:
        raise ValueError(f"MoE++ needs more than {NUM_SPECIAL} experts (E-4 FFN + 2 constant + copy + zero), got E={E}")
    cfg_e = config.get("num_experts")
    if cfg_e is not None:
        first = cfg_e[0] if isinstance(cfg_e, (list, tuple)) else cfg_e
        if first != E:
            raise ValueError(f"config num_experts={cfg_e} but gate.gate_map.weight is {tuple(gate_map.shape)}")
    if "gate.wg.0.weight" in sd:
        w_in, w_out = sd["gate.wg.0.weight"], sd["gate.wg.2.weight"]
        gate_hidden = w_in.shape[0]
    elif "gate.wg.weight" in sd:
        w_in, w_out, gate_hidden = None, sd["gate.wg.weight"], None
    else:
        raise ValueError("state_dict lacks the MoE++ gate ('gate.wg.0.weight'/'gate.wg.2.weight' or 'gate.wg.weight')")
    hidden = (w_in if w_in is not None else w_out).shape[1]
    top_k = int(config.get("num_experts_per_tok", MOE_TOP_K))
    inter = sd["experts.experts.0.down_proj.weight"].shape[1]
    perm = torch.tensor(official_order(E))
    scale = 1.0 if config.get("moe_feature_no_mul_topk", False) else float(top_k)
    layer = build_moe_layer(hidden_size=hidden, num_experts=n_ffn, num_experts_per_tok=top_k, moe_intermediate_size=inter,
                     hidden_act=config.get("hidden_act", "silu"), num_zero_experts=1, num_copy_experts=1,
                     num_constant_experts=2, expert_input_scale=scale, router_type="moepp",
                     router_kwargs={"top_k": top_k, "gate_hidden_size": gate_hidden, "gating_residual": True,
                                    "zeroed_expert_ids": [n_ffn]})
    with torch.no_grad():
        if w_in is not None:
            layer.gate.weight_in.copy_(w_in)
        layer.gate.weight.copy_(w_out[perm])
        layer.gate.gate_map.weight.copy_(gate_map[perm][:, perm])
        layer.experts.gate_up_proj.copy_(torch.stack([sd[f"experts.experts.{e}.up_proj.weight"] for e in range(n_ffn)]))
        layer.experts.down_proj.copy_(torch.stack([sd[f"experts.experts.{e}.down_proj.weight"] for e in range(n_ffn)]))
        layer.zero_flop.constant.copy_(torch.stack([sd[f"experts.experts.{e}.constant"] for e in (E - 4, E - 3)]))
        layer.zero_flop.constant_gate.copy_(torch.stack([sd[f"experts.experts.{e}.wg.weight"] for e in (E - 4, E - 3)]))
    return layer


def run(module: MoELayer, config: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    x = inputs["in.hidden_states"]
    E = module.num_routable
    perm = torch.tensor(official_order(E))
    inv = torch.argsort(perm)  # official id -> moezoo id
    result = {}
    runs = [("nores", None)]
    if "in.gate_residual" in inputs:
        runs.append(("res", inputs["in.gate_residual"][:, perm]))
    for tag, residual in runs:
        out, ro = module(x.clone(), gate_residual=residual)
        result[f"out.output_{tag}"] = out
        result[f"out.gate_logits_{tag}"] = ro.extras["gate_residual"][:, inv]
        result[f"out.expert_mask_{tag}"] = ro.expert_mask()[:, inv]
        result[f"out.combine_weights_{tag}"] = ro.combine_weights()[:, inv]
    return result
