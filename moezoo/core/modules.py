"""Non-MoE building blocks that conditional-routing families share (camera / scene routers).

These are not token routers (they do not return a :class:`moezoo.core.routing.RouterOutput`): they choose among a
small set of labels per *sample* (e.g. which camera views a driving policy looks at).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CameraRouter(nn.Module):
    """DriveMoE's scene (camera) router: which camera view a sample needs, from front-camera tokens and a waypoint.

    A learned query attends over ``[waypoint_projector(waypoint), front_tokens]``
    (``waypoint_projector = Linear(waypoint_dim, waypoint_hidden) -> ReLU -> Linear(waypoint_hidden, D)``) with
    ``nn.MultiheadAttention(D, num_heads, batch_first=True)``; the attended query goes through ``LayerNorm`` and the head
    ``Linear(D, mlp_hidden) -> ReLU -> Dropout -> Linear(mlp_hidden, num_labels)`` (``mlp_hidden`` = D // 2 by default).
    Parameter names follow the official module (``router_query``, ``waypoint_projector.{0,2}``, ``cross_attn``, ``ln``,
    ``mlp.{0,3}``) so its state dict loads unchanged.

    ``forward(front_tokens (B, N, D), waypoint (B, waypoint_dim)) -> logits (B, num_labels)``;
    :meth:`select` turns logits into a one-hot view choice (argmax in eval, straight-through Gumbel-softmax in training).
    """

    def __init__(self, token_dim: int, num_labels: int, num_heads: int = 8, *, waypoint_dim: int = 2,
                 waypoint_hidden: int = 128, mlp_hidden: int | None = None, dropout: float = 0.1):
        super().__init__()
        for name, v in (("token_dim", token_dim), ("num_labels", num_labels), ("num_heads", num_heads),
                        ("waypoint_dim", waypoint_dim), ("waypoint_hidden", waypoint_hidden)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if token_dim % num_heads:
            raise ValueError(f"token_dim={token_dim} must be divisible by num_heads={num_heads}")
        mlp_hidden = token_dim // 2 if mlp_hidden is None else mlp_hidden
        if not isinstance(mlp_hidden, int) or mlp_hidden <= 0:
            raise ValueError(f"mlp_hidden must be a positive int, got {mlp_hidden!r}")
        # serialisable constructor arguments (``moezoo convert`` rebuilds the module from them)
        self.init_kwargs = dict(token_dim=token_dim, num_labels=num_labels, num_heads=num_heads,
                                waypoint_dim=waypoint_dim, waypoint_hidden=waypoint_hidden, mlp_hidden=mlp_hidden,
                                dropout=dropout)
        self.token_dim, self.num_labels, self.waypoint_dim = token_dim, num_labels, waypoint_dim
        self.router_query = nn.Parameter(torch.randn(1, 1, token_dim) * 0.02)
        self.waypoint_projector = nn.Sequential(nn.Linear(waypoint_dim, waypoint_hidden), nn.ReLU(),
                                                nn.Linear(waypoint_hidden, token_dim))
        self.cross_attn = nn.MultiheadAttention(token_dim, num_heads, batch_first=True)
        self.ln = nn.LayerNorm(token_dim)
        self.mlp = nn.Sequential(nn.Linear(token_dim, mlp_hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_hidden, num_labels))

    def forward(self, front_tokens: torch.Tensor, waypoint: torch.Tensor) -> torch.Tensor:
        if front_tokens.dim() != 3 or front_tokens.shape[-1] != self.token_dim:
            raise ValueError(f"front_tokens has shape {tuple(front_tokens.shape)}, expected (batch, tokens, "
                             f"token_dim={self.token_dim})")
        B = front_tokens.shape[0]
        if waypoint.dim() != 2 or tuple(waypoint.shape) != (B, self.waypoint_dim):
            raise ValueError(f"waypoint has shape {tuple(waypoint.shape)}, expected (batch={B}, "
                             f"waypoint_dim={self.waypoint_dim})")
        wp = self.waypoint_projector(waypoint.to(front_tokens.dtype)).unsqueeze(1)
        kv = torch.cat([wp, front_tokens], dim=1)
        query = self.router_query.expand(B, -1, -1)
        attended, _ = self.cross_attn(query, kv, kv, need_weights=False)
        return self.mlp(self.ln(attended)).squeeze(1)

    def select(self, logits: torch.Tensor, *, tau: float = 1.0, hard: bool = True) -> torch.Tensor:
        """(B, L) logits -> (B, L) selection weights: one-hot argmax in eval; straight-through Gumbel-softmax
        (``F.gumbel_softmax(tau, hard)``) in training, so the choice stays differentiable."""
        if self.training:
            return F.gumbel_softmax(logits, tau=tau, hard=hard)
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)

    def select_topk(self, logits: torch.Tensor, top_k: int = 1, *, tau: float = 1.0, hard: bool = True,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick ``top_k`` of the ``L`` views per sample -> (slots (B, k, L), indices (B, k)).

        Eval: the k largest logits (one-hot slots, best first). Training: Gumbel-perturbed logits
        ``(logits + g) / tau`` decide the k views; each slot is the straight-through one-hot
        ``hard - soft.detach() + soft`` with ``soft = softmax((logits + g) / tau)`` (``hard=False``: the soft weights),
        so the choice stays differentiable. ``top_k=1`` in training is ``F.gumbel_softmax(logits, tau, hard)``.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must have shape (batch, num_labels), got {tuple(logits.shape)}")
        L = logits.shape[-1]
        if not isinstance(top_k, int) or not 1 <= top_k <= L:
            raise ValueError(f"top_k must be an int in [1, num_labels={L}], got {top_k!r}")
        if not self.training:
            idx = logits.topk(top_k, dim=-1).indices
            return F.one_hot(idx, L).to(logits.dtype), idx
        gumbels = -torch.empty_like(logits).exponential_().log()
        y = (logits + gumbels) / tau
        soft = y.softmax(-1)
        idx = y.topk(top_k, dim=-1).indices
        slots = soft.unsqueeze(1).expand(-1, top_k, -1)
        if hard:
            slots = F.one_hot(idx, L).to(soft.dtype) - slots.detach() + slots
        return slots, idx
