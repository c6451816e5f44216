"""Official DiT-MoE checkpoints (feizc/DiT-MoE ``models.py``, class ``DiT``) -> ``moezoo_dit_moe`` folders.

``moezoo convert dit-moe SRC DST [--config CONFIG.json] [--allow-pickle]``: SRC is a folder with ``config.json`` (the
``DiT(**kwargs)`` arguments) and the weights (``*.safetensors``; ``.pt``/``.pth`` only with ``--allow-pickle``, read
with ``torch.load(weights_only=True)``; a training checkpoint's ``"ema"`` weights are preferred, as DiT's sampler does),
or a weights file. Sizes the config does not state are read from the tensor shapes.

Official layout -> moezoo: ``blocks.<i>.moe.gate.weight`` -> ``blocks.<i>.mlp.gate.weight``;
``blocks.<i>.moe.experts.<e>.{gate_proj,up_proj,down_proj}.weight`` -> the 3-D ``mlp.experts.gate_up_proj[e]``
(= [gate; up]) and ``mlp.experts.down_proj[e]``; ``blocks.<i>.moe.shared_experts.*`` -> ``mlp.shared_expert.*``; every
other key is unchanged. ``pretraining_tp`` only splits the official matmuls (same math) and is ignored.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ...checkpoints import load_official_checkpoint
from ...convert import register_converter
from .configuration_dit_moe import MoezooDiTMoeConfig

# DiT's head counts by width (the checkpoint shapes do not tell them)
DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16, 1408: 16}


def strip_wrappers(state_dict: dict) -> dict:
    """Drop ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_official(src: str | Path, *, allow_pickle: bool = False, config=None) -> tuple[dict, dict]:
    """(official config dict, official state_dict without DDP / compile wrappers) from a folder or a weights file
    (:func:`moezoo.checkpoints.load_official_checkpoint`)."""
    config, state = load_official_checkpoint(src, allow_pickle=allow_pickle, config=config)
    return config, strip_wrappers(state)


def _shape(sd: dict, key: str) -> tuple:
    if key not in sd:
        raise ValueError(f"the official state_dict lacks {key!r} (is this a DiT-MoE / ProMoE checkpoint?)")
    return tuple(sd[key].shape)


def count_blocks(sd: dict) -> int:
    ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not ids or ids != list(range(len(ids))):
        raise ValueError(f"expected blocks 0..N-1 in the state dict, found {ids}")
    return len(ids)


def backbone_sizes(official: dict, sd: dict) -> dict:
    """The DiT sizes shared by DiT-MoE and ProMoE, from the official kwargs, else from the tensor shapes."""
    hidden, in_ch, p, p2 = _shape(sd, "x_embedder.proj.weight")
    if p != p2:
        raise ValueError(f"non-square patches ({p}x{p2}) are not supported")
    num_patches = _shape(sd, "pos_embed")[1]
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"pos_embed has {num_patches} positions, not a square grid")
    out_dim = _shape(sd, "final_layer.linear.weight")[0]
    out_ch = out_dim // (p * p)
    depth = count_blocks(sd)
    rows = _shape(sd, "y_embedder.embedding_table.weight")[0]
    checks = {"hidden_size": hidden, "in_channels": in_ch, "patch_size": p, "input_size": grid * p, "depth": depth}
    for key, val in checks.items():
        if key in official and int(official[key]) != val:
            raise ValueError(f"config {key}={official[key]} but the weights say {val}")
    learn_sigma = official.get("learn_sigma", out_ch == 2 * in_ch)
    if (2 * in_ch if learn_sigma else in_ch) != out_ch:
        raise ValueError(f"final_layer predicts {out_ch} channels per pixel; learn_sigma={learn_sigma} with "
                         f"in_channels={in_ch} expects {2 * in_ch if learn_sigma else in_ch}")
    dropout = float(official.get("class_dropout_prob", 0.1))
    num_classes = int(official.get("num_classes", rows - 1 if dropout > 0 else rows))
    if rows != num_classes + (dropout > 0):
        raise ValueError(f"the label table has {rows} rows; num_classes={num_classes} with class_dropout_prob="
                         f"{dropout} expects {num_classes + (dropout > 0)}")
    heads = official.get("num_heads")
    if heads is None:
        heads = DIT_HEADS.get(hidden)
        if heads is None:
            raise ValueError(f"num_heads is not in the config and hidden_size={hidden} is not a DiT size "
                             f"({sorted(DIT_HEADS)}); pass a config with num_heads")
    return dict(sample_size=grid * p, in_channels=in_ch, patch_size=p, hidden_size=hidden, num_hidden_layers=depth,
                num_attention_heads=int(heads), num_classes=num_classes, class_dropout_prob=dropout,
                learn_sigma=bool(learn_sigma), use_null_class_embedding=dropout > 0, cfg_channels=3)


def config_from_official(official: dict, state_dict: dict) -> MoezooDiTMoeConfig:
    """A :class:`MoezooDiTMoeConfig` reproducing ``DiT(**official)`` with these weights (shapes fill the gaps)."""
    official = {k: v for k, v in official.items() if not k.startswith("_")}
    sd = state_dict
    kw = backbone_sizes(official, sd)
    H = kw["hidden_size"]
    E = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.0\.moe\.experts\.(\d+)\.", k))})
    if E == 0:
        raise ValueError("no 'blocks.0.moe.experts.<e>.*' in the state dict (not a DiT-MoE checkpoint)")
    if "num_experts" in official and int(official["num_experts"]) != E:
        raise ValueError(f"config num_experts={official['num_experts']} but the weights hold {E} experts")
    gate_rows = _shape(sd, "blocks.0.moe.gate.weight")[0]
    if gate_rows != E:
        raise ValueError(f"blocks.0.moe.gate.weight has {gate_rows} rows for {E} experts")
    inter = _shape(sd, "blocks.0.moe.experts.0.gate_proj.weight")[0]
    shared = "blocks.0.moe.shared_experts.gate_proj.weight" in sd
    shared_inter = _shape(sd, "blocks.0.moe.shared_experts.gate_proj.weight")[0] if shared else H
    top_k = int(official.get("num_experts_per_tok", 2))
    n_shared = 2 if shared and shared_inter % 2 == 0 else int(shared)
    return MoezooDiTMoeConfig(
        **kw, mlp_ratio=inter / H, moe_every=1, num_experts=E, num_experts_per_tok=top_k,
        moe_intermediate_size=inter, router_type="topk", norm_topk_prob=False, hidden_act="silu",
        gated_experts=True, expert_bias=False, num_shared_experts=n_shared,
        shared_intermediate_size=shared_inter // max(n_shared, 1), shared_gated=True, unconditional_expert=False,
        router_aux_loss_coef=0.01, router_z_loss_coef=0.0, balance_loss_normalize="slots",
        routing_contrastive_coef=0.0)


def convert_state_dict(state_dict: dict, config: MoezooDiTMoeConfig) -> dict:
    """Official DiT-MoE keys -> moezoo keys (experts stacked into 3-D tensors)."""
    sd = dict(state_dict)
    out = {}
    E = config.num_experts
    for i in range(config.num_hidden_layers):
        pre = f"blocks.{i}.moe."
        gate_up, down = [], []
        for e in range(E):
            g = sd.pop(f"{pre}experts.{e}.gate_proj.weight")
            u = sd.pop(f"{pre}experts.{e}.up_proj.weight")
            gate_up.append(torch.cat([g, u], 0))
            down.append(sd.pop(f"{pre}experts.{e}.down_proj.weight"))
        out[f"blocks.{i}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        out[f"blocks.{i}.mlp.experts.down_proj"] = torch.stack(down)
        out[f"blocks.{i}.mlp.gate.weight"] = sd.pop(f"{pre}gate.weight")
        for name in ("gate_proj", "up_proj", "down_proj"):
            key = f"{pre}shared_experts.{name}.weight"
            if key in sd:
                out[f"blocks.{i}.mlp.shared_expert.{name}.weight"] = sd.pop(key)
    left = [k for k in sd if ".moe." in k]
    if left:
        raise ValueError(f"unexpected MoE keys in the DiT-MoE state dict: {left[:5]}")
    out.update(sd)
    return out


def model_with_weights(config, converted: dict):
    """A :class:`MoezooDiTMoeModel` of ``config`` holding the converted weights; every key must fit (eval mode)."""
    from .modeling_dit_moe import MoezooDiTMoeModel

    model = MoezooDiTMoeModel(config)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"converted weights do not fit the model: missing {sorted(missing)[:8]}, unexpected "
                         f"{sorted(unexpected)[:8]}")
    return model.eval()


def load_model(official: dict, state_dict: dict):
    """Build the moezoo model for an official DiT-MoE config + state dict (strict load)."""
    config = config_from_official(official, state_dict)
    return model_with_weights(config, convert_state_dict(state_dict, config))


def write_converted(reference: str, src, dst, build, *, config=None, allow_pickle: bool = False, **options) -> Path:
    """Read an official DiT-style checkpoint, build the moezoo model with ``build(official, state)`` and save it to
    ``dst`` (the body of the ``dit-moe`` and ``promoe`` converters)."""
    if options:
        raise ValueError(f"unknown {reference} converter option(s): {sorted(options)} (expected config, allow_pickle)")
    official, state = load_official(src, allow_pickle=allow_pickle, config=config)
    build(official, state).save_pretrained(str(dst))
    return Path(dst)


@register_converter("dit-moe")
def convert_dit_moe(src, dst, *, config=None, allow_pickle: bool = False, **options):
    """``moezoo convert dit-moe SRC DST``: write a ``save_pretrained`` folder of :class:`MoezooDiTMoeModel`."""
    return write_converted("dit-moe", src, dst, load_model, config=config, allow_pickle=allow_pickle, **options)


__all__ = ["config_from_official", "convert_state_dict", "load_model", "load_official", "convert_dit_moe",
           "model_with_weights", "write_converted", "backbone_sizes"]
