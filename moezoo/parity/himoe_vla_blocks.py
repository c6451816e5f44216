"""HiMoE-VLA AS-MoE (action-space conditional MoE) and HB-MoE (heterogeneity-balancing MoE) blocks.

AS-MoE -> ``MoELayer(router_type="condition")``: the router reads the per-sample action-dimension ``data_mask``
(repeated over the sequence), top-1 with the raw softmax weight (the official code renormalises only when top_k > 1),
aux loss = InfoNCE mutual-information loss (``mutual_information_loss``) times ``aux_loss_alpha``, computed by the
router in training.
HB-MoE -> ``MoELayer(router_type="topk")``: softmax, top-k renormalised with eps 1e-20, shared expert of intermediate
``moe_intermediate_size * n_shared_experts`` added unweighted; aux = DeepSeek sequence-level balance loss
(``sequence_balance_loss``; ``seq_aux=False``: the token-level one, i.e. the Switch loss / k) times ``aux_loss_alpha``.
"""
from __future__ import annotations


import torch
from torch import nn

from moezoo.core import MoELayer, build_moe_layer
from moezoo.checkpoints import count_experts
from moezoo.core.losses import sequence_balance_loss, switch_balance_loss

REPO = "ZhiyingDu/HiMoE-VLA"
EXACT = {"as_moe.topk_idx", "hb_moe.topk_idx"}
BLOCKS = ("as_moe", "hb_moe")


def matches(config: dict) -> bool:
    return any(b in config for b in BLOCKS)


def _load_experts(layer: MoELayer, state: dict, prefix: str, n: int) -> None:
    gate_up = torch.stack([torch.cat([state[f"{prefix}experts.{e}.gate_proj.weight"],
                                      state[f"{prefix}experts.{e}.up_proj.weight"]], 0) for e in range(n)])
    down = torch.stack([state[f"{prefix}experts.{e}.down_proj.weight"] for e in range(n)])
    layer.experts.gate_up_proj.data.copy_(gate_up)
    layer.experts.down_proj.data.copy_(down)


def _load_shared(layer: MoELayer, state: dict, prefix: str) -> None:
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(layer.shared_expert, name).weight.data.copy_(state[f"{prefix}shared_experts.{name}.weight"])


def _build(name: str, cfg: dict, state: dict) -> MoELayer:
    prefix = f"{name}."
    E = count_experts(state, f"{prefix}experts.", "gate_proj.weight", what=f"{name} experts",
                      config_value=cfg.get("n_routed_experts"), config_key="n_routed_experts")
    I, H = state[f"{prefix}experts.0.gate_proj.weight"].shape
    k = int(cfg.get("num_experts_per_tok", 1))
    norm = bool(cfg.get("norm_topk_prob", False)) and k > 1  # official: renormalise only when top_k > 1
    scoring = cfg.get("scoring_func", "softmax")
    gate_w = state[f"{prefix}gate.weight"]
    has_shared = f"{prefix}shared_experts.gate_proj.weight" in state
    shared_inter = state[f"{prefix}shared_experts.gate_proj.weight"].shape[0] if has_shared else None
    router_kwargs = dict(scoring_func=scoring, norm_topk_prob=norm, renorm_eps=1e-20)
    if name == "as_moe":
        router_type = "condition"
        router_kwargs.update(condition_dim=int(gate_w.shape[1]), mi_loss_coef=float(cfg.get("aux_loss_alpha", 0.0)))
    else:
        router_type = "topk"
    layer = build_moe_layer(hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=I,
                     hidden_act=cfg.get("hidden_act", "silu"), router_type=router_type, router_kwargs=router_kwargs,
                     num_shared_experts=1 if has_shared else 0, shared_intermediate_size=shared_inter)
    layer.gate.weight.data.copy_(gate_w)
    _load_experts(layer, state, prefix, E)
    if has_shared:
        _load_shared(layer, state, prefix)
    return layer


def convert(config: dict, state_dict: dict) -> nn.Module:
    return nn.ModuleDict({name: _build(name, config[name], state_dict) for name in BLOCKS if name in config})


def _sorted_topk(ro):
    idx, order = ro.indices.sort(dim=-1)
    return idx, ro.weights.gather(1, order)


def run(module: nn.Module, config: dict, inputs: dict) -> dict:
    out = {}
    cond = inputs["in.data_mask"].bool()
    was_training = module.training
    for name in BLOCKS:
        if name not in module:
            continue
        layer, cfg = module[name], config[name]
        x = inputs[f"in.{name}.hidden_states"]
        signals = {"condition": cond} if name == "as_moe" else {}
        layer.train()  # the official aux losses only exist in training (no dropout / noise: same output)
        y, ro = layer(x, **signals)
        if name == "as_moe":
            aux = ro.aux_loss
        elif cfg.get("seq_aux", True):
            aux = sequence_balance_loss(ro, batch_size=x.shape[0]) * cfg.get("aux_loss_alpha", 0.0)
        else:
            aux = switch_balance_loss(ro) / ro.indices.shape[-1] * cfg.get("aux_loss_alpha", 0.0)
        idx, w = _sorted_topk(ro)
        out[f"out.{name}.output"] = y
        out[f"out.{name}.aux_loss"] = aux.reshape(1)
        out[f"out.{name}.router_logits"] = ro.logits
        out[f"out.{name}.topk_idx"] = idx
        out[f"out.{name}.topk_weight"] = w
        layer.eval()
        out[f"out.{name}.output_eval"] = layer(x, **signals)[0]
    module.train(was_training)
    return out
