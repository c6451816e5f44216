"""Token dispatch: dropless (the default, see ``experts.moezoo_experts_forward``) and capacity-factor mode."""
from __future__ import annotations

import math

import torch

from .routing.output import RouterOutput


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int = 1) -> int:
    """Slots per expert: ``ceil(capacity_factor * T * k / E)`` (at least ``min_capacity``)."""
    return max(min_capacity, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def apply_capacity(ro: RouterOutput, num_experts: int, capacity_factor: float, *, policy: str = "probs",
                   min_capacity: int = 1, capacity: int | None = None) -> RouterOutput:
    """Drop token-expert pairs beyond each expert's capacity.

    ``policy="probs"`` keeps the pairs with the highest routing weight, ``"position"`` the earliest tokens (Switch),
    ``"choice"`` every token's first choice before any second choice, each in token order (GShard / DeepSpeed
    top-2: an expert's slots go to its first-choice tokens, then to its second-choice tokens).
    ``capacity`` overrides the slots per expert computed from ``capacity_factor`` (``expert_capacity``).
    Dropped slots become sentinels with weight 0; ``extras["drop_rate"]`` is the fraction of routed pairs dropped,
    ``extras["capacity"]`` the capacity used and ``extras["capacity_slot"]`` (T, K) the position of each pair in its
    expert's queue (counted before dropping; -1 for dropped pairs and sentinels).
    """
    if policy not in ("probs", "position", "choice"):
        raise ValueError(f"drop_policy must be 'probs', 'position' or 'choice', got {policy!r}")
    idx, w = ro.indices, ro.weights
    T, K = idx.shape
    cap = int(capacity) if capacity is not None else expert_capacity(T, num_experts, K, capacity_factor, min_capacity)
    flat_idx = idx.reshape(-1)
    valid = flat_idx < num_experts
    if policy == "probs":
        priority = w.detach().reshape(-1).float()
    elif policy == "position":  # earlier tokens first, then earlier slots
        priority = -torch.arange(flat_idx.numel(), device=idx.device, dtype=torch.float32)
    else:  # earlier slots first (all first choices), then earlier tokens
        pos = torch.arange(flat_idx.numel(), device=idx.device)
        priority = -((pos % K) * T + pos // K).to(torch.float64)
    # order slots by (expert, priority desc); rank inside each expert's group
    key_exp = torch.where(valid, flat_idx, num_experts)
    order = torch.argsort(priority, descending=True, stable=True)
    order = order[torch.argsort(key_exp[order], stable=True)]
    counts = torch.bincount(key_exp, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(flat_idx)
    rank[order] = torch.arange(flat_idx.numel(), device=idx.device) - starts[key_exp[order]]
    keep = valid & (rank < cap)
    n_valid = int(valid.sum())
    drop_rate = (valid & ~keep).sum().float() / max(n_valid, 1)
    new_idx = torch.where(keep, flat_idx, num_experts).view(T, K)
    new_w = torch.where(keep.view(T, K), w, torch.zeros((), dtype=w.dtype, device=w.device))
    slot = torch.where(keep, rank, torch.full_like(rank, -1)).view(T, K)
    extras = dict(ro.extras, drop_rate=drop_rate, capacity=cap, capacity_slot=slot)
    return RouterOutput.from_selection(ro.logits, ro.probs, new_idx, new_w, ro.num_experts, ro.aux_loss, **extras)
