"""Token-choice top-k routing and its variants: softmax / sigmoid scoring, renormalised or not, DeepSeek-V3 group-limited
and bias-balanced (auxiliary-loss-free) selection, AdaMoE's null-expert-aware renormalisation, MoE++ gating residuals."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Router, register_router
from .output import RouterOutput, check_router_input, check_top_k


@register_router("topk")
class TopKRouter(Router):
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
        check_top_k(top_k, num_experts)
        if num_experts % n_group:
            raise ValueError(f"num_experts={num_experts} must be divisible by n_group={n_group}")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
        if equal_per_group and top_k % n_group:
            raise ValueError(f"equal_per_group needs num_experts_per_tok={top_k} divisible by n_group={n_group}")
        super().__init__(hidden_size, num_experts, bias=bias, scoring_func=scoring_func, jitter_noise=jitter_noise,
                         router_dtype=router_dtype)
        self.top_k = top_k
        self.norm_topk_prob, self.softmax_after_topk = norm_topk_prob, softmax_after_topk
        self.n_group, self.topk_group, self.equal_per_group = n_group, topk_group, equal_per_group
        self.routed_scaling_factor, self.renorm_eps = routed_scaling_factor, renorm_eps
        if use_selection_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        else:
            self.e_score_correction_bias = None

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
        logits = self.compute_logits(self.jitter(hidden_states))
        if self.softmax_after_topk:
            top_logits, indices = logits.topk(self.top_k, dim=-1)
            weights = top_logits.softmax(dim=-1)
            return RouterOutput.from_selection(logits, logits.softmax(-1), indices, weights, self.num_experts)
        probs = self.score(logits)
        sel = probs if self.e_score_correction_bias is None else probs + self.e_score_correction_bias
        indices = self.select(sel.detach() if self.e_score_correction_bias is not None else sel)
        weights = probs.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + self.renorm_eps)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return RouterOutput.from_selection(logits, probs, indices, weights, self.num_experts)




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
        return RouterOutput.from_selection(out.logits, out.probs, out.indices, weights, out.num_experts, out.aux_loss, **out.extras)


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

    signals = ("gate_residual",)

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
        with torch.autocast(x.device.type, enabled=False):  # under bf16 autocast the router stays in router_dtype
            h = torch.tanh(F.linear(x.to(dt), self.weight_in.to(dt)))
            return F.linear(h, self.weight.to(dt), None if self.bias is None else self.bias.to(dt))

    def forward(self, hidden_states: torch.Tensor, gate_residual: torch.Tensor | None = None, **_) -> RouterOutput:
        check_router_input(hidden_states, self.hidden_size)
        logits = self.compute_logits(self.jitter(hidden_states))
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
        return RouterOutput.from_selection(logits, probs, indices, weights, self.num_experts, gate_residual=logits)


