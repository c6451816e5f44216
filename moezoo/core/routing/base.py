"""The :class:`Router` base class and the router registry (``ROUTERS``, ``register_router``, ``build_router``).

A router maps token features (T, H) to a :class:`~moezoo.core.routing.output.RouterOutput`. The base owns what every
router has: the linear gate ``weight`` (R, H) (kept at ``...mlp.gate.weight``) and optional ``bias``, the dtype the
scores are computed in, training-time input jitter, the scoring function (softmax / sigmoid) and the init. A subclass
writes ``forward`` (the selection) and declares in ``signals`` the extra keyword inputs it reads besides the tokens
(``condition``, ``modality_ids``, ``uncond_mask``, ...); ``uses_token_shape`` asks the MoE layer for the (batch, seq)
shape of the tokens (per-sample routers).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

SCORING_FUNCS = ("softmax", "sigmoid")


class Router(nn.Module):
    """Base of every router.

    Args:
        hidden_size: H, the width of the features the gate reads (``None``: the router has no linear gate).
        num_experts: R, the routable experts (routed + zero-FLOP); also the sentinel id of the output.
        bias: a bias on the linear gate.
        scoring_func: ``"softmax"`` or ``"sigmoid"`` (:meth:`score`).
        jitter_noise: training-time multiplicative input jitter ``x * U(1 - eps, 1 + eps)`` (Switch Transformer).
        router_dtype: dtype the logits and scores are computed in (fp32 by default).
        gate_outputs: rows of the gate (default R; e.g. stacked per-modality gates have more).
        init_std: std of the normal init of the gate (default ``H ** -0.5``).
        linear: False builds no gate (routers that take logits from elsewhere or hold other parameters).

    Class attributes: ``signals`` (names of the extra ``forward`` keyword inputs the router reads) and
    ``uses_token_shape`` (the router needs ``token_shape=(batch, seq)``).
    """

    signals: tuple[str, ...] = ()
    uses_token_shape: bool = False

    def __init__(self, hidden_size: int | None, num_experts: int, *, bias: bool = False, scoring_func: str = "softmax",
                 jitter_noise: float = 0.0, router_dtype: torch.dtype = torch.float32, gate_outputs: int | None = None,
                 init_std: float | None = None, linear: bool = True):
        super().__init__()
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")
        self.hidden_size, self.num_experts = hidden_size, num_experts
        self.scoring_func, self.jitter_noise, self.router_dtype = scoring_func, jitter_noise, router_dtype
        self.init_std = init_std
        if linear:
            rows = num_experts if gate_outputs is None else gate_outputs
            self.weight = nn.Parameter(torch.empty(rows, hidden_size))
            self.bias = nn.Parameter(torch.zeros(rows)) if bias else None
            nn.init.normal_(self.weight, std=self.default_init_std())
        else:
            self.weight = self.bias = None

    def default_init_std(self) -> float:
        return self.init_std if self.init_std is not None else self.weight.shape[-1] ** -0.5

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(T, H) -> (T, R) gate logits in ``router_dtype``."""
        dt = self.router_dtype
        with torch.autocast(x.device.type, enabled=False):  # under bf16 autocast the router stays in router_dtype
            return F.linear(x.to(dt), self.weight.to(dt), None if self.bias is None else self.bias.to(dt))

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        return jitter(x, self.jitter_noise, self.training)

    def extra_repr(self) -> str:
        k = getattr(self, "top_k", None)
        return f"hidden={self.hidden_size}, num_experts={self.num_experts}" + (f", top_k={k}" if k is not None else "")


def jitter(x: torch.Tensor, eps: float, training: bool) -> torch.Tensor:
    """Multiplicative input jitter ``x * U(1 - eps, 1 + eps)`` (Switch Transformer), training only."""
    if not training or eps <= 0:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str):
    """Decorator adding a router class to :data:`ROUTERS` under ``name`` (config field ``router_type``)."""
    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            raise TypeError(f"register_router({name!r}) expects a subclass of moezoo.core.Router, got {cls!r}")
        ROUTERS[name] = cls
        return cls
    return deco


def router_class(router_type: str) -> type[Router]:
    if router_type not in ROUTERS:
        raise ValueError(f"router_type={router_type!r} is unknown; expected one of {sorted(ROUTERS)}")
    return ROUTERS[router_type]


def router_parameters(router_type: str) -> set[str]:
    """Names of the constructor arguments of a registered router (``top_k`` for token-choice routers, ...)."""
    return set(inspect.signature(router_class(router_type)).parameters)


def build_router(router_type: str, **kwargs) -> Router:
    return router_class(router_type)(**kwargs)


__all__ = ["Router", "ROUTERS", "SCORING_FUNCS", "register_router", "router_class", "router_parameters", "build_router",
           "jitter"]
