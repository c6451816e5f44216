"""Official UniMoE-Audio checkpoints (``UniAudioRVQQwen2_5VLMoEForConditionalGeneration``,
HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs ``UniMoE-Audio/utils/UniMoE_Audio_model.py``) -> ``audio_moe``.

Config: the official ``config.json`` (``text_config`` = ``Qwen2_5_VLMoETextConfig`` kwargs, codec fields at the top
level). Sizes are read from the weights and checked against it. The vision tower (``visual.*``) is dropped: it only
serves video-to-music prompts, which this family does not model.

Weights: ``language_model.*`` -> ``model.*``; per layer the gate rows are ``[D dynamic | N null | F fixed]``, moezoo
stores ``[D dynamic | F shared (router-weighted, always selected) | N null]``; the D dynamic experts
(``mlp.dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts.<e>``) and F fixed experts (``mlp.fixed_real_moe.<f>``)
become one 3-D SwiGLU tensor, the narrower kind zero-padded to the wider intermediate size (exact). ``codec_head``
(one Linear(H, K*Vc), codebook c = rows c*Vc..) is kept fused; ``codec_embed_tokens.<c>`` -> ``model.codec_embed_tokens.<c>``.

Options: ``aux_loss_counter`` (``"train"`` default; ``"official"`` advances the aux-weight schedule on every forward with
labels as the released code does).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ...checkpoints import count_experts, float_dtype, load_official_checkpoint
from ...convert import register_converter
from .configuration_audio_moe import MoezooAudioMoeConfig
from .modeling_audio_moe import MoezooAudioMoeForCausalLM

DYN = "mlp.dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts."
FIX = "mlp.fixed_real_moe."
# Qwen2_5_VLMoETextConfig / UniAudioRVQQwen2_5VLMoEConfig defaults used when config.json omits a key
TEXT_DEFAULTS = dict(rms_norm_eps=1e-6, rope_theta=1_000_000.0, hidden_act="silu", max_position_embeddings=32768,
                     mlp_dynamic_null_expert_num=0, mlp_dynamic_top_p=0.7, mlp_dynamic_top_k=2,
                     router_jitter_noise=0.01, l_aux_weight=0.0, min_l_aux_weight=0.0, l_aux_weight_decay_steps=1,
                     initializer_range=0.02)
TOP_DEFAULTS = dict(codec_vocab_size=1028, codec_delay_pattern=[0, 8, 9, 10, 11, 12, 13, 14, 15], codec_channels=9,
                    codec_eos_value=1024, codec_pad_value=1025, codec_bos_value=1026, codec_placeholder_value=None)


def config_from_official(official: dict, state_dict: dict | None = None, *,
                         aux_loss_counter: str = "train") -> MoezooAudioMoeConfig:
    """A :class:`MoezooAudioMoeConfig` from an official ``config.json`` dict (sizes checked against ``state_dict``)."""
    if not isinstance(official, dict):
        raise TypeError(f"official config must be a dict (parsed config.json), got {type(official).__name__}")
    if "text_config" not in official:
        raise ValueError("config.json has no text_config: not an official UniMoE-Audio "
                         "(UniAudioRVQQwen2_5VLMoEConfig) config")
    t = {**TEXT_DEFAULTS, **official["text_config"]}
    top = {**TOP_DEFAULTS, **{k: v for k, v in official.items() if k in TOP_DEFAULTS}}
    if t.get("mlp_dynamic_top_k", 0) and float(t["mlp_dynamic_top_k"]) > 0:
        raise ValueError(f"mlp_dynamic_top_k={t['mlp_dynamic_top_k']} (fixed top-k instead of top-p) is not "
                         "supported; the released models use top-p (mlp_dynamic_top_k=0)")
    Vc = int(top["codec_vocab_size"])
    eos, pad, bos = int(top["codec_eos_value"]), int(top["codec_pad_value"]), int(top["codec_bos_value"])
    if (eos, pad, bos) != (Vc - 3, Vc - 2, Vc - 1):
        raise ValueError(f"codec special ids EOS={eos}, PAD={pad}, BOS={bos} must be the last three ids of "
                         f"codec_vocab_size={Vc} (codes first), as in the released models")
    D, N, Fx = (int(t["mlp_dynamic_expert_num"]), int(t["mlp_dynamic_null_expert_num"]),
                int(t["mlp_fixed_expert_num"]))
    rope = t.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        raise ValueError(f"rope_scaling={rope} is not supported (only default / mrope without vision tokens)")
    cfg = MoezooAudioMoeConfig(
        vocab_size=int(t["vocab_size"]), hidden_size=int(t["hidden_size"]),
        num_hidden_layers=int(t["num_hidden_layers"]), num_attention_heads=int(t["num_attention_heads"]),
        num_key_value_heads=int(t.get("num_key_value_heads") or t["num_attention_heads"]),
        max_position_embeddings=int(t["max_position_embeddings"]), rope_theta=float(t["rope_theta"]),
        rms_norm_eps=float(t["rms_norm_eps"]), attention_bias=True, hidden_act=t["hidden_act"],
        num_codebooks=int(top["codec_channels"]), codebook_size=Vc - 3,
        delay_pattern=list(top["codec_delay_pattern"]), codec_placeholder_id=top["codec_placeholder_value"],
        moe_type="topp", topp_weighting="official", router_top_p=float(t["mlp_dynamic_top_p"]),
        num_experts=D, num_experts_per_tok=1, num_null_experts=N, num_shared_experts=Fx,
        moe_intermediate_size=int(t["dynamic_intermediate_size"]),
        shared_intermediate_size=int(t["shared_intermediate_size"]),
        sparsemixer_eps=float(t["router_jitter_noise"]), router_aux_loss_coef=float(t["l_aux_weight"]),
        router_aux_loss_min_coef=float(t["min_l_aux_weight"]),
        router_aux_loss_decay_steps=int(t["l_aux_weight_decay_steps"]), router_z_loss_coef=0.0,
        aux_loss_counter=aux_loss_counter, initializer_range=float(t.get("initializer_range", 0.02)),
        tie_word_embeddings=False)
    if state_dict is not None:
        _check_sizes(cfg, state_dict)
    return cfg


def _layer_ids(sd: dict) -> list[int]:
    ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"language_model\.layers\.(\d+)\.", k))})
    if ids != list(range(len(ids))):
        raise ValueError(f"official state dict has decoder layers {ids}, expected 0..L-1")
    return ids


def _check_sizes(cfg: MoezooAudioMoeConfig, sd: dict) -> None:
    need = ["language_model.embed_tokens.weight", "codec_head.weight", "lm_head.weight", "language_model.norm.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"official state dict lacks {missing}: not a UniMoE-Audio checkpoint")
    L = len(_layer_ids(sd))
    if L != cfg.num_hidden_layers:
        raise ValueError(f"config num_hidden_layers={cfg.num_hidden_layers} but the weights hold {L} layers")
    p = "language_model.layers.0."
    count_experts(sd, p + DYN, "gate_proj.weight", what="dynamic experts", config_value=cfg.num_experts,
                  config_key="mlp_dynamic_expert_num")
    count_experts(sd, p + FIX, "gate_proj.weight", what="fixed experts", config_value=cfg.num_shared_experts,
                  config_key="mlp_fixed_expert_num", allow_empty=True)
    R = sd[p + "mlp.gate.weight"].shape[0]
    if R != cfg.num_experts + cfg.num_null_experts + cfg.num_shared_experts:
        raise ValueError(f"gate has {R} rows, config implies {cfg.num_experts} dynamic + {cfg.num_null_experts} "
                         f"null + {cfg.num_shared_experts} fixed experts")
    K, Vc, H = cfg.num_codebooks, cfg.codec_vocab_size, cfg.hidden_size
    if tuple(sd["codec_head.weight"].shape) != (K * Vc, H):
        raise ValueError(f"codec_head.weight has shape {tuple(sd['codec_head.weight'].shape)}, config implies "
                         f"({K * Vc}, {H})")


def official_gate_order(D: int, N: int, F: int) -> list[int]:
    """``[moezoo id] -> official gate row``: moezoo ``[dynamic, fixed, null]`` from official ``[dynamic, null, fixed]``."""
    return list(range(D)) + list(range(D + N, D + N + F)) + list(range(D, D + N))


def _pad(w: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    extra = size - w.shape[dim]
    if extra == 0:
        return w
    shape = list(w.shape)
    shape[dim] = extra
    return torch.cat([w, w.new_zeros(shape)], dim)


def convert_state_dict(cfg: MoezooAudioMoeConfig, sd: dict) -> dict[str, torch.Tensor]:
    """Official keys -> ``MoezooAudioMoeForCausalLM`` keys (``visual.*`` dropped)."""
    out: dict[str, torch.Tensor] = {}
    D, N, Fx = cfg.num_experts, cfg.num_null_experts, cfg.num_shared_experts
    inter = max(cfg.moe_intermediate_size, cfg.shared_intermediate_size or cfg.moe_intermediate_size)
    perm = torch.tensor(official_gate_order(D, N, Fx))
    used = set()
    for i in _layer_ids(sd):
        p, q = f"language_model.layers.{i}.", f"model.layers.{i}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                     "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
                     "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight"):
            out[q + name] = sd[p + name]
            used.add(p + name)
        out[q + "mlp.gate.weight"] = sd[p + "mlp.gate.weight"][perm]
        used.add(p + "mlp.gate.weight")
        names = [p + DYN + f"{e}." for e in range(D)] + [p + FIX + f"{f}." for f in range(Fx)]
        gu, dn = [], []
        for n in names:
            gu.append(torch.cat([_pad(sd[n + "gate_proj.weight"], inter, 0), _pad(sd[n + "up_proj.weight"], inter, 0)]))
            dn.append(_pad(sd[n + "down_proj.weight"], inter, 1))
            used.update(n + k for k in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
        out[q + "mlp.experts.gate_up_proj"] = torch.stack(gu)
        out[q + "mlp.experts.down_proj"] = torch.stack(dn)
    simple = {"language_model.embed_tokens.weight": "model.embed_tokens.weight",
              "language_model.norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight",
              "codec_head.weight": "codec_head.weight"}
    simple.update({f"codec_embed_tokens.{c}.weight": f"model.codec_embed_tokens.{c}.weight"
                   for c in range(cfg.num_codebooks)})
    for a, b in simple.items():
        out[b] = sd[a]
        used.add(a)
    left = sorted(k for k in sd if k not in used and not k.startswith("visual."))
    if left:
        raise ValueError(f"official weights not understood by the converter: {left[:8]}{' ...' if len(left) > 8 else ''}")
    return out


def build_model(official: dict, state_dict: dict, *, aux_loss_counter: str = "train",
                dtype: torch.dtype = torch.float32) -> MoezooAudioMoeForCausalLM:
    """A :class:`MoezooAudioMoeForCausalLM` holding the official weights (strict load)."""
    cfg = config_from_official(official, state_dict, aux_loss_counter=aux_loss_counter)
    model = MoezooAudioMoeForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(convert_state_dict(cfg, state_dict), strict=False)
    if missing or unexpected:
        raise ValueError(f"converted UniMoE-Audio weights do not fit the model: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.to(dtype).eval()


@register_converter("unimoe_audio")
def convert_unimoe_audio(src, dst, *, config=None, allow_pickle: bool = False, aux_loss_counter: str = "train",
                         dtype: str = "float32") -> Path:
    """Convert an official UniMoE-Audio folder ``src`` (config.json + weights) into a moezoo folder ``dst``."""
    dst = Path(dst)
    official, state = load_official_checkpoint(src, allow_pickle=allow_pickle, config=config, require_config=True)
    torch_dtype = float_dtype(dtype)
    model = build_model(official, state, aux_loss_counter=aux_loss_counter, dtype=torch_dtype)
    model.config.architectures = ["MoezooAudioMoeForCausalLM"]
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    return dst


__all__ = ["config_from_official", "convert_state_dict", "build_model", "convert_unimoe_audio", "official_gate_order"]
