"""Parity: AdaMoE null experts (``CustomMixtralSparseMoeBlock`` + ``load_balancing_loss_func_with_null_experts``).

Official layout: ``gate.weight`` (E, H) and ``gate2.weight`` (n_null, H) (logits ``[true | null]``),
``experts.<e>.{w1,w2,w3}.weight`` (Mixtral: ``w2(silu(w1 x) * w3 x)``); a full checkpoint prefixes them with
``model.layers.<i>.block_sparse_moe.`` (stripped here).  moezoo: a :class:`~moezoo.core.MoELayer` with ``E`` routed
experts, ``n_null`` null experts and the ``"topk_null"`` router (one weight = ``cat([gate, gate2])``), whose selected
true experts are renormalised among themselves.  The balance loss is :func:`moezoo.core.losses.switch_balance_loss`
over all ``E + n_null`` experts.

True-expert count: the official block and loss test ``0 <= id <= 7`` (hard-coded for Mixtral-8x7B).  :func:`convert`
uses the config's ``num_local_experts`` instead (the intended semantics; identical when it is 8).  Pass
``official_true_bound=True`` to renormalise over ids ``< 8`` as the released code does for other counts (for fewer
than 8 true experts some null experts then enter the denominator; for more, experts ``>= 8`` keep raw probabilities).
The loss's ``## modified`` slice of the top-k axis is a no-op for ``top_k <= 8`` (the only supported case).
"""
from __future__ import annotations

import re

import torch

from moezoo.parity import strip_prefix
from moezoo.core import MoELayer, build_moe_layer
from moezoo.core.losses import switch_balance_loss

REPO = "CengZihao/AdaMoE"
EXACT = {"expert_mask", "num_true_experts_per_token"}
OFFICIAL_TRUE_EXPERT_BOUND = 8


def matches(config: dict) -> bool:
    return (config.get("_reference") or {}).get("class", "CustomMixtralSparseMoeBlock") == "CustomMixtralSparseMoeBlock"


def convert(config: dict, state_dict: dict[str, torch.Tensor], *, official_true_bound: bool = False) -> MoELayer:
    sd = strip_prefix(state_dict, "gate2.weight", "the null-expert router")
    gate, gate2 = sd["gate.weight"], sd["gate2.weight"]
    num_experts, hidden = gate.shape
    num_null = gate2.shape[0]
    if config.get("num_local_experts", num_experts) != num_experts:
        raise ValueError(f"config num_local_experts={config['num_local_experts']} but gate.weight has {num_experts} rows")
    if config.get("num_null_experts", num_null) != num_null:
        raise ValueError(f"config num_null_experts={config['num_null_experts']} but gate2.weight has {num_null} rows")
    ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"experts\.(\d+)\.", k))})
    if ids != list(range(num_experts)):
        raise ValueError(f"gate has {num_experts} experts but the state_dict holds experts {ids}")
    top_k = int(config.get("num_experts_per_tok", 2))
    inter = sd["experts.0.w1.weight"].shape[0]
    num_true = min(OFFICIAL_TRUE_EXPERT_BOUND, num_experts + num_null) if official_true_bound else num_experts
    layer = build_moe_layer(hidden_size=hidden, num_experts=num_experts, num_experts_per_tok=top_k,
                     moe_intermediate_size=inter, hidden_act=config.get("hidden_act", "silu"),
                     num_null_experts=num_null, router_type="topk_null",
                     router_kwargs={"top_k": top_k, "num_true_experts": num_true,
                                    "jitter_noise": float(config.get("router_jitter_noise", 0.0) or 0.0)})
    gate_up = torch.stack([torch.cat([sd[f"experts.{e}.w1.weight"], sd[f"experts.{e}.w3.weight"]], 0)
                           for e in range(num_experts)])
    down = torch.stack([sd[f"experts.{e}.w2.weight"] for e in range(num_experts)])
    with torch.no_grad():
        layer.gate.weight.copy_(torch.cat([gate, gate2], 0))
        layer.experts.gate_up_proj.copy_(gate_up)
        layer.experts.down_proj.copy_(down)
    return layer


def run(module: MoELayer, config: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    x = inputs["in.hidden_states"]
    out, ro = module(x)
    E = module.num_experts
    result = {
        "out.output": out,
        "out.router_logits": ro.logits,
        "out.expert_mask": ro.expert_mask(),
        "out.combine_weights_true": ro.combine_weights()[:, :E],
        "out.num_true_experts_per_token": (ro.indices < E).sum(-1),
        "out.balance_loss": switch_balance_loss(ro),
    }
    if "in.attention_mask" in inputs:
        result["out.balance_loss_masked"] = switch_balance_loss(ro, attention_mask=inputs["in.attention_mask"])
    return result
