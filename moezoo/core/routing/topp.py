"""Top-p (dynamic-k) routing: Dynamic-MoE ("Harder Tasks Need More Experts") and UniMoE-Audio's dynamic-capacity
routing with always-on experts and SparseMixer multipliers."""
from __future__ import annotations

import torch

from .base import Router, register_router
from .output import RouterOutput, check_router_input, check_top_p, token_keep_mask


def sparsemixer_eval_multipliers(sorted_logits: torch.Tensor, eps: float) -> torch.Tensor:
    """Deterministic (eval) SparseMixer multipliers for greedy picks in descending-logit order.

    ``sorted_logits`` (T, D) sorted descending.  Pick ``j`` takes the max of the logits still unpicked (positions
    ``>= j``); its multiplier is the softmax, over those remaining logits whose relative gap
    ``(max - s) / max(|s|, |max|)`` is ``<= 2 * eps``, gathered at the pick.  Without near-ties every multiplier is 1.
    Returns (T, D); entry j is the multiplier of the j-th pick.
    """
    s = sorted_logits
    D = s.shape[-1]
    top = s.unsqueeze(-1)  # (T, D, 1): the pick j
    other = s.unsqueeze(-2)  # (T, 1, D): candidate i
    factor = torch.maximum(top.abs(), other.abs())
    remaining = torch.ones(D, D, dtype=torch.bool, device=s.device).triu()  # i >= j
    in_window = remaining & ((top - other) <= 2.0 * eps * factor)
    return 1.0 / (torch.exp(other - top) * in_window).sum(-1)


@register_router("topp")
class TopPRouter(Router):
    """Top-p (dynamic-k) routing: each token takes the most probable experts until their mass reaches ``top_p``.

    Two conventions (``convention=``):

    ``"dynamic_moe"`` ("Harder Tasks Need More Experts", Dynamic-MoE): probs = softmax over all experts, sorted
    descending; keep experts up to AND including the first whose cumulative sum is strictly ``> top_p`` (so >= 1
    expert).  Weights are the raw softmax probabilities (the paper's and the official choice, the default here);
    ``norm_topp_prob=True`` renormalises them to sum 1.  Raw probabilities are the default on purpose: with
    renormalisation a token routed to a single expert gets weight exactly 1 and its router receives no gradient from
    the task loss.

    ``"unimoe_audio"`` (UniMoE-Audio dynamic-capacity MoE): the experts in ``fixed_expert_ids`` are always on and take no
    part in top-p; over the other ("dynamic") columns, null experts included, ``k = 1 + #(cumsum < top_p)`` of the
    sorted softmax.  The k picks get deterministic SparseMixer multipliers (see :func:`sparsemixer_eval_multipliers`,
    window ``2 * sparsemixer_eps``) renormalised as ``m / (sum m + multiplier_eps)``, times the dynamic group's mass
    in ``softmax(logits masked to {selected dynamic} + {fixed})``; each fixed expert gets its own masked-softmax
    probability.  A padding token (``attention_mask`` signal == 0) keeps no dynamic expert and its fixed experts are
    weighted by the softmax over the fixed columns only.  This is the released code's weighting (it differs from the
    paper's Eq. 3, where each routed expert is weighted by its own probability), kept as the reference behaviour.

    Both: ``top_p = 1`` selects every (dynamic) expert (the official Dynamic-MoE code would keep a single expert when the
    fp32 cumulative sum never exceeds 1, a degenerate edge we do not reproduce).  ``indices`` (T, K) are padded with the
    sentinel ``num_experts``; K is the largest possible count (``num_experts``).  ``extras["dynamic_top_k"]`` (T,) is
    the top-p count before padding masks; ``extras["fixed_expert_ids"]`` the always-on ids.

    Args:
        hidden_size, num_experts: H and the number of routable experts R (zero-FLOP experts included).
        top_p: threshold in (0, 1].
        convention: ``"dynamic_moe"`` or ``"unimoe_audio"``.
        norm_topp_prob: renormalise the selected weights to sum 1 (``"dynamic_moe"`` only).
        fixed_expert_ids: always-on experts (``"unimoe_audio"`` only).
        sparsemixer_eps: UniMoE-Audio's ``router_jitter_noise`` (the SparseMixer window is twice this).
        multiplier_eps: added to the multiplier sum before renormalising (``"unimoe_audio"``).
        bias, jitter_noise: router bias; training-time multiplicative input jitter.
    """

    CONVENTIONS = ("dynamic_moe", "unimoe_audio")

    signals = ("attention_mask",)

    def __init__(self, hidden_size: int, num_experts: int, top_p: float = 0.4, *, convention: str = "dynamic_moe",
                 norm_topp_prob: bool = False, fixed_expert_ids=(), sparsemixer_eps: float = 0.01,
                 multiplier_eps: float = 1e-6, bias: bool = False, jitter_noise: float = 0.0,
                 router_dtype: torch.dtype = torch.float32):
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        top_p = check_top_p(top_p)
        if convention not in self.CONVENTIONS:
            raise ValueError(f"convention must be one of {self.CONVENTIONS}, got {convention!r}")
        fixed = sorted({int(i) for i in fixed_expert_ids})
        if fixed and convention != "unimoe_audio":
            raise ValueError("fixed_expert_ids are only supported with convention='unimoe_audio'")
        if any(not 0 <= i < num_experts for i in fixed):
            raise ValueError(f"fixed_expert_ids must lie in [0, num_experts={num_experts}), got {list(fixed_expert_ids)}")
        if len(fixed) >= num_experts:
            raise ValueError(f"fixed_expert_ids={fixed} leave no dynamic expert among num_experts={num_experts}")
        if norm_topp_prob and convention != "dynamic_moe":
            raise ValueError("norm_topp_prob is only supported with convention='dynamic_moe'")
        if sparsemixer_eps < 0:
            raise ValueError(f"sparsemixer_eps must be >= 0, got {sparsemixer_eps!r}")
        super().__init__(hidden_size, num_experts, bias=bias, jitter_noise=jitter_noise, router_dtype=router_dtype)
        self.top_p, self.convention = top_p, convention
        self.norm_topp_prob, self.sparsemixer_eps, self.multiplier_eps = norm_topp_prob, sparsemixer_eps, multiplier_eps
        self.fixed_expert_ids = fixed
        dynamic = [i for i in range(num_experts) if i not in set(fixed)]
        # plain lists, not non-persistent buffers: from_pretrained (meta-device init) leaves those uninitialised
        self._dynamic_list, self._fixed_list = dynamic, fixed

    @property
    def max_experts_per_tok(self) -> int:
        return self.num_experts

    def _count(self, sorted_probs: torch.Tensor, strict: bool) -> torch.Tensor:
        n = sorted_probs.shape[-1]
        if self.top_p >= 1.0:
            return torch.full(sorted_probs.shape[:1], n, dtype=torch.long, device=sorted_probs.device)
        cs = sorted_probs.cumsum(-1)
        below = (cs < self.top_p) if strict else (cs <= self.top_p)
        return (below.sum(-1) + 1).clamp(max=n)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> RouterOutput:
        check_router_input(hidden_states, self.hidden_size)
        logits = self.compute_logits(self.jitter(hidden_states))
        if self.convention == "dynamic_moe":
            return self._dynamic_moe(logits)
        return self._unimoe_audio(logits, token_keep_mask(attention_mask, logits.shape[0], logits.device))

    def _dynamic_moe(self, logits: torch.Tensor) -> RouterOutput:
        R = self.num_experts
        probs = logits.softmax(dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        k = self._count(sorted_probs.detach(), strict=False)
        keep = torch.arange(R, device=logits.device) < k.unsqueeze(-1)
        weights = torch.where(keep, sorted_probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
        if self.norm_topp_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        indices = torch.where(keep, order, R)
        return RouterOutput.from_selection(logits, probs, indices, weights, R, dynamic_top_k=k, fixed_expert_ids=[])

    def _unimoe_audio(self, logits: torch.Tensor, keep_tok: torch.Tensor | None) -> RouterOutput:
        R, T = self.num_experts, logits.shape[0]
        dyn = torch.tensor(self._dynamic_list, dtype=torch.long, device=logits.device)
        fixed = torch.tensor(self._fixed_list, dtype=torch.long, device=logits.device)
        D = dyn.numel()
        dyn_logits = logits.index_select(1, dyn)
        dyn_probs = dyn_logits.softmax(dim=-1)
        sorted_probs, order = dyn_probs.sort(dim=-1, descending=True, stable=True)
        k = self._count(sorted_probs.detach(), strict=True)
        keep = torch.arange(D, device=logits.device) < k.unsqueeze(-1)
        if keep_tok is not None:
            keep = keep & keep_tok.unsqueeze(-1)
        sorted_logits = dyn_logits.gather(1, order)
        mult = sparsemixer_eval_multipliers(sorted_logits, self.sparsemixer_eps)
        mult = torch.where(keep, mult, torch.zeros((), dtype=mult.dtype, device=mult.device))
        mult = mult / (mult.sum(-1, keepdim=True) + self.multiplier_eps)
        ids = dyn[order]  # (T, D) expert ids in pick order
        selected = torch.zeros(T, R + 1, dtype=torch.bool, device=logits.device)
        selected.scatter_(1, torch.where(keep, ids, R), True)
        selected = selected[:, :R]
        if fixed.numel():
            selected[:, fixed] = True
        masked = logits.masked_fill(~selected, torch.finfo(logits.dtype).min).softmax(dim=-1) * selected
        mass = masked.index_select(1, dyn).sum(-1, keepdim=True)
        dyn_weights = mult * mass
        indices = torch.cat([torch.where(keep, ids, R), fixed.unsqueeze(0).expand(T, -1)], 1)
        weights = torch.cat([dyn_weights, masked.index_select(1, fixed)], 1)
        probs = torch.zeros_like(logits).index_copy(1, dyn, dyn_probs)
        return RouterOutput.from_selection(logits, probs, indices, weights, R, dynamic_top_k=k, fixed_expert_ids=list(self.fixed_expert_ids))

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, num_experts={self.num_experts}, top_p={self.top_p}, "
                f"convention={self.convention!r}, fixed={self.fixed_expert_ids}")


