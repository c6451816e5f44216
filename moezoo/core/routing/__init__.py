"""Routers of the shared backbone: a :class:`Router` base class and one module per routing idea.

=====================  ==================================================================================
module                 routers (``router_type`` in configs)
=====================  ==================================================================================
``output``             :class:`RouterOutput` (what every router returns) and the mask / shape helpers
``base``               :class:`Router` (gate weight, bias, dtype, jitter, scoring, init, declared signals),
                       the registry ``ROUTERS`` / :func:`register_router` / :func:`build_router`
``topk``               :class:`TopKRouter` ("topk": softmax / sigmoid, renormalised or not, grouped,
                       bias-balanced), :class:`NullExpertTopKRouter` ("topk_null", AdaMoE),
                       :class:`GatingResidualRouter` ("moepp", MoE++)
``topp``               :class:`TopPRouter` ("topp": Dynamic-MoE, UniMoE-Audio)
``expert_choice``      :class:`ExpertChoiceRouter` ("expert_choice")
``conditional``        :class:`ConditionRouter` ("condition"), :class:`PooledRouter` ("pooled"),
                       :class:`ModalityRouter` ("modality"), :class:`UnconditionalRouter` (wrapper, ProMoE)
``prototype``          :class:`PrototypeRouter` ("prototype", ProMoE)
``uncertainty``        :class:`UncertaintyRouter` ("uncertainty", MoFME)
=====================  ==================================================================================
"""
from .base import ROUTERS, Router, build_router, jitter, register_router, router_class, router_parameters
from .conditional import ConditionRouter, ModalityRouter, PooledRouter, UnconditionalRouter, next_token_modality_ids
from .expert_choice import ExpertChoiceRouter
from .output import RouterOutput, check_router_input, check_top_k, expand_per_sample, samples_of_tokens
from .prototype import PrototypeRouter
from .topk import GatingResidualRouter, NullExpertTopKRouter, TopKRouter
from .top2_capacity import Top2CapacityRouter
from .topp import TopPRouter, sparsemixer_eval_multipliers
from .uncertainty import UncertaintyRouter, probit_calibrate

__all__ = ["ROUTERS", "Router", "RouterOutput", "build_router", "jitter", "register_router", "router_class",
           "router_parameters", "ConditionRouter", "ModalityRouter", "PooledRouter", "next_token_modality_ids",
           "ExpertChoiceRouter", "UnconditionalRouter", "PrototypeRouter", "GatingResidualRouter", "NullExpertTopKRouter", "TopKRouter",
           "Top2CapacityRouter", "TopPRouter", "sparsemixer_eval_multipliers", "UncertaintyRouter", "probit_calibrate", "check_router_input",
           "check_top_k", "expand_per_sample", "samples_of_tokens"]
