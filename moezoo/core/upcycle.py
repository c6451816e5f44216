"""Sparse upcycling: turn the dense FFNs of a Hugging Face decoder into :class:`~moezoo.core.MoELayer` s.

``upcycle_model(model, num_experts=8, num_experts_per_tok=2)`` replaces ``...layers[i].mlp`` of a Llama / Qwen2 /
Mistral / Gemma-style decoder (``gate_proj`` / ``up_proj`` / ``down_proj``), a Phi-3-style one (fused
``gate_up_proj`` holding [gate; up]) or a Phi-2-style one (plain ``fc1`` / ``fc2``, upcycled into non-gated experts
with ``...mlp.experts.up_proj``) by an :class:`UpcycledMoE`, in place, and returns ``(model, summary)``.

Equality at initialisation
--------------------------
Every routed expert is a copy of the dense MLP, so the routed output is ``sum_i w_i * dense(x)``; it equals the dense
output whenever the selected weights sum to one.  The default router (``"topk"`` with ``norm_topk_prob=True``, no
``renorm_eps``, ``routed_scaling_factor=1``) renormalises its top-k weights, so the upcycled model reproduces the dense
logits up to float rounding (measured ~1e-6 on a tiny Llama, see tests/core/test_upcycle.py) *whatever* the router
weights are.  The router therefore gets a plain random init (``router_init_std``, ``config.initializer_range`` or
0.02): random, not zero, so that different tokens reach different copies and the experts can diverge (with a zero
router all tokens tie and go to experts 0..k-1 and the others never train; the router itself gets no gradient until
the experts differ, since identical experts make the output independent of the routing weights).

Router settings whose weights do not sum to one (``norm_topk_prob=False``, ``routed_scaling_factor != 1``, zero-FLOP
experts that take probability mass, top-p routers that do not renormalise ...) are accepted but break the equality;
``verify=True`` (default) runs a few random tokens through every converted layer and the dense MLP and reports the
largest difference in ``summary["max_abs_diff"]``.  ``expert_noise_std > 0`` (off by default) perturbs each copy with
Gaussian noise of that size relative to each weight tensor's std, which also breaks exact equality on purpose.

Shared experts
--------------
With ``num_shared_experts > 0`` both the shared expert and the routed experts are initialised from the dense MLP and
the dense output is *split* between them: the shared expert(s) carry ``shared_expert_fraction * dense(x)`` and the
routed experts ``(1 - shared_expert_fraction) * dense(x)`` (the down projections, and their biases, are scaled), so
their sum is the dense output.  The default fraction 0.5 scales by a power of two, which is exact in floating point;
``1.0`` gives routed experts with a zero down projection (they start as "residual" experts that only add what they
learn).  ``num_shared_experts = n > 1`` fuses n copies into one MLP of intermediate ``n * I`` (the core's layout), each
copy's down projection divided by n.  With ``shared_expert_gate=True`` the sigmoid gate's weight starts at zero
(``sigmoid(0) = 0.5`` exactly) and the shared down projection is scaled by ``2 * fraction`` to compensate.

Drop-in module
--------------
:class:`UpcycledMoE` *is* a ``MoELayer`` (so the parameter paths are ``...mlp.gate.weight``,
``...mlp.experts.gate_up_proj``, ``...mlp.experts.down_proj`` and transformers' EP plans / peft's
``target_parameters`` apply), whose ``forward(hidden_states)`` returns only the tensor that HF decoder layers expect
and keeps the :class:`~moezoo.core.routing.RouterOutput` in ``last_router_output``.  ``collect_router_outputs(model)``
gathers them in layer order for :func:`moezoo.core.losses.switch_balance_loss` (``upcycled_balance_loss`` does both).

Experts implementation
----------------------
The experts share the HF model's config object (``experts_config``), so ``model.set_experts_implementation(...)``
reaches them.  transformers only lets a model switch if the source file of its class contains
``@use_experts_implementation`` (dense Llama's does not), so ``upcycle_model`` marks the *instances* (not the
classes) of the model and its PreTrainedModel submodules as switchable.  The default implementation is ``"moezoo"``.

Saving
------
``model.save_pretrained(dir)`` writes the upcycled weights (keys ``...mlp.gate.weight``, ``...mlp.experts.*``) and
the upcycling arguments under ``config.moezoo_upcycle``; the config class is still the dense one, so a plain
``from_pretrained`` would build a dense model and drop the expert weights.  :func:`load_upcycled` rebuilds the
upcycled structure from ``config.moezoo_upcycle`` and loads the saved weights into it.
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from transformers.activations import ACT2CLS

from .experts import ExpertsImplementationConfig
from .layer import MoELayer, build_moe_layer
from .losses import switch_balance_loss
from .routing.output import RouterOutput

__all__ = ["UpcycledMoE", "upcycle_mlp", "upcycle_model", "find_dense_mlps", "collect_router_outputs",
           "clear_router_outputs", "upcycled_balance_loss", "load_upcycled", "dense_mlp_weights"]

_LAYER_MLP = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp$")



class UpcycledMoE(MoELayer):
    """A :class:`MoELayer` that replaces a dense ``mlp`` of an HF decoder.

    ``forward(hidden_states (..., H), **signals)`` returns the output tensor only; the routing decision of the last
    call is kept in ``last_router_output`` (``None`` before the first call, or always when ``store_router_output`` is
    False).  ``forward_with_router(...)`` returns ``(output, RouterOutput)`` like a plain MoELayer.
    All other keyword arguments are those of :class:`MoELayer`.
    """

    store_router_output: bool = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_router_output: RouterOutput | None = None

    def forward_with_router(self, hidden_states: torch.Tensor, **signals) -> tuple[torch.Tensor, RouterOutput]:
        return MoELayer.forward(self, hidden_states, **signals)

    def forward(self, hidden_states: torch.Tensor, **signals) -> torch.Tensor:  # type: ignore[override]
        out, ro = MoELayer.forward(self, hidden_states, **signals)
        if self.store_router_output:
            self.last_router_output = ro
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Reading a dense MLP
# ----------------------------------------------------------------------------------------------------------------------


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(getattr(m, "weight", None), torch.Tensor)
                                        and getattr(m, "weight").dim() == 2)


def is_dense_mlp(module: nn.Module) -> bool:
    """Whether ``module`` looks like a dense MLP this module can upcycle: gated (``gate_proj``/``up_proj``/``down_proj``
    or ``gate_up_proj``/``down_proj``) or plain (``fc1``/``fc2``, Phi-2 / GPT-style)."""
    if isinstance(module, MoELayer):
        return False
    if _is_linear(getattr(module, "fc1", None)) and _is_linear(getattr(module, "fc2", None)):
        return True
    down = getattr(module, "down_proj", None)
    if not _is_linear(down):
        return False
    if _is_linear(getattr(module, "gate_up_proj", None)):
        return True
    return _is_linear(getattr(module, "gate_proj", None)) and _is_linear(getattr(module, "up_proj", None))


def _activation_name(mlp: nn.Module, config) -> str:
    for cfg in (getattr(mlp, "config", None), config):
        for attr in ("hidden_act", "hidden_activation"):
            name = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(name, str):
                return name
    for attr in ("act_fn", "activation_fn", "act"):
        act = getattr(mlp, attr, None)
        if isinstance(act, nn.GELU):
            return "gelu_pytorch_tanh" if act.approximate == "tanh" else "gelu"
        for name, entry in ACT2CLS.items():  # transformers' activation classes, by their ACT2FN name
            if act is not None and type(act) is (entry[0] if isinstance(entry, tuple) else entry):
                return name
    raise ValueError(f"could not tell the activation of {type(mlp).__name__}; pass hidden_act= explicitly")


def dense_mlp_weights(mlp: nn.Module) -> dict:
    """``{"gated", "gate", "up", "down", "gate_bias", "up_bias", "down_bias"}`` of a dense MLP (weights in Linear
    layout: gate/up (I, H), down (H, I); biases or None; ``gate`` is None for a plain ``fc1``/``fc2`` MLP)."""
    if not is_dense_mlp(mlp):
        raise ValueError(f"mlp must have down_proj and either gate_proj+up_proj or a fused gate_up_proj "
                         f"(Llama/Qwen2/Mistral/Phi-3 style), or fc1+fc2 (Phi-2 style); got {type(mlp).__name__}")
    if _is_linear(getattr(mlp, "fc1", None)) and not _is_linear(getattr(mlp, "down_proj", None)):
        up, down = mlp.fc1.weight, mlp.fc2.weight
        if down.shape != (up.shape[1], up.shape[0]):
            raise ValueError(f"inconsistent dense MLP shapes: fc1 {tuple(up.shape)}, fc2 {tuple(down.shape)}")
        up_bias, down_bias = getattr(mlp.fc1, "bias", None), getattr(mlp.fc2, "bias", None)
        if (up_bias is None) != (down_bias is None):
            raise ValueError("the dense MLP has a bias on one of fc1/fc2 only; the core's experts have biases on all or none")
        return {"gated": False, "gate": None, "up": up, "down": down, "gate_bias": None, "up_bias": up_bias,
                "down_bias": down_bias}
    down = mlp.down_proj
    if _is_linear(getattr(mlp, "gate_up_proj", None)):
        fused = mlp.gate_up_proj
        if fused.weight.shape[0] % 2:
            raise ValueError(f"gate_up_proj of {type(mlp).__name__} has an odd output size {fused.weight.shape[0]}")
        gate, up = fused.weight.chunk(2, dim=0)  # Phi-3 order: [gate; up]
        b = getattr(fused, "bias", None)
        gate_bias, up_bias = (None, None) if b is None else b.chunk(2, dim=0)
    else:
        gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
        gate_bias, up_bias = getattr(mlp.gate_proj, "bias", None), getattr(mlp.up_proj, "bias", None)
    if gate.shape != up.shape or down.weight.shape != (gate.shape[1], gate.shape[0]):
        raise ValueError(f"inconsistent dense MLP shapes: gate {tuple(gate.shape)}, up {tuple(up.shape)}, "
                         f"down {tuple(down.weight.shape)}")
    down_bias = getattr(down, "bias", None)
    has = [x is not None for x in (gate_bias, up_bias, down_bias)]
    if any(has) and not all(has):
        raise ValueError("the dense MLP has biases on some projections only; the core's experts have biases on all or none")
    return {"gated": True, "gate": gate, "up": up, "down": down.weight, "gate_bias": gate_bias, "up_bias": up_bias,
            "down_bias": down_bias}


# ----------------------------------------------------------------------------------------------------------------------
# One MLP -> one UpcycledMoE
# ----------------------------------------------------------------------------------------------------------------------


def _check_materialised(layer: nn.Module) -> None:
    """A module that keeps plain (unregistered) tensors would still hold meta tensors after ``to_empty``."""
    for mod in layer.modules():
        for k, v in vars(mod).items():
            if isinstance(v, torch.Tensor) and v.is_meta:
                raise ValueError(f"{type(mod).__name__}.{k} is an unregistered tensor attribute; register it as a buffer "
                                 "so upcycling can materialise it")


def _noisy(t: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    if std <= 0:
        return t
    scale = t.float().std() if t.numel() > 1 else t.float().abs()
    noise = torch.randn(t.shape, generator=generator, dtype=torch.float32, device="cpu").to(t.device)
    return t + (noise * std * scale).to(t.dtype)


@torch.no_grad()
def upcycle_mlp(mlp: nn.Module, *, num_experts: int = 8, num_experts_per_tok: int = 2, router_type: str = "topk",
                router_kwargs: dict | None = None, num_shared_experts: int = 0, shared_expert_fraction: float = 0.5,
                shared_expert_gate: bool = False, hidden_act: str | None = None, router_init_std: float = 0.02,
                expert_noise_std: float = 0.0, experts_config=None, config=None, store_router_output: bool = True,
                generator: torch.Generator | None = None, layer_kwargs: dict | None = None) -> UpcycledMoE:
    """Build an :class:`UpcycledMoE` whose experts are copies of the gated dense ``mlp`` (see the module docstring).

    Args:
        mlp: a dense MLP (``gate_proj``/``up_proj``/``down_proj``, fused ``gate_up_proj``/``down_proj``, or plain
            ``fc1``/``fc2``; shared experts need a gated one).
        num_experts, num_experts_per_tok: E routed experts, k.
        router_type, router_kwargs: the router (``"topk"``: renormalised softmax top-k unless overridden).
        num_shared_experts, shared_expert_fraction, shared_expert_gate: shared experts and the split of the dense
            output between them and the routed experts.
        hidden_act: activation override (read from ``mlp.config`` / ``config`` / the activation module otherwise).
        router_init_std: std of the normal init of the router's ``weight`` (0 gives a zero router).
        expert_noise_std: relative Gaussian noise added to each expert copy (0 = exact copies).
        experts_config: object with ``_experts_implementation`` shared by the experts (the HF model config).
        config: the model config, used to find the activation.
        generator: RNG for the router init and the noise.
        layer_kwargs: further :class:`MoELayer` keyword arguments (capacity_factor, num_null_experts, ...).
    """
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(num_experts_per_tok, int) or not 1 <= num_experts_per_tok <= num_experts:
        raise ValueError(f"num_experts_per_tok must be an int in [1, num_experts={num_experts}], got {num_experts_per_tok!r}")
    if not 0.0 <= float(shared_expert_fraction) <= 1.0:
        raise ValueError(f"shared_expert_fraction must be in [0, 1], got {shared_expert_fraction!r}")
    if router_init_std < 0 or expert_noise_std < 0:
        raise ValueError(f"router_init_std and expert_noise_std must be >= 0, got {router_init_std!r}, {expert_noise_std!r}")
    w = dense_mlp_weights(mlp)
    gated = w["gated"]
    inter, hidden = w["up"].shape
    bias = w["down_bias"] is not None
    if num_shared_experts and not gated:
        raise ValueError("num_shared_experts needs a gated dense MLP (the core's shared expert is gated); "
                         f"{type(mlp).__name__} is a plain fc1/fc2 MLP")
    act = hidden_act or _activation_name(mlp, config)
    device, dtype = w["down"].device, w["down"].dtype
    kwargs = dict(layer_kwargs or {})
    for forbidden in ("hidden_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "hidden_act",
                      "expert_bias", "gated_experts", "up_first", "router_type", "router_kwargs", "num_shared_experts",
                      "shared_intermediate_size", "shared_expert_gate", "experts_config", "router"):
        if forbidden in kwargs:
            raise ValueError(f"layer_kwargs must not set {forbidden!r}; it is an argument of upcycle_mlp or fixed by the dense MLP")
    ctor = dict(hidden_size=hidden, num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                moe_intermediate_size=inter, hidden_act=act, expert_bias=bias, gated_experts=gated,
                router_type=router_type,
                router_kwargs=router_kwargs, num_shared_experts=num_shared_experts, shared_intermediate_size=inter,
                shared_expert_gate=shared_expert_gate, experts_config=experts_config or ExpertsImplementationConfig(),
                layer_class=UpcycledMoE, **kwargs)
    # The FFN weights are overwritten below, so build the layer on the meta device (no random init of E dense-sized
    # experts) and take every other tensor (router, zero-FLOP experts, ...) from a twin with 1-wide FFNs, which gets
    # each module's own default init.
    with torch.device("meta"):
        layer = build_moe_layer(**ctor)
    layer = layer.to_empty(device=device)
    layer.store_router_output = store_router_output
    with torch.device(device):
        twin = build_moe_layer(**{**ctor, "moe_intermediate_size": 1, "shared_intermediate_size": 1})
    target = dict(layer.named_parameters()) | dict(layer.named_buffers())
    for name, t in list(twin.named_parameters()) + list(twin.named_buffers()):
        if name.startswith(("experts.", "shared_expert.")):
            continue
        if target[name].shape != t.shape:  # pragma: no cover - a module whose shape depends on the FFN width
            raise ValueError(f"cannot initialise {name}: its shape depends on the FFN width")
        target[name].copy_(t)
    layer.to(dtype=dtype)
    _check_materialised(layer)

    frac = float(shared_expert_fraction) if num_shared_experts else 0.0
    routed_scale = 1.0 - frac
    # [gate; up] (2I, H) for gated experts, up (I, H) for plain ones
    in_w = torch.cat([w["gate"], w["up"]], dim=0) if gated else w["up"]
    experts = layer.experts
    E = num_experts
    if expert_noise_std > 0:
        for e in range(E):
            experts.in_proj[e].copy_(_noisy(in_w, expert_noise_std, generator))
            experts.down_proj[e].copy_(_noisy(w["down"] * routed_scale, expert_noise_std, generator))
    else:
        experts.in_proj.copy_(in_w.unsqueeze(0).expand(E, -1, -1))
        experts.down_proj.copy_((w["down"] * routed_scale).unsqueeze(0).expand(E, -1, -1))
    if bias:
        in_b = torch.cat([w["gate_bias"], w["up_bias"]]) if gated else w["up_bias"]
        experts.in_proj_bias.copy_(in_b.unsqueeze(0).expand(E, -1))
        experts.down_proj_bias.copy_((w["down_bias"] * routed_scale).unsqueeze(0).expand(E, -1))

    if num_shared_experts:
        n = num_shared_experts
        se = layer.shared_expert
        gate_factor = 1.0
        if layer.shared_expert_gate is not None:
            layer.shared_expert_gate.weight.zero_()
            if getattr(layer.shared_expert_gate, "bias", None) is not None:
                layer.shared_expert_gate.bias.zero_()
            gate_factor = 2.0  # sigmoid(0) = 0.5
        se.gate_proj.weight.copy_(w["gate"].repeat(n, 1))
        se.up_proj.weight.copy_(w["up"].repeat(n, 1))
        se.down_proj.weight.copy_(w["down"].repeat(1, n) * (frac * gate_factor / n))
        if bias:
            se.gate_proj.bias.copy_(w["gate_bias"].repeat(n))
            se.up_proj.bias.copy_(w["up_bias"].repeat(n))
            se.down_proj.bias.copy_(w["down_bias"] * (frac * gate_factor))

    router_weight = getattr(layer.gate, "weight", None)
    if isinstance(router_weight, torch.Tensor) and router_weight.is_floating_point():
        if router_init_std > 0:
            noise = torch.randn(router_weight.shape, generator=generator, dtype=torch.float32, device="cpu")
            router_weight.copy_((noise * router_init_std).to(router_weight.dtype))
        else:
            router_weight.zero_()
        router_bias = getattr(layer.gate, "bias", None)
        if isinstance(router_bias, torch.Tensor) and router_bias.is_floating_point():
            router_bias.zero_()
    layer.train(mlp.training)
    return layer


# ----------------------------------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------------------------------


def _default_root(model: nn.Module) -> nn.Module:
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            dec = get_decoder()
        except Exception:  # noqa: BLE001 - some models raise when they have no decoder
            dec = None
        if isinstance(dec, nn.Module) and dec is not model:
            return dec
    return model


def find_dense_mlps(model: nn.Module, root: nn.Module | str | None = None) -> list[tuple[str, int, nn.Module]]:
    """``[(qualified_name, layer_index, mlp)]`` of every ``...layers.<i>.mlp`` under ``root`` that is a dense MLP
    (or already a :class:`MoELayer`), sorted by layer index.  ``root`` defaults to ``model.get_decoder()`` (so a
    VLM's vision tower is left alone); a string is a submodule path of ``model``."""
    if root is None:
        root = _default_root(model)
    elif isinstance(root, str):
        root = model.get_submodule(root)
    prefix = ""
    for name, mod in model.named_modules():
        if mod is root:
            prefix = name
            break
    found = []
    for name, mod in root.named_modules():
        m = _LAYER_MLP.search(name)
        if m and (is_dense_mlp(mod) or isinstance(mod, MoELayer)):
            full = f"{prefix}.{name}" if prefix else name
            found.append((full, int(m.group(1)), mod))
    indices = [i for _, i, _ in found]
    if len(set(indices)) != len(indices):
        raise ValueError("several `layers.<i>.mlp` modules share a layer index under the chosen root; pass root= to pick one stack")
    return sorted(found, key=lambda t: t[1])


def _select_layers(indices: list[int], layers, every_n_layers: int | None) -> list[int]:
    n = len(indices)
    chosen = set(indices)
    if layers is not None:
        if callable(layers):
            chosen &= {i for i in indices if layers(i)}
        else:
            if isinstance(layers, int):
                raise ValueError(f"layers must be None, an iterable of layer indices or a callable, got the int {layers!r} "
                                 f"(use every_n_layers= for 'every n-th layer')")
            wanted = set()
            for i in layers:
                if not isinstance(i, int) or not -n <= i < max(indices) + 1:
                    raise ValueError(f"layers contains {i!r}; expected layer indices in {sorted(indices)} (negatives count from the end)")
                wanted.add(sorted(indices)[i] if i < 0 else i)
            missing = wanted - set(indices)
            if missing:
                raise ValueError(f"layers {sorted(missing)} have no dense MLP; available: {sorted(indices)}")
            chosen &= wanted
    if every_n_layers is not None:
        if not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive int, got {every_n_layers!r}")
        # Qwen-MoE's decoder_sparse_step convention: layer i is MoE when (i + 1) % step == 0
        chosen &= {i for i in indices if (i + 1) % every_n_layers == 0}
    return sorted(chosen)


def _always_true() -> bool:
    return True


def _enable_experts_switching(model: nn.Module) -> None:
    """Let ``model.set_experts_implementation`` switch this *instance* (see the module docstring)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return
    for mod in model.modules():
        if isinstance(mod, PreTrainedModel):
            mod._can_set_experts_implementation = _always_true


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _jsonable(v):
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def upcycle_model(model: nn.Module, num_experts: int = 8, num_experts_per_tok: int = 2, layers=None, *,
                  every_n_layers: int | None = None, router_type: str = "topk", router_kwargs: dict | None = None,
                  num_shared_experts: int = 0, shared_expert_fraction: float = 0.5, shared_expert_gate: bool = False,
                  router_init_std: float | None = None, expert_noise_std: float = 0.0,
                  experts_implementation: str | None = "moezoo", root: nn.Module | str | None = None,
                  layer_kwargs: dict | None = None, verify: bool = True, seed: int | None = 0,
                  store_router_output: bool = True) -> tuple[nn.Module, dict]:
    """Sparse-upcycle the dense FFNs of ``model`` in place.

    Args:
        model: an HF decoder (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``, ``Phi3ForCausalLM``,
            ...) or any module with ``...layers.<i>.mlp`` gated MLPs.
        num_experts, num_experts_per_tok: E, k of every converted layer.
        layers: which layer indices to convert (None = all; an iterable of ints, negatives from the end; or a
            callable ``i -> bool``).
        every_n_layers: convert only layers with ``(i + 1) % n == 0`` (Qwen-MoE's ``decoder_sparse_step``); combined
            with ``layers`` by intersection.
        router_type, router_kwargs, num_shared_experts, shared_expert_fraction, shared_expert_gate, expert_noise_std,
        layer_kwargs: see :func:`upcycle_mlp`.
        router_init_std: std of the router init (default ``config.initializer_range`` or 0.02).
        experts_implementation: set on the model with ``set_experts_implementation`` ("moezoo" default; None keeps
            the config's).
        root: the module (or its path) holding the decoder layers (default ``model.get_decoder()``).
        verify: compare every converted layer with its dense MLP on 16 random tokens (``summary["max_abs_diff"]``).
        seed: seed of the router init / noise / verification inputs (None = the global RNG).

    Returns ``(model, summary)``; ``summary`` has ``layers`` (converted indices), ``num_layers_converted``,
    ``params_before``, ``params_after``, ``active_params_after`` (per token: k of E routed experts), ``max_abs_diff`` and
    ``max_rel_diff`` (largest |MoE - dense| on the verification tokens, absolute and relative to max |dense|; None
    without verify) and ``upcycle_kwargs`` (also stored as ``model.config.moezoo_upcycle``).
    """
    config = getattr(model, "config", None)
    mlps = find_dense_mlps(model, root)
    if not mlps:
        raise ValueError(f"model ({type(model).__name__}) has no `layers.<i>.mlp` dense MLP to upcycle")
    already = [i for _, i, m in mlps if isinstance(m, MoELayer)]
    indices = [i for _, i, _ in mlps]
    selected = _select_layers(indices, layers, every_n_layers)
    if not selected:
        raise ValueError(f"the layer selection (layers={layers!r}, every_n_layers={every_n_layers!r}) picks none of {indices}")
    clash = sorted(set(selected) & set(already))
    if clash:
        raise ValueError(f"layers {clash} are already MoE layers; select only dense layers")
    if router_init_std is None:
        router_init_std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    params_before = _count(model)
    experts_config = None
    by_index = {i: (name, m) for name, i, m in mlps}
    converted = []
    for i in selected:
        name, mlp = by_index[i]
        mlp_config = getattr(mlp, "config", None) or config
        if experts_config is None:
            experts_config = mlp_config if hasattr(mlp_config, "_experts_implementation") else ExpertsImplementationConfig()
        layer = upcycle_mlp(mlp, num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                            router_type=router_type, router_kwargs=router_kwargs, num_shared_experts=num_shared_experts,
                            shared_expert_fraction=shared_expert_fraction, shared_expert_gate=shared_expert_gate,
                            router_init_std=router_init_std, expert_noise_std=expert_noise_std,
                            experts_config=experts_config, config=mlp_config, generator=generator,
                            layer_kwargs=layer_kwargs, store_router_output=store_router_output)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        converted.append((mlp, layer))

    if not isinstance(experts_config, ExpertsImplementationConfig) and hasattr(model, "set_experts_implementation"):
        _enable_experts_switching(model)
        if experts_implementation is not None:
            model.set_experts_implementation(experts_implementation)
    elif experts_implementation is not None:
        experts_config._experts_implementation = experts_implementation

    max_diff = max_rel = None
    if verify:
        max_diff = max_rel = 0.0
        for mlp, layer in converted:
            d, r = _verify(mlp, layer, generator)
            max_diff, max_rel = max(max_diff, d), max(max_rel, r)

    params_after = _count(model)
    per_expert = 0
    inactive = 0
    for i in selected:
        ex = model.get_submodule(by_index[i][0]).experts
        per_expert = sum(p[0].numel() for n, p in ex.named_parameters(recurse=False) if p.dim() >= 1
                         and p.shape[0] == ex.num_experts)
        inactive += per_expert * (num_experts - num_experts_per_tok)
    upcycle_kwargs = _jsonable(dict(
        num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, layers=selected, router_type=router_type,
        router_kwargs=dict(router_kwargs or {}), num_shared_experts=num_shared_experts,
        shared_expert_fraction=shared_expert_fraction, shared_expert_gate=shared_expert_gate,
        layer_kwargs=dict(layer_kwargs or {}), root=root if isinstance(root, str) else None))
    if config is not None:
        try:
            config.moezoo_upcycle = upcycle_kwargs
        except Exception:  # noqa: BLE001 - frozen configs
            pass
    summary = {
        "layers": selected, "num_layers_converted": len(selected), "params_before": params_before,
        "params_after": params_after, "active_params_after": params_after - inactive, "max_abs_diff": max_diff,
        "max_rel_diff": max_rel, "upcycle_kwargs": upcycle_kwargs,
    }
    return model, summary


@torch.no_grad()
def _verify(mlp: nn.Module, layer: UpcycledMoE, generator: torch.Generator | None) -> tuple[float, float]:
    w = next(mlp.parameters())
    x = torch.randn(16, layer.hidden_size, generator=generator, dtype=torch.float32, device="cpu").to(w.device, w.dtype)
    was = layer.training
    layer.eval()
    try:
        ref = mlp(x)
        out, _ = layer.forward_with_router(x)
    finally:
        layer.train(was)
    diff = float((out.float() - ref.float()).abs().max())
    return diff, diff / max(float(ref.float().abs().max()), 1e-30)


# ----------------------------------------------------------------------------------------------------------------------
# Router outputs and the balance loss
# ----------------------------------------------------------------------------------------------------------------------


def collect_router_outputs(model: nn.Module) -> list[RouterOutput]:
    """The ``last_router_output`` of every MoE layer of ``model`` that has one, in module order (= layer order)."""
    outs = []
    for mod in model.modules():
        ro = getattr(mod, "last_router_output", None) if isinstance(mod, MoELayer) else None
        if ro is not None:
            outs.append(ro)
    return outs


def clear_router_outputs(model: nn.Module) -> None:
    """Drop the stored router outputs (and the autograd graph they hold)."""
    for mod in model.modules():
        if isinstance(mod, MoELayer) and hasattr(mod, "last_router_output"):
            mod.last_router_output = None


def upcycled_balance_loss(model: nn.Module, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`switch_balance_loss` over every layer's last routing decision (call it after the forward)."""
    outs = collect_router_outputs(model)
    if not outs:
        raise ValueError("the model has no stored router outputs: run a forward first (store_router_output=True)")
    return switch_balance_loss(outs, attention_mask=attention_mask)


# ----------------------------------------------------------------------------------------------------------------------
# Loading a saved upcycled model
# ----------------------------------------------------------------------------------------------------------------------


def load_upcycled(path: str | os.PathLike, model_class=None, **from_pretrained_kwargs) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after :func:`upcycle_model`.

    Builds the dense architecture from the saved config (``model_class``, default ``AutoModelForCausalLM``, with
    ``from_config``: no dense weights are read), re-applies the upcycling stored in ``config.moezoo_upcycle`` and loads
    every ``*.safetensors`` file of ``path`` into it (strictly, tied weights excepted).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    config = AutoConfig.from_pretrained(path, **from_pretrained_kwargs)
    kw = getattr(config, "moezoo_upcycle", None)
    if not isinstance(kw, dict):
        raise ValueError(f"{path} has no `moezoo_upcycle` entry in its config.json: it was not saved after upcycle_model")
    model = model_class.from_config(config)
    kw = dict(kw)
    upcycle_model(model, kw.pop("num_experts"), kw.pop("num_experts_per_tok"), layers=kw.pop("layers"), verify=False,
                  experts_implementation=getattr(config, "_experts_implementation", None) or "moezoo", **kw)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no .safetensors file in {path}")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set()
    tied_keys = getattr(model, "_tied_weights_keys", None) or {}
    tied.update(tied_keys.keys() if isinstance(tied_keys, dict) else tied_keys)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint at {path} does not match the upcycled model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    return model
