"""Parity: ProMoE token-choice DiT (ali-vilab/ProMoE ``models/models_ProMoE_TC.py``) as ``MoezooDiTMoeModel``.

The converted model (:func:`moezoo.models.dit_moe.convert_promoe.load_model`: prototype router, unconditional expert
for the null label, GELU experts with biases, MoE in odd blocks) reproduces the eval and train forwards, each MoE
block's router input, cosine similarities, ``compute_router`` weights / indices (null-class tokens: expert E with
weight [1, 0, ...] in every slot, as the official code returns them; moezoo pads the extra slots with sentinels),
the routing contrastive loss per block and in total, and the prototype gradients of ``output.sum()`` where the RCL
gets gradient 1 (``AddAuxiliaryLoss``): equal to backpropagating ``output.sum() + total RCL``.
"""
from __future__ import annotations

import torch

REPO = "ali-vilab/ProMoE"
EXACT = frozenset(f"out.eval.blocks.{i}.mlp.expert_indices" for i in range(512))


def matches(config: dict) -> bool:
    return (config.get("_reference") or {}).get("file", "models/models_ProMoE_TC.py").endswith("ProMoE_TC.py")


def convert(config: dict, state_dict: dict[str, torch.Tensor]):
    from moezoo.models.dit_moe.convert_promoe import load_model

    return load_model(config, state_dict)


def _capture_moe_inputs(module):
    """Forward pre-hooks storing each MoE block's input; returns (store, handles)."""
    store: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(module.blocks):
        if block.is_moe:
            handles.append(block.mlp.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: store.__setitem__(i, args[0]), with_kwargs=True))
    return store, handles


def official_router_format(ro, top_k: int):
    """(T, k) indices / weights as ProMoE's ``compute_router`` returns them (null-class rows: E in every slot)."""
    idx, w = ro.indices, ro.weights
    if "uncond_token_mask" in ro.extras:
        null = ro.extras["uncond_token_mask"][:, None]
        idx = torch.where(null & (idx == ro.num_experts), torch.full_like(idx, ro.extras["uncond_expert_id"]), idx)
    return idx[:, :top_k], w[:, :top_k]


def run(module, config: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    x, t, y = inputs["in.x"], inputs["in.t"], inputs["in.y"]
    cfg = module.config
    B = x.shape[0]
    result: dict[str, torch.Tensor] = {}
    moe_blocks = [i for i, b in enumerate(module.blocks) if b.is_moe]

    store, handles = _capture_moe_inputs(module)
    try:
        module.eval()
        with torch.no_grad():
            out = module(x, t, y)
        result["out.eval.output"] = out.sample
        for i, ro in zip(moe_blocks, out.router_outputs):
            h = store[i]
            result[f"out.eval.blocks.{i}.mlp.router_input"] = h
            result[f"out.eval.blocks.{i}.mlp.cos_sim"] = module.blocks[i].mlp.gate.cosine(h.reshape(-1, h.shape[-1]))
            idx, w = official_router_format(ro, cfg.num_experts_per_tok)
            result[f"out.eval.blocks.{i}.mlp.router_weights"] = w.reshape(B, -1, w.shape[-1])
            result[f"out.eval.blocks.{i}.mlp.expert_indices"] = idx.reshape(B, -1, idx.shape[-1])

        module.train()
        with torch.enable_grad():
            module.zero_grad(set_to_none=True)
            out = module(x, t, y, force_drop_ids=torch.zeros_like(y))
            total = out.sample.sum()
            if out.routing_contrastive_loss is not None:
                total = total + out.routing_contrastive_loss
            if out.aux_loss is not None:
                total = total + out.aux_loss
            total.backward()
        result["out.train.output"] = out.sample.detach()
        with torch.no_grad():
            for i, ro in zip(moe_blocks, out.router_outputs):
                rcl = module.routing_contrastive_loss([(module.blocks[i], store[i])], [ro])
                result[f"out.train.blocks.{i}.mlp.routing_contrastive_loss"] = cfg.routing_contrastive_coef * rcl
                grad = module.blocks[i].mlp.gate.weight.grad
                result[f"out.train.grad_of_output_sum.blocks.{i}.mlp.cluster_centers"] = (
                    grad.clone() if grad is not None else None)
        if out.routing_contrastive_loss is not None:
            result["out.train.routing_contrastive_loss_total"] = out.routing_contrastive_loss.detach()
    finally:
        for hnd in handles:
            hnd.remove()
        module.zero_grad(set_to_none=True)
        module.eval()
    return result
