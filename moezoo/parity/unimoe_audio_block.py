"""Parity: UniMoE-Audio dynamic-capacity MoE block (``UniMoEAudioSparseMoeBlock``).

Official layout: ``gate.weight`` (D + N + F, H) with columns ``[D real dynamic | N null | F fixed/shared]``,
``dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts.<e>.{gate,up,down}_proj.weight`` (SwiGLU, intermediate
``dynamic_intermediate_size``) and ``fixed_real_moe.<f>.{gate,up,down}_proj.weight`` (intermediate
``shared_intermediate_size``), no biases; a full checkpoint prefixes them with ``model.layers.<i>.mlp.`` (stripped).

moezoo: a :class:`~moezoo.core.MoELayer` whose routed experts are the D dynamic experts followed by the F fixed experts
(the fixed experts are weighted per token by the router, so they are routed experts that the ``"topp"`` router in its
``"unimoe_audio"`` convention always selects — not the layer's unweighted shared expert), plus N null experts.  When the
two intermediate sizes differ, the smaller experts are zero-padded to the larger one (exact: ``silu(0) * 0 = 0``).
Router ids are permuted: moezoo ``[dynamic..., fixed..., null...]`` = official ``[0..D-1, D+N.., D..D+N-1]``; ``run``
maps outputs back.  The aux loss is :func:`moezoo.core.losses.unimoe_audio_balance_loss`.  The released
``ignore_differentiable_router=True`` path (deterministic SparseMixer) is what the router implements; the training-time
Gumbel sampling of the other setting is not reproduced.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moezoo.parity import strip_prefix
from moezoo.core import MoELayer, build_moe_layer
from moezoo.core.losses import unimoe_audio_balance_loss

REPO = "HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs"
EXACT = {"dynamic_top_k", "expert_mask"}
DYN = "dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts"


def matches(config: dict) -> bool:
    return (config.get("_reference") or {}).get("class") == "UniMoEAudioSparseMoeBlock"


def _count(sd: dict, prefix: str) -> int:
    n = 0
    while f"{prefix}.{n}.gate_proj.weight" in sd:
        n += 1
    return n


def official_order(num_dynamic: int, num_null: int, num_fixed: int) -> list[int]:
    """``official_order(...)[moezoo_id]`` = official gate column."""
    D, N, Fx = num_dynamic, num_null, num_fixed
    return list(range(D)) + list(range(D + N, D + N + Fx)) + list(range(D, D + N))


def _pad(w: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    extra = size - w.shape[dim]
    if extra == 0:
        return w
    pad = [0, 0] * (w.dim() - 1 - dim) + [0, extra]
    return F.pad(w, pad)


def convert(config: dict, state_dict: dict[str, torch.Tensor]) -> MoELayer:
    sd = strip_prefix(state_dict, f"{DYN}.0.gate_proj.weight", "one UniMoE-Audio MoE block")
    gate = sd["gate.weight"]
    R, hidden = gate.shape
    D = _count(sd, DYN)
    Fx = _count(sd, "fixed_real_moe")
    N = R - D - Fx
    for name, got in (("mlp_dynamic_expert_num", D), ("mlp_fixed_expert_num", Fx), ("mlp_dynamic_null_expert_num", N)):
        if name in config and config[name] != got:
            raise ValueError(f"config {name}={config[name]} but the state_dict implies {got} (gate.weight has {R} rows)")
    if N < 0 or D < 1:
        raise ValueError(f"gate.weight has {R} rows, fewer than the {D} dynamic + {Fx} fixed experts found")
    if config.get("mlp_dynamic_top_k", 0):
        raise ValueError("mlp_dynamic_top_k > 0 (fixed top-k instead of top-p) is not supported by this converter")
    dyn_inter = sd[f"{DYN}.0.gate_proj.weight"].shape[0]
    fix_inter = sd["fixed_real_moe.0.gate_proj.weight"].shape[0] if Fx else dyn_inter
    inter = max(dyn_inter, fix_inter)
    layer = build_moe_layer(hidden_size=hidden, num_experts=D + Fx, num_experts_per_tok=D + N + Fx,
                     moe_intermediate_size=inter, hidden_act=config.get("hidden_act", "silu"), num_null_experts=N,
                     router_type="topp",
                     router_kwargs={"top_p": float(config["mlp_dynamic_top_p"]), "convention": "unimoe_audio",
                                    "fixed_expert_ids": list(range(D, D + Fx)),
                                    "sparsemixer_eps": float(config.get("router_jitter_noise", 0.01)),
                                    "jitter_noise": 0.0})
    names = [f"{DYN}.{e}" for e in range(D)] + [f"fixed_real_moe.{f}" for f in range(Fx)]
    gate_up = torch.stack([torch.cat([_pad(sd[f"{n}.gate_proj.weight"], inter, 0),
                                      _pad(sd[f"{n}.up_proj.weight"], inter, 0)], 0) for n in names])
    down = torch.stack([_pad(sd[f"{n}.down_proj.weight"], inter, 1) for n in names])
    perm = torch.tensor(official_order(D, N, Fx))
    with torch.no_grad():
        layer.gate.weight.copy_(gate[perm])
        layer.experts.gate_up_proj.copy_(gate_up)
        layer.experts.down_proj.copy_(down)
    return layer


def _module_order(module: MoELayer) -> torch.Tensor:
    Fx = len(module.gate.fixed_expert_ids)
    return torch.tensor(official_order(module.num_experts - Fx, module.zero_flop.num_null, Fx))


def run(module: MoELayer, config: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    x = inputs["in.hidden_states"]
    mask = inputs.get("in.attention_mask")
    inv = torch.argsort(_module_order(module))
    out, ro = module(x, attention_mask=mask)
    result = {
        "out.hidden_states": out,
        "out.router_logits": ro.logits[:, inv],
        "out.dynamic_top_k": ro.extras["dynamic_top_k"],
        "out.expert_mask": ro.expert_mask()[:, inv],
        "out.combine_weights": ro.combine_weights()[:, inv],
        "out.aux_loss": unimoe_audio_balance_loss(ro, aux_balance_weight=inputs.get("in.aux_balance_weight")),
        "out.aux_loss_no_balance_weight": unimoe_audio_balance_loss(ro),
    }
    return result
