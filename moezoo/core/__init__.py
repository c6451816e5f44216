"""The shared MoE backbone: plain PyTorch, explicit keyword arguments."""
from .experts import (BiasedExperts, Experts, ExpertsImplementationConfig, PlainBiasedExperts, PlainExperts, SharedExpert,
                      ZeroFlopExperts, build_experts, moezoo_experts_forward)
from .dispatch import apply_capacity, expert_capacity
from .layer import MoELayer
from .routers import ROUTERS, RouterOutput, TopKRouter, build_router, register_router
from .routers import ExpertChoiceRouter
from .routers import ConditionRouter, ModalityRouter, PooledRouter, next_token_modality_ids
from .modules import CameraRouter, SceneRouter
from .stats import RoutingStats, expert_load, routing_entropy
from .losses import CoefficientSchedule, null_expert_usage, switch_balance_loss, update_selection_bias
from .upcycle import UpcycledMoE, collect_router_outputs, upcycle_model, upcycled_balance_loss
from .parallel import base_model_ep_plan, distribute_experts, ep_plan
from .routers import PrototypeRouter
from .losses import routing_contrastive_loss
from .layer import PlainSharedExpert
from .fme import FMEExperts, FMEMoELayer
from .uncertainty import UncertaintyRouter, probit_calibrate
from .top2_gating import Top2CapacityRouter

__all__ = [
    "BiasedExperts", "Experts", "ExpertsImplementationConfig", "PlainBiasedExperts", "PlainExperts", "SharedExpert",
    "ZeroFlopExperts", "build_experts", "moezoo_experts_forward", "apply_capacity", "expert_capacity", "MoELayer",
    "ROUTERS", "RouterOutput", "TopKRouter", "build_router", "register_router",
    "ExpertChoiceRouter", "RoutingStats", "expert_load", "routing_entropy", "CoefficientSchedule", "null_expert_usage",
    "switch_balance_loss", "update_selection_bias",
    "ConditionRouter", "ModalityRouter", "PooledRouter", "next_token_modality_ids", "CameraRouter", "SceneRouter",
    "UpcycledMoE", "collect_router_outputs", "upcycle_model", "upcycled_balance_loss", "base_model_ep_plan",
    "distribute_experts", "ep_plan",
    "PrototypeRouter", "routing_contrastive_loss", "PlainSharedExpert",
    "FMEExperts", "FMEMoELayer", "UncertaintyRouter", "probit_calibrate", "Top2CapacityRouter",
]
