"""DriveMoE action-expert MoE MLP + action router + camera (scene) router.

- ``moe_mlp`` -> ``MoELayer(router_type="pooled")`` with GemmaMLP experts (``hidden_act="gelu_tanh"``); its gate is a
  :class:`moezoo.core.routing.PooledRouter` holding the official ``MLPRouter`` weights (``router_linear.weight`` ->
  ``gate.weight``, ``temperature``): per-sample ``mean_seq(W h) / |temperature|``, softmax fp32, top-k renormalised
  without epsilon, shared by all tokens of a sample. The official model computes these logits once, from the hidden
  states of the layer before the first MoE layer: ``run`` passes them as ``router_hidden_states=``.
  The ``num_shared_experts`` GemmaMLP shared experts (summed unweighted) fuse into one ``SharedExpert`` of
  intermediate ``num_shared_experts * I`` (gate/up rows and down columns concatenated).
- ``camera_router`` -> :class:`moezoo.core.modules.CameraRouter` (same parameter names).
"""
from __future__ import annotations


import torch
from torch import nn

from moezoo.core import MoELayer, build_moe_layer
from moezoo.checkpoints import count_experts
from moezoo.core.modules import CameraRouter

REPO = "mr-d-self-driving/DriveMoE"
EXACT = {"topk_idx", "camera_selected"}


def _moe_mlp(cfg: dict, router_cfg: dict, state: dict) -> MoELayer:
    E = count_experts(state, "moe_mlp.skill_experts.", "gate_proj.weight", what="skill experts",
                      config_value=cfg.get("num_skill_experts"), config_key="num_skill_experts")
    shared = range(count_experts(state, "moe_mlp.shared_experts.", "gate_proj.weight", what="shared experts",
                                 allow_empty=True))
    I, H = state["moe_mlp.skill_experts.0.gate_proj.weight"].shape
    k = int(cfg["num_experts_per_tok"])
    router_w = state["action_router.router_linear.weight"]
    if router_w.shape[0] != E:
        raise ValueError(f"action_router has {router_w.shape[0]} outputs but moe_mlp has {E} skill experts")
    router_bias = state.get("action_router.router_linear.bias")
    shared_inter = [state[f"moe_mlp.shared_experts.{s}.gate_proj.weight"].shape[0] for s in shared]
    layer = build_moe_layer(hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=I,
                     hidden_act="gelu_tanh", router_type="pooled",
                     router_kwargs=dict(hidden_size=int(router_w.shape[1]), norm_topk_prob=True, renorm_eps=0.0,
                                        bias=router_bias is not None),
                     num_shared_experts=1 if shared else 0, shared_intermediate_size=sum(shared_inter) or None)
    layer.gate.weight.data.copy_(router_w)
    if router_bias is not None:
        layer.gate.bias.data.copy_(router_bias)
    layer.gate.temperature.data.copy_(state["action_router.temperature"].reshape(1))
    p = "moe_mlp.skill_experts."
    layer.experts.gate_up_proj.data.copy_(torch.stack([
        torch.cat([state[f"{p}{e}.gate_proj.weight"], state[f"{p}{e}.up_proj.weight"]], 0) for e in range(E)]))
    layer.experts.down_proj.data.copy_(torch.stack([state[f"{p}{e}.down_proj.weight"] for e in range(E)]))
    if shared:  # sum_s down_s(act(gate_s x) * up_s x) == one MLP with concatenated intermediate units
        p = "moe_mlp.shared_experts."
        se = layer.shared_expert
        se.gate_proj.weight.data.copy_(torch.cat([state[f"{p}{s}.gate_proj.weight"] for s in shared], 0))
        se.up_proj.weight.data.copy_(torch.cat([state[f"{p}{s}.up_proj.weight"] for s in shared], 0))
        se.down_proj.weight.data.copy_(torch.cat([state[f"{p}{s}.down_proj.weight"] for s in shared], 1))
    return layer


def _camera_router(cfg: dict, state: dict) -> CameraRouter:
    p = "camera_router."
    wp_hidden, wp_dim = state[f"{p}waypoint_projector.0.weight"].shape
    mlp_hidden, D = state[f"{p}mlp.0.weight"].shape
    labels = state[f"{p}mlp.3.weight"].shape[0]
    if cfg.get("num_labels", labels) != labels or cfg.get("token_dim", D) != D:
        raise ValueError(f"camera_router config {cfg} does not match the weights (token_dim={D}, num_labels={labels})")
    router = CameraRouter(D, labels, int(cfg.get("num_heads", 8)), waypoint_dim=int(wp_dim),
                          waypoint_hidden=int(wp_hidden), mlp_hidden=int(mlp_hidden))
    router.load_state_dict({k[len(p):]: v for k, v in state.items() if k.startswith(p)}, strict=True)
    return router


def convert(config: dict, state_dict: dict) -> nn.Module:
    mods = {"moe_mlp": _moe_mlp(config["moe_mlp"], config.get("action_router", {}), state_dict)}
    if "camera_router" in config:
        mods["camera_router"] = _camera_router(config["camera_router"], state_dict)
    return nn.ModuleDict(mods)


def run(module: nn.Module, config: dict, inputs: dict) -> dict:
    y, ro = module["moe_mlp"](inputs["in.hidden_states"], router_hidden_states=inputs["in.router_hidden_states"])
    out = {
        "out.moe_output": y,
        "out.action_router_logits": ro.extras["sample_logits"],
        "out.routing_probs": ro.extras["sample_probs"],
        "out.topk_idx": ro.extras["sample_indices"],
        "out.topk_weight": ro.extras["sample_weights"],
    }
    if "camera_router" in module:
        cam = module["camera_router"](inputs["in.front_tokens"], inputs["in.waypoint"])
        out["out.camera_logits"] = cam
        out["out.camera_selected"] = cam.argmax(-1)
    return out
