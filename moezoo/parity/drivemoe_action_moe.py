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

from moezoo.core.modules import CameraRouter
from moezoo.models.vla.convert_drivemoe import action_moe_layer

REPO = "mr-d-self-driving/DriveMoE"
EXACT = {"topk_idx", "camera_selected"}


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
    mods = {"moe_mlp": action_moe_layer(config["moe_mlp"], config.get("action_router", {}), state_dict)}
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
