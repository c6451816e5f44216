"""``moezoo convert mofme SRC DST``: an official MoFME / MoWE (``gate='film'``) checkpoint -> a moezoo folder.

SRC is a folder with the official ``config.json`` (``MoWE(**config)`` kwargs) and ``model.safetensors`` (or a
``.pth`` / ``.pt`` with ``allow_pickle=True``, read with ``torch.load(weights_only=True)``), or a weights file with
``config=`` pointing at the config.  Every size is inferred from the config and the state-dict shapes.

Key mapping (official -> moezoo ``MoezooDeweatherForImageRestoration``):

- ``head.*`` -> ``model.head.*``; ``Img_Encoder.vision_transformer.to_patch_embedding.{proj,norm}`` ->
  ``model.patch_embed.{proj,norm}``; ``img_pos_embedding`` is dropped (the official forward never adds it).
- transformer layer i (``...transformer.layers.i``): ``0.norm`` -> ``attn_norm``, ``0.fn.to_qkv`` ->
  ``attn.qkv_proj``, ``0.fn.to_out.0`` -> ``attn.o_proj`` (identity when the official has none), ``1.0`` -> ``mlp.gate``
  (router with bias), ``2.0`` / ``2.3`` -> ``mlp.adaptor_up`` / ``mlp.adaptor_down``, ``3.0`` -> ``mlp.norm``,
  ``3.1.0.0`` + ``3.1.1.0`` -> ``mlp.basenet`` (rows [W0; W1]), ``3.<e+3>.expert.{0,1}`` -> ``mlp.experts.film_proj[e]``
  (rows [A; B]) and ``film_proj_bias[e]``; the experts' unused ``norm`` is dropped.
- ``patch_embed_to_img_feature.0`` -> ``tail_proj``; ``tail.{1,2,3,4}`` -> ``tail.{0,1,2,3}`` (``tail.0`` is the
  official parameter-free ``Upsampler(scale=1)``, ``tail.5`` the sigmoid).

The converted config sets ``official_expert_offset=True`` (the released forward's slot mapping, which the checkpoint
was trained with) and ``router_type="topk"`` with KeepTopK-softmax; ``top_k=0`` (official: no top-k) becomes top-E.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ...checkpoints import load_official_checkpoint, load_state_dict
from ...convert import register_converter
from .configuration_deweather import MoezooDeweatherConfig

ENCODER = "Img_Encoder.vision_transformer."
TRANSFORMER = ENCODER + "transformer."


def _need(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"official state_dict lacks {key!r} (not a MoFME/MoWE gate='film' checkpoint?)")
    return state[key]


def count_layers(state: dict, prefix: str) -> int:
    ids = sorted({int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", k))})
    if not ids or ids != list(range(len(ids))):
        raise ValueError(f"expected transformer layers 0..L-1 under {prefix!r}layers.<i>, found {ids}")
    return len(ids)


def count_fme_experts(state: dict, layer_prefix: str) -> int:
    """Number of ``Modular_Experts`` in one official layer (``<layer>.3.<j>.expert.0.weight``, j = 3 .. E+2)."""
    pat = re.compile(re.escape(layer_prefix) + r"3\.(\d+)\.expert\.0\.weight$")
    ids = sorted(int(m.group(1)) for k in state if (m := pat.match(k)))
    if not ids or ids != list(range(3, 3 + len(ids))):
        raise ValueError(f"expected FiLM experts {layer_prefix}3.<3..E+2>.expert.*, found ids {ids}")
    return len(ids)


def layer_hparams(config: dict, state: dict, prefix: str) -> dict:
    """Transformer sizes inferred from the official config and weights (``prefix`` ends with 'transformer.' or '')."""
    num_layers = count_layers(state, prefix)
    lp = f"{prefix}layers.0."
    E = count_fme_experts(state, lp)
    cfg_E = config.get("num_expert")
    if cfg_E is not None and int(cfg_E) != E:
        raise ValueError(f"config num_expert={cfg_E} but the weights hold {E} FiLM experts per layer")
    hidden = _need(state, f"{lp}1.0.weight").shape[1]
    if _need(state, f"{lp}1.0.weight").shape[0] != E:
        raise ValueError(f"router {lp}1.0.weight has {state[f'{lp}1.0.weight'].shape[0]} rows, expected {E} experts")
    heads = int(config.get("heads", config.get("n_heads", 0)) or 0)
    qkv_rows = _need(state, f"{lp}0.fn.to_qkv.weight").shape[0]
    if heads <= 0 or qkv_rows % (3 * heads):
        raise ValueError(f"config heads/n_heads={heads} does not divide the qkv width {qkv_rows} / 3")
    head_dim = qkv_rows // (3 * heads)
    if config.get("dim_head") is not None and int(config["dim_head"]) != head_dim:
        raise ValueError(f"config dim_head={config['dim_head']} but to_qkv implies {head_dim}")
    top_k = int(config.get("top_k", 0) or 0)
    if not 0 <= top_k <= E:
        raise ValueError(f"config top_k={top_k} must be in [0, num_expert={E}]")
    return dict(num_hidden_layers=num_layers, num_experts=E, num_experts_per_tok=top_k or E, hidden_size=hidden,
                num_attention_heads=heads, head_dim=head_dim,
                intermediate_size=_need(state, f"{lp}2.0.weight").shape[0],
                fme_intermediate_size=_need(state, f"{lp}3.1.0.0.weight").shape[0],
                dropout=float(config.get("dropout", 0.0) or 0.0))


def convert_layers(state: dict, prefix: str, num_layers: int, num_experts: int, out_prefix: str = "layers.") -> dict:
    """Official ``<prefix>layers.<i>.*`` (Transformer_MoE_FiLM) -> moezoo ``<out_prefix><i>.*`` tensors."""
    out = {}
    for i in range(num_layers):
        s, d = f"{prefix}layers.{i}.", f"{out_prefix}{i}."
        out[d + "attn_norm.weight"] = _need(state, s + "0.norm.weight")
        out[d + "attn_norm.bias"] = _need(state, s + "0.norm.bias")
        qkv = _need(state, s + "0.fn.to_qkv.weight")
        out[d + "attn.qkv_proj.weight"] = qkv
        if s + "0.fn.to_out.0.weight" in state:
            out[d + "attn.o_proj.weight"] = state[s + "0.fn.to_out.0.weight"]
            out[d + "attn.o_proj.bias"] = _need(state, s + "0.fn.to_out.0.bias")
        else:  # official Attention has no projection when heads == 1 and dim_head == dim
            dim = qkv.shape[1]
            out[d + "attn.o_proj.weight"] = torch.eye(dim, dtype=qkv.dtype)
            out[d + "attn.o_proj.bias"] = torch.zeros(dim, dtype=qkv.dtype)
        out[d + "mlp.gate.weight"] = _need(state, s + "1.0.weight")
        out[d + "mlp.gate.bias"] = _need(state, s + "1.0.bias")
        out[d + "mlp.adaptor_up.weight"] = _need(state, s + "2.0.weight")
        out[d + "mlp.adaptor_up.bias"] = _need(state, s + "2.0.bias")
        out[d + "mlp.adaptor_down.weight"] = _need(state, s + "2.3.weight")
        out[d + "mlp.adaptor_down.bias"] = _need(state, s + "2.3.bias")
        out[d + "mlp.norm.weight"] = _need(state, s + "3.0.weight")
        out[d + "mlp.norm.bias"] = _need(state, s + "3.0.bias")
        out[d + "mlp.basenet.weight"] = torch.cat([_need(state, s + "3.1.0.0.weight"), _need(state, s + "3.1.1.0.weight")])
        out[d + "mlp.basenet.bias"] = torch.cat([_need(state, s + "3.1.0.0.bias"), _need(state, s + "3.1.1.0.bias")])
        out[d + "mlp.experts.film_proj"] = torch.stack([
            torch.cat([_need(state, f"{s}3.{e + 3}.expert.0.weight"), _need(state, f"{s}3.{e + 3}.expert.1.weight")])
            for e in range(num_experts)])
        out[d + "mlp.experts.film_proj_bias"] = torch.stack([
            torch.cat([_need(state, f"{s}3.{e + 3}.expert.0.bias"), _need(state, f"{s}3.{e + 3}.expert.1.bias")])
            for e in range(num_experts)])
    return out


def config_from_official(config: dict, state_dict: dict, **overrides) -> MoezooDeweatherConfig:
    """A :class:`MoezooDeweatherConfig` reproducing ``MoWE(**config)`` with weights ``state_dict``."""
    gate = config.get("gate", "film")
    if gate != "film" or not config.get("moe_enable", True) or config.get("transformer_type", "vit") != "vit":
        raise ValueError(f"only MoWE with transformer_type='vit', moe_enable=True, gate='film' (MoFME) converts; got "
                         f"gate={gate!r}, moe_enable={config.get('moe_enable')!r}, "
                         f"transformer_type={config.get('transformer_type')!r}")
    if "head.0.weight" not in state_dict and any(k.startswith("layers.0.3.") for k in state_dict):
        raise ValueError("these weights are a lone Transformer_MoE_FiLM (FME layers), not a whole MoWE model; "
                         "check them with `moezoo parity mofme FOLDER`")
    # what MoWE's signature defaults to, for configs written like the official training script's (which leaves them out)
    config = {"n_heads": 8, "dim_head": 64, "dropout": 0.1, **config}
    hp = layer_hparams(config, state_dict, TRANSFORMER)
    head_w = _need(state_dict, "head.0.weight")
    head_channels, in_channels, k = head_w.shape[0], head_w.shape[1], head_w.shape[-1]
    n_res = len({int(m.group(1)) for key in state_dict if (m := re.match(r"head\.(\d+)\.body\.0\.weight$", key))})
    proj = _need(state_dict, ENCODER + "to_patch_embedding.proj.weight")
    patch = proj.shape[-1]
    tail_rows = _need(state_dict, "patch_embed_to_img_feature.0.weight").shape[0]
    if tail_rows % (head_channels * patch * patch):
        raise ValueError(f"patch_embed_to_img_feature has {tail_rows} outputs, not a multiple of out_ch * patch^2 = "
                         f"{head_channels * patch * patch}")
    img = config.get("img_size", 64)
    image_size = list(img) if isinstance(img, (list, tuple)) else int(img)
    kwargs = dict(hp, image_size=image_size, in_channels=in_channels,
                  out_channels=_need(state_dict, "tail.4.weight").shape[0], patch_size=patch,
                  head_channels=head_channels, num_head_resblocks=n_res, out_ch_scale=tail_rows // (head_channels * patch * patch),
                  kernel_size=k, residual_learning=bool(config.get("residual_learning", True)),
                  embed_dropout=float(config.get("embed_dropout", 0.0) or 0.0), expert_type="fme",
                  official_expert_offset=True, router_type="topk",
                  router_kwargs={"softmax_after_topk": True, "bias": True}, hidden_act="gelu", layer_norm_eps=1e-5)
    kwargs.update(overrides)
    return MoezooDeweatherConfig(**kwargs)


def convert_state_dict(state_dict: dict, config: MoezooDeweatherConfig) -> dict:
    """Official MoWE (gate='film') tensors -> ``MoezooDeweatherForImageRestoration`` tensors."""
    out = {}
    for key, v in state_dict.items():
        if key.startswith("head."):
            out["model." + key] = v
    for part in ("proj", "norm"):
        for leaf in ("weight", "bias"):
            out[f"model.patch_embed.{part}.{leaf}"] = _need(state_dict, f"{ENCODER}to_patch_embedding.{part}.{leaf}")
    out.update(convert_layers(state_dict, TRANSFORMER, config.num_hidden_layers, config.num_experts, "model.layers."))
    out["tail_proj.weight"] = _need(state_dict, "patch_embed_to_img_feature.0.weight")
    out["tail_proj.bias"] = _need(state_dict, "patch_embed_to_img_feature.0.bias")
    for src, dst in (("tail.1.body.0", "tail.0.body.0"), ("tail.1.body.2", "tail.0.body.2"), ("tail.2", "tail.1"),
                     ("tail.3.body.0", "tail.2.body.0"), ("tail.3.body.2", "tail.2.body.2"), ("tail.4", "tail.3")):
        for leaf in ("weight", "bias"):
            out[f"{dst}.{leaf}"] = _need(state_dict, f"{src}.{leaf}")
    return out


def load_official(config: dict, state_dict: dict, **overrides):
    """Build the moezoo model from an official config + state_dict (strict: every moezoo tensor must be filled)."""
    from .modeling_deweather import MoezooDeweatherForImageRestoration

    cfg = config_from_official(config, state_dict, **overrides)
    model = MoezooDeweatherForImageRestoration(cfg)
    missing, unexpected = model.load_state_dict(convert_state_dict(state_dict, cfg), strict=False)
    if missing or unexpected:
        raise ValueError(f"converted MoFME weights do not fit the moezoo model (missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)})")
    return model.eval()


@register_converter("mofme_full")
@register_converter("mofme")
def convert_mofme(src, dst, *, config=None, allow_pickle: bool = False, **overrides) -> Path:
    """Official MoWE/MoFME checkpoint (``src``: folder or weights file) -> ``save_pretrained`` folder ``dst``."""
    dst = Path(dst)
    config, state = load_official_checkpoint(src, allow_pickle=allow_pickle, config=config, require_config=True)
    model = load_official({k: v for k, v in config.items() if not k.startswith("_")}, state, **overrides)
    model.save_pretrained(dst)
    return dst


__all__ = ["config_from_official", "convert_state_dict", "convert_layers", "layer_hparams", "load_official",
           "convert_mofme"]
