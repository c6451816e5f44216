"""MoELayer = router + dispatch + experts (+ zero-FLOP experts, + shared experts)."""
from __future__ import annotations

import torch
from torch import nn

from .dispatch import apply_capacity
from .experts import ExpertsImplementationConfig, ZeroFlopExperts, SharedExpert, build_experts
from .routers import RouterOutput, build_router, router_parameters

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
                 capacity_factor: float | None = None, drop_policy: str = "probs", experts_config=None):
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
        self.zero_flop = ZeroFlopExperts(hidden_size, num_experts, num_null=num_null_experts, num_zero=num_zero_experts,
                                         num_copy=num_copy_experts, num_constant=num_constant_experts)
        self.num_routable = num_experts + self.zero_flop.count
        if router is None:
            kwargs = dict(router_kwargs or {})
            kwargs.setdefault("hidden_size", hidden_size)
            kwargs.setdefault("num_experts", self.num_routable)
            if "top_k" in router_parameters(router_type):
                kwargs.setdefault("top_k", num_experts_per_tok)
            router = build_router(router_type, **kwargs)
        self.gate = router
        self.experts = build_experts(experts_config or ExpertsImplementationConfig(), num_experts=num_experts,
                                     hidden_size=hidden_size, intermediate_size=moe_intermediate_size,
                                     hidden_act=hidden_act, bias=expert_bias, gated=gated_experts, up_first=up_first)
        self.shared_expert = None
        self.shared_expert_gate = None
        if num_shared_experts:
            inter = num_shared_experts * (shared_intermediate_size or moe_intermediate_size)
            self.shared_expert = SharedExpert(hidden_size, inter, shared_hidden_act or hidden_act, bias=expert_bias)
            if shared_expert_gate:
                self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        self.expert_input_scale = expert_input_scale
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy

    def route(self, x: torch.Tensor, **signals) -> RouterOutput:
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
        if getattr(self.gate, "uses_token_shape", False):  # per-sample routers need the (batch, seq) grouping
            signals.setdefault("token_shape", tuple(shape[:-1]))
        ro = self.route(x, **signals)
        out = self.combine(x, ro)
        return out.reshape(shape), ro

    def combine(self, x: torch.Tensor, ro: RouterOutput) -> torch.Tensor:
        """Expert outputs mixed with the routing decision ``ro`` (T, H) -> (T, H)."""
        xe = x * self.expert_input_scale if self.expert_input_scale != 1.0 else x
        idx, w = ro.indices, ro.weights
        E = self.num_experts
        routed = idx < E
        impl = getattr(self.experts.config, "_experts_implementation", None)
        # transformers' expert parallelism (``_is_expert_parallel``, set by its "grouped_gemm" style) counts tokens per
        # global expert id, so sentinels must not reach it (moezoo.core.parallel)
        if impl in _SENTINEL_AWARE and not getattr(self.experts, "_is_expert_parallel", False):
            ridx = torch.where(routed, idx, E)
            rw = w
        else:  # transformers' kernels: point empty slots at expert 0 with weight 0
            ridx = torch.where(routed, idx, 0)
            rw = torch.where(routed, w, torch.zeros((), dtype=w.dtype, device=w.device))
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
