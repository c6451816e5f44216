"""The shared MoE backbone: plain PyTorch, explicit keyword arguments."""
from .experts import (BiasedExperts, Experts, ExpertsImplementationConfig, PlainBiasedExperts, PlainExperts, SharedExpert,
                      ZeroFlopExperts, build_experts, moezoo_experts_forward)
from .dispatch import apply_capacity, expert_capacity
from .layer import MoELayer
from .routers import ROUTERS, RouterOutput, TopKRouter, build_router, register_router

__all__ = [
    "BiasedExperts", "Experts", "ExpertsImplementationConfig", "PlainBiasedExperts", "PlainExperts", "SharedExpert",
    "ZeroFlopExperts", "build_experts", "moezoo_experts_forward", "apply_capacity", "expert_capacity", "MoELayer",
    "ROUTERS", "RouterOutput", "TopKRouter", "build_router", "register_router",
]
