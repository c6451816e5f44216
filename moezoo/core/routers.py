"""Routers of the shared backbone.

Every router maps token features (T, H) -> :class:`RouterOutput`. Expert ids index one space: routed experts
``[0, E)``, then the zero-FLOP experts of the layer (null / zero / copy / constant), and the sentinel id is the total
count ``num_experts`` of the router; sentinel slots carry weight 0 and pad dynamic-k selections to a common width.
"""
from __future__ import annotations

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


def build_router(router_type: str, **kwargs) -> nn.Module:
    if router_type not in ROUTERS:
        raise ValueError(f"router_type={router_type!r} is unknown; expected one of {sorted(ROUTERS)}")
    return ROUTERS[router_type](**kwargs)
