"""The MoE FFN of the shared backbone: ``MoELayer(router, experts, shared, zero_flop, capacity)`` and the one translator
from a config (or plain keyword arguments) to such a layer, :func:`build_moe_layer`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .dispatch import apply_capacity
from .experts import ExpertsImplementationConfig, SharedExpert, ZeroFlopExperts, build_experts, get_activation
from .routing import Router, RouterOutput, build_router, router_parameters
from .routing.conditional import UnconditionalRouter

# implementations that understand the sentinel id ``num_experts`` natively
_SENTINEL_AWARE = {"moezoo", "eager", None}
DROP_POLICIES = ("probs", "position")


@dataclass(frozen=True)
class Capacity:
    """Capacity mode with token dropping: each expert takes at most ``ceil(factor * T * k / R)`` slots; the pairs
    beyond are dropped by ``drop_policy`` (``"probs"``: lowest weight first, ``"position"``: latest tokens first)."""

    factor: float
    drop_policy: str = "probs"

    def __post_init__(self):
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or self.factor <= 0:
            raise ValueError(f"capacity_factor must be a number > 0 or None, got {self.factor!r}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}")

    def apply(self, routing: RouterOutput) -> RouterOutput:
        return apply_capacity(routing, routing.num_experts, self.factor, policy=self.drop_policy)


def _base_module(module: nn.Module) -> nn.Module:
    """The module itself, or the one a peft adapter wraps (peft's ``BaseTunerLayer.get_base_layer``)."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


class MoELayer(nn.Module):
    """One Mixture-of-Experts FFN layer: ``router`` -> (capacity) -> ``experts`` (+ ``zero_flop``, + ``shared``).

    Args:
        router: a :class:`moezoo.core.Router` returning a :class:`RouterOutput` over the layer's expert space: the
            FFN experts ``[0, E)``, then the zero-FLOP experts; the sentinel id is the total.
        experts: the FFN experts (``forward(x (T, H), top_k_index (T, K), top_k_weights (T, K))``), e.g.
            :func:`moezoo.core.build_experts`; 3-D parameters ``gate_up_proj`` / ``up_proj`` and ``down_proj``.
        shared: an always-on dense MLP added to every token (``shared_expert``), or None.
        zero_flop: :class:`ZeroFlopExperts` placed after the FFN experts (null / zero / copy / constant), or None.
        capacity: a :class:`Capacity` (or a capacity factor) for capacity mode with dropping; None = dropless.
        shared_gate: ``Linear(H, 1)`` whose sigmoid scales the shared expert (``shared_expert_gate``), or None.
        expert_input_scale: multiply the experts' input (not the router's) by this (MoE++ doubles it).
        num_experts_per_tok: k reported for parameter counts (default: the router's ``top_k``).

    Submodules keep transformers' names: ``gate`` (router), ``experts``, ``shared_expert``, ``shared_expert_gate``,
    ``zero_flop``, so ``...mlp.gate.weight`` / ``...mlp.experts.gate_up_proj`` paths carry over.

    ``forward(hidden_states (..., H), **signals)`` returns ``(output (..., H), RouterOutput)``; ``signals`` go to the
    router (``condition=``, ``modality_ids=``, ``gate_residual=``, ``attention_mask=``, ``uncond_mask=`` ...). A router
    whose class sets ``uses_token_shape = True`` also gets ``token_shape=`` = the leading shape ``(B, S)``.
    Build one from a config with :func:`build_moe_layer`.
    """

    def __init__(self, router: Router, experts: nn.Module, shared: nn.Module | None = None,
                 zero_flop: ZeroFlopExperts | None = None, capacity: Capacity | float | None = None, *,
                 shared_gate: nn.Module | None = None, expert_input_scale: float = 1.0,
                 num_experts_per_tok: int | None = None):
        super().__init__()
        if not isinstance(router, nn.Module) or not hasattr(router, "num_experts"):
            raise ValueError(f"router must be a moezoo.core.Router, got {type(router).__name__}")
        if capacity is not None and not isinstance(capacity, Capacity):
            capacity = Capacity(capacity)
        if zero_flop is not None and zero_flop.count == 0:
            zero_flop = None
        self.gate = router
        self.experts = experts
        # FFN experts before any expert parallelism (which makes ``experts.num_experts`` local)
        self.num_ffn_experts = int(experts.num_experts)
        self.num_experts = self.num_ffn_experts - int(getattr(router, "num_extra_experts", 0))
        self.hidden_size = int(getattr(experts, "hidden_dim", getattr(router, "hidden_size", 0)))
        self.zero_flop = zero_flop
        self.num_routable = self.num_ffn_experts + (zero_flop.count if zero_flop is not None else 0)
        router_width = router.num_experts + int(getattr(router, "num_extra_experts", 0))
        if router_width != self.num_routable:
            raise ValueError(f"the router routes over {router_width} experts but the layer has {self.num_routable} "
                             f"({self.num_ffn_experts} FFN experts + "
                             f"{zero_flop.count if zero_flop is not None else 0} zero-FLOP experts)")
        self.shared_expert = shared
        self.shared_expert_gate = shared_gate
        if isinstance(router, UnconditionalRouter):  # capacity applies to the routed tokens only
            router.routed_capacity, capacity = capacity, None
        self.capacity = capacity
        self.expert_input_scale = expert_input_scale
        self.num_experts_per_tok = int(num_experts_per_tok or getattr(router, "top_k", None) or self.num_experts)

    @classmethod
    def from_init_kwargs(cls, **init_kwargs) -> "MoELayer":
        """Rebuild a layer from its ``init_kwargs`` (:func:`build_moe_layer` arguments; ``moezoo convert`` folders)."""
        return build_moe_layer(layer_class=cls, **init_kwargs)

    @property
    def capacity_factor(self) -> float | None:
        cap = self.gate.routed_capacity if isinstance(self.gate, UnconditionalRouter) else self.capacity
        return None if cap is None else cap.factor

    @property
    def unconditional_expert(self) -> bool:
        return isinstance(self.gate, UnconditionalRouter)

    def route(self, x: torch.Tensor, **signals) -> RouterOutput:
        routing = self.gate(x, **signals)
        if self.capacity is not None:
            routing = self.capacity.apply(routing)
        return routing

    def forward(self, hidden_states: torch.Tensor, **signals) -> tuple[torch.Tensor, RouterOutput]:
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states has last dimension {hidden_states.shape[-1]}, "
                             f"expected hidden_size={self.hidden_size}")
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        if getattr(self.gate, "uses_token_shape", False):  # per-sample grouping
            signals.setdefault("token_shape", tuple(shape[:-1]))
        routing = self.route(x, **signals)
        out = self.combine(x, routing)
        return out.reshape(shape), routing

    def combine(self, x: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """Expert outputs mixed with the routing decision (T, H) -> (T, H)."""
        xe = x * self.expert_input_scale if self.expert_input_scale != 1.0 else x
        idx, w = routing.indices, routing.weights
        E = self.num_ffn_experts
        routed = idx < E
        experts = _base_module(self.experts)
        impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
        # transformers' expert parallelism (``_is_expert_parallel``, set by its "grouped_gemm" style) counts tokens per
        # global expert id, so sentinels must not reach it (moezoo.core.parallel)
        if impl in _SENTINEL_AWARE and not getattr(experts, "_is_expert_parallel", False):
            # sentinel slots (dynamic-k padding, zero-FLOP experts) cost nothing there: the kernel compacts the
            # selected (token, expert) pairs before sorting them (``sort_by_expert``)
            ridx = torch.where(routed, idx, E)
            rw = w
        else:  # transformers' kernels: point empty slots at expert 0 with weight 0
            if idx.shape[-1] > 1 and idx.device.type == "cpu" and not torch.compiler.is_compiling():
                # dynamic-k routers (top-p) pad every token to the widest possible selection; slots that no token
                # fills with an FFN expert would be computed (weight 0) by these kernels, so drop them (eager CPU
                # only: the check is a host sync and a graph break)
                live = routed.any(0)
                idx_e, w_e, routed_e = (idx, w, routed) if bool(live.all()) else (idx[:, live], w[:, live],
                                                                                   routed[:, live])
            else:
                idx_e, w_e, routed_e = idx, w, routed
            ridx = torch.where(routed_e, idx_e, 0)
            rw = torch.where(routed_e, w_e, torch.zeros((), dtype=w.dtype, device=w.device))
        out = self.experts(xe, ridx, rw.to(xe.dtype))
        if self.zero_flop is not None and self.zero_flop.has_output:
            out = out + self.zero_flop(xe, idx, w)
        if self.shared_expert is not None:
            s = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(x)) * s
            out = out + s
        return out

    def extra_repr(self) -> str:
        return f"routable={self.num_routable}, top_k={self.num_experts_per_tok}, capacity_factor={self.capacity_factor}"


# ----------------------------------------------------------------------------------------------------------------------
# The one translator: config / keyword arguments -> MoELayer
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class MoELayerConfig:
    """Everything :func:`build_moe_layer` reads, named as transformers' MoE config fields.

    hidden_size, num_experts, num_experts_per_tok, moe_intermediate_size: H, E (routed FFN experts), k, I.
    hidden_act, expert_bias, gated_experts, up_first: expert MLP form (SwiGLU by default; see ``Experts``).
    router_type: a name in :data:`moezoo.core.ROUTERS`; router_kwargs: its extra constructor kwargs;
    norm_topk_prob: given to routers that take it (unless router_kwargs sets it).
    num_null_experts, num_zero_experts, num_copy_experts, num_constant_experts: zero-FLOP experts after the routed ones.
    num_shared_experts, shared_intermediate_size, shared_expert_gate, shared_hidden_act, shared_gated: always-on
        experts (one fused MLP of intermediate ``num_shared_experts * shared_intermediate_size``; gated ``act(g) * u``
        or plain ``down(act(up x))``), optionally scaled by a sigmoid gate.
    expert_input_scale: multiply the experts' input by this (MoE++).
    capacity_factor, drop_policy: capacity mode (None = dropless).
    unconditional_expert: one more FFN expert taking the tokens flagged by ``uncond_mask=`` (ProMoE), see
        :class:`moezoo.core.routing.UnconditionalRouter`.
    """

    hidden_size: int
    num_experts: int
    moe_intermediate_size: int
    num_experts_per_tok: int = 2
    hidden_act: str = "silu"
    expert_bias: bool = False
    gated_experts: bool = True
    up_first: bool = False
    router_type: str = "topk"
    router_kwargs: dict | None = None
    norm_topk_prob: bool | None = None
    num_null_experts: int = 0
    num_zero_experts: int = 0
    num_copy_experts: int = 0
    num_constant_experts: int = 0
    num_shared_experts: int = 0
    shared_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    shared_hidden_act: str | None = None
    shared_gated: bool = True
    expert_input_scale: float = 1.0
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    unconditional_expert: bool = False

    @classmethod
    def from_config(cls, config, **overrides) -> "MoELayerConfig":
        """Read the fields of a (transformers) config object by name; missing ones keep their defaults."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in overrides:
                values[f.name] = overrides.pop(f.name)
            elif hasattr(config, f.name):
                values[f.name] = getattr(config, f.name)
        if overrides:
            raise TypeError(f"build_moe_layer got unknown argument(s) {sorted(overrides)}; expected fields of "
                            f"MoELayerConfig: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**values)

    def __post_init__(self):
        for name in ("hidden_size", "num_experts", "moe_intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("num_null_experts", "num_zero_experts", "num_copy_experts", "num_constant_experts",
                     "num_shared_experts"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if self.router_kwargs is not None and not isinstance(self.router_kwargs, dict):
            raise ValueError(f"router_kwargs must be a dict or None, got {type(self.router_kwargs).__name__}")
        if self.capacity_factor is not None:
            Capacity(self.capacity_factor, self.drop_policy)


def build_moe_layer(config=None, *, experts_config=None, router: Router | None = None,
                    layer_class: type[MoELayer] = MoELayer, **kwargs) -> MoELayer:
    """Build the :class:`MoELayer` that ``config`` describes: the one translator every family uses.

    ``config``: a :class:`MoELayerConfig`, or any object (a transformers config) whose fields are read by the names of
    :class:`MoELayerConfig`, or None (then ``kwargs`` hold the fields); ``kwargs`` override config fields.
    ``experts_config``: object carrying ``_experts_implementation`` (default: ``config`` when it is a model config,
    so ``model.set_experts_implementation(...)`` reaches the experts). ``router``: a ready router (replaces
    ``router_type`` / ``router_kwargs``). ``layer_class``: a MoELayer subclass to build.
    The result keeps its build arguments in ``init_kwargs`` (``moezoo convert`` rebuilds block references from them).
    """
    if isinstance(config, MoELayerConfig):
        spec = dataclasses.replace(config, **kwargs) if kwargs else config
    elif config is None:
        spec = MoELayerConfig(**kwargs)
    else:
        spec = MoELayerConfig.from_config(config, **kwargs)
        if experts_config is None:
            experts_config = config
    H, E = spec.hidden_size, spec.num_experts
    zero_flop = ZeroFlopExperts(H, E + int(spec.unconditional_expert), num_null=spec.num_null_experts,
                                num_zero=spec.num_zero_experts, num_copy=spec.num_copy_experts,
                                num_constant=spec.num_constant_experts)
    if router is None:
        router_kwargs = dict(spec.router_kwargs or {})
        params = router_parameters(spec.router_type)
        router_kwargs.setdefault("hidden_size", H)
        router_kwargs.setdefault("num_experts", E + zero_flop.count)
        if "top_k" in params:
            router_kwargs.setdefault("top_k", spec.num_experts_per_tok)
        if spec.norm_topk_prob is not None and "norm_topk_prob" in params:
            router_kwargs.setdefault("norm_topk_prob", spec.norm_topk_prob)
        if "condition_dim" in params:  # conditional routers read a condition of the tokens' width unless told
            router_kwargs.setdefault("condition_dim", H)
        router = build_router(spec.router_type, **router_kwargs)
    if spec.unconditional_expert:
        router = UnconditionalRouter.wrap(router, expert_id=E)
    experts = build_experts(experts_config or ExpertsImplementationConfig(), num_experts=E + int(spec.unconditional_expert),
                            hidden_size=H, intermediate_size=spec.moe_intermediate_size, hidden_act=spec.hidden_act,
                            bias=spec.expert_bias, gated=spec.gated_experts, up_first=spec.up_first)
    shared = shared_gate = None
    if spec.num_shared_experts:
        inter = spec.num_shared_experts * (spec.shared_intermediate_size or spec.moe_intermediate_size)
        act = spec.shared_hidden_act or spec.hidden_act
        shared = (SharedExpert(H, inter, act, bias=spec.expert_bias) if spec.shared_gated
                  else PlainSharedExpert(H, inter, act, bias=spec.expert_bias))
        if spec.shared_expert_gate:
            shared_gate = nn.Linear(H, 1, bias=False)
    capacity = None if spec.capacity_factor is None else Capacity(spec.capacity_factor, spec.drop_policy)
    layer = layer_class(router, experts, shared, zero_flop, capacity, shared_gate=shared_gate,
                        expert_input_scale=spec.expert_input_scale, num_experts_per_tok=spec.num_experts_per_tok)
    # serialisable build arguments (what ``moezoo convert`` writes for block references)
    layer.init_kwargs = dataclasses.asdict(spec)
    layer.router_type = spec.router_type
    return layer


class PlainSharedExpert(nn.Module):
    """A dense non-gated MLP ``down(act(up x))`` applied to every token (ProMoE's shared expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "gelu_tanh", bias: bool = True):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = get_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


__all__ = ["MoELayer", "MoELayerConfig", "Capacity", "build_moe_layer", "PlainSharedExpert", "DROP_POLICIES"]
