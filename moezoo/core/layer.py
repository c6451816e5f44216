"""MoELayer = router + dispatch + experts (+ zero-FLOP experts, + shared experts)."""
from __future__ import annotations

import torch
from torch import nn

from .dispatch import apply_capacity
from .experts import ExpertsImplementationConfig, ZeroFlopExperts, SharedExpert, build_experts
from .routers import RouterOutput, build_router, finish, router_parameters, samples_of_tokens

# implementations that understand the sentinel id ``num_experts`` natively
_SENTINEL_AWARE = {"moezoo", "eager", None}


class MoELayer(nn.Module):
    """One Mixture-of-Experts FFN layer of the shared backbone.

    Keyword args (all explicit; families translate their configs into these):
        hidden_size, num_experts, num_experts_per_tok, moe_intermediate_size: H, E (routed FFN experts), k, I.
        hidden_act, expert_bias, gated_experts, up_first: expert MLP form (SwiGLU by default; see ``Experts``).
        router_type: a name in :data:`moezoo.core.routers.ROUTERS` (``"topk"`` by default).
        router: a ready router module (overrides ``router_type``); it must return a :class:`RouterOutput`.
        router_kwargs: extra keyword arguments for the router constructor (``scoring_func``, ``norm_topk_prob``,
            ``n_group``, ``top_p``, ...).
        num_null_experts, num_zero_experts, num_copy_experts, num_constant_experts: zero-FLOP experts appended after the
            routed ones in the router's expert space (AdaMoE null experts; MoE++ zero / copy / constant experts).
        num_shared_experts, shared_intermediate_size, shared_expert_gate: always-on dense experts (one fused MLP of
            intermediate ``num_shared_experts * shared_intermediate_size``), optionally scaled by a sigmoid gate.
        expert_input_scale: multiply the experts' input (not the router's) by this (MoE++ doubles it).
        capacity_factor, drop_policy: capacity mode with token dropping (``None`` = dropless).
        experts_config: object carrying ``_experts_implementation`` (the model config inside moezoo models).
        shared_gated: the shared expert is a gated MLP (``act(gate) * up``, default) or a plain ``down(act(up x))``
            MLP (ProMoE's GELU shared expert; with ``expert_bias`` it has biases).
        unconditional_expert: one more FFN expert (id ``num_experts``, after the routed ones) that takes every token
            flagged by the ``uncond_mask=`` signal with weight 1, bypassing the router (ProMoE's conditional routing:
            tokens of null-class samples). The router (any type) sees only the other tokens and routes them over the
            ``num_experts`` routed experts; see :meth:`route_unconditional`.

    ``forward(hidden_states (..., H), **signals)`` returns ``(output (..., H), RouterOutput)``; ``signals`` go to the
    router (``condition=``, ``modality_ids=``, ``gate_residual=``, ``attention_mask=`` ...). A router whose class sets
    ``uses_token_shape = True`` (per-sample routers) also gets ``token_shape=`` = the leading shape ``(B, S)`` of
    ``hidden_states`` (unless the caller passes one).
    """

    def __init__(self, *, hidden_size: int, num_experts: int, num_experts_per_tok: int = 2, moe_intermediate_size: int,
                 hidden_act: str = "silu", expert_bias: bool = False, gated_experts: bool = True, up_first: bool = False,
                 router_type: str = "topk", router: nn.Module | None = None, router_kwargs: dict | None = None,
                 num_null_experts: int = 0, num_zero_experts: int = 0, num_copy_experts: int = 0,
                 num_constant_experts: int = 0, num_shared_experts: int = 0, shared_intermediate_size: int | None = None,
                 shared_expert_gate: bool = False, shared_hidden_act: str | None = None, expert_input_scale: float = 1.0,
                 capacity_factor: float | None = None, drop_policy: str = "probs", experts_config=None,
                 shared_gated: bool = True, unconditional_expert: bool = False):
        super().__init__()
        # serialisable constructor arguments (what ``moezoo convert`` writes for block references)
        self.init_kwargs = {k: v for k, v in locals().items()
                            if k not in ("self", "router", "experts_config", "__class__")}
        for name, v in (("hidden_size", hidden_size), ("num_experts", num_experts), ("moe_intermediate_size", moe_intermediate_size)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name, v in (("num_null_experts", num_null_experts), ("num_zero_experts", num_zero_experts),
                        ("num_copy_experts", num_copy_experts), ("num_constant_experts", num_constant_experts),
                        ("num_shared_experts", num_shared_experts)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor!r}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.unconditional_expert = bool(unconditional_expert)
        n_uncond = int(self.unconditional_expert)
        self.zero_flop = ZeroFlopExperts(hidden_size, num_experts + n_uncond, num_null=num_null_experts,
                                         num_zero=num_zero_experts, num_copy=num_copy_experts,
                                         num_constant=num_constant_experts)
        self.num_routable = num_experts + n_uncond + self.zero_flop.count
        if router is None:
            kwargs = dict(router_kwargs or {})
            kwargs.setdefault("hidden_size", hidden_size)
            kwargs.setdefault("num_experts", self.num_routable - n_uncond)
            if "top_k" in router_parameters(router_type):
                kwargs.setdefault("top_k", num_experts_per_tok)
            router = build_router(router_type, **kwargs)
        self.gate = router
        self.experts = build_experts(experts_config or ExpertsImplementationConfig(), num_experts=num_experts + n_uncond,
                                     hidden_size=hidden_size, intermediate_size=moe_intermediate_size,
                                     hidden_act=hidden_act, bias=expert_bias, gated=gated_experts, up_first=up_first)
        self.shared_expert = None
        self.shared_expert_gate = None
        if num_shared_experts:
            inter = num_shared_experts * (shared_intermediate_size or moe_intermediate_size)
            if shared_gated:
                self.shared_expert = SharedExpert(hidden_size, inter, shared_hidden_act or hidden_act, bias=expert_bias)
            else:
                self.shared_expert = PlainSharedExpert(hidden_size, inter, shared_hidden_act or hidden_act,
                                                       bias=expert_bias)
            if shared_expert_gate:
                self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        self.expert_input_scale = expert_input_scale
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy

    def route(self, x: torch.Tensor, **signals) -> RouterOutput:
        if self.unconditional_expert:
            return self.route_unconditional(x, **signals)
        out = self.gate(x, **signals)
        if self.capacity_factor is not None:
            out = apply_capacity(out, self.num_routable, self.capacity_factor, policy=self.drop_policy)
        return out

    def forward(self, hidden_states: torch.Tensor, **signals) -> tuple[torch.Tensor, RouterOutput]:
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states has last dimension {hidden_states.shape[-1]}, "
                             f"expected hidden_size={self.hidden_size}")
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        if getattr(self.gate, "uses_token_shape", False) or self.unconditional_expert:  # per-sample grouping
            signals.setdefault("token_shape", tuple(shape[:-1]))
        ro = self.route(x, **signals)
        out = self.combine(x, ro)
        return out.reshape(shape), ro

    def combine(self, x: torch.Tensor, ro: RouterOutput) -> torch.Tensor:
        """Expert outputs mixed with the routing decision ``ro`` (T, H) -> (T, H)."""
        xe = x * self.expert_input_scale if self.expert_input_scale != 1.0 else x
        idx, w = ro.indices, ro.weights
        # routed experts (+ the unconditional expert); not experts.num_experts, which expert parallelism makes local
        E = self.num_experts + int(self.unconditional_expert)
        routed = idx < E
        if idx.shape[-1] > 1:
            # dynamic-k routers (top-p) pad every token to the widest possible selection; slots that no token fills
            # with an FFN expert (sentinel / zero-FLOP ids) would only add dispatch work, so the experts skip them
            live = routed.any(0)
            if not bool(live.all()):
                idx_e, w_e, routed_e = idx[:, live], w[:, live], routed[:, live]
            else:
                idx_e, w_e, routed_e = idx, w, routed
        else:
            idx_e, w_e, routed_e = idx, w, routed
        impl = getattr(self.experts.config, "_experts_implementation", None)
        # transformers' expert parallelism (``_is_expert_parallel``, set by its "grouped_gemm" style) counts tokens per
        # global expert id, so sentinels must not reach it (moezoo.core.parallel)
        if impl in _SENTINEL_AWARE and not getattr(self.experts, "_is_expert_parallel", False):
            ridx = torch.where(routed_e, idx_e, E)
            rw = w_e
        else:  # transformers' kernels: point empty slots at expert 0 with weight 0
            ridx = torch.where(routed_e, idx_e, 0)
            rw = torch.where(routed_e, w_e, torch.zeros((), dtype=w.dtype, device=w.device))
        out = self.experts(xe, ridx, rw.to(xe.dtype))
        if self.zero_flop.has_output:
            out = out + self.zero_flop(xe, idx, w)
        if self.shared_expert is not None:
            s = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(x)) * s
            out = out + s
        return out

    def extra_repr(self) -> str:
        return f"routable={self.num_routable}, top_k={self.num_experts_per_tok}, capacity_factor={self.capacity_factor}"

    def route_unconditional(self, x: torch.Tensor, *, uncond_mask=None, **signals) -> RouterOutput:
        """Conditional routing with an unconditional expert (``unconditional_expert=True``).

        ``uncond_mask``: bool, one entry per sample (B,) or per token ((B, S) / (T,)); flagged tokens go to expert
        ``num_experts`` with weight 1 (slot 0; the other slots are sentinels), the rest through the router over the
        routed experts (capacity applies to those only). Tensor signals are cut to the routed tokens: per-sample ones
        (leading dim B) by sample when the mask is per-sample, per-token ones (leading T, or (B, S)) by token;
        ``token_shape`` becomes ``(routed samples, S)`` for per-sample masks (so per-sample routers keep working).

        The returned output lives in the layer's expert space (routed, unconditional, zero-FLOP experts): logits are
        ``finfo.min`` where a token cannot go (0 for the unconditional column of flagged tokens), probs 0 / 1 there.
        ``extras``: ``routed_output`` (the router's own output on the routed tokens, for balance / contrastive losses),
        ``routed_token_index`` (n,), ``uncond_token_mask`` (T,), ``uncond_expert_id``.
        """
        if uncond_mask is None:
            raise ValueError("a MoELayer with unconditional_expert=True needs the signal uncond_mask= (bool, one entry "
                             "per sample (batch,) or per token), True for tokens that go to the unconditional expert")
        if not torch.is_tensor(uncond_mask) or uncond_mask.is_floating_point() or uncond_mask.is_complex():
            raise ValueError("uncond_mask must be a bool (or integer 0/1) tensor")
        T = x.shape[0]
        token_shape = signals.pop("token_shape", None)
        flat = uncond_mask.reshape(-1).to(device=x.device).bool()
        sample_keep = None
        if flat.numel() == T:
            null_tok = flat
        else:
            B = flat.numel()
            per = samples_of_tokens(T, B, token_shape, "uncond_mask")
            null_tok = flat.repeat_interleave(per)
            sample_keep = ~flat
        keep = ~null_tok
        cond_idx = keep.nonzero().squeeze(-1)
        lead = tuple(int(v) for v in token_shape) if token_shape is not None else None
        sub = {k: _subset_signal(v, T, lead, keep, sample_keep) for k, v in signals.items()}
        if getattr(self.gate, "uses_token_shape", False):
            if sample_keep is not None and lead is not None and len(lead) >= 2:
                sub["token_shape"] = (int(sample_keep.sum()), *lead[1:])
            else:
                sub["token_shape"] = None
        if cond_idx.numel():
            base = self.gate(x.index_select(0, cond_idx), **sub)
        else:  # nothing to route: run the router on every token once for the output widths, keep no row
            if getattr(self.gate, "uses_token_shape", False):
                signals["token_shape"] = token_shape
            full = self.gate(x, **signals)
            base = RouterOutput(full.logits[:0], full.probs[:0], full.indices[:0], full.weights[:0],
                                full.experts_per_token[:0], full.num_experts, None, {})
        if self.capacity_factor is not None:
            base = apply_capacity(base, base.num_experts, self.capacity_factor, policy=self.drop_policy)
        E = self.num_experts
        R = base.num_experts + 1
        K = base.indices.shape[-1]
        dev = x.device
        mapped = base.indices + (base.indices >= E).long()  # make room for the unconditional id E
        indices = torch.full((T, K), R, dtype=torch.long, device=dev)
        indices[:, 0] = torch.where(null_tok, E, R)
        indices = indices.index_copy(0, cond_idx, mapped)
        w_null = torch.zeros(T, K, dtype=base.weights.dtype, device=dev)
        w_null[:, 0] = null_tok.to(w_null.dtype)
        weights = w_null.index_copy(0, cond_idx, base.weights)

        def widen(t: torch.Tensor, fill: float, null_value: float) -> torch.Tensor:
            full = torch.full((T, R), fill, dtype=t.dtype, device=dev)
            full[:, E] = torch.where(null_tok, torch.full_like(null_tok, null_value, dtype=t.dtype),
                                     torch.full_like(null_tok, fill, dtype=t.dtype))
            col = torch.full((t.shape[0], 1), fill, dtype=t.dtype, device=dev)
            return full.index_copy(0, cond_idx, torch.cat([t[:, :E], col, t[:, E:]], 1))

        logits = widen(base.logits, torch.finfo(base.logits.dtype).min, 0.0)
        probs = widen(base.probs, 0.0, 1.0)
        return finish(logits, probs, indices, weights, R, base.aux_loss, routed_output=base,
                      routed_token_index=cond_idx, uncond_token_mask=null_tok, uncond_expert_id=E)


def _subset_signal(value, num_tokens: int, token_shape, keep: torch.Tensor, sample_keep: torch.Tensor | None):
    """Cut a router signal to the routed tokens (see :meth:`MoELayer.route_unconditional`)."""
    if not torch.is_tensor(value) or value.dim() == 0:
        return value
    n = value.shape[0]
    B = None if sample_keep is None else sample_keep.numel()
    if B is not None and n == B and B != num_tokens:
        return value[sample_keep.to(value.device)]
    if n == num_tokens:
        return value[keep.to(value.device)]
    if token_shape is not None and len(token_shape) >= 2 and tuple(value.shape[:2]) == tuple(token_shape[:2]):
        return value.reshape(num_tokens, *value.shape[2:])[keep.to(value.device)]
    if token_shape is not None and len(token_shape) >= 2 and n == token_shape[0]:  # per-sample, per-token mask
        per = num_tokens // n
        return value.repeat_interleave(per, dim=0)[keep.to(value.device)]
    return value


class PlainSharedExpert(nn.Module):
    """A dense non-gated MLP ``down(act(up x))`` applied to every token (ProMoE's shared expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "gelu_tanh", bias: bool = True):
        super().__init__()
        from .experts import get_activation

        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = get_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))
