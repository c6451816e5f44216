"""Official DriveMoE checkpoint keys -> :class:`MoezooVlaPolicy` keys, for the parts that correspond.

Mapped (official ``mr-d-self-driving/DriveMoE``, ``src/model/DriveMoE``):

- ``joint_model.mixtures.action.layers.<i>.mlp.skill_experts.<e>.{gate,up,down}_proj.weight`` and
  ``...mlp.shared_experts.<s>.*`` (``MoEGemmaMLP``) -> ``action_expert.layers.<i>.mlp.experts.*`` (3-D) and
  ``...mlp.shared_expert.*`` (the unweighted sum of the shared GemmaMLPs fused into one MLP);
- ``joint_model.action_router.{router_linear.weight,temperature}`` (``MLPRouter``, computed once and reused) ->
  ``action_expert.layers.<first MoE layer>.mlp.gate.{weight,temperature}`` (the later MoE layers' gates hold no weights:
  they receive the first layer's logits);
- ``camera_router.*`` (``Router``) -> ``camera_router.*`` (same names, :class:`moezoo.core.CameraRouter`).

``moezoo convert drivemoe SRC DST [--option model=<registry name>] [--option tiny=true] [--option config={...}]``
writes a ``save_pretrained`` folder with the mapped tensors and ``unmapped_keys.json``.

The per-layer tensor layout is the one the block parity reference ``drivemoe_action_moe`` checks
(:func:`action_moe_layer`); this module only renames. The PaliGemma VLM, the Gemma action
expert's attention / adaptive norms and the action encoders of the official model differ from this π0 base and are
returned as unmapped keys.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ...checkpoints import count_experts
from ...convert import register_converter
from ...core import MoELayer, build_moe_layer

OFFICIAL_MOE = "joint_model.mixtures.action.layers.{i}.mlp."
OFFICIAL_ROUTER = "joint_model.action_router."
CAMERA = "camera_router."


def action_moe_layer(cfg: dict, router_cfg: dict, state: dict) -> MoELayer:
    """One official ``MoEGemmaMLP`` (skill + shared experts) and its ``MLPRouter`` (keys relative to the block) ->
    ``MoELayer(router_type="pooled")``: the layout the block parity reference ``drivemoe_action_moe`` checks."""
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


def official_moe_layers(state_dict: dict) -> list[int]:
    """Indices i of ``joint_model.mixtures.action.layers.<i>.mlp.skill_experts`` in an official state dict."""
    pat = re.compile(r"^joint_model\.mixtures\.action\.layers\.(\d+)\.mlp\.skill_experts\.")
    return sorted({int(m.group(1)) for k in state_dict if (m := pat.match(k))})


def convert_drivemoe_state_dict(state_dict: dict, config) -> tuple[dict, list[str]]:
    """Map an official DriveMoE state dict onto a :class:`MoezooVlaConfig` policy.

    Returns ``(moezoo_state, unmapped_official_keys)``; load the first with ``policy.load_state_dict(state,
    strict=False)`` (it only holds the action-MoE, action-router and camera-router tensors). The official MoE layers
    must sit where ``config.mlp_layer_types`` has ``"skill_moe"``, with the config's expert counts and widths.
    """
    layers = official_moe_layers(state_dict)
    ours = [i for i, t in enumerate(config.mlp_layer_types) if t == "skill_moe"]
    if layers != ours:
        raise ValueError(f"the official checkpoint has skill-MoE FFNs in action layers {layers}, the config in {ours} "
                         "(set num_moe_layers / mlp_layer_types to match)")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    router = {k[len(OFFICIAL_ROUTER):]: v for k, v in state_dict.items() if k.startswith(OFFICIAL_ROUTER)}
    if "router_linear.weight" not in router or "temperature" not in router:
        raise ValueError(f"the official checkpoint has no action router ('{OFFICIAL_ROUTER}router_linear.weight', "
                         f"'{OFFICIAL_ROUTER}temperature')")
    used.update(OFFICIAL_ROUTER + k for k in router)
    for n, i in enumerate(layers):
        pre = OFFICIAL_MOE.format(i=i)
        sub = {"moe_mlp." + k[len(pre):]: v for k, v in state_dict.items() if k.startswith(pre)}
        used.update(k for k in state_dict if k.startswith(pre))
        sub.update({"action_router." + k: v for k, v in router.items()})
        layer = action_moe_layer({"num_experts_per_tok": config.num_experts_per_tok, "num_skill_experts": config.num_experts},
                         {}, sub)
        if layer.experts.down_proj.shape[-1] != config.moe_intermediate_size or layer.hidden_size != config.hidden_size:
            raise ValueError(f"official MoE layer {i} has hidden {layer.hidden_size} / intermediate "
                             f"{layer.experts.down_proj.shape[-1]}, the config hidden_size={config.hidden_size} / "
                             f"moe_intermediate_size={config.moe_intermediate_size}")
        for k, v in layer.state_dict().items():
            if k.startswith("gate.") and n > 0:
                continue  # the router lives in the first MoE layer only
            out[f"action_expert.layers.{i}.mlp.{k}"] = v.detach().clone()
    for k, v in state_dict.items():
        if k.startswith(CAMERA):
            out[k] = v
            used.add(k)
    return out, sorted(k for k in state_dict if k not in used)


@register_converter("drivemoe")
def convert_drivemoe(src, dst, *, model: str = "drivemoe_s_e6k1", tiny: bool = False, config: dict | None = None,
                     allow_pickle: bool = False) -> Path:
    """``moezoo convert drivemoe SRC DST``: official weights (a safetensors file or folder) -> a ``save_pretrained``
    folder of the registry model ``model`` (``tiny`` / ``config`` overrides) with the action-MoE, action-router and
    camera-router tensors mapped."""
    import moezoo

    from .convert_himoe import load_official_state

    state = load_official_state(Path(src), allow_pickle)
    policy = moezoo.create_model(model, tiny=bool(tiny), **(config or {}))
    mapped, unmapped = convert_drivemoe_state_dict(state, policy.config)
    _, unexpected = policy.load_state_dict(mapped, strict=False)
    if unexpected:
        raise ValueError(f"converted keys {unexpected[:4]} are not in {model}")
    dst = Path(dst)
    policy.save_pretrained(dst)
    (dst / "unmapped_keys.json").write_text(json.dumps({"mapped": len(mapped), "unmapped": unmapped}, indent=1))
    return dst


__all__ = ["convert_drivemoe_state_dict", "official_moe_layers", "convert_drivemoe"]
