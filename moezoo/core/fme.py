"""Feature-Modulated Experts (FME, MoFME): one shared FFN whose output every expert modulates with FiLM.

MoFME (Zhang et al., AAAI 2024) replaces E parallel FFN experts by one shared "basenet" and E cheap FiLM modulations
of its output ``y``::

    y      = act(W0 LN(x) + c0) * (W1 LN(x) + c1)           shared basenet (gated FFN, width W)
    f_e(y) = (A_e y + a_e) * y + (B_e y + b_e)               expert e (FiLM; A_e, B_e are W x W)
    mix    = sum_e w_e(x) f_e(y)                              router weights (top-k, 0 elsewhere)
    out    = Linear(GELU(Linear(mix)))                        adaptor W -> adaptor_size -> H

The caller adds the residual (``x + out``), as with :class:`moezoo.core.MoELayer`.  The router sees the
*un-normalised* ``x`` (as in the official code); only the basenet input is layer-normalised.

Official quirk (``official_expert_offset=True``): the released forward reads expert ``idx`` as ``ff_list[idx + 2]``,
so routing slot 0 multiplies the parameter-free ``act(y)`` (the basenet's GELU module), slot ``i >= 1`` expert
``i - 1``, and the last expert is never used.  The default (False) uses every expert.

Storage: ``experts.film_proj`` (E, 2W, W) holds ``[A_e; B_e]``, ``experts.film_proj_bias`` (E, 2W) holds ``[a_e; b_e]``.
Compute: ``"sparse"`` (default, faster on CPU; see :class:`FMEExperts`) evaluates only the selected (token, expert)
pairs: the core's sort-based dispatch, then one product per expert on its contiguous rows with a custom backward;
``"dense"`` evaluates every expert with one einsum.  Both give the same result.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .experts import get_activation, sort_by_expert, sort_by_expert_static
from .routing import RouterOutput, build_router, router_parameters

FME_IMPLEMENTATIONS = ("sparse", "dense")


def _grouped_linear_forward(x, weight, bias, bounds):
    out = x.new_empty(x.shape[0], weight.shape[1])
    for e, s, t in bounds:
        torch.addmm(bias[e], x[s:t], weight[e].t(), out=out[s:t])
    return out


def _grouped_linear_backward(grad, x, weight, bounds, needs=(True, True, True)):
    grad = grad.contiguous()
    gx = gw = gb = None
    if needs[0]:
        gx = torch.zeros_like(x)
        for e, s, t in bounds:
            torch.mm(grad[s:t], weight[e], out=gx[s:t])
    if needs[1]:
        gw = torch.zeros_like(weight)
        for e, s, t in bounds:
            torch.mm(grad[s:t].t(), x[s:t], out=gw[e])
    if needs[2]:
        gb = weight.new_zeros(weight.shape[0], weight.shape[1])
        for e, s, t in bounds:
            torch.sum(grad[s:t], dim=0, out=gb[e])
    return gx, gw, gb


def _bounds(counts) -> tuple:
    """(expert, start, end) of the experts with rows, from per-expert row counts."""
    bounds, start = [], 0
    for e, c in enumerate(counts):
        if c:
            bounds.append((e, start, start + c))
            start += c
    return tuple(bounds)


class _SortedGroupedLinear(torch.autograd.Function):
    """``out[s:t] = x[s:t] @ weight[e].T + bias[e]`` for each ``(e, s, t)`` in ``bounds`` (rows grouped by expert).

    Autograd of ``weight[e]`` inside a Python loop would allocate a full-size zero gradient per expert; this writes
    every expert's weight gradient into one (E, O, I) buffer and skips experts without rows.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, bounds):
        ctx.save_for_backward(x, weight)
        ctx.bounds = bounds
        return _grouped_linear_forward(x, weight, bias, bounds)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx, gw, gb = _grouped_linear_backward(grad, x, weight, ctx.bounds, ctx.needs_input_grad[:3])
        return gx, gw, gb, None


# the compiled path: the same grouped product as an opaque custom op (static shapes; counts read inside the op)
@torch.library.custom_op("moezoo::fme_grouped_linear", mutates_args=())
def _grouped_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return _grouped_linear_forward(x, weight, bias, _bounds(counts.tolist()))


@_grouped_linear_op.register_fake
def _(x, weight, bias, counts):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("moezoo::fme_grouped_linear_backward", mutates_args=())
def _grouped_linear_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                counts: torch.Tensor) -> list[torch.Tensor]:
    return list(_grouped_linear_backward(grad, x, weight, _bounds(counts.tolist())))


@_grouped_linear_backward_op.register_fake
def _(grad, x, weight, counts):
    return [torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[:2])]


def _grouped_linear_setup(ctx, inputs, output):
    x, weight, _, counts = inputs
    ctx.save_for_backward(x, weight, counts)


def _grouped_linear_op_backward(ctx, grad):
    x, weight, counts = ctx.saved_tensors
    gx, gw, gb = _grouped_linear_backward_op(grad, x, weight, counts)
    return gx, gw, gb, None


_grouped_linear_op.register_autograd(_grouped_linear_op_backward, setup_context=_grouped_linear_setup)


class FMEExperts(nn.Module):
    """E FiLM experts on a W-wide shared feature, stored as 3-D tensors.

    ``forward(y (T, W), top_k_index (T, k), top_k_weights (T, k)) -> (T, W)`` = ``sum_slots w * f_slot(y)``; slot ids
    ``>= num_experts`` are sentinels (weight ignored).  With ``official_expert_offset`` slot 0 is ``act(y)`` and slot
    ``i >= 1`` is expert ``i - 1`` (see the module docstring).

    ``"sparse"`` (default) runs each expert's product on its own contiguous rows (:class:`_SortedGroupedLinear`);
    ``"dense"`` runs every expert on every token. ``python eval/speed/fme_layer.py`` (H 256, T 1024, 1 thread): the
    sparse FME layer takes 0.81 / 0.81 / 0.40 of the forward time of a conventional MoE layer (GELU FFN experts 4H,
    moezoo kernel) at E/k = 4/2, 8/2, 16/4, and 0.93 / 0.92 / 0.64 of its forward + backward; dense is 1.1-1.9x.
    """

    def __init__(self, *, num_experts: int, hidden_size: int, official_expert_offset: bool = False,
                 offset_act: str = "gelu", implementation: str = "sparse"):
        super().__init__()
        for name, v in (("num_experts", num_experts), ("hidden_size", hidden_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if implementation not in FME_IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {FME_IMPLEMENTATIONS}, got {implementation!r}")
        self.num_experts, self.hidden_dim = num_experts, hidden_size
        self.official_expert_offset = bool(official_expert_offset)
        self.offset_act_name = offset_act
        self.offset_act = get_activation(offset_act)
        self.implementation = implementation
        self.film_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden_size, hidden_size))
        self.film_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * hidden_size))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Near-identity FiLM: scale ``A y + a`` ~ 1, shift ``B y + b`` ~ 0, experts differ by N(0, std^2) weights."""
        nn.init.normal_(self.film_proj, 0.0, std)
        with torch.no_grad():
            self.film_proj_bias[:, : self.hidden_dim].fill_(1.0)
            self.film_proj_bias[:, self.hidden_dim:].zero_()

    def expert_forward(self, expert: int, y: torch.Tensor) -> torch.Tensor:
        """FiLM of one expert on (N, W) features (reference path, no routing)."""
        h = F.linear(y, self.film_proj[expert], self.film_proj_bias[expert])
        scale, shift = h.chunk(2, dim=-1)
        return scale * y + shift

    def slot_forward(self, slot: int, y: torch.Tensor) -> torch.Tensor:
        """What routing slot ``slot`` computes (honours ``official_expert_offset``)."""
        if self.official_expert_offset:
            return self.offset_act(y) if slot == 0 else self.expert_forward(slot - 1, y)
        return self.expert_forward(slot, y)

    def forward(self, y: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if y.dim() != 2 or y.shape[-1] != self.hidden_dim:
            raise ValueError(f"FME input must have shape (tokens, {self.hidden_dim}), got {tuple(y.shape)}")
        if top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != y.shape[0]:
            raise ValueError(f"top_k_index {tuple(top_k_index.shape)} and top_k_weights {tuple(top_k_weights.shape)} "
                             f"must both be (tokens={y.shape[0]}, k)")
        E = self.num_experts
        w = top_k_weights.to(y.dtype)
        idx = top_k_index
        out = None
        if self.official_expert_offset:
            w0 = torch.where(idx == 0, w, torch.zeros((), dtype=w.dtype, device=w.device)).sum(-1, keepdim=True)
            out = w0 * self.offset_act(y)
            idx = torch.where((idx >= 1) & (idx < E), idx - 1, torch.full_like(idx, E))  # slot i -> expert i-1
        valid = (idx >= 0) & (idx < E)
        idx = torch.where(valid, idx, torch.full_like(idx, E))
        w = torch.where(valid, w, torch.zeros((), dtype=w.dtype, device=w.device))
        mix = self._dense(y, idx, w) if self.implementation == "dense" else self._sparse(y, idx, w)
        return mix if out is None else out + mix

    def _dense(self, y: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        E = self.num_experts
        dense_w = torch.zeros(y.shape[0], E + 1, dtype=y.dtype, device=y.device).scatter_add_(1, idx, w)[:, :E]
        h = torch.einsum("tw,eow->teo", y, self.film_proj) + self.film_proj_bias
        scale, shift = h.chunk(2, dim=-1)
        f = scale * y.unsqueeze(1) + shift  # (T, E, W)
        return torch.einsum("te,tew->tw", dense_w, f)

    def _sparse(self, y: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The core's sort-based dispatch (``sort_by_expert``), then each expert's FiLM product on its contiguous slice
        of the sorted features (:class:`_SortedGroupedLinear`: no padding, one weight-gradient buffer)."""
        E = self.num_experts
        if torch.compiler.is_compiling():
            # static shapes: every slot (sentinels on the last expert with weight 0), counts stay a tensor and the
            # grouped product is the custom op moezoo::fme_grouped_linear (no graph break, no recompile per batch)
            _, tok, ws, _, counts, _ = sort_by_expert_static(idx, w, E)
            ys = y.index_select(0, tok)
            h = _grouped_linear_op(ys, self.film_proj, self.film_proj_bias, counts)
        else:
            order, tok, counts, _ = sort_by_expert(idx, E)
            if order.numel() == 0:
                return torch.zeros_like(y) + 0.0 * self.film_proj.sum()  # keep the graph connected
            ys = y.index_select(0, tok)  # (n, W), grouped by expert
            h = _SortedGroupedLinear.apply(ys, self.film_proj, self.film_proj_bias, _bounds(counts.tolist()))
            ws = w.reshape(-1)[order]
        scale, shift = h.chunk(2, dim=-1)
        f = torch.addcmul(shift, scale, ys) * ws.unsqueeze(-1)
        return torch.zeros_like(y).index_add(0, tok, f)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, "
                f"official_expert_offset={self.official_expert_offset}, implementation={self.implementation!r}")


class FMEMoELayer(nn.Module):
    """Router + shared basenet + FiLM experts + adaptor (MoFME's FME block); ``forward -> (out, RouterOutput)``.

    Keyword args:
        hidden_size, num_experts, num_experts_per_tok: H, E, k.
        fme_intermediate_size: basenet / FiLM width W (default H, as official).
        adaptor_size: adaptor width (default 4H; the official ``mlp_dim``).
        hidden_act: basenet gate activation (exact-erf ``gelu`` as official); ``adaptor_act`` likewise.
        norm_eps: eps of the basenet LayerNorm.  dropout: after the adaptor's activation and output (official 0.1).
        official_expert_offset: the released off-by-one slot mapping (see the module docstring).
        router_type / router / router_kwargs: as in :class:`moezoo.core.MoELayer` (the router gets the un-normalised x).
        implementation: ``"sparse"`` or ``"dense"`` (see :class:`FMEExperts`).

    Parameters: ``gate`` (router), ``norm``, ``basenet`` (Linear H -> 2W, rows [W0; W1]), ``experts.film_proj``,
    ``experts.film_proj_bias``, ``adaptor_up`` (W -> A), ``adaptor_down`` (A -> H).  The output excludes the residual.
    """

    def __init__(self, *, hidden_size: int, num_experts: int, num_experts_per_tok: int = 2,
                 fme_intermediate_size: int | None = None, adaptor_size: int | None = None, hidden_act: str = "gelu",
                 adaptor_act: str = "gelu", norm_eps: float = 1e-5, dropout: float = 0.0,
                 official_expert_offset: bool = False, router_type: str = "topk", router: nn.Module | None = None,
                 router_kwargs: dict | None = None, implementation: str = "sparse"):
        super().__init__()
        self.init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "router", "__class__")}
        for name, v in (("hidden_size", hidden_size), ("num_experts", num_experts),
                        ("num_experts_per_tok", num_experts_per_tok)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        W = hidden_size if fme_intermediate_size is None else fme_intermediate_size
        A = 4 * hidden_size if adaptor_size is None else adaptor_size
        for name, v in (("fme_intermediate_size", W), ("adaptor_size", A)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.hidden_size, self.num_experts, self.num_experts_per_tok = hidden_size, num_experts, num_experts_per_tok
        self.num_routable = num_experts
        self.fme_intermediate_size, self.adaptor_size = W, A
        if router is None:
            kwargs = dict(router_kwargs or {})
            kwargs.setdefault("hidden_size", hidden_size)
            kwargs.setdefault("num_experts", num_experts)
            if "top_k" in router_parameters(router_type):
                kwargs.setdefault("top_k", num_experts_per_tok)
            router = build_router(router_type, **kwargs)
        self.gate = router
        self.norm = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.basenet = nn.Linear(hidden_size, 2 * W)
        self.act_fn = get_activation(hidden_act)
        self.experts = FMEExperts(num_experts=num_experts, hidden_size=W, official_expert_offset=official_expert_offset,
                                  offset_act=hidden_act, implementation=implementation)
        self.adaptor_up = nn.Linear(W, A)
        self.adaptor_act = get_activation(adaptor_act)
        self.adaptor_down = nn.Linear(A, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def basenet_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shared basenet ``act(W0 LN x) * (W1 LN x)`` (..., H) -> (..., W)."""
        g, u = self.basenet(self.norm(x)).chunk(2, dim=-1)
        return self.act_fn(g) * u

    def adaptor(self, mix: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.adaptor_down(self.dropout(self.adaptor_act(self.adaptor_up(mix)))))

    def forward(self, hidden_states: torch.Tensor, **signals) -> tuple[torch.Tensor, RouterOutput]:
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states has last dimension {hidden_states.shape[-1]}, "
                             f"expected hidden_size={self.hidden_size}")
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        if getattr(self.gate, "uses_token_shape", False):
            signals.setdefault("token_shape", tuple(shape[:-1]))
        ro = self.gate(x, **signals)
        y = self.basenet_forward(x)
        mix = self.experts(y, ro.indices, ro.weights)
        return self.adaptor(mix).reshape(shape), ro

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.num_experts_per_tok}, "
                f"fme_width={self.fme_intermediate_size}, adaptor={self.adaptor_size}")


__all__ = ["FMEExperts", "FMEMoELayer", "FME_IMPLEMENTATIONS"]
