"""Parity: DiT-MoE (feizc/DiT-MoE ``models.py``, class ``DiT``) as :class:`moezoo.models.dit_moe.MoezooDiTMoeModel`.

The converted model (:func:`moezoo.models.dit_moe.convert_dit_moe.load_model`) reproduces the eval forward
(``moe_infer``), the train forward (label dropout forced off), the gate of every block (logits, top-k ids and
un-renormalised weights, rows by descending weight), the per-block balance loss
``0.01 * E * sum_e P_e * count_e / (T * k)`` (:func:`moezoo.core.losses.switch_balance_loss` with
``normalize="slots"``), ``forward_with_cfg`` (guidance on the first 3 channels, the official default) and the
gate-weight gradients of ``output.sum()`` where the aux losses get gradient 1 (``AddAuxiliaryLoss``): equal to
backpropagating ``output.sum() + sum of the aux losses``.
"""
from __future__ import annotations

import torch

from moezoo.core.losses import switch_balance_loss

REPO = "feizc/DiT-MoE"


# selected expert ids are compared exactly (any depth up to 512 blocks)
EXACT = frozenset(f"out.eval.blocks.{i}.moe.gate.topk_idx" for i in range(512))


def matches(config: dict) -> bool:
    return (config.get("_reference") or {}).get("class", "DiT") == "DiT"


def convert(config: dict, state_dict: dict[str, torch.Tensor]):
    from moezoo.models.dit_moe.convert_dit_moe import load_model

    return load_model(config, state_dict)


def run(module, config: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    x, t, y = inputs["in.x"], inputs["in.t"], inputs["in.y"]
    cfg = module.config
    no_drop = torch.zeros_like(y)
    result: dict[str, torch.Tensor] = {}
    moe_blocks = [i for i, b in enumerate(module.blocks) if b.is_moe]

    module.eval()
    with torch.no_grad():
        out = module(x, t, y)
    result["out.eval.output"] = out.sample
    for i, ro in zip(moe_blocks, out.router_outputs):
        result[f"out.eval.blocks.{i}.moe.gate.logits"] = ro.logits
        result[f"out.eval.blocks.{i}.moe.gate.topk_idx"] = ro.indices
        result[f"out.eval.blocks.{i}.moe.gate.topk_weight"] = ro.weights

    module.train()
    with torch.enable_grad():
        module.zero_grad(set_to_none=True)
        out = module(x, t, y, force_drop_ids=no_drop)
        (out.sample.sum() + out.aux_loss).backward()
    result["out.train.output"] = out.sample.detach()
    for i, ro in zip(moe_blocks, out.router_outputs):
        loss = cfg.router_aux_loss_coef * switch_balance_loss(ro, normalize=cfg.balance_loss_normalize)
        result[f"out.train.blocks.{i}.moe.gate.aux_loss"] = loss.detach()
        grad = module.blocks[i].mlp.gate.weight.grad
        result[f"out.train.grad_of_output_sum.blocks.{i}.moe.gate.weight"] = grad.clone() if grad is not None else None
    result["out.train.aux_loss_total"] = out.aux_loss.detach()
    module.zero_grad(set_to_none=True)
    module.eval()

    if "in.cfg.x" in inputs:
        with torch.no_grad():
            scale = float(inputs["in.cfg.cfg_scale"])
            result["out.cfg.output"] = module.forward_with_cfg(inputs["in.cfg.x"], inputs["in.cfg.t"],
                                                               inputs["in.cfg.y"], scale, return_dict=False)
    return result
