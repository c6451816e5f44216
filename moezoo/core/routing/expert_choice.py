"""Expert-choice routing (Zhou et al., 2022): every expert picks its top-C tokens."""
from __future__ import annotations

import math

import torch

from .base import Router, register_router
from .output import RouterOutput, check_router_input, check_top_k


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al., 2022): every expert picks its top-C tokens, ``C = ceil(capacity_factor * T
    * top_k / R)`` (at least ``min_capacity``, at most the number of real tokens), so the load is balanced by
    construction and a token may get any number of experts (0 to R).

    Per token the chosen experts are listed by descending score and padded with the sentinel ``num_experts`` to the
    width ``max_experts_per_token`` (default R: nothing is ever cut). A smaller width keeps each token's best
    experts and reports the cut pairs in ``extras["drop_rate"]``. ``extras``: ``capacity`` (C),
    ``unrouted_fraction`` (real tokens that no expert picked), ``drop_rate``.

    The combine weight is the token's router score for the expert (softmax over experts, or sigmoid). Selection uses
    the whole batch of tokens, so it is not causal: an autoregressive model routes differently at generation time.
    Tokens whose ``attention_mask`` signal is 0 are never picked and do not count in T.

    Args:
        hidden_size, num_experts, top_k: H, routable experts R, the average experts per token k.
        capacity_factor: C multiplier (1.0 = on average k experts per token).
        scoring_func: ``"softmax"`` (over experts, the paper's) or ``"sigmoid"``.
        max_experts_per_token: slot width per token (None = R).
        bias, jitter_noise, router_dtype, min_capacity: as in :class:`TopKRouter` / ``expert_capacity``.
    """

    signals = ("attention_mask",)

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, *, capacity_factor: float = 1.0,
                 scoring_func: str = "softmax", max_experts_per_token: int | None = None, bias: bool = False,
                 jitter_noise: float = 0.0, router_dtype: torch.dtype = torch.float32, min_capacity: int = 1):
        check_top_k(top_k, num_experts)
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be a number > 0, got {capacity_factor!r}")
        if max_experts_per_token is not None:
            check_top_k(max_experts_per_token, num_experts, "max_experts_per_token")
        if not isinstance(min_capacity, int) or min_capacity < 1:
            raise ValueError(f"min_capacity must be a positive int, got {min_capacity!r}")
        super().__init__(hidden_size, num_experts, bias=bias, scoring_func=scoring_func, jitter_noise=jitter_noise,
                         router_dtype=router_dtype)
        self.top_k = top_k
        self.capacity_factor = float(capacity_factor)
        self.max_experts_per_token = max_experts_per_token
        self.min_capacity = min_capacity

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert picks out of ``num_tokens``."""
        c = max(self.min_capacity, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))
        return min(c, num_tokens)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> RouterOutput:
        check_router_input(hidden_states, self.hidden_size)
        logits = self.compute_logits(self.jitter(hidden_states))
        probs = self.score(logits)
        T, R = probs.shape
        keep = None
        if attention_mask is not None:
            if not torch.is_tensor(attention_mask) or attention_mask.numel() != T:
                raise ValueError(f"attention_mask must be a tensor with one entry per token ({T})")
            keep = attention_mask.reshape(-1).to(probs.device) != 0
        n_real = T if keep is None else int(keep.sum())
        cap = self.capacity(n_real)
        scores = probs.detach()
        if keep is not None:
            scores = scores.masked_fill(~keep[:, None], float("-inf"))
        chosen = torch.zeros(T, R, dtype=torch.bool, device=probs.device)
        if cap > 0:
            chosen.scatter_(0, scores.topk(cap, dim=0).indices, True)
        if keep is not None:
            chosen &= keep[:, None]
        width = R if self.max_experts_per_token is None else self.max_experts_per_token
        ranked = probs.detach().masked_fill(~chosen, float("-inf"))
        order = ranked.topk(width, dim=-1).indices
        sel = chosen.gather(1, order)
        indices = torch.where(sel, order, torch.full_like(order, R))
        weights = probs.gather(1, order)
        n_pairs = chosen.sum()
        drop_rate = (n_pairs - sel.sum()).float() / n_pairs.clamp_min(1).float()
        unrouted = (~chosen.any(-1) if keep is None else (~chosen.any(-1) & keep)).sum().float() / max(n_real, 1)
        return RouterOutput.from_selection(logits, probs, indices, weights, R, capacity=cap, unrouted_fraction=unrouted, drop_rate=drop_rate)

