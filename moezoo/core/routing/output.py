"""What every router returns (:class:`RouterOutput`) and the small tensor helpers routers, losses and stats share.

A leaf module: it imports only torch, so any part of moezoo may import it without a cycle.

Expert ids index one space: routed experts ``[0, E)``, then the zero-FLOP experts of the layer (null / zero / copy /
constant), and the sentinel id is the total count ``num_experts`` of the router; sentinel slots carry weight 0 and pad
dynamic-k selections to a common width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# ``None``: check router inputs for NaN/inf on CPU only (free there, a host sync on an accelerator); True / False force.
CHECK_FINITE: bool | None = None


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

    @classmethod
    def from_selection(cls, logits, probs, indices, weights, num_experts: int, aux_loss=None, **extras) -> "RouterOutput":
        """Build the output of a selection: weights at sentinel slots (ids >= ``num_experts``) are zeroed and the
        experts per token counted."""
        valid = indices < num_experts
        weights = torch.where(valid, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
        return cls(logits, probs, indices, weights, valid.sum(-1), num_experts, aux_loss, extras)

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


# ---------------------------------------------------------------------------------------------------------- argument checks


def data_check(cond: torch.Tensor, message, exc: type[Exception] = ValueError) -> None:
    """Raise ``exc(message)`` unless the boolean tensor ``cond`` holds (``message``: a str or a callable making one).

    Eager on CPU this reads ``cond`` on the host and raises ``exc``. Under ``torch.compile`` and on accelerators it is
    an asynchronous device assert instead (``torch._assert_async``: no graph break, no host sync; it fails as a
    RuntimeError carrying the same message), so input checks never cost the hot path a sync.
    """
    if torch.compiler.is_compiling() or cond.device.type != "cpu":
        torch._assert_async(cond, message if isinstance(message, str) else "moezoo input check failed")
        return
    if not bool(cond):
        raise exc(message() if callable(message) else message)


def check_router_input(x: torch.Tensor, hidden_size: int | None, name: str = "hidden_states") -> None:
    """Shape check; the NaN/inf check runs on CPU (or everywhere with ``CHECK_FINITE = True``): on an accelerator it
    would be a host sync per MoE layer per step."""
    if hidden_size is not None and x.shape[-1] != hidden_size:
        raise ValueError(f"{name} has last dimension {x.shape[-1]}, expected hidden_size={hidden_size}")
    check = CHECK_FINITE if CHECK_FINITE is not None else x.device.type == "cpu"
    if check:
        data_check(torch.isfinite(x).all(), f"{name} reaching the router contains NaN or inf values")


def check_top_k(top_k: int, num_experts: int, name: str = "num_experts_per_tok") -> None:
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"{name} must be an int in [1, num_experts={num_experts}], got {top_k!r}")


def check_top_p(top_p) -> float:
    """``top_p`` must be a real number in (0, 1]."""
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    return float(top_p)


# ---------------------------------------------------------------------------------------------------------- masks and tokens


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


def topk_weights(probs: torch.Tensor, top_k: int, norm: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``probs`` (T, R) -> (weights (T, k), indices (T, k)), weights renormalised to sum 1 when ``norm``."""
    weights, indices = probs.topk(top_k, dim=-1)
    if norm:
        weights = weights / (weights.sum(-1, keepdim=True) + eps)
    return weights, indices


__all__ = ["RouterOutput", "CHECK_FINITE", "data_check", "check_router_input", "check_top_k", "check_top_p", "token_mask_weights",
           "token_keep_mask", "samples_of_tokens", "expand_per_sample", "topk_weights"]
