"""Glue between moezoo MoE layers and transformers' expert parallelism (no engine of our own).

transformers (5.x, ``transformers.distributed``) shards experts with two plan styles:

- ``"grouped_gemm"`` on each per-expert parameter (``...mlp.experts.gate_up_proj``, ``...down_proj`` and their biases):
  the leading expert dimension is split over the EP ranks (``Shard(0)``) and ``experts.num_experts`` becomes the
  local count;
- ``"ep_dispatch_experts"`` on the experts module (``...mlp.experts``): its forward is replaced by a token exchange
  (all-to-all, or all-reduce when the EP group shares one batch) that runs the local experts on local expert ids.

Models declare this as ``base_model_ep_plan`` on their config class (e.g. Qwen3-MoE, Mixtral:
``{"layers.*.mlp.experts.gate_up_proj": "grouped_gemm", "layers.*.mlp.experts.down_proj": "grouped_gemm",
"layers.*.mlp.experts": "ep_dispatch_experts"}``; gpt-oss adds ``..._bias`` entries), and
``from_pretrained(..., distributed_config=DistributedConfig(ep_size=...))`` applies it under torchrun.

Here:

- :func:`base_model_ep_plan` gives that dict for a moezoo config class (``layers.*.mlp`` layout);
- :func:`ep_plan` derives the plan of an existing model from its :class:`~moezoo.core.MoELayer` s (an upcycled HF
  model, a moezoo model, a bare layer), listing every per-expert parameter (biases included: a bias left out of the
  plan would stay whole while the weights are split);
- :func:`set_ep_plan` installs it on a ``PreTrainedModel`` instance (``model.ep_plan``), so transformers' own
  resolution (``DistributedConfig(ep_size=...)``) finds it;
- :func:`distribute_experts` applies transformers' machinery (``prepare_distribute_model`` +
  ``maybe_distribute_model``) to a model that is already built, e.g. right after :func:`moezoo.core.upcycle.upcycle_model`
  (``from_pretrained`` cannot, since the saved config describes the dense architecture).  Every rank must hold the
  same weights before the call: each keeps its own slice of the experts.

The router (``...mlp.gate``), shared experts and zero-FLOP experts stay replicated; their outputs are computed on every
rank from the routing decision, as in transformers' MoE models.  Sentinel expert ids (dynamic k, zero-FLOP experts)
reach the experts as id 0 with weight 0 under EP (see ``MoELayer.combine``), because transformers' dispatch counts
tokens per global expert id.
"""
from __future__ import annotations

from torch import nn

from .layer import MoELayer

__all__ = ["EP_DISPATCH_STYLE", "EP_PARAM_STYLE", "base_model_ep_plan", "expert_parameter_names", "ep_plan",
           "set_ep_plan", "distribute_experts"]

EP_DISPATCH_STYLE = "ep_dispatch_experts"
EP_PARAM_STYLE = "grouped_gemm"


def _wildcard(name: str) -> str:
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    return replace_layer_number_by_wildcard(name)


def base_model_ep_plan(mlp_path: str = "layers.*.mlp", *, gated: bool = True, bias: bool = False) -> dict[str, str]:
    """The ``base_model_ep_plan`` class attribute for a config whose base model has MoE layers at ``mlp_path``.

    ``gated``: experts store ``gate_up_proj`` (else ``up_proj``); ``bias``: per-expert biases exist.
    """
    if not isinstance(mlp_path, str) or not mlp_path or mlp_path.endswith("."):
        raise ValueError(f"mlp_path must be a dotted module path such as 'layers.*.mlp', got {mlp_path!r}")
    in_proj = "gate_up_proj" if gated else "up_proj"
    names = [in_proj, "down_proj"] + ([f"{in_proj}_bias", "down_proj_bias"] if bias else [])
    plan = {f"{mlp_path}.experts.{n}": EP_PARAM_STYLE for n in names}
    plan[f"{mlp_path}.experts"] = EP_DISPATCH_STYLE
    return plan


def expert_parameter_names(experts: nn.Module) -> list[str]:
    """Direct parameters of an experts module that are stacked per expert (leading dimension ``num_experts``)."""
    E = getattr(experts, "num_experts", None)
    if not isinstance(E, int):
        raise ValueError(f"{type(experts).__name__} has no integer `num_experts`; not an experts module")
    return [n for n, p in experts.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == E]


def ep_plan(model: nn.Module, *, wildcard: bool = True, prefix: str = "") -> dict[str, str]:
    """The expert-parallel plan of ``model``, derived from the :class:`MoELayer` s it contains.

    Keys are module / parameter paths relative to ``model`` (with ``prefix.`` prepended when given), layer numbers
    replaced by ``*`` (``wildcard=True``, transformers' plan style) so one rule covers every layer, e.g. for an
    upcycled ``LlamaForCausalLM``: ``{"model.layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
    "model.layers.*.mlp.experts.down_proj": "grouped_gemm", "model.layers.*.mlp.experts": "ep_dispatch_experts"}``.
    Pass the base model (``model.model``) to get the ``base_model_ep_plan`` form (``layers.*...``).
    Raises ``ValueError`` when the model has no MoE layer.
    """
    plan: dict[str, str] = {}
    found = False
    for name, mod in model.named_modules():
        if not isinstance(mod, MoELayer):
            continue
        found = True
        base = f"{name}.experts" if name else "experts"
        if prefix:
            base = f"{prefix}.{base}"
        key = _wildcard(base) if wildcard else base
        for p in expert_parameter_names(mod.experts):
            plan[f"{key}.{p}"] = EP_PARAM_STYLE
        plan[key] = EP_DISPATCH_STYLE
    if not found:
        raise ValueError(f"{type(model).__name__} contains no MoELayer; nothing to shard over experts")
    return plan


def set_ep_plan(model: nn.Module, plan: dict[str, str] | None = None) -> dict[str, str]:
    """Install ``plan`` (default :func:`ep_plan` of ``model``) as the instance's ``ep_plan`` (a ``PreTrainedModel``)
    and return it; transformers validates the style names."""
    if not hasattr(type(model), "ep_plan"):
        raise ValueError(f"model must be a transformers PreTrainedModel (with an `ep_plan`), got {type(model).__name__}")
    plan = ep_plan(model) if plan is None else dict(plan)
    model.ep_plan = plan
    return plan


def distribute_experts(model: nn.Module, ep_size: int | None = None, *, distributed_config=None,
                       ep_implementation: str = "auto") -> nn.Module:
    """Shard the experts of an already-built ``PreTrainedModel`` with transformers' expert parallelism.

    Call it on every rank of an initialised ``torch.distributed`` group (torchrun, or ``init_process_group``), after
    the model holds the same weights everywhere.  Default layout ``DistributedConfig(ep_size=ep_size,
    fsdp_size=world)``: every rank trains on its own batch (FSDP2 over the dense modules), each rank keeps
    ``num_experts / ep_size`` experts (``world / ep_size`` FSDP-sharded copies of each when ``ep_size < world``), and
    tokens travel to their experts' rank with all-to-all (forward and backward).  Pass ``distributed_config`` for other
    layouts; its ``ep_plan`` entries override the derived ones.  Returns the model (sharded in place).

    Note: ``DistributedConfig(ep_size=n, tp_size=n, tp_plan={})`` (EP alone over ranks that share a batch) is rejected
    by transformers 5.23 for models without a ``base_model_tp_plan`` override ("has no tp_plan").
    """
    import torch.distributed as dist
    from transformers.distributed import DistributedConfig

    if not hasattr(type(model), "maybe_distribute_model"):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised: launch with torchrun or call init_process_group first")
    world = dist.get_world_size()
    if distributed_config is None:
        if ep_size is None:
            ep_size = world
        if not isinstance(ep_size, int) or ep_size < 2 or world % ep_size:
            raise ValueError(f"ep_size must be an int >= 2 dividing the world size {world}, got {ep_size!r}")
        distributed_config = DistributedConfig(ep_size=ep_size, fsdp_size=world, ep_implementation=ep_implementation)
    for name, mod in model.named_modules():
        if isinstance(mod, MoELayer) and mod.num_experts % distributed_config.ep_size:
            raise ValueError(f"{name} has num_experts={mod.num_experts}, not divisible by ep_size={distributed_config.ep_size}")
    plan = ep_plan(model)
    if isinstance(distributed_config.ep_plan, dict):
        plan = plan | distributed_config.ep_plan
    set_ep_plan(model, plan)
    cfg, _, mesh_manager = model.prepare_distribute_model(distributed_config)
    return type(model).maybe_distribute_model(model, cfg, mesh_manager)
