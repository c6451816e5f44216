"""``moezoo convert moe-llava SRC DST``: an official MoE-LLaVA checkpoint -> a ``MoezooVlMoeForConditionalGeneration``.

The official checkpoint (PKU-YuanGroup/MoE-LLaVA, ``MoELLaVA<LM>ForCausalLM``) is the LM's own layout plus DeepSpeed
MoE layers and LLaVA's multimodal parts:

| official key | moezoo key |
|---|---|
| ``model.layers.<i>.mlp.deepspeed_moe.gate.wg.weight`` (E, H) | ``model.language_model.layers.<i>.mlp.gate.weight`` |
| ``model.layers.<i>.mlp.deepspeed_moe.experts.deepspeed_experts.<e>.{gate,up,down}_proj.weight`` | ``...mlp.experts.gate_up_proj`` (E, 2I, H) / ``...mlp.experts.down_proj`` (E, H, I) |
| ``model.layers.<i>.mlp.deepspeed_moe.experts.deepspeed_experts.<e>.fc1/fc2.*`` (Phi-2) | ``...mlp.experts.up_proj`` / ``down_proj`` (+ biases) |
| other ``model.layers.*``, ``model.embed_tokens.*``, ``model.norm.*`` (Phi: ``model.final_layernorm.*``) | ``model.language_model.*`` |
| ``model.mm_projector.<n>.*`` | ``model.multi_modal_projector.<n>.*`` |
| ``model.image_tower.image_tower.*`` (a ``CLIPVisionModel``) | ``model.vision_tower.model.*`` |
| ``lm_head.weight`` | ``lm_head.weight`` |

The config's ``moe`` block (``moe_layers_idx``, ``num_experts`` per layer, ``top_k_experts``, ``capacity_factor``,
``eval_capacity_factor``, ``min_capacity``, ``use_residual``, ``router_aux_loss_coef``) becomes
``router_type="top2_capacity"`` with those options. The official gate samples its second expert with Gumbel noise at
inference too; ``official_sampling=True`` keeps that, the default is the deterministic second-best expert.
The LM config is the official one with ``model_type`` ``moe_llava_<lm>`` mapped to transformers' ``<lm>``
(``stablelm``, ``llama``, ``phi``, ``mistral``, ``qwen2``; Qwen-1 remote-code checkpoints are not supported).
The vision tower's architecture is not in the official config (only its hub name): pass ``vision_config`` (a dict or
a path to a CLIP vision config.json); the default is CLIP ViT-L/14 at 336 px, the tower every released MoE-LLaVA uses.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ...checkpoints import count_experts, load_state_dict
from ...convert import register_converter
from .configuration_vl_moe import MoezooVlMoeConfig

GATE = "deepspeed_moe.gate.wg.weight"
EXPERTS = "deepspeed_moe.experts.deepspeed_experts."


def router_kwargs(config: dict, *, second_expert_sampling: bool = True) -> dict:
    """The ``top2_capacity`` router options of an official MoE-LLaVA / DeepSpeed MoE config."""
    k = int(config.get("top_k_experts", config.get("num_experts_per_tok", 2)))
    if k != 2:
        raise ValueError(f"MoE-LLaVA's DeepSpeed gate is converted for top-2 only, got top_k_experts={k}")
    if config.get("use_residual"):
        raise ValueError("use_residual=True (PR-MoE) is not supported; MoE-LLaVA uses use_residual=False")
    return dict(capacity_factor=float(config.get("capacity_factor", 1.0)),
                eval_capacity_factor=float(config.get("eval_capacity_factor", 1.0)),
                min_capacity=int(config.get("min_capacity", 4)), drop_tokens=bool(config.get("drop_tokens", True)),
                second_expert_sampling=second_expert_sampling)


def convert_layer_state(state_dict: dict, num_experts: int | None = None) -> tuple[dict, dict]:
    """Official MoE-module keys -> (``MoELayer`` state dict, shape info ``{E, H, I, gated, bias}``)."""
    E = count_experts(state_dict, EXPERTS, "down_proj.weight" if f"{EXPERTS}0.down_proj.weight" in state_dict
                      else "fc2.weight", config_value=num_experts)
    gate = state_dict[GATE]
    if f"{EXPERTS}0.down_proj.weight" in state_dict:
        g = torch.stack([state_dict[f"{EXPERTS}{e}.gate_proj.weight"] for e in range(E)])
        u = torch.stack([state_dict[f"{EXPERTS}{e}.up_proj.weight"] for e in range(E)])
        d = torch.stack([state_dict[f"{EXPERTS}{e}.down_proj.weight"] for e in range(E)])
        if any(f"{EXPERTS}{e}.{n}.bias" in state_dict for e in range(E) for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError("biased gated experts are not a MoE-LLaVA form (StableLM / Llama / Qwen MLPs are bias-free)")
        out = {"gate.weight": gate, "experts.gate_up_proj": torch.cat([g, u], dim=1), "experts.down_proj": d}
        info = dict(E=E, H=gate.shape[1], I=g.shape[1], gated=True, bias=False)
    else:  # Phi-2: fc1 / fc2 with biases
        up = torch.stack([state_dict[f"{EXPERTS}{e}.fc1.weight"] for e in range(E)])
        out = {"gate.weight": gate, "experts.up_proj": up,
               "experts.down_proj": torch.stack([state_dict[f"{EXPERTS}{e}.fc2.weight"] for e in range(E)]),
               "experts.up_proj_bias": torch.stack([state_dict[f"{EXPERTS}{e}.fc1.bias"] for e in range(E)]),
               "experts.down_proj_bias": torch.stack([state_dict[f"{EXPERTS}{e}.fc2.bias"] for e in range(E)])}
        info = dict(E=E, H=gate.shape[1], I=up.shape[1], gated=False, bias=True)
    if gate.shape[0] != E:
        raise ValueError(f"gate {GATE} has {gate.shape[0]} rows but the checkpoint holds {E} experts")
    return out, info



LM_TYPES = {"moe_llava_stablelm": "stablelm", "moe_llava_llama": "llama", "moe_llava_phi": "phi",
            "moe_llava_mistral": "mistral", "moe_llava_qwen1_5": "qwen2", "moe_llava_qwen2": "qwen2",
            "llava_stablelm": "stablelm", "llava_llama": "llama", "llava_phi": "phi", "llava_mistral": "mistral"}
CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5)
_LLAVA_KEYS = {"moe", "mm_projector_type", "mm_hidden_size", "mm_vision_select_layer", "mm_vision_select_feature",
               "mm_image_tower", "mm_video_tower", "image_aspect_ratio", "tune_mm_mlp_adapter", "mm_use_im_start_end",
               "mm_use_im_patch_token", "freeze_mm_mlp_adapter", "image_grid_pinpoints", "tokenizer_padding_side",
               "tokenizer_model_max_length", "architectures", "auto_map", "_name_or_path", "transformers_version",
               "torch_dtype", "dtype", "mm_vision_tower", "X", "use_mm_proj", "_reference", "model_type"}


def moe_llava_config(official: dict, *, vision_config=None, official_sampling: bool = False,
                     image_token_id: int | None = None) -> MoezooVlMoeConfig:
    """Our config for an official MoE-LLaVA ``config.json``."""
    mt = official.get("model_type", "")
    if mt not in LM_TYPES:
        raise ValueError(f"unsupported MoE-LLaVA model_type {mt!r}; supported: {sorted(LM_TYPES)}")
    moe = official.get("moe") or {}
    if not moe.get("moe_layers_idx"):
        raise ValueError("the config has no moe.moe_layers_idx: not a MoE-LLaVA (stage 3) checkpoint")
    layers = [int(i) for i in moe["moe_layers_idx"]]
    experts = moe.get("num_experts", [4])
    experts = [int(e) for e in (experts if isinstance(experts, list) else [experts])]
    if len(set(experts)) != 1:
        raise ValueError(f"MoE layers with different expert counts {experts} are not supported (one num_experts per model)")
    text = {k: v for k, v in official.items() if k not in _LLAVA_KEYS}
    text["model_type"] = LM_TYPES[mt]
    if isinstance(vision_config, (str, Path)):
        vision_config = json.loads(Path(vision_config).read_text())
    vision = dict(vision_config or CLIP_L_336)
    select = official.get("mm_vision_select_feature", "patch")
    rk = router_kwargs(dict(moe, num_experts=experts[0]), second_expert_sampling=official_sampling)
    kw = dict(text_config=text, vision_config=vision, vision_tower=None,
              vision_feature_layer=int(official.get("mm_vision_select_layer", -2)),
              vision_feature_select_strategy="default" if select == "patch" else "full",
              projector_type=official.get("mm_projector_type", "mlp2x_gelu"), moe_layers_idx=layers,
              num_experts=experts[0], num_experts_per_tok=2, router_type="top2_capacity", router_kwargs=rk,
              router_aux_loss_coef=float(moe.get("router_aux_loss_coef", 0.01)), router_init_std=0.0)
    if image_token_id is not None:
        kw["image_token_id"] = int(image_token_id)
    return MoezooVlMoeConfig(**kw)


def convert_moe_llava_state(state: dict, config: MoezooVlMoeConfig, *, tower_prefix: str = "") -> dict:
    """Official MoE-LLaVA keys -> ``MoezooVlMoeForConditionalGeneration`` keys (see the module docstring).

    ``tower_prefix``: what the official ``CLIPVisionModel`` keys (``vision_model.*``, transformers 4.x) become under
    ``model.vision_tower.model.`` (``""`` for transformers 5, whose ``CLIPVisionModel`` has no ``vision_model``)."""
    out = {}
    moe_prefixes = sorted({k[: -len(GATE)] for k in state if k.endswith(GATE)})
    expected = [f"model.layers.{i}.mlp." for i in config.moe_layers()]
    if sorted(moe_prefixes) != sorted(expected):
        raise ValueError(f"the checkpoint's DeepSpeed MoE layers {moe_prefixes} do not match moe_layers_idx "
                         f"{config.moe_layers()}")
    for prefix in moe_prefixes:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        weights, _ = convert_layer_state(sub, config.num_experts)
        for k, v in weights.items():
            out[f"model.language_model.{prefix[len('model.'):]}{k}"] = v
    for k, v in state.items():
        if any(k.startswith(p) for p in moe_prefixes):
            continue
        if k.startswith("model.mm_projector."):
            out["model.multi_modal_projector." + k[len("model.mm_projector."):]] = v
        elif k.startswith("model.image_tower.image_tower."):
            rest = k[len("model.image_tower.image_tower."):]
            if rest.startswith("vision_model."):
                rest = tower_prefix + rest[len("vision_model."):]
            out["model.vision_tower.model." + rest] = v
        elif k.startswith("model.video_tower.") or k.endswith("rotary_emb.inv_freq"):
            continue  # MoE-LLaVA's unused video tower; RoPE buffers are rebuilt
        elif k.startswith("model."):
            out["model.language_model." + k[len("model."):]] = v
        elif k == "lm_head.weight":
            out[k] = v
        else:
            raise ValueError(f"unexpected key {k!r} in the MoE-LLaVA checkpoint")
    return out


@register_converter("moe-llava")
def convert_moe_llava(src, dst, *, config=None, vision_config=None, official_sampling: bool = False,
                      image_token_id: int | None = None, allow_pickle: bool = False,
                      allow_missing_vision_tower: bool = False):
    """Convert an official MoE-LLaVA folder (config.json + weights) into a moezoo folder; returns ``dst``.

    Options: ``config`` (path to the official config.json), ``vision_config`` (CLIP vision config dict / path),
    ``official_sampling`` (Gumbel second expert, as the official gate), ``image_token_id`` (default: the last LM token
    id; MoE-LLaVA itself uses the placeholder -200, which our processor maps to a real token),
    ``allow_missing_vision_tower`` (a checkpoint saved without the CLIP weights keeps a random tower).
    """
    from .modeling_vl_moe import MoezooVlMoeForConditionalGeneration

    src, dst = Path(src), Path(dst)
    cfg_path = Path(config) if config is not None else (src if src.is_dir() else src.parent) / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"no config.json at {str(cfg_path)!r}; pass config= (CLI: --config PATH)")
    official = json.loads(cfg_path.read_text())
    cfg = moe_llava_config(official, vision_config=vision_config, official_sampling=official_sampling,
                           image_token_id=image_token_id)
    state = load_state_dict(src, allow_pickle=allow_pickle)
    if not any(k.startswith(f"model.layers.") and EXPERTS in k for k in state):
        raise ValueError(f"{src} holds no DeepSpeed MoE expert weights ('{EXPERTS}<e>.*')")
    model = MoezooVlMoeForConditionalGeneration(cfg)
    tower = model.model.vision_tower.model
    mapped = convert_moe_llava_state(state, cfg, tower_prefix="vision_model." if hasattr(tower, "vision_model") else "")
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if cfg.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if allow_missing_vision_tower:
        missing = [k for k in missing if not k.startswith("model.vision_tower.")]
    if missing or unexpected:
        raise ValueError(f"the converted MoE-LLaVA weights do not fit: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model.tie_weights()
    model.save_pretrained(dst)
    return dst


__all__ = ["convert_moe_llava", "convert_moe_llava_state", "moe_llava_config"]
