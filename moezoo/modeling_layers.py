"""Transformer building blocks shared by the decoder families (``moezoo_lm``, ``time_moe``): RMSNorm, rotate-half
RoPE (:class:`RotaryEmbedding`: the one RoPE table of the project) and the eager attention function registered as the
``eager`` entry of transformers' attention interface."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled by a learned weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """``theta ** (-2i / head_dim)`` for i < head_dim / 2 (float32)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE: (B, T) position ids -> cos, sin (B, T, head_dim) in ``dtype``.

    Eager on CPU the cos/sin rows are looked up in a table built once per (device, dtype) and grown on demand
    (positions are read on the host, which is free there), so decoding never rebuilds the table. Under
    ``torch.compile`` and on accelerators the rows are computed in place (the compiler fuses it; no host read of the
    positions). Both give the same values: ``cos(float(p) * inv_freq)``. The table is a plain attribute, not a buffer,
    so meta-device initialisation (``from_pretrained``) never leaves it unset.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        self.head_dim, self.theta = int(head_dim), float(theta)
        self._tables: dict = {}

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions[..., None].float() * rope_inv_freq(self.head_dim, self.theta, positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32):
        if torch.compiler.is_compiling() or position_ids.device.type != "cpu" or position_ids.numel() == 0:
            return self._compute(position_ids, dtype)
        needed = int(position_ids.max()) + 1
        key = (position_ids.device, dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < needed:
            size = max(needed, 2 * table[0].shape[0] if table is not None else 4096)
            table = self._compute(torch.arange(size, device=position_ids.device), dtype)
            self._tables[key] = table
        return table[0][position_ids], table[1][position_ids]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate (B, heads, S, D) queries and keys by the (B, S, D) tables."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **_):
    """Softmax attention with grouped-query KV heads; ``attention_mask`` additive (float) or keep-mask (bool).

    The scale goes on the (T, D) queries and the mask is applied in place, so the (T, S) scores are written once
    by the matmul and once by the softmax (no extra passes over them).
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query * scaling, key.transpose(2, 3))
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores.masked_fill_(mask.logical_not(), torch.finfo(scores.dtype).min)
        else:
            scores.add_(mask)
    probs = scores.softmax(dim=-1, dtype=torch.float32) if scores.dtype != torch.float32 else scores.softmax(dim=-1)
    probs = probs.to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


__all__ = ["RMSNorm", "RotaryEmbedding", "rope_inv_freq", "rotate_half", "apply_rope", "eager_attention"]
