"""MoE-LLaVA MoE layer (DeepSpeed 0.9.5 ``MoE`` over StableLM / Llama MLP experts) -> ``MoELayer(router_type="top2_capacity")``.

Official keys (relative to the MoE module; a full MoE-LLaVA checkpoint puts them under ``model.layers.<i>.mlp.``):
``deepspeed_moe.gate.wg.weight`` (E, H) and ``deepspeed_moe.experts.deepspeed_experts.<e>.{gate_proj,up_proj,down_proj}.weight``
(Phi-2 experts: ``fc1`` / ``fc2`` with biases, non-gated). The gate is :class:`moezoo.core.Top2CapacityRouter` with the
official Gumbel second-expert sampling on; parity feeds the recorded draws (``in.gumbel_noise_*``) as the
``gumbel_noise=`` signal. Train outputs run the layer in training mode (capacity_factor) with autograd.
"""
from __future__ import annotations

import torch
from torch import nn

from moezoo.core import build_moe_layer
from moezoo.models.vl_moe.convert_moe_llava import GATE, convert_layer_state, router_kwargs
from moezoo.parity import strip_prefix

REPO = "PKU-YuanGroup/MoE-LLaVA"
EXACT = {"eval.exp_counts", "eval.capacity", "eval.expert_top1", "eval.expert_top2", "eval.kept", "eval.capacity_slot",
         "train.exp_counts", "train.capacity", "train.expert_top1", "train.expert_top2", "train.kept",
         "train.capacity_slot", "skewed_train.exp_counts", "skewed_train.capacity", "skewed_train.expert_top1",
         "skewed_train.expert_top2", "skewed_train.kept", "skewed_train.capacity_slot"}
def convert(config: dict, state_dict: dict) -> nn.Module:
    state = strip_prefix(state_dict, GATE, "DeepSpeed MoE gate")
    weights, info = convert_layer_state(state, config.get("num_experts"))
    layer = build_moe_layer(hidden_size=info["H"], num_experts=info["E"], num_experts_per_tok=2, moe_intermediate_size=info["I"],
                     hidden_act="silu" if info["gated"] else config.get("hidden_act", "gelu_tanh"),
                     gated_experts=info["gated"], expert_bias=info["bias"], router_type="top2_capacity",
                     router_kwargs=router_kwargs(config))
    missing, unexpected = layer.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if not k.startswith("zero_flop")]:
        raise ValueError(f"converted weights do not fit the layer: missing {missing}, unexpected {unexpected}")
    return layer


def _routing_outputs(prefix: str, ro, E: int) -> dict:
    T = ro.indices.shape[0]
    slot = torch.full((T, E + 1), -1, dtype=torch.long)
    slot.scatter_(1, ro.indices.cpu(), ro.extras["capacity_slot"].cpu())
    kept = torch.stack([ro.extras["top1"], ro.extras["top2"]], -1)
    return {
        f"{prefix}.exp_counts": ro.extras["exp_counts"],
        f"{prefix}.capacity": torch.tensor(ro.extras["capacity"], dtype=torch.long),
        f"{prefix}.expert_top1": ro.extras["top1"], f"{prefix}.expert_top2": ro.extras["top2"],
        f"{prefix}.kept": (ro.indices == kept).long(),
        f"{prefix}.combine_weights": ro.combine_weights(),
        f"{prefix}.capacity_slot": slot[:, :E],
        f"{prefix}.l_aux": ro.extras["l_aux"],
    }


def run(module: nn.Module, config: dict, inputs: dict) -> dict:
    E = module.num_experts
    x = inputs["in.hidden_states"].clone()
    out = {}
    module.eval()
    with torch.no_grad():
        y, ro = module(x, gumbel_noise=inputs.get("in.gumbel_noise_eval"))
    out["out.router_logits"] = ro.logits
    out["out.eval.hidden_states"] = y
    out.update(_routing_outputs("out.eval", ro, E))
    for name, key in (("train", "in.hidden_states"), ("skewed_train", "in.hidden_states_skewed")):
        if key not in inputs:
            continue
        module.train()
        try:
            with torch.enable_grad():
                xi = inputs[key].clone().requires_grad_()
                y, ro = module(xi, gumbel_noise=inputs.get(f"in.gumbel_noise_{name}"))
                gw, gx = torch.autograd.grad(y.sum(), [module.gate.weight, xi], retain_graph=True)
                (gl,) = torch.autograd.grad(ro.extras["l_aux"], [module.gate.weight])
        finally:
            module.eval()
        if name == "skewed_train":
            out["out.skewed_router_logits"] = ro.logits.detach()
        out[f"out.{name}.hidden_states"] = y.detach()
        out.update({k: v.detach() for k, v in _routing_outputs(f"out.{name}", ro, E).items()})
        out[f"out.{name}.grad_gate_weight"] = gw
        out[f"out.{name}.grad_gate_weight_l_aux"] = gl
        out[f"out.{name}.grad_hidden_states"] = gx
    return out
