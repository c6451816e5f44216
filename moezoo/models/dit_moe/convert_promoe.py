"""Official ProMoE token-choice checkpoints (ali-vilab/ProMoE ``models/models_ProMoE_TC.py``, class ``DiT``) ->
``moezoo_dit_moe`` folders.

``moezoo convert promoe SRC DST [--config CONFIG.json] [--allow-pickle]``: SRC is a folder with ``config.json`` (the
``DiT(**kwargs)`` arguments with a ``MoE_config`` dict, as in ProMoE's ``configs/*.yaml``) and the weights, or a
weights file (see :func:`moezoo.models.dit_moe.convert_dit_moe.load_official`). Sizes missing from the config are
read from the tensor shapes; MoE options missing from ``MoE_config`` take the official ``SparseMoeBlock`` defaults.

Official layout -> moezoo: ``blocks.<i>.mlp.cluster_centers`` -> ``blocks.<i>.mlp.gate.weight`` (the prototypes);
``blocks.<i>.mlp.experts.<e>.{up_proj,down_proj}.{weight,bias}`` -> ``mlp.experts.{up_proj,down_proj}[e]`` and
``..._bias[e]`` (expert ``E`` is the unconditional expert); ``mlp.shared_expert.*`` unchanged; dense blocks keep
``mlp.fc1`` / ``mlp.fc2`` (``use_swiglu=True`` dense ``up_proj`` / ``down_proj`` become ``fc1`` / ``fc2``: the same GELU
MLP). Quirks kept: null class = label 1000 (``null_class_id``; the official code hard-codes 1000, so convert with
``num_classes=1000``), raw-cosine top-k weights, the balance loss only from ``load_balance_loss_coef`` (the configs'
``aux_loss_coef`` key is ignored by the official block, which then uses its default 0.001).
"""
from __future__ import annotations

import re
import warnings

import torch

from ...convert import register_converter
from .configuration_dit_moe import MoezooDiTMoeConfig
from .convert_dit_moe import _shape, backbone_sizes, load_official, model_with_weights, write_converted

OFFICIAL_NULL_LABEL = 1000
# SparseMoeBlock's defaults
MOE_DEFAULTS = dict(top_k=2, load_balance_loss_coef=0.001, norm_topk_prob=False, seq_aux=False, use_shared_expert=True,
                    use_uncond_expert=True, router_weight_mode="softmax", routing_contrastive_lam=0,
                    use_top_k_for_routing_contrastive=False, routing_contrastive_temperature=0.1, interleave=False)


def moe_blocks(sd: dict) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.mlp\.cluster_centers$", k))})


def config_from_official(official: dict, state_dict: dict) -> MoezooDiTMoeConfig:
    """A :class:`MoezooDiTMoeConfig` reproducing ProMoE's ``DiT(**official)`` with these weights."""
    official = {k: v for k, v in official.items() if not k.startswith("_")}
    sd = state_dict
    kw = backbone_sizes(official, sd)
    H, depth = kw["hidden_size"], kw["num_hidden_layers"]
    moe = dict(MOE_DEFAULTS)
    moe.update(dict(official.get("MoE_config") or {}))
    layers = moe_blocks(sd)
    if not layers:
        raise ValueError("no 'blocks.<i>.mlp.cluster_centers' in the state dict (not a ProMoE token-choice checkpoint)")
    expected = [i for i in range(depth) if i % 2 == 1] if moe["interleave"] else list(range(depth))
    if layers != expected:
        raise ValueError(f"MoE blocks in the weights are {layers}; interleave={moe['interleave']} expects {expected}")
    i0 = layers[0]
    E = _shape(sd, f"blocks.{i0}.mlp.cluster_centers")[0]
    if "num_routed_experts" in moe and int(moe["num_routed_experts"]) != E:
        raise ValueError(f"MoE_config num_routed_experts={moe['num_routed_experts']} but cluster_centers has {E} rows")
    n_ffn = len({int(m.group(1)) for k in sd if (m := re.match(rf"blocks\.{i0}\.mlp\.experts\.(\d+)\.", k))})
    uncond = bool(moe["use_uncond_expert"])
    if n_ffn != E + uncond:
        raise ValueError(f"the weights hold {n_ffn} experts per MoE block; {E} routed experts with "
                         f"use_uncond_expert={uncond} expect {E + uncond}")
    inter = _shape(sd, f"blocks.{i0}.mlp.experts.0.up_proj.weight")[0]
    shared_key = f"blocks.{i0}.mlp.shared_expert.up_proj.weight"
    shared = shared_key in sd
    if shared != bool(moe["use_shared_expert"]):
        raise ValueError(f"use_shared_expert={moe['use_shared_expert']} but the weights "
                         f"{'hold' if shared else 'lack'} a shared expert")
    mlp_ratio = float(official.get("mlp_ratio", 4.0))
    dense = [i for i in range(depth) if i not in layers]
    if dense:
        key = f"blocks.{dense[0]}.mlp.fc1.weight"
        if key not in sd:
            key = f"blocks.{dense[0]}.mlp.up_proj.weight"
        mlp_ratio = _shape(sd, key)[0] / H
    qkv_rows = _shape(sd, "blocks.0.attn.qkv.weight")[0]
    head_dim = official.get("head_dim")
    if head_dim is None and qkv_rows != 3 * H:  # attention width != hidden: infer head_dim from the qkv rows
        head_dim = qkv_rows // (3 * kw["num_attention_heads"])
    if head_dim is not None and 3 * kw["num_attention_heads"] * int(head_dim) != qkv_rows:
        raise ValueError(f"attn.qkv has {qkv_rows} rows; num_heads={kw['num_attention_heads']} x head_dim={head_dim} "
                         f"x 3 does not match")
    qk_norm = bool(official.get("qk_norm", "blocks.0.attn.q_norm.weight" in sd))
    num_classes = kw["num_classes"]
    if num_classes != OFFICIAL_NULL_LABEL and uncond:
        warnings.warn(f"ProMoE hard-codes the null label 1000 in its routing; with num_classes={num_classes} moezoo "
                      f"routes the null class {num_classes} to the unconditional expert instead (the official code "
                      "would route dropped labels through the prototypes)", stacklevel=2)
    if moe["seq_aux"] and moe["load_balance_loss_coef"]:
        warnings.warn("seq_aux=True: moezoo's balance loss is the batch-level one (same forward, different loss)",
                      stacklevel=2)
    mode = moe["router_weight_mode"]
    return MoezooDiTMoeConfig(
        **kw, head_dim=None if head_dim is None else int(head_dim), qk_norm=qk_norm, mlp_ratio=mlp_ratio,
        moe_every=2 if moe["interleave"] else 1, num_experts=E, num_experts_per_tok=int(moe["top_k"]),
        moe_intermediate_size=inter, router_type="prototype",
        router_kwargs={"weight_mode": mode}, norm_topk_prob=bool(moe["norm_topk_prob"]),
        hidden_act="gelu_tanh", gated_experts=False, expert_bias=True, num_shared_experts=int(shared),
        shared_intermediate_size=_shape(sd, shared_key)[0] if shared else inter, shared_gated=False,
        unconditional_expert=uncond, router_aux_loss_coef=float(moe["load_balance_loss_coef"] or 0.0),
        router_z_loss_coef=0.0, balance_loss_normalize="slots",
        routing_contrastive_coef=float(moe["routing_contrastive_lam"] or 0.0),
        routing_contrastive_tau=float(moe["routing_contrastive_temperature"]),
        routing_contrastive_top_k=bool(moe["use_top_k_for_routing_contrastive"]))


def convert_state_dict(state_dict: dict, config: MoezooDiTMoeConfig) -> dict:
    """Official ProMoE keys -> moezoo keys (experts stacked into 3-D tensors, prototypes as the gate weight)."""
    sd = dict(state_dict)
    out = {}
    n = config.num_experts + int(config.unconditional_expert)
    for i in range(config.num_hidden_layers):
        pre = f"blocks.{i}.mlp."
        if config.is_moe_layer(i):
            out[f"{pre}gate.weight"] = sd.pop(f"{pre}cluster_centers")
            for proj in ("up_proj", "down_proj"):
                out[f"{pre}experts.{proj}"] = torch.stack([sd.pop(f"{pre}experts.{e}.{proj}.weight") for e in range(n)])
                out[f"{pre}experts.{proj}_bias"] = torch.stack([sd.pop(f"{pre}experts.{e}.{proj}.bias")
                                                                for e in range(n)])
        else:
            for old, new in (("up_proj", "fc1"), ("down_proj", "fc2")):
                for leaf in ("weight", "bias"):
                    if f"{pre}{old}.{leaf}" in sd:
                        out[f"{pre}{new}.{leaf}"] = sd.pop(f"{pre}{old}.{leaf}")
    left = [k for k in sd if ".experts." in k or "cluster_centers" in k]
    if left:
        raise ValueError(f"unexpected expert keys in the ProMoE state dict: {left[:5]}")
    out.update(sd)
    return out


def load_model(official: dict, state_dict: dict):
    """Build the moezoo model for an official ProMoE config + state dict (strict load)."""
    config = config_from_official(official, state_dict)
    return model_with_weights(config, convert_state_dict(state_dict, config))


@register_converter("promoe")
def convert_promoe(src, dst, *, config=None, allow_pickle: bool = False, **options):
    """``moezoo convert promoe SRC DST``: write a ``save_pretrained`` folder of :class:`MoezooDiTMoeModel`."""
    return write_converted("promoe", src, dst, load_model, config=config, allow_pickle=allow_pickle, **options)


__all__ = ["config_from_official", "convert_state_dict", "load_model", "convert_promoe"]
