"""Routers of the shared backbone.

Every router maps token features (T, H) -> :class:`RouterOutput`. Expert ids index one space: routed experts
``[0, E)``, then the zero-FLOP experts of the layer (null / zero / copy / constant), and the sentinel id is the total
count ``num_experts`` of the router; sentinel slots carry weight 0 and pad dynamic-k selections to a common width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    """What every router returns.

    Attributes:
        logits: (T, R) raw router scores over every routable expert (R = routed + zero-FLOP experts).
        probs: (T, R) probabilities/scores after the scoring function (softmax or sigmoid).
        indices: (T, K) int64 selected expert ids, padded with the sentinel ``num_experts`` (= R) for dynamic k.
        weights: (T, K) combine weight of each selected slot (0 at sentinel slots).
        experts_per_token: (T,) int64 number of non-sentinel slots per token.
        num_experts: R, also the sentinel id.
        aux_loss: an auxiliary loss the router computes itself (already multiplied by its coefficient), or None.
        extras: router-specific tensors (e.g. ``gate_residual`` for the next MoE++ layer, ``drop_rate``).
    """

    logits: torch.Tensor
    probs: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    experts_per_token: torch.Tensor
    num_experts: int
    aux_loss: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def sentinel(self) -> int:
        return self.num_experts

    def expert_mask(self) -> torch.Tensor:
        """(T, R) int64, 1 where the expert is selected."""
        mask = torch.zeros(self.indices.shape[0], self.num_experts + 1, dtype=torch.long, device=self.indices.device)
        mask.scatter_(1, self.indices, 1)
        return mask[:, : self.num_experts]

    def combine_weights(self) -> torch.Tensor:
        """(T, R) weight of each expert's output (0 where not selected)."""
        dense = torch.zeros(self.indices.shape[0], self.num_experts + 1, dtype=self.weights.dtype, device=self.weights.device)
        dense.scatter_add_(1, self.indices, self.weights)
        return dense[:, : self.num_experts]

    def reshape_tokens(self, *lead: int) -> "RouterOutput":
        """View the per-token tensors with leading dims ``lead`` (e.g. (B, S)) instead of T."""
        def r(t):
            return t.reshape(*lead, *t.shape[1:]) if t is not None else None
        return RouterOutput(r(self.logits), r(self.probs), r(self.indices), r(self.weights), r(self.experts_per_token),
                            self.num_experts, self.aux_loss, dict(self.extras))


def check_router_input(x: torch.Tensor, hidden_size: int | None, name: str = "hidden_states") -> None:
    if hidden_size is not None and x.shape[-1] != hidden_size:
        raise ValueError(f"{name} has last dimension {x.shape[-1]}, expected hidden_size={hidden_size}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} reaching the router contains NaN or inf values")


def check_top_k(top_k: int, num_experts: int, name: str = "num_experts_per_tok") -> None:
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"{name} must be an int in [1, num_experts={num_experts}], got {top_k!r}")


def jitter(x: torch.Tensor, eps: float, training: bool) -> torch.Tensor:
    """Multiplicative input jitter ``x * U(1 - eps, 1 + eps)`` (Switch Transformer), training only."""
    if not training or eps <= 0:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


def finish(logits, probs, indices, weights, num_experts, aux_loss=None, **extras) -> RouterOutput:
    """Build a RouterOutput, zeroing sentinel weights and counting experts per token."""
    valid = indices < num_experts
    weights = torch.where(valid, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
    return RouterOutput(logits, probs, indices, weights, valid.sum(-1), num_experts, aux_loss, extras)


class TopKRouter(nn.Module):
    """Token-choice top-k routing (Switch/Mixtral/Qwen-MoE/DeepSeek-V3/OLMoE and the families built on them).

    Args:
        hidden_size, num_experts, top_k: H, number of routable experts R, k.
        scoring_func: ``"softmax"`` or ``"sigmoid"``.
        norm_topk_prob: renormalise the k selected weights to sum 1 (``renorm_eps`` added to the denominator).
        softmax_after_topk: softmax over the k selected logits only (Mixtral's "topk then softmax" variant).
        bias: a bias on the router linear layer.
        n_group, topk_group: DeepSeek-V3 group-limited selection (groups ranked by the sum of their top-2 scores).
        equal_per_group: MoGE: select ``top_k // n_group`` experts inside every group.
        use_selection_bias: a non-trainable ``e_score_correction_bias`` added for *selection only*, updated by
            :func:`moezoo.core.losses.update_selection_bias` (DeepSeek-V3 auxiliary-loss-free balancing).
        routed_scaling_factor: multiplies the final weights.
        jitter_noise: training-time multiplicative input jitter.
        router_dtype: dtype the scores are computed in (fp32 by default).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, scoring_func: str = "softmax",
                 norm_topk_prob: bool = True, softmax_after_topk: bool = False, bias: bool = False,
                 n_group: int = 1, topk_group: int = 1, equal_per_group: bool = False,
                 use_selection_bias: bool = False, routed_scaling_factor: float = 1.0, jitter_noise: float = 0.0,
                 renorm_eps: float = 0.0, router_dtype: torch.dtype = torch.float32):
        super().__init__()
        check_top_k(top_k, num_experts)
        if scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")
        if num_experts % n_group:
            raise ValueError(f"num_experts={num_experts} must be divisible by n_group={n_group}")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
        if equal_per_group and top_k % n_group:
            raise ValueError(f"equal_per_group needs num_experts_per_tok={top_k} divisible by n_group={n_group}")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.scoring_func, self.norm_topk_prob, self.softmax_after_topk = scoring_func, norm_topk_prob, softmax_after_topk
        self.n_group, self.topk_group, self.equal_per_group = n_group, topk_group, equal_per_group
        self.routed_scaling_factor, self.jitter_noise, self.renorm_eps = routed_scaling_factor, jitter_noise, renorm_eps
        self.router_dtype = router_dtype
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        if use_selection_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        else:
            self.e_score_correction_bias = None
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.router_dtype), self.weight.to(self.router_dtype),
                        None if self.bias is None else self.bias.to(self.router_dtype))

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices (T, k) of the chosen experts given selection scores (T, R)."""
        T, R = scores.shape
        if self.n_group > 1:
            grouped = scores.view(T, self.n_group, R // self.n_group)
            if self.equal_per_group:
                per = self.top_k // self.n_group
                local = grouped.topk(per, dim=-1).indices
                base = torch.arange(self.n_group, device=scores.device).view(1, -1, 1) * (R // self.n_group)
                return (local + base).reshape(T, self.top_k)
            k_in_group = min(2, R // self.n_group)
            group_scores = grouped.topk(k_in_group, dim=-1).values.sum(-1)
            group_idx = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
            keep = group_mask.unsqueeze(-1).expand_as(grouped).reshape(T, R).bool()
            scores = scores.masked_fill(~keep, float("-inf"))
        return scores.topk(self.top_k, dim=-1).indices

    def forward(self, hidden_states: torch.Tensor, **_) -> RouterOutput:
        check_router_input(hidden_states, self.hidden_size)
        x = jitter(hidden_states, self.jitter_noise, self.training)
        logits = self.compute_logits(x)
        if self.softmax_after_topk:
            top_logits, indices = logits.topk(self.top_k, dim=-1)
            weights = top_logits.softmax(dim=-1)
            return finish(logits, logits.softmax(-1), indices, weights, self.num_experts)
        probs = self.score(logits)
        sel = probs if self.e_score_correction_bias is None else probs + self.e_score_correction_bias
        indices = self.select(sel.detach() if self.e_score_correction_bias is not None else sel)
        weights = probs.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + self.renorm_eps)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return finish(logits, probs, indices, weights, self.num_experts)


ROUTERS: dict[str, type[nn.Module]] = {"topk": TopKRouter}


def register_router(name: str):
    """Decorator adding a router class to :data:`ROUTERS` under ``name``."""
    def deco(cls):
        ROUTERS[name] = cls
        return cls
    return deco


def router_parameters(router_type: str) -> set[str]:
    """Names of the constructor arguments of a registered router (``top_k`` for token-choice routers, ...)."""
    import inspect

    if router_type not in ROUTERS:
        raise ValueError(f"router_type={router_type!r} is unknown; expected one of {sorted(ROUTERS)}")
    return set(inspect.signature(ROUTERS[router_type]).parameters)


def build_router(router_type: str, **kwargs) -> nn.Module:
    if router_type not in ROUTERS:
        raise ValueError(f"router_type={router_type!r} is unknown; expected one of {sorted(ROUTERS)}")
    return ROUTERS[router_type](**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Expert-choice routing
# ----------------------------------------------------------------------------------------------------------------------


@register_router("expert_choice")
class ExpertChoiceRouter(nn.Module):
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

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, *, capacity_factor: float = 1.0,
                 scoring_func: str = "softmax", max_experts_per_token: int | None = None, bias: bool = False,
                 jitter_noise: float = 0.0, router_dtype: torch.dtype = torch.float32, min_capacity: int = 1):
        super().__init__()
        check_top_k(top_k, num_experts)
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be a number > 0, got {capacity_factor!r}")
        if scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")
        if max_experts_per_token is not None:
            check_top_k(max_experts_per_token, num_experts, "max_experts_per_token")
        if not isinstance(min_capacity, int) or min_capacity < 1:
            raise ValueError(f"min_capacity must be a positive int, got {min_capacity!r}")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.capacity_factor, self.scoring_func = float(capacity_factor), scoring_func
        self.max_experts_per_token = max_experts_per_token
        self.jitter_noise, self.router_dtype, self.min_capacity = jitter_noise, router_dtype, min_capacity
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert picks out of ``num_tokens``."""
        c = max(self.min_capacity, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))
        return min(c, num_tokens)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> RouterOutput:
        check_router_input(hidden_states, self.hidden_size)
        x = jitter(hidden_states, self.jitter_noise, self.training)
        logits = F.linear(x.to(self.router_dtype), self.weight.to(self.router_dtype),
                          None if self.bias is None else self.bias.to(self.router_dtype))
        probs = torch.sigmoid(logits) if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
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
        return finish(logits, probs, indices, weights, R, capacity=cap, unrouted_fraction=unrouted, drop_rate=drop_rate)


# ----------------------------------------------------------------------------------------------------------------------
# Top-p (dynamic-k) routing, null-expert-aware top-k (AdaMoE) and MoE++ gating
# ----------------------------------------------------------------------------------------------------------------------


def check_top_p(top_p) -> float:
    """``top_p`` must be a real number in (0, 1]."""
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    return float(top_p)


def token_mask_weights(attention_mask: torch.Tensor | None, n_tokens: int, device) -> torch.Tensor | None:
    """A padding mask of any shape with one entry per token -> (T,) float32 weights (0 = padding), or None."""
    if attention_mask is None:
        return None
    if not torch.is_tensor(attention_mask):
        raise ValueError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    m = attention_mask.reshape(-1)
    if m.numel() != n_tokens:
        raise ValueError(f"attention_mask has {m.numel()} entries, expected one per token ({n_tokens})")
    return m.to(device=device, dtype=torch.float32)


def token_keep_mask(attention_mask: torch.Tensor | None, n_tokens: int, device) -> torch.Tensor | None:
    """A padding mask of any shape with one entry per token -> (T,) bool (True = real token), or None."""
    m = token_mask_weights(attention_mask, n_tokens, device)
    return None if m is None else m != 0


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
class TopPRouter(nn.Module):
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

    def __init__(self, hidden_size: int, num_experts: int, top_p: float = 0.4, *, convention: str = "dynamic_moe",
                 norm_topp_prob: bool = False, fixed_expert_ids=(), sparsemixer_eps: float = 0.01,
                 multiplier_eps: float = 1e-6, bias: bool = False, jitter_noise: float = 0.0,
                 router_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        self.top_p = check_top_p(top_p)
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
        self.hidden_size, self.num_experts, self.convention = hidden_size, num_experts, convention
        self.norm_topp_prob, self.sparsemixer_eps, self.multiplier_eps = norm_topp_prob, sparsemixer_eps, multiplier_eps
        self.jitter_noise, self.router_dtype = jitter_noise, router_dtype
        self.fixed_expert_ids = fixed
        dynamic = [i for i in range(num_experts) if i not in set(fixed)]
        # plain lists, not non-persistent buffers: from_pretrained (meta-device init) leaves those uninitialised
        self._dynamic_list, self._fixed_list = dynamic, fixed
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)

    @property
    def max_experts_per_tok(self) -> int:
        return self.num_experts

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.router_dtype), self.weight.to(self.router_dtype),
                        None if self.bias is None else self.bias.to(self.router_dtype))

    def _count(self, sorted_probs: torch.Tensor, strict: bool) -> torch.Tensor:
        n = sorted_probs.shape[-1]
        if self.top_p >= 1.0:
            return torch.full(sorted_probs.shape[:1], n, dtype=torch.long, device=sorted_probs.device)
        cs = sorted_probs.cumsum(-1)
        below = (cs < self.top_p) if strict else (cs <= self.top_p)
        return (below.sum(-1) + 1).clamp(max=n)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> RouterOutput:
        check_router_input(hidden_states, self.hidden_size)
        x = jitter(hidden_states, self.jitter_noise, self.training)
        logits = self.compute_logits(x)
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
        return finish(logits, probs, indices, weights, R, dynamic_top_k=k, fixed_expert_ids=[])

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
        return finish(logits, probs, indices, weights, R, dynamic_top_k=k, fixed_expert_ids=list(self.fixed_expert_ids))

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, num_experts={self.num_experts}, top_p={self.top_p}, "
                f"convention={self.convention!r}, fixed={self.fixed_expert_ids}")


@register_router("topk_null")
class NullExpertTopKRouter(TopKRouter):
    """AdaMoE routing: top-k over true + null experts, the selected TRUE experts renormalised among themselves.

    The router space is ``[true experts 0..num_true_experts) | null experts ...]`` (the layer's null experts follow its
    routed experts).  Selected weights of ids ``< num_true_experts`` are divided by their sum; a token whose k picks are
    all null gets sum 1 (its output is exactly 0).  Null-expert weights are left as raw probabilities (they multiply a
    zero output).  Other kwargs as :class:`TopKRouter` (``norm_topk_prob`` is forced off: this renormalisation replaces
    it).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, num_true_experts: int, **kwargs):
        if not isinstance(num_true_experts, int) or not 1 <= num_true_experts <= num_experts:
            raise ValueError(f"num_true_experts must be an int in [1, num_experts={num_experts}], got {num_true_experts!r}")
        kwargs["norm_topk_prob"] = False
        super().__init__(hidden_size, num_experts, top_k, **kwargs)
        self.num_true_experts = num_true_experts

    def forward(self, hidden_states: torch.Tensor, **signals) -> RouterOutput:
        out = super().forward(hidden_states, **signals)
        true = out.indices < self.num_true_experts
        total = (out.weights * true).sum(-1, keepdim=True)
        total = torch.where(total == 0, torch.ones_like(total), total)
        weights = torch.where(true, out.weights / total, out.weights)
        return finish(out.logits, out.probs, out.indices, weights, out.num_experts, out.aux_loss, **out.extras)


@register_router("moepp")
class GatingResidualRouter(TopKRouter):
    """MoE++ routing: optional 2-layer tanh gate, gating residual from the previous MoE layer, zeroed-expert quirk.

    ``logits = gate(x) (+ gate_map(gate_residual))`` where ``gate`` is ``Linear(H, R)`` or, with ``gate_hidden_size=G``,
    ``Linear(H, G) -> tanh -> Linear(G, R)`` (parameters ``weight_in`` (G, H) and ``weight`` (R, G)), and
    ``gate_map = Linear(R, R, bias=False)`` (when ``gating_residual``) applied to the ``gate_residual=`` signal (T, R),
    the previous layer's returned logits.  The logits including the residual are returned as
    ``extras["gate_residual"]`` for the next layer.  Then softmax over all R, top-k, and:

    ``zeroed_expert_ids``: the weight of these experts (MoE++ zero experts) is set to 0 BEFORE the top-k weights are
    renormalised, so a token choosing (zero, X) gives X weight 1 (the official MoE++ code).  Default ``()``: the zero
    expert keeps its probability and, since its output is 0, the token's FFN output shrinks by that share — the
    mixture the paper describes; set the ids to reproduce the released code.
    Other kwargs as :class:`TopKRouter` (``norm_topk_prob`` True by default: MoE++ renormalises the top-k gates).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, gate_hidden_size: int | None = None,
                 gating_residual: bool = True, zeroed_expert_ids=(), **kwargs):
        super().__init__(hidden_size, num_experts, top_k, **kwargs)
        if self.n_group > 1 or self.softmax_after_topk or self.e_score_correction_bias is not None:
            raise ValueError("the moepp router supports neither n_group, softmax_after_topk nor use_selection_bias")
        if gate_hidden_size is not None:
            if not isinstance(gate_hidden_size, int) or gate_hidden_size <= 0:
                raise ValueError(f"gate_hidden_size must be a positive int or None, got {gate_hidden_size!r}")
            self.weight_in = nn.Parameter(torch.empty(gate_hidden_size, hidden_size))
            self.weight = nn.Parameter(torch.empty(num_experts, gate_hidden_size))
            nn.init.normal_(self.weight_in, std=hidden_size ** -0.5)
            nn.init.normal_(self.weight, std=gate_hidden_size ** -0.5)
        else:
            self.weight_in = None
        self.gate_hidden_size = gate_hidden_size
        self.gate_map = nn.Linear(num_experts, num_experts, bias=False) if gating_residual else None
        zeroed = sorted({int(i) for i in zeroed_expert_ids})
        if any(not 0 <= i < num_experts for i in zeroed):
            raise ValueError(f"zeroed_expert_ids must lie in [0, num_experts={num_experts}), got {list(zeroed_expert_ids)}")
        self.zeroed_expert_ids = zeroed

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_in is None:
            return super().compute_logits(x)
        dt = self.router_dtype
        h = torch.tanh(F.linear(x.to(dt), self.weight_in.to(dt)))
        return F.linear(h, self.weight.to(dt), None if self.bias is None else self.bias.to(dt))

    def forward(self, hidden_states: torch.Tensor, gate_residual: torch.Tensor | None = None, **_) -> RouterOutput:
        check_router_input(hidden_states, self.hidden_size)
        x = jitter(hidden_states, self.jitter_noise, self.training)
        logits = self.compute_logits(x)
        if gate_residual is not None and self.gate_map is not None:
            if not torch.is_tensor(gate_residual) or gate_residual.reshape(-1, gate_residual.shape[-1]).shape != logits.shape:
                shape = tuple(gate_residual.shape) if torch.is_tensor(gate_residual) else type(gate_residual).__name__
                raise ValueError(f"gate_residual must be the previous layer's logits of shape {tuple(logits.shape)} "
                                 f"(tokens, num_experts), got {shape}")
            logits = logits + self.gate_map(gate_residual.reshape(logits.shape).to(logits.dtype))
        probs = self.score(logits)
        indices = self.select(probs)
        weights = probs.gather(1, indices)
        if self.zeroed_expert_ids:
            zero = torch.isin(indices, torch.tensor(self.zeroed_expert_ids, device=indices.device))
            weights = weights.masked_fill(zero, 0.0)
        if self.norm_topk_prob:
            total = weights.sum(-1, keepdim=True) + self.renorm_eps
            weights = weights / torch.where(total == 0, torch.ones_like(total), total)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return finish(logits, probs, indices, weights, self.num_experts, gate_residual=logits)


# ----------------------------------------------------------------------------------------------------------------------
# Conditional routers: per-sample condition (HiMoE-VLA AS-MoE), per-sample pooled routing (DriveMoE), modality pools
# (MoIIE). They set ``uses_token_shape = True`` so that MoELayer passes the (batch, seq) shape of the tokens.
# ----------------------------------------------------------------------------------------------------------------------


def samples_of_tokens(num_tokens: int, batch_size: int, token_shape=None, name: str = "condition") -> int:
    """Tokens per sample when ``num_tokens`` flattened tokens belong to ``batch_size`` samples (row-major order).

    ``token_shape`` (the leading shape of the un-flattened hidden states, e.g. (B, S)) is checked when given.
    """
    if token_shape is not None and len(token_shape) >= 2:
        lead = tuple(int(s) for s in token_shape)
        if math.prod(lead) != num_tokens:
            raise ValueError(f"token_shape={lead} does not hold {num_tokens} tokens")
        if lead[0] != batch_size:
            raise ValueError(f"{name} has batch size {batch_size} but the hidden states have leading shape {lead} "
                             f"(batch {lead[0]})")
    if batch_size <= 0 or num_tokens % batch_size:
        raise ValueError(f"{name} has batch size {batch_size}, which does not divide the {num_tokens} tokens; "
                         f"expected one row per sample of hidden_states (batch, seq, hidden)")
    return num_tokens // batch_size


def expand_per_sample(values: torch.Tensor, num_tokens: int, token_shape=None, name: str = "condition") -> torch.Tensor:
    """(B, ...) per-sample rows -> (T, ...) one row per token (each sample's row repeated over its tokens)."""
    per = samples_of_tokens(num_tokens, values.shape[0], token_shape, name)
    return values.repeat_interleave(per, dim=0) if per != 1 else values


def _topk_weights(probs: torch.Tensor, top_k: int, norm: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    weights, indices = probs.topk(top_k, dim=-1)
    if norm:
        weights = weights / (weights.sum(-1, keepdim=True) + eps)
    return weights, indices


@register_router("condition")
class ConditionRouter(TopKRouter):
    """Routes on a per-sample condition vector instead of the token (HiMoE-VLA's action-space AS-MoE).

    ``forward(hidden_states (T, H), condition=(B, C) | (B, S, C) | (T, C), token_shape=(B, S))``: the condition of a
    sample is repeated over its ``S = T // B`` tokens (so every token of a sample gets the same experts), then the
    top-k routing of :class:`TopKRouter` runs on it (``weight`` is (E, C); every TopKRouter option applies).
    Boolean conditions (HiMoE's action-dimension ``data_mask``) are cast to float.

    ``mi_loss_coef > 0``: in training the router returns ``aux_loss = coef * mutual_information_loss(probs, condition)``
    (HiMoE's InfoNCE between routing distributions of tokens with the same condition; see
    :func:`moezoo.core.losses.mutual_information_loss`, ``mi_temperature`` / ``mi_threshold``).
    ``extras["condition"]`` holds the per-token (T, C) condition.

    HiMoE top-1 uses the raw softmax probability (``norm_topk_prob=False``); its official code renormalises only when
    ``top_k > 1``, with ``renorm_eps=1e-20``.
    """

    uses_token_shape = True

    def __init__(self, condition_dim: int, num_experts: int, top_k: int, *, hidden_size: int | None = None,
                 mi_loss_coef: float = 0.0, mi_temperature: float = 0.1, mi_threshold: float = 0.99, **kwargs):
        if not isinstance(condition_dim, int) or condition_dim <= 0:
            raise ValueError(f"condition_dim must be a positive int, got {condition_dim!r}")
        super().__init__(condition_dim, num_experts, top_k, **kwargs)
        self.condition_dim = condition_dim
        self.token_hidden_size = hidden_size
        self.mi_loss_coef, self.mi_temperature, self.mi_threshold = mi_loss_coef, mi_temperature, mi_threshold

    def expand_condition(self, condition, num_tokens: int, token_shape=None) -> torch.Tensor:
        if condition is None:
            raise ValueError("ConditionRouter needs the signal condition= of shape (batch, condition_dim="
                             f"{self.condition_dim}) (one condition vector per sample)")
        if not torch.is_tensor(condition):
            raise ValueError(f"condition must be a tensor of shape (batch, {self.condition_dim}), "
                             f"got {type(condition).__name__}")
        if condition.dim() < 2 or condition.shape[-1] != self.condition_dim:
            raise ValueError(f"condition has shape {tuple(condition.shape)}, expected (batch, condition_dim="
                             f"{self.condition_dim}) or (batch, seq, {self.condition_dim})")
        cond = condition if condition.is_floating_point() else condition.to(self.weight.dtype)
        if cond.dim() > 2:  # already per token
            cond = cond.reshape(-1, self.condition_dim)
            if cond.shape[0] != num_tokens:
                raise ValueError(f"condition has shape {tuple(condition.shape)} = {cond.shape[0]} tokens, "
                                 f"expected {num_tokens} tokens (or one row per sample)")
            return cond
        return expand_per_sample(cond, num_tokens, token_shape, "condition")

    def forward(self, hidden_states: torch.Tensor, condition: torch.Tensor | None = None, token_shape=None,
                **signals) -> RouterOutput:
        check_router_input(hidden_states, self.token_hidden_size)
        cond = self.expand_condition(condition, hidden_states.shape[0], token_shape)
        out = super().forward(cond, **signals)
        out.extras["condition"] = cond
        if self.training and self.mi_loss_coef > 0:
            from .losses import mutual_information_loss

            mi = mutual_information_loss(out.probs, cond, temperature=self.mi_temperature,
                                         threshold=self.mi_threshold) * self.mi_loss_coef
            out.aux_loss = mi if out.aux_loss is None else out.aux_loss + mi
        return out


@register_router("pooled")
class PooledRouter(nn.Module):
    """Per-sample routing: token logits averaged over each sample, divided by a learnable temperature (DriveMoE).

    ``sample_logits = mean_s(W h_s) / |temperature|`` (B, R); ``probs = softmax`` in fp32; top-k; weights renormalised to
    sum 1 (``renorm_eps`` added to the denominator, 0 = DriveMoE); all tokens of a sample share experts and weights.

    Where the logits come from (signals of ``forward``):
      - ``router_logits=`` (B, R): already pooled logits (DriveMoE computes them once and reuses them in every MoE
        layer); used as they are.
      - ``router_hidden_states=`` (B, S', H): hidden states of another layer (DriveMoE: the layer before the first MoE
        layer) pooled instead of the layer's own input.
      - otherwise the layer's own tokens, grouped into samples by ``token_shape`` (MoELayer passes it).
    ``attention_mask=`` (B, S) of the pooled tokens: with ``mask_padding=True`` (default) padding is left out of the
    mean; ``mask_padding=False`` is the official plain mean over all positions.
    ``use_linear=False`` builds a router without weights that only accepts ``router_logits=``.

    ``extras``: ``sample_logits``, ``sample_probs``, ``sample_indices``, ``sample_weights`` (per-sample tensors);
    ``logits``/``probs``/``indices``/``weights`` of the RouterOutput are those repeated over each sample's tokens.
    """

    uses_token_shape = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, temperature: float = 1.0,
                 learnable_temperature: bool = True, use_linear: bool = True, bias: bool = False,
                 norm_topk_prob: bool = True, renorm_eps: float = 0.0, mask_padding: bool = True,
                 router_dtype: torch.dtype = torch.float32):
        super().__init__()
        check_top_k(top_k, num_experts)
        if temperature == 0:
            raise ValueError("temperature must be non-zero (logits are divided by |temperature|)")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.norm_topk_prob, self.renorm_eps, self.mask_padding = norm_topk_prob, renorm_eps, mask_padding
        self.router_dtype = router_dtype
        t = torch.tensor([float(temperature)])
        if learnable_temperature:
            self.temperature = nn.Parameter(t)
        else:
            self.register_buffer("temperature", t)
        if use_linear:
            self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
            self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
            nn.init.normal_(self.weight, std=hidden_size ** -0.5)
        else:
            self.weight = self.bias = None

    def pooled_logits(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, H) -> (B, R) ``mean_s(W h) / |temperature|``."""
        if self.weight is None:
            raise ValueError("this PooledRouter has no weights (use_linear=False): pass router_logits= (batch, "
                             f"num_experts={self.num_experts})")
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden states to pool must have shape (batch, seq, {self.hidden_size}), "
                             f"got {tuple(hidden_states.shape)}")
        check_router_input(hidden_states, self.hidden_size)
        dt = self.router_dtype
        tok = F.linear(hidden_states.to(dt), self.weight.to(dt), None if self.bias is None else self.bias.to(dt))
        if attention_mask is not None and self.mask_padding:
            if tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                 f"{tuple(hidden_states.shape[:2])} (batch, seq)")
            m = (attention_mask != 0).to(dt).unsqueeze(-1)
            pooled = (tok * m).sum(1) / m.sum(1).clamp_min(1.0)
        else:
            pooled = tok.mean(1)
        return pooled / self.temperature.abs().to(dt)

    def route_samples(self, sample_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, R) logits -> probs (B, R), indices (B, k), weights (B, k)."""
        probs = sample_logits.float().softmax(dim=-1)
        weights, indices = _topk_weights(probs, self.top_k, self.norm_topk_prob, self.renorm_eps)
        return probs, indices, weights

    def forward(self, hidden_states: torch.Tensor, *, token_shape=None, router_hidden_states: torch.Tensor | None = None,
                router_logits: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **_) -> RouterOutput:
        T = hidden_states.shape[0]
        if router_logits is not None:
            if not torch.is_tensor(router_logits) or router_logits.dim() != 2 or router_logits.shape[-1] != self.num_experts:
                shape = tuple(router_logits.shape) if torch.is_tensor(router_logits) else type(router_logits).__name__
                raise ValueError(f"router_logits must have shape (batch, num_experts={self.num_experts}), got {shape}")
            sample_logits = router_logits
        elif router_hidden_states is not None:
            if not torch.is_tensor(router_hidden_states):
                raise ValueError("router_hidden_states must be a tensor of shape (batch, seq, hidden)")
            sample_logits = self.pooled_logits(router_hidden_states, attention_mask
                                               if attention_mask is not None and tuple(attention_mask.shape)
                                               == tuple(router_hidden_states.shape[:2]) else None)
        else:
            if token_shape is None or len(token_shape) < 2:
                raise ValueError("PooledRouter needs samples: call the MoELayer with hidden_states (batch, seq, hidden), "
                                 "or pass token_shape=(batch, seq), router_hidden_states= or router_logits=")
            B = int(token_shape[0])
            samples_of_tokens(T, B, token_shape, "token_shape")
            sample_logits = self.pooled_logits(hidden_states.reshape(B, -1, hidden_states.shape[-1]), attention_mask)
        probs, indices, weights = self.route_samples(sample_logits)
        per = samples_of_tokens(T, sample_logits.shape[0], token_shape, "router logits")

        def rep(t):
            return t.repeat_interleave(per, dim=0) if per != 1 else t
        return finish(rep(sample_logits), rep(probs), rep(indices), rep(weights), self.num_experts,
                      sample_logits=sample_logits, sample_probs=probs, sample_indices=indices, sample_weights=weights)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}"


def next_token_modality_ids(modality_ids: torch.Tensor, modalities=(1,), fallback: int = 0) -> torch.Tensor:
    """MoIIE's vision mask as modality ids: a token keeps modality m (in ``modalities``) only if the NEXT token of the
    same sequence has modality m too; otherwise (last token of a run, last position) it becomes ``fallback``.

    ``modality_ids`` (B, S) (or (S,)); returns a tensor of the same shape.
    """
    if modality_ids.dim() == 1:
        return next_token_modality_ids(modality_ids[None], modalities, fallback)[0]
    nxt = torch.cat([modality_ids[:, 1:], torch.full_like(modality_ids[:, :1], -1)], dim=1)
    out = modality_ids
    for m in modalities:
        out = torch.where((modality_ids == m) & (nxt != m), torch.full_like(modality_ids, fallback), out)
    return out


@register_router("modality")
class ModalityRouter(nn.Module):
    """Modality-aware routing: one gate and one expert pool per modality (MoIIE; Uni-MoE-style modality experts).

    ``expert_pools[m]`` lists the expert ids that modality m may use, in the order of its gate's outputs (default:
    every modality uses all experts). ``weight`` (sum of pool widths, H) stacks the gates: modality m's gate is rows
    ``[offset_m, offset_m + len(pool_m))`` (``gate_weight(m)``). A token of modality m gets ``softmax`` over its pool's
    logits, top-k inside the pool, weights renormalised (``norm_topk_prob``, default True as in MoIIE), and the local
    picks are mapped to the pool's expert ids. Outside its pool a token's logits are ``-inf`` and its probs 0.

    ``forward(hidden_states (T, H), modality_ids=(B, S) | (T,), token_shape=)`` — ints in ``[0, num_modalities)``.
    ``next_token_modalities=(1,)``: a token of those modalities whose next token differs is routed as
    ``fallback_modality`` (MoIIE's official vision mask ``type == 1 and next type == 1``; needs (B, S) ids or
    ``token_shape``). ``extras``: ``modality_ids`` (T,) effective ids, ``pool_logits`` / ``pool_token_index`` (per
    modality: its tokens' (n_m, w_m) pool logits and (n_m,) token positions, row-major) for
    :func:`moezoo.core.losses.modality_balance_loss`.
    MoIIE (E=4): pools ``[[1, 2, 3], [0, 1, 2]]`` (language = modality 0 uses ``gate``, vision = 1 uses ``gate_vis``).
    """

    uses_token_shape = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, expert_pools=None, num_modalities: int = 2,
                 scoring_func: str = "softmax", norm_topk_prob: bool = True, renorm_eps: float = 0.0, bias: bool = False,
                 next_token_modalities=(), fallback_modality: int = 0, jitter_noise: float = 0.0,
                 router_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if expert_pools is None:
            if not isinstance(num_modalities, int) or num_modalities < 1:
                raise ValueError(f"num_modalities must be a positive int, got {num_modalities!r}")
            expert_pools = [list(range(num_experts))] * num_modalities
        pools = [[int(e) for e in p] for p in expert_pools]
        if not pools:
            raise ValueError("expert_pools must hold one list of expert ids per modality")
        for m, p in enumerate(pools):
            if not p or len(set(p)) != len(p) or any(not 0 <= e < num_experts for e in p):
                raise ValueError(f"expert_pools[{m}]={p} must be distinct expert ids in [0, num_experts={num_experts})")
            check_top_k(top_k, len(p), f"num_experts_per_tok (pool of modality {m} has {len(p)} experts)")
        if scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")
        M = len(pools)
        bad = [m for m in list(next_token_modalities) + [fallback_modality] if not 0 <= int(m) < M]
        if bad:
            raise ValueError(f"next_token_modalities / fallback_modality must be modality ids in [0, {M}), got {bad}")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.expert_pools, self.num_modalities = pools, M
        self.scoring_func, self.norm_topk_prob, self.renorm_eps = scoring_func, norm_topk_prob, renorm_eps
        self.next_token_modalities = tuple(int(m) for m in next_token_modalities)
        self.fallback_modality = int(fallback_modality)
        self.jitter_noise, self.router_dtype = jitter_noise, router_dtype
        widths = [len(p) for p in pools]
        self.offsets = [sum(widths[:m]) for m in range(M)]
        for m, p in enumerate(pools):
            self.register_buffer(f"pool_{m}", torch.tensor(p, dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(torch.empty(sum(widths), hidden_size))
        self.bias = nn.Parameter(torch.zeros(sum(widths))) if bias else None
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)

    def gate_weight(self, modality: int) -> torch.Tensor:
        """The (w_m, H) gate rows of one modality (a view of ``weight``)."""
        o = self.offsets[modality]
        return self.weight[o: o + len(self.expert_pools[modality])]

    def resolve_modality_ids(self, modality_ids, num_tokens: int, token_shape=None) -> torch.Tensor:
        if modality_ids is None:
            raise ValueError(f"ModalityRouter needs the signal modality_ids= (batch, seq) or (tokens,) with ints in "
                             f"[0, {self.num_modalities})")
        if not torch.is_tensor(modality_ids) or modality_ids.is_floating_point() or modality_ids.is_complex():
            raise ValueError("modality_ids must be an integer (or bool) tensor with one id per token")
        if modality_ids.numel() != num_tokens:
            raise ValueError(f"modality_ids has shape {tuple(modality_ids.shape)} ({modality_ids.numel()} ids), "
                             f"expected one id per token ({num_tokens})")
        ids = modality_ids.long()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_modalities):
            raise ValueError(f"modality_ids must lie in [0, {self.num_modalities}) (one expert pool per modality), "
                             f"got values in [{int(ids.min())}, {int(ids.max())}]")
        if self.next_token_modalities:
            if ids.dim() < 2:
                if token_shape is None or len(token_shape) < 2:
                    raise ValueError("next_token_modalities needs modality_ids of shape (batch, seq) or token_shape")
                ids = ids.reshape(int(token_shape[0]), -1)
            ids = next_token_modality_ids(ids.reshape(ids.shape[0], -1), self.next_token_modalities,
                                          self.fallback_modality)
        return ids.reshape(-1).to(self.weight.device)

    def forward(self, hidden_states: torch.Tensor, modality_ids: torch.Tensor | None = None, token_shape=None,
                **_) -> RouterOutput:
        check_router_input(hidden_states, self.hidden_size)
        T, R, k = hidden_states.shape[0], self.num_experts, self.top_k
        mids = self.resolve_modality_ids(modality_ids, T, token_shape)
        x = jitter(hidden_states, self.jitter_noise, self.training)
        dt = self.router_dtype
        all_logits = F.linear(x.to(dt), self.weight.to(dt), None if self.bias is None else self.bias.to(dt))
        logits = all_logits.new_full((T, R), float("-inf"))
        probs = all_logits.new_zeros((T, R))
        indices = torch.zeros(T, k, dtype=torch.long, device=all_logits.device)
        weights = all_logits.new_zeros((T, k))
        pool_logits, pool_index = [], []
        for m, pool in enumerate(self.expert_pools):
            rows = (mids == m).nonzero().squeeze(-1)
            o, w = self.offsets[m], len(pool)
            lm = all_logits[rows, o: o + w]
            pool_logits.append(lm)
            pool_index.append(rows)
            if rows.numel() == 0:
                continue
            pm = torch.sigmoid(lm) if self.scoring_func == "sigmoid" else lm.float().softmax(dim=-1).to(dt)
            wm, li = _topk_weights(pm, k, self.norm_topk_prob, self.renorm_eps)
            ids = getattr(self, f"pool_{m}")
            cols = ids.unsqueeze(0).expand(rows.numel(), -1)
            r2 = rows.unsqueeze(-1).expand(-1, w)
            logits = logits.index_put((r2, cols), lm)
            probs = probs.index_put((r2, cols), pm)
            indices = indices.index_put((rows,), ids[li])
            weights = weights.index_put((rows,), wm)
        return finish(logits, probs, indices, weights, R, modality_ids=mids, pool_logits=pool_logits,
                      pool_token_index=pool_index, expert_pools=self.expert_pools)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, pools={self.expert_pools}"


# ----------------------------------------------------------------------------------------------------------------------
# Prototypical routing (ProMoE): cosine similarity to learnable prototypes ("cluster centers")
# ----------------------------------------------------------------------------------------------------------------------


@register_router("prototype")
class PrototypeRouter(nn.Module):
    """ProMoE's prototypical router: ``cos(token, prototype_e)`` for E learnable prototypes, then top-k.

    ``weight`` (E, H) holds the prototypes (so the path stays ``...mlp.gate.weight``); both sides are L2-normalised.
    ``weight_mode`` turns the cosine ``s`` (T, E) into selection scores and combine weights:

    - ``"identity"`` (ProMoE's released configs): top-k of the RAW cosine, weights = those cosines (may be negative);
    - ``"softmax"``: ``softmax(s / temperature)``; ``"sigmoid"``: ``sigmoid(s / temperature)``.

    ``norm_topk_prob`` renormalises the k weights (off in ProMoE). ``logits`` are the raw cosines; ``probs`` the
    distribution the balance loss uses: ``softmax(s / temperature)`` in ``"softmax"`` mode and, as in ProMoE's
    released balance loss, ``softmax(scores)`` of the mode's scores otherwise. ``extras["scores"]`` holds the scores
    (T, E) the top-k ran on.
    """

    WEIGHT_MODES = ("identity", "softmax", "sigmoid")

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, weight_mode: str = "identity",
                 temperature: float = 1.0, norm_topk_prob: bool = False, renorm_eps: float = 0.0,
                 init_std: float = 0.02, router_dtype: torch.dtype = torch.float32):
        super().__init__()
        check_top_k(top_k, num_experts)
        if weight_mode not in self.WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {self.WEIGHT_MODES}, got {weight_mode!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.weight_mode, self.temperature = weight_mode, float(temperature)
        self.norm_topk_prob, self.renorm_eps, self.router_dtype = norm_topk_prob, renorm_eps, router_dtype
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=init_std)

    @property
    def prototypes(self) -> torch.Tensor:
        return self.weight

    def cosine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(T, H) -> (T, E) cosine similarity to every prototype."""
        dt = self.router_dtype
        return F.normalize(hidden_states.to(dt), p=2, dim=-1) @ F.normalize(self.weight.to(dt), p=2, dim=-1).T

    def forward(self, hidden_states: torch.Tensor, **_) -> RouterOutput:
        check_router_input(hidden_states, self.hidden_size)
        cos = self.cosine(hidden_states)
        if self.weight_mode == "identity":
            scores = cos
            probs = cos.softmax(dim=-1)
        elif self.weight_mode == "softmax":
            scores = (cos / self.temperature if self.temperature != 1.0 else cos).softmax(dim=-1)
            probs = scores
        else:
            scores = torch.sigmoid(cos / self.temperature if self.temperature != 1.0 else cos)
            probs = scores.softmax(dim=-1)
        weights, indices = _topk_weights(scores, self.top_k, self.norm_topk_prob, self.renorm_eps)
        return finish(cos, probs, indices, weights, self.num_experts, scores=scores)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"weight_mode={self.weight_mode!r}, temperature={self.temperature}")
