"""The shared MoE backbone: plain PyTorch, explicit keyword arguments.

Where things are: ``routing/`` (routers, one module per idea; ``RouterOutput`` in ``routing/output.py``),
``experts.py`` (3-D experts, shared and zero-FLOP experts), ``dispatch.py`` (capacity), ``layer.py`` (``MoELayer``),
``fme.py`` (FiLM-modulated experts), ``losses.py`` (balance / z / contrastive losses), ``stats.py`` (routing
statistics and plots), ``upcycle.py`` (dense -> MoE), ``parallel.py`` (transformers' expert-parallel plans),
``modules.py`` (non-token routers such as DriveMoE's camera router).
"""
from .dispatch import apply_capacity, expert_capacity
from .experts import (BiasedExperts, Experts, ExpertsImplementationConfig, PlainBiasedExperts, PlainExperts, SharedExpert,
                      ZeroFlopExperts, build_experts)
from .fme import FMEExperts, FMEMoELayer
from .layer import Capacity, MoELayer, MoELayerConfig, PlainSharedExpert, build_moe_layer
from .losses import (modality_balance_loss, mutual_information_loss, null_expert_usage, router_z_loss,
                     routing_contrastive_loss, sequence_balance_loss, switch_balance_loss, update_selection_bias)
from .modules import CameraRouter
from .parallel import base_model_ep_plan, distribute_experts, ep_plan
from .routing import (ROUTERS, ConditionRouter, ExpertChoiceRouter, GatingResidualRouter, ModalityRouter,
                      NullExpertTopKRouter, PooledRouter, PrototypeRouter, Router, RouterOutput, Top2CapacityRouter,
                      TopKRouter, TopPRouter, UncertaintyRouter, UnconditionalRouter, build_router, register_router)
from .routing.output import data_check
from .stats import RoutingStats, expert_load, routing_entropy
from .upcycle import UpcycledMoE, collect_router_outputs, upcycle_model, upcycled_balance_loss

__all__ = [
    # layers
    "MoELayer", "MoELayerConfig", "Capacity", "build_moe_layer", "FMEMoELayer", "UpcycledMoE", "upcycle_model", "collect_router_outputs", "upcycled_balance_loss",
    # experts
    "Experts", "BiasedExperts", "PlainExperts", "PlainBiasedExperts", "SharedExpert", "PlainSharedExpert",
    "ZeroFlopExperts", "FMEExperts", "build_experts", "ExpertsImplementationConfig",
    # dispatch
    "apply_capacity", "expert_capacity",
    # routing
    "Router", "RouterOutput", "ROUTERS", "register_router", "build_router", "TopKRouter", "NullExpertTopKRouter",
    "GatingResidualRouter", "TopPRouter", "ExpertChoiceRouter", "ConditionRouter", "PooledRouter", "ModalityRouter", "UnconditionalRouter",
    "PrototypeRouter", "UncertaintyRouter", "Top2CapacityRouter", "CameraRouter", "data_check",
    # losses
    "switch_balance_loss", "router_z_loss", "sequence_balance_loss", "update_selection_bias", "null_expert_usage",
    "routing_contrastive_loss", "mutual_information_loss", "modality_balance_loss",
    # statistics
    "RoutingStats", "expert_load", "routing_entropy",
    # expert parallelism
    "base_model_ep_plan", "distribute_experts", "ep_plan",
]
