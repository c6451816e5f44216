"""GShard / DeepSpeed top-2 gating with a capacity factor and token dropping (MoE-LLaVA's gate).

What the gate computes (DeepSpeed's ``TopKGate`` with ``k=2``, as MoE-LLaVA runs it):

1. ``logits = W x`` in fp32 (bias-free linear), ``p = softmax(logits)`` over the E experts.
2. First choice ``argmax p``. Second choice ``argmax`` over the other experts of ``logits + g``: with
   ``second_expert_sampling=True`` ``g`` is Gumbel(0, 1) noise (a *sample* from the softmax over the remaining experts,
   drawn in training **and** evaluation as the official code does); with the default ``False`` ``g = 0`` (the
   second-largest probability, deterministic). A ``gumbel_noise=`` (T, E) signal supplies the noise explicitly (parity
   feeds the noise the official run recorded); it is used whenever given.
3. Capacity ``C = max(ceil(T / E * 2 * cf), min_capacity)`` computed in fp32 over all T tokens of the call (one
   group), with ``cf = capacity_factor`` in training and ``eval_capacity_factor`` in evaluation.
4. Slots: an expert's queue holds its first-choice tokens in token order, then its second-choice tokens in token
   order (counted before dropping); pairs beyond ``C`` are dropped (:func:`moezoo.core.dispatch.apply_capacity` with
   ``policy="choice"``). ``drop_tokens=False`` keeps every pair.
5. The two weights are renormalised *after* dropping: ``w_j = p_j kept_j / max(p_1 kept_1 + p_2 kept_2, eps)`` (one
   survivor gets weight 1, a token with both choices dropped gets a zero output).
6. Balance loss ``l_aux = E * sum_e mean_t(p_te) * frac_t(first choice = e)`` (first choices before dropping; its
   gradient flows through the mean probabilities only), in ``extras["l_aux"]`` unscaled; ``RouterOutput.aux_loss``
   stays None (the model weights it, e.g. ``router_aux_loss_coef * sum over layers``).

``extras``: ``l_aux``, ``exp_counts`` (E,) first-choice counts before dropping, ``top1`` / ``top2`` (T,) choices
before dropping, ``capacity``, ``capacity_slot`` (T, 2), ``drop_rate``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Router, register_router
from .output import RouterOutput, check_router_input


def sample_gumbel(shape, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel(0, 1) samples; without ``generator`` the same draw as ``torch.distributions.Gumbel(0., 1.).rsample``
    after the same ``torch.manual_seed`` (on CPU)."""
    if generator is None:
        return torch.distributions.Gumbel(torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)).rsample(shape)
    u = torch.rand(shape, generator=generator, device=device)
    tiny = torch.finfo(u.dtype).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1 - 1e-7)))


def top2_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's capacity ``ceil(T / E * (cf * 2))`` in fp32, raised to ``min_capacity``."""
    cap = int(torch.ceil((num_tokens / num_experts) * torch.tensor(capacity_factor * 2, dtype=torch.float32)))
    return max(cap, int(min_capacity))


@register_router("top2_capacity")
class Top2CapacityRouter(Router):
    """Top-2 gating with capacity factor, token dropping and the top-1 balance loss (see the module docstring).

    Args:
        hidden_size, num_experts: H, E (E >= 2).
        top_k: must be 2 (the gate is top-2 by construction; accepted so ``MoELayer`` can pass its k).
        capacity_factor, eval_capacity_factor: per-expert capacity multipliers in training / evaluation.
        min_capacity: lower bound of the capacity (MoE-LLaVA: 0).
        drop_tokens: drop pairs beyond the capacity (``False``: no capacity limit, weights still renormalised).
        second_expert_sampling: Gumbel-sample the second expert (official DeepSpeed 0.9.5 behaviour, train and eval).
        renorm_eps: floor of the renormalisation denominator (fp32 machine epsilon as in DeepSpeed).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, *, capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0, min_capacity: int = 4, drop_tokens: bool = True,
                 second_expert_sampling: bool = False, renorm_eps: float | None = None):
        if not isinstance(num_experts, int) or num_experts < 2:
            raise ValueError(f"num_experts must be an int >= 2 for top-2 gating, got {num_experts!r}")
        if top_k != 2:
            raise ValueError(f"router_type='top2_capacity' is top-2 gating: num_experts_per_tok must be 2, got {top_k!r}")
        for name, v in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")
        if not isinstance(min_capacity, int) or min_capacity < 0:
            raise ValueError(f"min_capacity must be a non-negative int, got {min_capacity!r}")
        super().__init__(hidden_size, num_experts)  # fp32 bias-free gate at .weight, normal(0, H^-0.5) init
        self.top_k = 2
        self.capacity_factor, self.eval_capacity_factor = float(capacity_factor), float(eval_capacity_factor)
        self.min_capacity, self.drop_tokens = min_capacity, bool(drop_tokens)
        self.second_expert_sampling = bool(second_expert_sampling)
        self.renorm_eps = float(torch.finfo(torch.float32).eps if renorm_eps is None else renorm_eps)

    signals = ("gumbel_noise", "generator")

    def capacity(self, num_tokens: int) -> int:
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        return top2_capacity(num_tokens, self.num_experts, cf, self.min_capacity)

    def forward(self, hidden_states: torch.Tensor, gumbel_noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None, **_) -> RouterOutput:
        check_router_input(hidden_states, self.hidden_size)
        T, E = hidden_states.shape[0], self.num_experts
        logits = self.compute_logits(hidden_states)
        probs = logits.softmax(dim=-1)
        top1 = probs.argmax(dim=-1)
        if gumbel_noise is not None:
            if tuple(gumbel_noise.shape) != (T, E):
                raise ValueError(f"gumbel_noise must have shape (tokens, num_experts) = {(T, E)}, "
                                 f"got {tuple(gumbel_noise.shape)}")
            noisy = logits + gumbel_noise.to(logits)
        elif self.second_expert_sampling:
            noisy = logits + sample_gumbel((T, E), logits.device, generator)
        else:
            noisy = logits
        noisy = noisy.masked_fill(F.one_hot(top1, E).bool(), float("-inf"))
        top2 = noisy.argmax(dim=-1)
        indices = torch.stack([top1, top2], dim=-1)
        weights = probs.gather(1, indices)
        # balance loss on first choices before dropping
        me = probs.mean(dim=0)
        ce = F.one_hot(top1, E).float().mean(dim=0)
        l_aux = (me * ce).sum() * E
        extras = dict(l_aux=l_aux, exp_counts=torch.bincount(top1, minlength=E).detach(), top1=top1, top2=top2)
        ro = RouterOutput.from_selection(logits, probs, indices, weights, E, **extras)
        from ..dispatch import apply_capacity  # dispatch imports routing.output: import it once routing is loaded

        cap = self.capacity(T) if self.drop_tokens else 2 * T
        ro = apply_capacity(ro, E, 1.0, policy="choice", capacity=cap)
        kept = (ro.indices < E).to(probs.dtype)
        w = weights * kept
        w = w / w.sum(dim=-1, keepdim=True).clamp(min=self.renorm_eps)
        return RouterOutput(ro.logits, ro.probs, ro.indices, w, ro.experts_per_token, E, None, ro.extras)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, num_experts={self.num_experts}, capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}, min_capacity={self.min_capacity}, "
                f"second_expert_sampling={self.second_expert_sampling}")
