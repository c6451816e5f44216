"""Official Time-MoE checkpoints (``Time-MoE/Time-MoE``, hub ``Maple728/TimeMoE-50M`` / ``-200M``) -> moezoo.

``moezoo convert time-moe SRC DST``: ``SRC`` is a folder with the official ``config.json`` (``TimeMoeConfig`` keys) and
``model.safetensors`` (or a sharded ``model.safetensors.index.json``; pickled ``pytorch_model.bin`` only with
``--allow-pickle``). ``DST`` is a ``save_pretrained`` folder that ``AutoModel`` / ``AutoModelForCausalLM`` /
``AutoModelForTimeSeriesPrediction`` load (after ``import moezoo``), and whose config ``moezoo.create_model``-style
code understands (``MoezooTimeMoeConfig``).

Sizes are inferred from the weights (layers, experts, expert and shared widths, KV heads, horizons, input size) and
checked against the official config; the number of attention heads, RoPE theta and norm eps come from the config.

Key mapping (official -> moezoo)::

    model.embed_layer.{emb,gate}_layer.weight         -> model.embed_layer.{emb,gate}_layer.weight
    model.layers.i.self_attn.{q,k,v,o}_proj.*         -> model.layers.i.self_attn.{q,k,v,o}_proj.*
    model.layers.i.{input,post_attention}_layernorm   -> same
    model.layers.i.ffn_layer.gate.weight              -> model.layers.i.mlp.gate.weight
    model.layers.i.ffn_layer.experts.e.{gate,up}_proj -> model.layers.i.mlp.experts.gate_up_proj[e] = [gate; up]
    model.layers.i.ffn_layer.experts.e.down_proj      -> model.layers.i.mlp.experts.down_proj[e]
    model.layers.i.ffn_layer.shared_expert.*          -> model.layers.i.mlp.shared_expert.*
    model.layers.i.ffn_layer.shared_expert_gate       -> model.layers.i.mlp.shared_expert_gate
    model.layers.i.ffn_layer.{gate,up,down}_proj      -> model.layers.i.mlp.{gate,up,down}_proj   (use_dense)
    model.norm.weight                                 -> model.norm.weight
    lm_heads.j.out_layer.weight                       -> lm_heads.j.weight

Converted configs keep the official quirks on: ``norm_topk_prob=False``, ``moe_intermediate_size`` as stored, and
``label_padding="official"`` (padded h > 1 targets counted in the loss when no ``loss_masks`` are given; pass
``label_padding="exclude"`` to fine-tune without that quirk).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ...convert import register_converter
from ...checkpoints import count_experts, float_dtype, load_official_checkpoint
from .configuration_time_moe import MoezooTimeMoeConfig

# TimeMoeConfig defaults (time_moe/models/configuration_time_moe.py), used for keys a config.json omits
OFFICIAL_DEFAULTS = dict(input_size=1, hidden_size=4096, intermediate_size=22016, horizon_lengths=[1],
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                         num_experts_per_tok=2, num_experts=1, max_position_embeddings=32768, initializer_range=0.02,
                         rms_norm_eps=1e-6, use_cache=True, use_dense=False, rope_theta=10000, attention_dropout=0.0,
                         apply_aux_loss=True, router_aux_loss_factor=0.02, tie_word_embeddings=False)
# keys of an official config.json that carry no architecture (hub metadata, our _reference block)
IGNORED_KEYS = {"architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
                "_name_or_path", "_attn_implementation", "_reference", "bos_token_id", "eos_token_id", "pad_token_id"}


def _layer_ids(state_dict: dict) -> list[int]:
    ids = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"model\.layers\.(\d+)\.", k))})
    if ids != list(range(len(ids))):
        raise ValueError(f"official state dict has decoder layers {ids}, expected 0..L-1")
    return ids


def config_from_official(official: dict, state_dict: dict | None = None, *,
                         label_padding: str = "official") -> MoezooTimeMoeConfig:
    """A :class:`MoezooTimeMoeConfig` from an official ``config.json`` dict (``TimeMoeConfig`` kwargs).

    With ``state_dict`` (official keys) the sizes are inferred from the weights and checked against the config.
    """
    if not isinstance(official, dict):
        raise TypeError(f"official config must be a dict (parsed config.json), got {type(official).__name__}")
    mt = official.get("model_type")
    if mt not in (None, "time_moe"):
        raise ValueError(f"config.json has model_type={mt!r}, expected 'time_moe' (an official Time-MoE checkpoint)")
    cfg = dict(OFFICIAL_DEFAULTS)
    cfg.update({k: v for k, v in official.items() if k not in IGNORED_KEYS})
    unknown = sorted(set(cfg) - set(OFFICIAL_DEFAULTS) - {"output_hidden_states", "output_attentions",
                                                          "return_dict", "use_return_dict"})
    if unknown:
        raise ValueError(f"unknown Time-MoE config keys {unknown}; expected TimeMoeConfig fields")
    hl = cfg["horizon_lengths"]
    hl = [hl] if isinstance(hl, int) else list(hl)
    if state_dict is not None:
        layers = _layer_ids(state_dict)
        head_re = re.compile(r"lm_heads\.(\d+)\.out_layer\.weight$")
        heads = sorted(int(m.group(1)) for k in state_dict if (m := head_re.match(k)))
        if heads != list(range(len(hl))):
            raise ValueError(f"config has {len(hl)} horizon_lengths {hl} but the weights hold heads {heads}")
        emb = state_dict["model.embed_layer.emb_layer.weight"]
        hidden, input_size = emb.shape
        for j, h in enumerate(hl):
            rows = state_dict[f"lm_heads.{j}.out_layer.weight"].shape[0]
            if rows != h * input_size:
                raise ValueError(f"lm_heads.{j} has {rows} outputs, expected horizon {h} x input_size {input_size}")
        kv = state_dict["model.layers.0.self_attn.k_proj.weight"].shape[0]
        n_heads = int(cfg["num_attention_heads"])
        if hidden % n_heads:
            raise ValueError(f"hidden size {hidden} (from the weights) is not divisible by "
                             f"num_attention_heads={n_heads}")
        head_dim = hidden // n_heads
        checks = {"hidden_size": hidden, "input_size": input_size, "num_hidden_layers": len(layers)}
        cfg["num_key_value_heads"] = kv // head_dim
        dense = "model.layers.0.ffn_layer.gate.weight" not in state_dict
        if dense != bool(cfg["use_dense"]):
            raise ValueError(f"config use_dense={cfg['use_dense']} but the weights are "
                             f"{'dense' if dense else 'MoE'} "
                             f"(ffn_layer.gate.weight {'absent' if dense else 'present'})")
        pre = "model.layers.0.ffn_layer."
        if dense:
            checks["intermediate_size"] = state_dict[pre + "gate_proj.weight"].shape[0]
        else:
            E = count_experts(state_dict, pre + "experts.", "gate_proj.weight", config_value=cfg.get("num_experts"))
            checks["num_experts"] = E
            checks["intermediate_size"] = state_dict[pre + "shared_expert.gate_proj.weight"].shape[0]
            cfg["moe_intermediate_size"] = state_dict[pre + "experts.0.gate_proj.weight"].shape[0]
        for k, v in checks.items():
            if k in official and int(official[k]) != int(v):
                raise ValueError(f"config {k}={official[k]} but the weights imply {v}")
            cfg[k] = int(v)
    use_dense = bool(cfg["use_dense"])
    kwargs = dict(
        input_size=int(cfg["input_size"]), hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]), num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        num_key_value_heads=None if cfg["num_key_value_heads"] is None else int(cfg["num_key_value_heads"]),
        horizon_lengths=hl, max_position_embeddings=int(cfg["max_position_embeddings"]),
        rope_theta=float(cfg["rope_theta"]), rms_norm_eps=float(cfg["rms_norm_eps"]),
        attention_dropout=float(cfg["attention_dropout"]), hidden_act=cfg["hidden_act"],
        initializer_range=float(cfg["initializer_range"]), use_cache=bool(cfg["use_cache"]),
        num_experts=max(int(cfg["num_experts"]), 2) if use_dense else int(cfg["num_experts"]),
        num_experts_per_tok=int(cfg["num_experts_per_tok"]), norm_topk_prob=False,
        router_aux_loss_coef=float(cfg["router_aux_loss_factor"]) if cfg["apply_aux_loss"] else 0.0,
        router_z_loss_coef=0.0, num_shared_experts=1, shared_expert_gate=True, huber_delta=2.0,
        label_padding=label_padding, use_dense=use_dense, tie_word_embeddings=False,
    )
    if use_dense:
        kwargs["dense_intermediate_size"] = int(cfg["intermediate_size"])
        kwargs["num_experts_per_tok"] = min(kwargs["num_experts_per_tok"], kwargs["num_experts"])
    if "moe_intermediate_size" in cfg:
        kwargs["moe_intermediate_size"] = int(cfg["moe_intermediate_size"])
    return MoezooTimeMoeConfig(**kwargs)


def convert_state_dict(official_sd: dict, config: MoezooTimeMoeConfig, *,
                       dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """Official ``TimeMoeForPrediction`` state dict -> ``MoezooTimeMoeForPrediction`` state dict (see module doc).

    Every official key must be used; ``dtype`` casts floating tensors (float32 by default: the hub files are bf16).
    """
    sd = dict(official_sd)
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"official state dict lacks {key!r}")
        return sd.pop(key)

    for name in ("emb_layer", "gate_layer"):
        out[f"model.embed_layer.{name}.weight"] = take(f"model.embed_layer.{name}.weight")
    out["model.norm.weight"] = take("model.norm.weight")
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight"):
            out[dst + n] = take(src + n)
        for p in ("q_proj", "k_proj", "v_proj"):
            out[dst + f"self_attn.{p}.weight"] = take(src + f"self_attn.{p}.weight")
            if config.attention_bias:
                out[dst + f"self_attn.{p}.bias"] = take(src + f"self_attn.{p}.bias")
        f = src + "ffn_layer."
        if config.use_dense:
            for p in ("gate_proj", "up_proj", "down_proj"):
                out[dst + f"mlp.{p}.weight"] = take(f + f"{p}.weight")
            continue
        out[dst + "mlp.gate.weight"] = take(f + "gate.weight")
        E = config.num_experts
        out[dst + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([take(f + f"experts.{e}.gate_proj.weight"), take(f + f"experts.{e}.up_proj.weight")], 0)
             for e in range(E)])
        out[dst + "mlp.experts.down_proj"] = torch.stack([take(f + f"experts.{e}.down_proj.weight") for e in range(E)])
        for p in ("gate_proj", "up_proj", "down_proj"):
            out[dst + f"mlp.shared_expert.{p}.weight"] = take(f + f"shared_expert.{p}.weight")
        out[dst + "mlp.shared_expert_gate.weight"] = take(f + "shared_expert_gate.weight")
    for j in range(len(config.horizon_lengths)):
        out[f"lm_heads.{j}.weight"] = take(f"lm_heads.{j}.out_layer.weight")
    if sd:
        raise ValueError(f"official state dict has {len(sd)} keys the conversion does not use: {sorted(sd)[:8]}")
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def build_model(official_config: dict, official_sd: dict, *, label_padding: str = "official",
                dtype: torch.dtype | None = torch.float32):
    """The converted :class:`MoezooTimeMoeForPrediction` (weights loaded strictly, eval mode)."""
    from .modeling_time_moe import MoezooTimeMoeForPrediction

    config = config_from_official(official_config, official_sd, label_padding=label_padding)
    sd = convert_state_dict(official_sd, config, dtype=dtype)
    model = MoezooTimeMoeForPrediction(config)
    if dtype is not None:
        model = model.to(dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"converted weights do not fit the model (missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)})")
    return model.eval()


@register_converter("time_moe")
def convert_time_moe(src, dst, *, config=None, allow_pickle: bool = False, label_padding: str = "official",
                     dtype: str = "float32") -> Path:
    """Convert an official Time-MoE folder ``src`` into a moezoo ``save_pretrained`` folder ``dst``.

    Options: ``config`` (path to the official config.json when SRC is a bare weights file), ``allow_pickle``,
    ``label_padding`` (``"official"`` default, or ``"exclude"``), ``dtype`` of the saved weights (``float32`` default,
    ``bfloat16`` keeps the hub precision).
    """
    dst = Path(dst)
    official_config, state = load_official_checkpoint(src, allow_pickle=allow_pickle, config=config,
                                                      require_config=True)
    torch_dtype = float_dtype(dtype)
    model = build_model(official_config, state, label_padding=label_padding, dtype=torch_dtype)
    model.config.architectures = ["MoezooTimeMoeForPrediction"]
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    return dst


__all__ = ["config_from_official", "convert_state_dict", "build_model", "convert_time_moe"]
