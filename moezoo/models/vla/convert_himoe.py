"""Official HiMoE-VLA checkpoint keys -> :class:`MoezooVlaPolicy` keys for the hierarchical action MoE.

Mapped (official ``ZhiyingDu/HiMoE-VLA``, ``src/moevla/models/himoe.py``, ``HiMoEDecoderLayer.mlp`` of the action
expert ``...paligemma_with_expert.gemma_expert.layers.<i>.mlp.``):

- ``ASMoE`` (``gate.weight`` (E, condition_dim), ``experts.<e>.{gate,up,down}_proj.weight``) and ``HBMoE`` (the same +
  ``shared_experts.{gate,up,down}_proj.weight``) -> ``action_expert.layers.<i>.mlp.gate.weight``,
  ``...mlp.experts.gate_up_proj`` ((E, 2I, H): gate rows then up rows per expert), ``...mlp.experts.down_proj``
  ((E, H, I)) and ``...mlp.shared_expert.*``: the tensor layout the block parity reference ``himoe_vla_blocks`` checks;
- ``HiMoEMLP`` (``gate_proj`` / ``up_proj`` / ``down_proj``) -> ``action_expert.layers.<i>.mlp.*`` (same names).

The official layer kinds must match ``config.mlp_layer_types`` (the official placement is
:func:`moezoo.models.vla.configuration_vla.himoe_layer_types`), with the config's expert counts and widths; any
mismatch raises a ValueError naming the layer. Everything else (PaliGemma, the action expert's attention and Gemma
``1 + w`` norms, the projections; the official flow time runs from 1 = noise to 0) is returned as unmapped keys.

``moezoo convert himoe SRC DST [--option model=<registry name>] [--option tiny=true] [--option config={...}]``
writes a ``save_pretrained`` folder with the mapped tensors (the rest keeps its initialisation) and
``unmapped_keys.json``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ...convert import register_converter

OFFICIAL_MLP = re.compile(r"^(?:.*\.)?gemma_expert\.layers\.(\d+)\.mlp\.(.+)$")


def official_mlp_keys(state_dict: dict) -> dict[int, dict[str, torch.Tensor]]:
    """``{layer i: {suffix after ...gemma_expert.layers.<i>.mlp.: tensor}}`` of an official state dict."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        m = OFFICIAL_MLP.match(k)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = v
    return out


def official_kind(sub: dict) -> str:
    """``"as_moe"`` / ``"hb_moe"`` / ``"dense"`` from the key names of one official ``mlp``."""
    if "gate.weight" in sub and "experts.0.gate_proj.weight" in sub:
        return "hb_moe" if "shared_experts.gate_proj.weight" in sub else "as_moe"
    if "gate_proj.weight" in sub:
        return "dense"
    raise ValueError(f"unrecognised official mlp keys {sorted(sub)[:6]}")


def _expected(config, kind: str) -> dict:
    H = config.hidden_size
    if kind == "as_moe":
        return dict(E=config.as_num_experts, I=config.as_moe_intermediate_size, gate_in=config.action_dim,
                    shared=None, names=("as_num_experts", "as_moe_intermediate_size", "action_dim"))
    if kind == "hb_moe":
        shared = config.hb_moe_intermediate_size * config.hb_num_shared_experts if config.hb_num_shared_experts else None
        return dict(E=config.hb_num_experts, I=config.hb_moe_intermediate_size, gate_in=H, shared=shared,
                    names=("hb_num_experts", "hb_moe_intermediate_size", "hidden_size"))
    return dict(I=config.intermediate_size)


def _count_experts(sub: dict) -> int:
    ids = {int(m.group(1)) for k in sub if (m := re.match(r"experts\.(\d+)\.gate_proj\.weight$", k))}
    if ids != set(range(len(ids))):
        raise ValueError(f"official experts are not numbered 0..E-1: {sorted(ids)}")
    return len(ids)


def convert_layer(sub: dict, kind: str, config, layer: int) -> dict[str, torch.Tensor]:
    """One official ``mlp`` (keys relative to it) -> our ``mlp`` keys (relative), shape-checked against ``config``."""
    H = config.hidden_size
    exp = _expected(config, kind)
    if kind == "dense":
        I, Hh = sub["gate_proj.weight"].shape
        if (I, Hh) != (exp["I"], H):
            raise ValueError(f"official dense mlp of layer {layer} is ({I}, {Hh}); the config has intermediate_size="
                             f"{exp['I']}, hidden_size={H}")
        return {f"{n}.weight": sub[f"{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")}
    E = _count_experts(sub)
    I, Hh = sub["experts.0.gate_proj.weight"].shape
    gate = sub["gate.weight"]
    if (E, I, Hh, gate.shape[1]) != (exp["E"], exp["I"], H, exp["gate_in"]):
        n = exp["names"]
        raise ValueError(f"official {kind} of layer {layer} has {E} experts of width {I}, hidden {Hh}, router input "
                         f"{gate.shape[1]}; the config has {n[0]}={exp['E']}, {n[1]}={exp['I']}, hidden_size={H}, "
                         f"{n[2]}={exp['gate_in']}")
    out = {"gate.weight": gate,
           "experts.gate_up_proj": torch.stack([torch.cat([sub[f"experts.{e}.gate_proj.weight"],
                                                           sub[f"experts.{e}.up_proj.weight"]], 0) for e in range(E)]),
           "experts.down_proj": torch.stack([sub[f"experts.{e}.down_proj.weight"] for e in range(E)])}
    if kind == "hb_moe":
        si = sub["shared_experts.gate_proj.weight"].shape[0]
        if si != exp["shared"]:
            raise ValueError(f"official shared expert of layer {layer} has width {si}; the config gives "
                             f"hb_moe_intermediate_size * hb_num_shared_experts = {exp['shared']}")
        for n in ("gate_proj", "up_proj", "down_proj"):
            out[f"shared_expert.{n}.weight"] = sub[f"shared_experts.{n}.weight"]
    return out


def convert_himoe_state_dict(state_dict: dict, config) -> tuple[dict, list[str]]:
    """Map an official HiMoE-VLA state dict onto a :class:`MoezooVlaConfig` policy.

    Returns ``(moezoo_state, unmapped_official_keys)``; load the first with ``policy.load_state_dict(state,
    strict=False)``. Raises a ValueError when the official action expert has another depth, another FFN kind in some
    layer, or other widths than the config."""
    layers = official_mlp_keys(state_dict)
    if not layers:
        raise ValueError("no '...gemma_expert.layers.<i>.mlp.' keys in the state dict: not an official HiMoE-VLA "
                         "checkpoint")
    types = list(config.mlp_layer_types)
    if sorted(layers) != list(range(len(types))):
        raise ValueError(f"the official action expert has mlp layers {sorted(layers)}, the config "
                         f"{len(types)} layers (text_config.num_hidden_layers)")
    out: dict[str, torch.Tensor] = {}
    for i, sub in sorted(layers.items()):
        kind = official_kind(sub)
        if kind != types[i]:
            raise ValueError(f"official layer {i} is {kind!r}, config.mlp_layer_types[{i}] is {types[i]!r} (the "
                             "official placement is himoe_layer_types(num_layers))")
        for k, v in convert_layer(sub, kind, config, i).items():
            out[f"action_expert.layers.{i}.mlp.{k}"] = v.detach().clone().contiguous()
    used = {k for k in state_dict if OFFICIAL_MLP.match(k)}
    return out, sorted(k for k in state_dict if k not in used)


def load_official_state(src: Path, allow_pickle: bool = False) -> dict:
    """Tensors of a safetensors file, or of every ``*.safetensors`` in a folder (pickles only with ``allow_pickle``)."""
    from safetensors.torch import load_file

    src = Path(src)
    files = [src] if src.is_file() else sorted(src.glob("*.safetensors"))
    if not files:
        if allow_pickle:
            files = sorted(src.glob("*.bin")) + sorted(src.glob("*.pt")) + sorted(src.glob("*.pth"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors under {src} (pickled checkpoints need allow_pickle=True)")
    state = {}
    for f in files:
        if f.suffix == ".safetensors":
            state.update(load_file(str(f)))
        else:
            state.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return state


@register_converter("himoe")
def convert_himoe(src, dst, *, model: str = "himoe_vla_e32k4", tiny: bool = False, config: dict | None = None,
                  allow_pickle: bool = False) -> Path:
    """``moezoo convert himoe SRC DST``: official weights (a safetensors file or folder) -> a ``save_pretrained``
    folder of the registry model ``model`` (``tiny`` / ``config`` overrides) with the action-MoE tensors mapped."""
    import moezoo

    state = load_official_state(Path(src), allow_pickle)
    policy = moezoo.create_model(model, tiny=bool(tiny), **(config or {}))
    mapped, unmapped = convert_himoe_state_dict(state, policy.config)
    missing = [k for k in mapped if k not in policy.state_dict()]
    if missing:
        raise ValueError(f"converted keys {missing[:4]} are not in {model}")
    policy.load_state_dict(mapped, strict=False)
    dst = Path(dst)
    policy.save_pretrained(dst)
    (dst / "unmapped_keys.json").write_text(json.dumps({"mapped": len(mapped), "unmapped": unmapped}, indent=1))
    return dst


__all__ = ["load_official_state", "convert_himoe_state_dict", "convert_layer", "official_mlp_keys", "official_kind", "convert_himoe",
           "OFFICIAL_MLP"]
