"""Auxiliary losses of the shared backbone. Each takes router outputs (or their tensors) and returns a scalar."""
from __future__ import annotations

import torch

from .routers import RouterOutput


def _token_mask(mask: torch.Tensor | None, n_tokens: int, device) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = mask.reshape(-1).to(device=device, dtype=torch.float32)
    if mask.numel() != n_tokens:
        raise ValueError(f"attention_mask has {mask.numel()} entries, expected one per token ({n_tokens})")
    return mask


def switch_balance_loss(router_outputs: RouterOutput | list[RouterOutput], *, num_experts: int | None = None,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss ``E * sum_e f_e * P_e`` (micro-batch).

    ``f_e`` is the fraction of routing slots (token x top-k) sent to expert e, ``P_e`` the mean router probability.
    Several layers are concatenated along tokens, as transformers' ``load_balancing_loss_func`` does.
    ``num_experts`` defaults to the router's full expert space (zero-FLOP experts included).
    """
    if isinstance(router_outputs, RouterOutput):
        router_outputs = [router_outputs]
    probs = torch.cat([ro.probs.reshape(-1, ro.probs.shape[-1]).float() for ro in router_outputs], 0)
    R = router_outputs[0].num_experts
    E = num_experts or R
    sel = torch.cat([ro.indices.reshape(-1, ro.indices.shape[-1]) for ro in router_outputs], 0)
    onehot = torch.zeros(sel.shape[0], sel.shape[1], R + 1, device=probs.device).scatter_(2, sel.unsqueeze(-1), 1.0)[..., :R]
    mask = _token_mask(attention_mask.repeat(len(router_outputs), *([1] * (attention_mask.dim() - 1)))
                       if attention_mask is not None else None, probs.shape[0], probs.device)
    if mask is None:
        f = onehot.mean(0)  # (k, R)
        p = probs.mean(0)
    else:
        f = (onehot * mask[:, None, None]).sum(0) / mask.sum()
        p = (probs * mask[:, None]).sum(0) / mask.sum()
    return (f * p.unsqueeze(0)).sum() * E


def router_z_loss(router_outputs: RouterOutput | list[RouterOutput]) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2``."""
    if isinstance(router_outputs, RouterOutput):
        router_outputs = [router_outputs]
    logits = torch.cat([ro.logits.reshape(-1, ro.logits.shape[-1]).float() for ro in router_outputs], 0)
    return torch.logsumexp(logits, dim=-1).pow(2).mean()
