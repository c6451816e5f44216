"""π0-style vision-language-action policy on the shared MoE backbone (Drive-π0 / DriveMoE / HiMoE-VLA).

Layout (see :class:`MoezooVlaConfig`)::

    prefix = [view tokens (timm tower -> projector, + view embedding) ..., instruction tokens]  -> causal LM (any
             transformers decoder), run once per chunk with a KV cache
    suffix = [state token, H action tokens (noisy actions x_t + flow time t)]                     -> action expert
    action expert layer i: queries of the suffix attend to [LM keys/values of layer i, suffix keys/values]
             (block-causal: state sees prefix + itself, actions see everything); FFN dense or skill MoE
    velocity = action_out_proj(norm(action tokens));  loss = || v - (x_1 - (1 - σ_min) x_0) ||²

Because prefix tokens never attend to the suffix, running the LM on the prefix alone and letting the expert read its
per-layer keys/values is exactly π0's joint attention with the block-causal mask, for any decoder that returns a KV
cache; sampling reuses the prefix cache for every integration step.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.utils import ModelOutput

from ...core import CameraRouter, MoELayer, build_moe_layer
from ...core.experts import SharedExpert
from ...core.losses import router_supervision_loss, sequence_balance_loss, switch_balance_loss
from ...modeling_layers import RMSNorm, apply_rope, eager_attention
from ...modeling_utils import MoezooPreTrainedModel
from .configuration_vla import MoezooVlaConfig

IMAGE_KEY = "observation.images."
STATE_KEY = "observation.state"
WAYPOINT_KEY = "observation.waypoint"
ACTION_KEY = "action"
TASK_KEY = "task"
EMBODIMENT_KEY = "embodiment"
ACTION_MASK_KEY = "action_mask"
BYTE_OFFSET = 3  # byte-level fallback tokenizer: 0 = pad, 1 = bos, 2 = eos, byte b -> b + 3


class MissingStatisticsError(ValueError):
    """Raw observations / actions were given but the model has no dataset statistics to normalise them."""


@dataclass
class MoezooVlaOutput(ModelOutput):
    """Output of :meth:`MoezooVlaPolicy.forward`.

    ``prediction``: the velocity field (B, H, action_dim) when ``actions`` are given (training), else the sampled action
    chunk in normalised units. ``loss`` = flow-matching loss (+ ``aux_loss`` when labels are given); ``aux_loss``:
    balance / router losses + weighted camera and skill supervision; ``router_logits``: one (T, E) tensor per MoE layer.
    HiMoE: ``as_loss`` (AS-MoE mutual-information loss, weighted, summed over AS layers) and ``hb_loss`` (HB-MoE
    sequence balance loss, weighted), both inside ``aux_loss``; ``expert_selection``: ``{layer index: (B, k) experts of
    each sample's first token}`` for the AS-MoE layers and per-sample expert counts (B, E) for HB / top-k layers.
    """

    loss: torch.FloatTensor | None = None
    prediction: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    action_loss: torch.FloatTensor | None = None
    camera_loss: torch.FloatTensor | None = None
    skill_loss: torch.FloatTensor | None = None
    router_logits: tuple | None = None
    camera_logits: torch.FloatTensor | None = None
    camera_selection: torch.LongTensor | None = None
    skill_logits: torch.FloatTensor | None = None
    skill_selection: torch.LongTensor | None = None
    as_loss: torch.FloatTensor | None = None
    hb_loss: torch.FloatTensor | None = None
    expert_selection: dict | None = None


# ----------------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------------


class Normalizer(nn.Module):
    """Dataset statistics of one feature as buffers (saved with the model); NaN until set."""

    def __init__(self, name: str, dim: int, mode: str, eps: float = 1e-8):
        super().__init__()
        self.name, self.mode, self.eps = name, mode, eps
        for stat in ("mean", "std", "min", "max"):
            self.register_buffer(stat, torch.full((dim,), float("nan")))

    @property
    def needs_stats(self) -> bool:
        return self.mode != "identity"

    def has_stats(self) -> bool:
        if not self.needs_stats:
            return True
        keys = ("mean", "std") if self.mode == "mean_std" else ("min", "max")
        return all(bool(torch.isfinite(getattr(self, k)).all()) for k in keys)

    def set(self, stats: dict) -> None:
        dim = self.mean.shape[0]
        for stat in ("mean", "std", "min", "max"):
            if stat in stats and stats[stat] is not None:
                v = torch.as_tensor(stats[stat], dtype=torch.float32).reshape(-1)
                if v.shape[0] != dim:
                    raise ValueError(f"statistics {self.name}.{stat} has {v.shape[0]} values, expected {dim}")
                getattr(self, stat).copy_(v)
        if not self.has_stats():
            need = "mean and std" if self.mode == "mean_std" else "min and max"
            raise ValueError(f"statistics for {self.name!r} need {need} (normalisation mode {self.mode!r}), "
                             f"got keys {sorted(stats)}")

    def _check(self):
        if not self.has_stats():
            raise MissingStatisticsError(
                f"dataset statistics for {self.name!r} are missing, so raw (unnormalised) values cannot be used: call "
                f"policy.set_normalization_stats({{{self.name!r}: {{'mean': ..., 'std': ...}}, ...}}) (e.g. from "
                "moezoo.models.vla.data.compute_stats) or set normalization_mapping to 'identity'")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.needs_stats:
            return x
        self._check()
        if self.mode == "mean_std":
            return (x - self.mean) / (self.std + self.eps)
        return 2 * (x - self.min) / (self.max - self.min + self.eps) - 1

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.needs_stats:
            return x
        self._check()
        if self.mode == "mean_std":
            return x * (self.std + self.eps) + self.mean
        return (x + 1) / 2 * (self.max - self.min + self.eps) + self.min


class EmbodimentNormalizer(nn.Module):
    """Per-embodiment statistics of one padded feature: buffers (num_embodiments, dim), NaN until set; the dimensions
    an embodiment does not use are left as they are (mean 0, std 1 / min -1, max 1)."""

    def __init__(self, name: str, names: list[str], dim: int, mode: str, eps: float = 1e-8):
        super().__init__()
        self.name, self.names, self.mode, self.eps = name, list(names), mode, eps
        for stat in ("mean", "std", "min", "max"):
            self.register_buffer(stat, torch.full((len(names), dim), float("nan")))

    @property
    def needs_stats(self) -> bool:
        return self.mode != "identity"

    def index(self, embodiment: str) -> int:
        if embodiment not in self.names:
            raise ValueError(f"unknown embodiment {embodiment!r}; the policy knows {self.names} (config.embodiments)")
        return self.names.index(embodiment)

    def has_stats(self, embodiment: str) -> bool:
        if not self.needs_stats:
            return True
        i = self.index(embodiment)
        keys = ("mean", "std") if self.mode == "mean_std" else ("min", "max")
        return all(bool(torch.isfinite(getattr(self, k)[i]).all()) for k in keys)

    def set(self, embodiment: str, stats: dict, used: list[int]) -> None:
        """``stats`` over the embodiment's own dims (len(used) values) or the padded width."""
        i, dim = self.index(embodiment), self.mean.shape[1]
        fill = {"mean": 0.0, "std": 1.0, "min": -1.0, "max": 1.0}
        for stat in ("mean", "std", "min", "max"):
            if stats.get(stat) is None:
                continue
            v = torch.as_tensor(stats[stat], dtype=torch.float32).reshape(-1)
            row = torch.full((dim,), fill[stat])
            if v.shape[0] == len(used):
                row[torch.tensor(used)] = v
            elif v.shape[0] == dim:
                row = v
            else:
                raise ValueError(f"statistics {self.name}.{stat} of embodiment {embodiment!r} have {v.shape[0]} values, "
                                 f"expected {len(used)} (its own dims) or {dim} (padded)")
            getattr(self, stat)[i].copy_(row)
        if not self.has_stats(embodiment):
            need = "mean and std" if self.mode == "mean_std" else "min and max"
            raise ValueError(f"statistics for {self.name!r} of embodiment {embodiment!r} need {need} (normalisation "
                             f"mode {self.mode!r}), got keys {sorted(stats)}")

    def _rows(self, embodiments: list[str]) -> list[int]:
        rows = [self.index(e) for e in embodiments]
        missing = sorted({e for e in embodiments if not self.has_stats(e)})
        if missing:
            raise MissingStatisticsError(
                f"dataset statistics for {self.name!r} of embodiment(s) {missing} are missing, so their raw values "
                f"cannot be normalised: call policy.set_normalization_stats({{'embodiments': {{{missing[0]!r}: "
                f"{{{self.name!r}: {{'mean': ..., 'std': ...}}, ...}}}}}}) (e.g. from moezoo.models.vla.robots."
                "compute_embodiment_stats) or set normalization_mapping to 'identity'")
        return rows

    def normalize(self, x: torch.Tensor, embodiments: list[str]) -> torch.Tensor:
        if not self.needs_stats:
            return x
        r = torch.tensor(self._rows(embodiments), device=x.device)
        shape = (-1,) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        if self.mode == "mean_std":
            return (x - self.mean[r].view(shape)) / (self.std[r].view(shape) + self.eps)
        lo, hi = self.min[r].view(shape), self.max[r].view(shape)
        return 2 * (x - lo) / (hi - lo + self.eps) - 1

    def unnormalize(self, x: torch.Tensor, embodiments: list[str]) -> torch.Tensor:
        if not self.needs_stats:
            return x
        r = torch.tensor(self._rows(embodiments), device=x.device)
        shape = (-1,) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        if self.mode == "mean_std":
            return x * (self.std[r].view(shape) + self.eps) + self.mean[r].view(shape)
        lo, hi = self.min[r].view(shape), self.max[r].view(shape)
        return (x + 1) / 2 * (hi - lo + self.eps) + lo


# ----------------------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------------------


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0):
    """π0's sine-cosine embedding of the flow time t (B,) -> (B, dim)."""
    if dim % 2:
        raise ValueError(f"time embedding width must be even, got {dim}")
    frac = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float32, device=t.device)
    period = min_period * (max_period / min_period) ** frac
    x = t.float()[:, None] * (2 * math.pi / period)[None]
    return torch.cat([x.sin(), x.cos()], dim=-1)


class VisionTower(nn.Module):
    """A timm model by name -> (B, tokens, num_features) patch / feature-map tokens."""

    def __init__(self, config: MoezooVlaConfig):
        super().__init__()
        import timm

        self.model = timm.create_model(config.vision_model_name, pretrained=config.vision_pretrained, num_classes=0,
                                       **(config.vision_model_kwargs or {}))
        self.num_features = int(self.model.num_features)
        self.register_buffer("pixel_mean", torch.tensor(config.image_mean).view(1, -1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(config.image_std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        feats = self.model.forward_features(x)
        if feats.dim() == 4:  # CNN feature map (B, C, h, w)
            feats = feats.flatten(2).transpose(1, 2)
        if feats.dim() != 3:
            raise ValueError(f"timm model {type(self.model).__name__} returned features of shape {tuple(feats.shape)}; "
                             "expected (batch, tokens, channels) or (batch, channels, h, w)")
        return feats


class ActionExpertLayer(nn.Module):
    """One action-expert layer: pre-norm attention over [LM keys/values, own keys/values] + pre-norm FFN."""

    def __init__(self, config: MoezooVlaConfig, layer_idx: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        H = config.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(H, config.rms_norm_eps)
        self.q_proj = nn.Linear(H, self.num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(H, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(H, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * head_dim, H, bias=False)
        self.post_attention_layernorm = RMSNorm(H, config.rms_norm_eps)
        self.mlp_type = config.mlp_layer_types[layer_idx]
        moe = [i for i, t in enumerate(config.mlp_layer_types) if t == "skill_moe"]
        if self.mlp_type == "skill_moe":
            # DriveMoE's MLPRouter runs once; its weights live in the first MoE layer, later layers reuse its logits
            owner = layer_idx == moe[0]
            rk = dict(config.router_kwargs or {})
            if not owner:
                rk.update(use_linear=False, learnable_temperature=False)
            self.mlp = build_moe_layer(config, router_type="pooled", router_kwargs=rk)
        elif self.mlp_type in ("as_moe", "hb_moe", "topk_moe"):
            self.mlp = build_moe_layer(config, **himoe_layer_kwargs(config, self.mlp_type))
        else:
            self.mlp = SharedExpert(H, config.intermediate_size, config.hidden_act)

    def forward(self, hidden_states, prefix_kv, cos, sin, mask, router_signals: dict | None = None,
                capture_router_input: bool = False, action_mask: torch.Tensor | None = None):
        B, S, _ = hidden_states.shape
        h = self.input_layernorm(hidden_states)
        q = self.q_proj(h).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos.to(q.dtype), sin.to(q.dtype))
        pk, pv = prefix_kv
        k = torch.cat([pk.to(k.dtype), k], dim=2)
        v = torch.cat([pv.to(v.dtype), v], dim=2)
        attn, _ = eager_attention(self, q, k, v, mask, scaling=self.head_dim ** -0.5)
        hidden_states = hidden_states + self.o_proj(attn.reshape(B, S, -1))
        h = self.post_attention_layernorm(hidden_states)
        router_out = None
        if self.mlp_type == "as_moe":
            y, router_out = self.mlp(h, condition=action_mask)
        elif self.mlp_type in ("hb_moe", "topk_moe"):
            y, router_out = self.mlp(h)
        elif isinstance(self.mlp, MoELayer):
            y, router_out = self.mlp(h, **(router_signals or {}))
        else:
            y = self.mlp(h)
        if router_out is not None:
            router_out.extras["batch_size"] = B
            router_out.extras["mlp_type"] = self.mlp_type
            router_out.extras["layer_idx"] = self.layer_idx
        return hidden_states + y, router_out, (h if capture_router_input else None)


def himoe_layer_kwargs(config: MoezooVlaConfig, kind: str) -> dict:
    """:func:`moezoo.core.build_moe_layer` arguments of an ``"as_moe"`` / ``"hb_moe"`` / ``"topk_moe"`` action-expert
    FFN: the same core pieces the block parity reference ``himoe_vla_blocks`` checks (condition router + mutual
    information loss; softmax top-k renormalised with eps 1e-20 + shared expert)."""
    H = config.hidden_size
    common = dict(hidden_size=H, capacity_factor=None, shared_expert_gate=False, expert_input_scale=1.0,
                  num_null_experts=0, num_zero_experts=0, num_copy_experts=0, num_constant_experts=0,
                  unconditional_expert=False, gated_experts=True, expert_bias=False)
    if kind == "as_moe":
        k = config.as_num_experts_per_tok
        norm = bool(config.as_norm_topk_prob) and k > 1  # official: renormalise only when top_k > 1
        return dict(common, num_experts=config.as_num_experts, num_experts_per_tok=k,
                    moe_intermediate_size=config.as_moe_intermediate_size, hidden_act=config.himoe_hidden_act,
                    router_type="condition", norm_topk_prob=norm, num_shared_experts=0,
                    router_kwargs=dict(condition_dim=config.action_dim, scoring_func="softmax", norm_topk_prob=norm,
                                       renorm_eps=1e-20, mi_loss_coef=float(config.as_aux_loss_alpha),
                                       mi_temperature=float(config.as_mi_temperature)))
    if kind == "hb_moe":
        k = config.hb_num_experts_per_tok
        norm = bool(config.hb_norm_topk_prob) and k > 1
        return dict(common, num_experts=config.hb_num_experts, num_experts_per_tok=k,
                    moe_intermediate_size=config.hb_moe_intermediate_size, hidden_act=config.himoe_hidden_act,
                    router_type="topk", norm_topk_prob=norm, num_shared_experts=config.hb_num_shared_experts,
                    shared_intermediate_size=config.hb_moe_intermediate_size,
                    router_kwargs=dict(scoring_func="softmax", norm_topk_prob=norm, renorm_eps=1e-20))
    if kind == "topk_moe":
        return dict(common, num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                    moe_intermediate_size=config.moe_intermediate_size, hidden_act=config.himoe_hidden_act,
                    router_type="topk", norm_topk_prob=True, num_shared_experts=0,
                    router_kwargs=dict(scoring_func="softmax", norm_topk_prob=True))
    raise ValueError(f"not a HiMoE / top-k FFN kind: {kind!r}")


# ----------------------------------------------------------------------------------------------------------------------
# the policy
# ----------------------------------------------------------------------------------------------------------------------


class MoezooVlaPreTrainedModel(MoezooPreTrainedModel):
    config_class = MoezooVlaConfig
    config: MoezooVlaConfig
    base_model_prefix = "vla"
    main_input_name = "pixel_values"
    _no_split_modules = ["ActionExpertLayer"]


class MoezooVlaPolicy(MoezooVlaPreTrainedModel):
    """π0-style VLA policy (Drive-π0; DriveMoE with the camera router and / or the skill MoE on).

    Two levels of API:
      - ``forward(pixel_values, input_ids, attention_mask, state, actions=None, ...)`` on model-space tensors
        (normalised state / actions) -> :class:`MoezooVlaOutput` (training loss, or a sampled chunk);
      - the LeRobot-style policy API on raw observation dicts (``observation.images.<camera>`` (B, 3, H, W) in [0, 1],
        ``observation.state`` (B, state_dim), ``task`` (str or list of str), ``observation.waypoint`` (B, waypoint_dim)
        for the camera router, ``action`` (B, H, action_dim) for training): :meth:`compute_loss`,
        :meth:`predict_action_chunk`, :meth:`select_action` (action queue of ``n_action_steps``), :meth:`reset`;
        normalisation uses the statistics saved with the model (:meth:`set_normalization_stats`).
    """

    def __init__(self, config: MoezooVlaConfig):
        super().__init__(config)
        text_cfg = dict(config.text_config)
        self.lm = AutoModel.from_config(AutoConfig.for_model(**text_cfg))
        tc = self.lm.config
        self.lm_hidden = int(tc.hidden_size)
        self.num_layers = int(tc.num_hidden_layers)
        self.head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
        kv_heads = int(getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads)
        if config.num_attention_heads % kv_heads:
            raise ValueError(f"num_attention_heads={config.num_attention_heads} of the action expert must be a multiple "
                             f"of the LM's num_key_value_heads={kv_heads} (both attend to the same keys/values)")
        if len(config.mlp_layer_types) != self.num_layers:
            raise ValueError(f"mlp_layer_types has {len(config.mlp_layer_types)} entries, the LM has {self.num_layers} "
                             "layers")
        self.vision_tower = VisionTower(config)
        nf = self.vision_tower.num_features
        if config.projector_type == "linear":
            self.multi_modal_projector = nn.Linear(nf, self.lm_hidden)
        else:
            self.multi_modal_projector = nn.Sequential(nn.Linear(nf, self.lm_hidden), nn.GELU(),
                                                       nn.Linear(self.lm_hidden, self.lm_hidden))
        self.view_embeddings = nn.Embedding(len(config.camera_names), self.lm_hidden)
        self.camera_router = None
        if config.use_camera_router:
            heads = config.camera_router_heads
            if self.lm_hidden % heads:
                raise ValueError(f"camera_router_heads={heads} must divide the LM width {self.lm_hidden}")
            self.camera_router = CameraRouter(self.lm_hidden, len(config.candidate_cameras), heads,
                                              waypoint_dim=config.waypoint_dim)
        H = config.hidden_size
        self.state_proj = nn.Linear(config.state_dim + (config.action_dim if config.state_with_action_mask else 0), H)
        self.action_in_proj = nn.Linear(config.action_dim, H)
        self.action_time_mlp_in = nn.Linear(2 * H, H)
        self.action_time_mlp_out = nn.Linear(H, H)
        self.action_expert = nn.ModuleDict({
            "layers": nn.ModuleList(ActionExpertLayer(config, i, kv_heads, self.head_dim)
                                    for i in range(self.num_layers)),
            "norm": RMSNorm(H, config.rms_norm_eps)})
        self.action_out_proj = nn.Linear(H, config.action_dim)
        self.normalize_state = Normalizer(STATE_KEY, config.state_dim, config.normalization_mapping["state"])
        self.normalize_action = Normalizer(ACTION_KEY, config.action_dim, config.normalization_mapping["action"])
        self.embodiment_names = sorted(config.embodiments or {})
        if self.embodiment_names:
            self.embodiment_state = EmbodimentNormalizer(STATE_KEY, self.embodiment_names, config.state_dim,
                                                         config.normalization_mapping["state"])
            self.embodiment_action = EmbodimentNormalizer(ACTION_KEY, self.embodiment_names, config.action_dim,
                                                          config.normalization_mapping["action"])
        moe = [i for i, t in enumerate(config.mlp_layer_types) if t == "skill_moe"]
        self.moe_start_layer = moe[0] - 1 if moe else None  # the layer whose FFN input feeds the action router
        self.tokenizer = None
        self._queue: deque = deque()
        self.post_init()

    # ------------------------------------------------------------------------------------------------ prefix
    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        V, (Hh, Ww) = len(self.config.camera_names), self.config.image_size
        if not torch.is_tensor(pixel_values) or pixel_values.dim() != 5 or tuple(pixel_values.shape[1:]) != (V, 3, Hh, Ww):
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"pixel_values has shape {shape}, expected (batch, num_cameras={V} "
                             f"{self.config.camera_names}, 3, {Hh}, {Ww})")

    def encode_views(self, images: torch.Tensor) -> torch.Tensor:
        """(B, V, 3, H, W) -> (B, V, tokens, lm_hidden) projected view tokens (no view embedding)."""
        B, V = images.shape[:2]
        feats = self.vision_tower(images.reshape(B * V, *images.shape[2:]))
        tok = self.multi_modal_projector(feats)
        return tok.view(B, V, tok.shape[1], tok.shape[2])

    def embed_views(self, pixel_values, waypoint=None, camera_labels=None):
        """View tokens of the prefix (B, N, lm_hidden) and the camera-router results (logits, chosen candidate ids)."""
        cfg = self.config
        names = cfg.camera_names
        if self.camera_router is None:
            tok = self.encode_views(pixel_values)
            tok = tok + self.view_embeddings.weight[:, None].to(tok.dtype)
            return tok.flatten(1, 2), None, None
        ctx_ids = [names.index(c) for c in cfg.context_cameras]
        cand_ids = [names.index(c) for c in cfg.candidate_cameras]
        ctx = self.encode_views(pixel_values[:, ctx_ids])
        ctx = ctx + self.view_embeddings.weight[ctx_ids][:, None].to(ctx.dtype)
        ctx = ctx.flatten(1, 2)
        B = pixel_values.shape[0]
        if waypoint is None:
            raise ValueError(f"the camera router needs waypoint= / {WAYPOINT_KEY!r} of shape (batch={B}, "
                             f"waypoint_dim={cfg.waypoint_dim})")
        if tuple(waypoint.shape) != (B, cfg.waypoint_dim):
            raise ValueError(f"waypoint has shape {tuple(waypoint.shape)}, expected (batch={B}, "
                             f"waypoint_dim={cfg.waypoint_dim})")
        logits = self.camera_router(ctx, waypoint.to(ctx.dtype))
        k, L = cfg.num_cameras_selected, len(cand_ids)
        cand_emb = self.view_embeddings.weight[cand_ids]  # (L, D)
        if self.training and camera_labels is not None and cfg.camera_teacher_forcing:
            # stage 1: the labelled view (plus the router's next best views when k > 1), no gradient to the router
            masked = logits.detach().scatter(1, camera_labels.long().view(-1, 1), float("inf"))
            idx = masked.topk(k, -1).indices
            slots = F.one_hot(idx, L).to(ctx.dtype)
        elif self.training:
            slots, idx = self.camera_router.select_topk(logits, k, tau=cfg.camera_gumbel_tau, hard=True)
            slots = slots.to(ctx.dtype)
        else:
            slots, idx = self.camera_router.select_topk(logits, k)
            slots = slots.to(ctx.dtype)
        if self.training and not (camera_labels is not None and cfg.camera_teacher_forcing):
            cand = self.encode_views(pixel_values[:, cand_ids])  # all candidates, straight-through selection
            sel = torch.einsum("bkl,bltd->bktd", slots, cand)
        else:  # only the chosen views go through the vision tower
            chosen = torch.tensor(cand_ids, device=idx.device)[idx]  # (B, k)
            imgs = pixel_values[torch.arange(B, device=idx.device)[:, None], chosen]
            sel = self.encode_views(imgs)
        sel = sel + torch.einsum("bkl,ld->bkd", slots, cand_emb.to(sel.dtype))[:, :, None]
        return torch.cat([ctx, sel.flatten(1, 2)], dim=1), logits, idx

    def embed_prefix(self, pixel_values, input_ids, attention_mask=None, waypoint=None, camera_labels=None):
        self._check_pixels(pixel_values)
        B = pixel_values.shape[0]
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != B:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"input_ids has shape {shape}, expected (batch={B}, text_tokens)")
        vocab = self.lm.get_input_embeddings().num_embeddings
        if input_ids.numel() and (int(input_ids.max()) >= vocab or int(input_ids.min()) < 0):
            raise ValueError(f"input_ids must be in [0, vocab_size={vocab})")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(input_ids.shape)}")
        img, cam_logits, cam_idx = self.embed_views(pixel_values, waypoint, camera_labels)
        txt = self.lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([img.to(txt.dtype), txt], dim=1)
        mask = torch.cat([torch.ones(B, img.shape[1], dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], dim=1)
        return embeds, mask, cam_logits, cam_idx

    def run_prefix(self, embeds, mask):
        """LM over the prefix -> per-layer (keys, values) (B, kv_heads, P, head_dim) after RoPE, and positions."""
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = out.get("cache", None) if hasattr(out, "get") else None
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        if cache is None:
            raise ValueError(f"the LM {type(self.lm).__name__} returned no KV cache; the action expert needs the "
                             "keys/values of every layer (use a transformers decoder with use_cache support)")
        if hasattr(cache, "layers"):
            kv = [(layer.keys, layer.values) for layer in cache.layers]
        else:
            kv = [(cache[i][0], cache[i][1]) for i in range(self.num_layers)]
        if len(kv) != self.num_layers:
            raise ValueError(f"the LM cache has {len(kv)} layers, expected {self.num_layers}")
        return kv, mask.long().sum(-1)

    # ------------------------------------------------------------------------------------------------ suffix
    def _rope(self, positions: torch.Tensor, like: torch.Tensor):
        rot = getattr(self.lm, "rotary_emb", None)
        if rot is not None:
            return rot(like, positions)
        inv = 1.0 / (float(getattr(self.lm.config, "rope_theta", 10000.0) or 10000.0)
                     ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=like.device) / self.head_dim))
        freqs = positions.float()[..., None] * inv
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos(), emb.sin()

    def run_expert(self, prefix_kv, prefix_mask, prefix_len, state, x_t, t, action_mask=None):
        """Suffix [state, actions] through the action expert -> velocity (B, H, action_dim), router outputs."""
        cfg = self.config
        B, Hn = x_t.shape[:2]
        if cfg.state_with_action_mask:
            state = torch.cat([state, action_mask.to(state.dtype)], -1)
        st = self.state_proj(state.to(self.state_proj.weight.dtype))[:, None]
        a = self.action_in_proj(x_t.to(self.action_in_proj.weight.dtype))
        te = sinusoidal_time_embedding(t, cfg.hidden_size).to(a.dtype)[:, None].expand(-1, Hn, -1)
        a = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([a, te], -1))))
        h = torch.cat([st, a], dim=1)
        S = Hn + 1
        positions = prefix_len[:, None] + torch.arange(S, device=h.device)[None]
        cos, sin = self._rope(positions, h)
        # keep-mask (B, 1, S, P + S): prefix where valid; state sees itself only; actions see the whole suffix
        suffix = torch.ones(S, S, dtype=torch.bool, device=h.device)
        suffix[0, 1:] = False
        mask = torch.cat([prefix_mask.bool()[:, None, None].expand(B, 1, S, -1),
                          suffix[None, None].expand(B, 1, S, S)], dim=-1)
        router_outs, signals, skill_logits = [], None, None
        for i, layer in enumerate(self.action_expert["layers"]):
            h, ro, rin = layer(h, prefix_kv[i], cos, sin, mask, signals, capture_router_input=i == self.moe_start_layer,
                               action_mask=action_mask)
            if rin is not None:
                signals = {"router_hidden_states": rin[:, 1:]}  # the action tokens (official: action mixture)
            if ro is not None:
                router_outs.append(ro)
                if skill_logits is None and layer.mlp_type == "skill_moe":
                    skill_logits = ro.extras["sample_logits"]
                    signals = {"router_logits": skill_logits}
        v = self.action_out_proj(self.action_expert["norm"](h[:, 1:]))
        return v, router_outs, skill_logits

    def sample_time(self, batch_size: int, device, generator=None) -> torch.Tensor:
        cfg = self.config
        a = torch._standard_gamma(torch.full((batch_size,), cfg.time_beta_alpha, device=device), generator=generator)
        b = torch._standard_gamma(torch.full((batch_size,), cfg.time_beta_beta, device=device), generator=generator)
        z = a / (a + b)
        return ((cfg.time_max - z) / cfg.time_max).clamp(0.0, 1.0)

    def _check_action_mask(self, action_mask, batch_size: int, device) -> torch.Tensor | None:
        """The per-sample action-space descriptor (B, action_dim) bool; all ones when not given."""
        cfg = self.config
        if action_mask is None:
            if not cfg.himoe_layers and not cfg.state_with_action_mask:
                return None
            return torch.ones(batch_size, cfg.action_dim, dtype=torch.bool, device=device)
        if not torch.is_tensor(action_mask):
            action_mask = torch.as_tensor(action_mask)
        if action_mask.dim() == 1:
            action_mask = action_mask[None].expand(batch_size, -1)
        if action_mask.dim() != 2 or action_mask.shape[-1] != cfg.action_dim or action_mask.shape[0] != batch_size:
            raise ValueError(f"action_mask (the action-space descriptor) has shape {tuple(action_mask.shape)}, expected "
                             f"(batch={batch_size}, action_dim={cfg.action_dim}): one flag per dimension of the padded "
                             "action vector, True where the embodiment has an action")
        if action_mask.is_floating_point() and not bool(((action_mask == 0) | (action_mask == 1)).all()):
            raise ValueError("action_mask must be 0/1 (or bool): which dimensions of the padded action vector are used")
        m = action_mask.bool().to(device)
        if not bool(m.any(-1).all()):
            raise ValueError("action_mask has a sample with no action dimension (every row needs at least one True)")
        return m

    def _check_state_actions(self, state, actions=None):
        cfg = self.config
        if not torch.is_tensor(state) or state.dim() != 2 or state.shape[-1] != cfg.state_dim:
            shape = tuple(state.shape) if torch.is_tensor(state) else type(state).__name__
            raise ValueError(f"state ({STATE_KEY}) has shape {shape}, expected (batch, state_dim={cfg.state_dim})")
        if actions is not None and (actions.dim() != 3 or tuple(actions.shape[1:]) != (cfg.chunk_size, cfg.action_dim)):
            raise ValueError(f"actions ({ACTION_KEY}) has shape {tuple(actions.shape)}, expected (batch, chunk_size="
                             f"{cfg.chunk_size}, action_dim={cfg.action_dim})")

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, state: torch.Tensor,
                attention_mask: torch.Tensor | None = None, actions: torch.Tensor | None = None,
                action_is_pad: torch.Tensor | None = None, waypoint: torch.Tensor | None = None,
                camera_labels: torch.Tensor | None = None, skill_labels: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, time: torch.Tensor | None = None,
                generator: torch.Generator | None = None, num_inference_steps: int | None = None,
                action_mask: torch.Tensor | None = None, **kwargs) -> MoezooVlaOutput:
        """Model-space forward. With ``actions`` (normalised (B, H, action_dim)): flow-matching training loss
        (``noise`` / ``time`` drawn unless given); without: a sampled normalised chunk in ``prediction``.
        ``action_mask`` (B, action_dim) bool: the action-space descriptor (HiMoE's ``data_mask``; AS-MoE routes on it,
        the loss ignores the dimensions it leaves out, sampled chunks are 0 there); default all True."""
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        self._check_state_actions(state, actions)
        cfg = self.config
        embeds, mask, cam_logits, cam_idx = self.embed_prefix(pixel_values, input_ids, attention_mask, waypoint,
                                                              camera_labels)
        kv, plen = self.run_prefix(embeds, mask)
        B, dev = state.shape[0], state.device
        amask = self._check_action_mask(action_mask, B, dev)
        if actions is None:
            chunk, router_outs, skill_logits = self._sample(kv, mask, plen, state, noise, generator,
                                                            num_inference_steps, amask)
            return MoezooVlaOutput(prediction=chunk, router_logits=tuple(ro.logits for ro in router_outs) or None,
                                   camera_logits=cam_logits, camera_selection=cam_idx, skill_logits=skill_logits,
                                   skill_selection=None if skill_logits is None else skill_logits.argmax(-1),
                                   expert_selection=self.expert_selection(router_outs, B))
        x1 = actions.to(embeds.dtype)
        if amask is not None:  # padded dimensions are zero whatever the batch holds there (official: zero padding)
            x1 = x1 * amask.to(x1.dtype)[:, None, :]
        x0 = torch.randn(x1.shape, generator=generator, device=dev, dtype=x1.dtype) if noise is None else noise
        t = self.sample_time(B, dev, generator) if time is None else time.reshape(B).to(dev)
        tt = t.to(x1.dtype)[:, None, None]
        x_t = (1 - (1 - cfg.flow_sig_min) * tt) * x0 + tt * x1
        v, router_outs, skill_logits = self.run_expert(kv, mask, plen, state, x_t, t, amask)
        target = x1 - (1 - cfg.flow_sig_min) * x0
        err = (v - target).pow(2)
        keep = torch.ones_like(err)
        if action_is_pad is not None:
            if tuple(action_is_pad.shape) != (B, cfg.chunk_size):
                raise ValueError(f"action_is_pad has shape {tuple(action_is_pad.shape)}, expected (batch={B}, "
                                 f"chunk_size={cfg.chunk_size})")
            keep = keep * (~action_is_pad.bool()).to(err.dtype)[..., None]
        if amask is not None:
            keep = keep * amask.to(err.dtype)[:, None, :]
        action_loss = (err * keep).sum() / keep.sum().clamp_min(1.0)
        aux = self.compute_aux_loss(router_outs)
        as_loss, hb_loss = self._himoe_losses(router_outs, B)
        camera_loss = skill_loss = None
        if camera_labels is not None and cam_logits is not None:
            camera_loss = router_supervision_loss(cam_logits, camera_labels, gamma=cfg.router_focal_gamma)
        if skill_labels is not None and skill_logits is not None:
            skill_loss = router_supervision_loss(skill_logits, skill_labels, gamma=cfg.router_focal_gamma)
        extra = 0.0
        if camera_loss is not None and cfg.camera_router_loss_coef:
            extra = extra + cfg.camera_router_loss_coef * camera_loss
        if skill_loss is not None and cfg.action_router_loss_coef:
            extra = extra + cfg.action_router_loss_coef * skill_loss
        if aux is None:
            aux = action_loss.new_zeros(())
        aux = aux + extra
        return MoezooVlaOutput(loss=action_loss + aux, prediction=v, aux_loss=aux, action_loss=action_loss,
                               camera_loss=camera_loss, skill_loss=skill_loss,
                               router_logits=tuple(ro.logits for ro in router_outs) or None, camera_logits=cam_logits,
                               camera_selection=cam_idx, skill_logits=skill_logits,
                               skill_selection=None if skill_logits is None else skill_logits.argmax(-1),
                               as_loss=as_loss, hb_loss=hb_loss, expert_selection=self.expert_selection(router_outs, B))

    # ------------------------------------------------------------------------------------------------ HiMoE losses
    def _himoe_losses(self, router_outs, batch_size: int):
        """(AS-MoE mutual-information loss, HB-MoE balance loss), each already weighted (None without such layers)."""
        as_terms = [ro.aux_loss for ro in router_outs if ro.extras.get("mlp_type") == "as_moe" and ro.aux_loss is not None]
        hb = [ro for ro in router_outs if ro.extras.get("mlp_type") == "hb_moe"]
        as_loss = torch.stack([t.float() for t in as_terms]).sum() if as_terms else None
        hb_loss = None
        if hb and self.training and self.config.hb_aux_loss_alpha:
            hb_loss = self._hb_balance(hb, batch_size) * self.config.hb_aux_loss_alpha
        return as_loss, hb_loss

    def _hb_balance(self, router_outs, batch_size: int) -> torch.Tensor:
        if self.config.hb_seq_aux:  # DeepSeek's sequence-level loss, per layer, summed over layers
            return sequence_balance_loss(router_outs, batch_size=batch_size)
        # token-level (official seq_aux=False): Switch loss over slots, i.e. the "tokens" loss / k, per layer
        return sum(switch_balance_loss(ro, normalize="slots") for ro in router_outs)

    def aux_loss_terms(self, router_outputs) -> tuple:
        """HB-MoE's sequence-level balance loss (AS-MoE's mutual-information loss comes with its router output)."""
        hb = [ro for ro in router_outputs if ro.extras.get("mlp_type") == "hb_moe"]
        if not hb or not self.training or not self.config.hb_aux_loss_alpha:
            return ()
        B = hb[0].extras.get("batch_size")
        return (self._hb_balance(hb, B) * self.config.hb_aux_loss_alpha,)

    def compute_aux_loss(self, router_outputs, attention_mask=None):
        """Generic balance / z losses (``router_aux_loss_coef`` / ``router_z_loss_coef``) see only the skill and top-k
        layers; AS-MoE and HB-MoE bring their own losses (mutual information, sequence balance)."""
        ros = [ro for ro in router_outputs if ro is not None]
        if not ros:
            return None
        plain = [ro for ro in ros if ro.extras.get("mlp_type") not in ("as_moe", "hb_moe")]
        own = [ro.aux_loss for ro in ros if ro.extras.get("mlp_type") in ("as_moe", "hb_moe")]
        total = super().compute_aux_loss(plain) if plain else None
        if total is None:
            total = ros[0].logits.new_zeros((), dtype=torch.float32)
        for t in own:
            if t is not None:
                total = total + t.float()
        for t in self.aux_loss_terms(ros):
            total = total + t.float()
        return total

    @staticmethod
    def expert_selection(router_outs, batch_size: int) -> dict | None:
        """Per-sample expert use of the HiMoE / top-k layers: ``{"as_moe.<i>": (B, k) experts of each sample (all its
        tokens share them), "hb_moe.<i>" / "topk_moe.<i>": (B, E) slot counts}``."""
        out = {}
        for ro in router_outs:
            kind, i = ro.extras.get("mlp_type"), ro.extras.get("layer_idx")
            if kind == "as_moe":
                out[f"as_moe.{i}"] = ro.indices.reshape(batch_size, -1, ro.indices.shape[-1])[:, 0].detach()
            elif kind in ("hb_moe", "topk_moe"):
                idx = ro.indices.reshape(batch_size, -1).clamp(0, ro.num_experts)
                cnt = torch.zeros(batch_size, ro.num_experts + 1, device=idx.device).scatter_add_(
                    1, idx, torch.ones_like(idx, dtype=torch.float32))[:, : ro.num_experts]
                out[f"{kind}.{i}"] = cnt
        return out or None

    def _sample(self, kv, mask, plen, state, noise=None, generator=None, num_inference_steps=None, action_mask=None):
        cfg = self.config
        B = state.shape[0]
        steps = int(num_inference_steps or cfg.num_inference_steps)
        if steps <= 0:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        shape = (B, cfg.chunk_size, cfg.action_dim)
        x = torch.randn(shape, generator=generator, device=state.device) if noise is None else noise.clone()
        if tuple(x.shape) != shape:
            raise ValueError(f"noise has shape {tuple(x.shape)}, expected {shape}")
        dt = 1.0 / steps
        router_outs, skill_logits = [], None
        for s in range(steps):
            t = torch.full((B,), s * dt, device=state.device)
            v, router_outs, skill_logits = self.run_expert(kv, mask, plen, state, x, t, action_mask)
            x = x + dt * v
        if action_mask is not None:
            x = x * action_mask.to(x.dtype)[:, None, :]  # dimensions the embodiment does not have
        return x, router_outs, skill_logits

    # ------------------------------------------------------------------------------------------------ policy API
    def set_normalization_stats(self, stats: dict) -> None:
        """Store dataset statistics ``{"observation.state": {"mean", "std"[, "min", "max"]}, "action": {...}}``
        (saved with the model). With ``config.embodiments``: ``{"embodiments": {name: {"observation.state": {...},
        "action": {...}}}}``, each over the embodiment's own dims (or the padded widths)."""
        if "embodiments" in stats:
            if not self.embodiment_names:
                raise ValueError("per-embodiment statistics given, but the config has no embodiments "
                                 "(config.embodiments)")
            for name, st in stats["embodiments"].items():
                spec = self.config.embodiments.get(name)
                if spec is None:
                    raise ValueError(f"statistics for unknown embodiment {name!r}; the config knows "
                                     f"{self.embodiment_names}")
                for key, norm, used in ((STATE_KEY, self.embodiment_state, list(range(spec["state_dim"]))),
                                        (ACTION_KEY, self.embodiment_action, spec["action_indices"])):
                    if key in st:
                        norm.set(name, st[key], used)
                    elif norm.needs_stats:
                        raise ValueError(f"statistics for {key!r} of embodiment {name!r} are missing from {sorted(st)}")
            rest = {k: v for k, v in stats.items() if k != "embodiments"}
            if not rest:
                return
            stats = rest
        for key, norm in ((STATE_KEY, self.normalize_state), (ACTION_KEY, self.normalize_action)):
            if key in stats:
                norm.set(stats[key])
            elif norm.needs_stats:
                raise ValueError(f"statistics for {key!r} are missing from {sorted(stats)}")

    def tokenize(self, tasks) -> tuple[torch.Tensor, torch.Tensor]:
        """Instructions -> (input_ids, attention_mask), right-padded to the longest (at most ``max_text_tokens``).

        Uses ``self.tokenizer`` (any Hugging Face tokenizer you attach) or, without one, a byte-level fallback
        (``byte + 3``; needs ``vocab_size >= 259``)."""
        if isinstance(tasks, str):
            tasks = [tasks]
        if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
            raise ValueError(f"{TASK_KEY!r} must be a string or a list of strings (the language instruction), "
                             f"got {type(tasks).__name__}")
        n = self.config.max_text_tokens
        if self.tokenizer is not None:
            enc = self.tokenizer(list(tasks), padding=True, truncation=True, max_length=n, return_tensors="pt")
            return enc["input_ids"], enc["attention_mask"]
        vocab = self.lm.get_input_embeddings().num_embeddings
        if vocab < 256 + BYTE_OFFSET:
            raise ValueError(f"the byte-level fallback tokenizer needs vocab_size >= {256 + BYTE_OFFSET} (the LM has "
                             f"{vocab}); attach a tokenizer: policy.tokenizer = AutoTokenizer.from_pretrained(...)")
        rows = [[1] + [b + BYTE_OFFSET for b in t.encode("utf-8")][: n - 1] for t in tasks]
        L = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        am = torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            am[i, : len(r)] = 1
        return ids, am

    def prepare_inputs(self, batch: dict) -> dict:
        """Raw observation dict -> model-space keyword arguments of :meth:`forward` (validated, normalised)."""
        if not isinstance(batch, dict):
            raise ValueError(f"observation must be a dict, got {type(batch).__name__}")
        cfg = self.config
        dev = self.state_proj.weight.device
        missing = [IMAGE_KEY + c for c in cfg.camera_names if IMAGE_KEY + c not in batch]
        if missing:
            have = sorted(k for k in batch if k.startswith(IMAGE_KEY))
            raise ValueError(f"observation is missing camera keys {missing}; expected {[IMAGE_KEY + c for c in cfg.camera_names]}"
                             f", got {have}")
        if STATE_KEY not in batch:
            raise ValueError(f"observation is missing {STATE_KEY!r} (batch, state_dim={cfg.state_dim})")
        if TASK_KEY not in batch:
            raise ValueError(f"observation is missing {TASK_KEY!r} (the language instruction, str or list of str)")
        state = torch.as_tensor(batch[STATE_KEY], dtype=torch.float32, device=dev)
        if state.dim() == 1:
            state = state[None]
        embodiments = self._embodiments_of(batch, state.shape[0])
        if embodiments is not None and state.dim() == 2 and state.shape[-1] < cfg.state_dim:
            widths = {cfg.embodiments[e]["state_dim"] for e in embodiments}
            if widths != {state.shape[-1]}:
                raise ValueError(f"{STATE_KEY} has width {state.shape[-1]}, expected state_dim={cfg.state_dim} (padded) "
                                 f"or the embodiment's own width {sorted(widths)}")
            state = F.pad(state, (0, cfg.state_dim - state.shape[-1]))
        self._check_state_actions(state)
        B = state.shape[0]
        Hh, Ww = cfg.image_size
        imgs = []
        for c in cfg.camera_names:
            im = torch.as_tensor(batch[IMAGE_KEY + c], device=dev)
            if im.dim() == 3:
                im = im[None]
            if im.dtype == torch.uint8:
                im = im.float() / 255.0
            if im.dim() != 4 or tuple(im.shape) != (B, 3, Hh, Ww):
                raise ValueError(f"{IMAGE_KEY + c} has shape {tuple(im.shape)}, expected (batch={B}, 3, {Hh}, {Ww}) "
                                 "(channels first, values in [0, 1] or uint8)")
            imgs.append(im.float())
        tasks = batch[TASK_KEY]
        if isinstance(tasks, str):
            tasks = [tasks] * B
        if len(tasks) != B:
            raise ValueError(f"{TASK_KEY!r} has {len(tasks)} instructions, expected one per sample ({B})")
        ids, am = self.tokenize(tasks)
        if embodiments is not None:
            norm_state = self.embodiment_state.normalize(state, embodiments)
            amask = torch.tensor([cfg.action_mask_of(e) for e in embodiments], device=dev)
            if batch.get(ACTION_MASK_KEY) is not None and not torch.equal(
                    self._check_action_mask(batch[ACTION_MASK_KEY], B, dev), amask):
                raise ValueError(f"{ACTION_MASK_KEY!r} disagrees with the action_indices of the embodiments "
                                 f"{sorted(set(embodiments))} in config.embodiments")
        else:
            norm_state = self.normalize_state.normalize(state)
            amask = batch.get(ACTION_MASK_KEY)
        out = dict(pixel_values=torch.stack(imgs, 1), input_ids=ids.to(dev), attention_mask=am.to(dev),
                   state=norm_state)
        amask = self._check_action_mask(amask, B, dev)
        if amask is not None:
            out["action_mask"] = amask
        if embodiments is not None:
            out["_embodiments"] = embodiments
        if self.camera_router is not None:
            if WAYPOINT_KEY not in batch:
                raise ValueError(f"observation is missing {WAYPOINT_KEY!r} (batch, waypoint_dim={cfg.waypoint_dim}); "
                                 "the camera router reads it")
            wp = torch.as_tensor(batch[WAYPOINT_KEY], dtype=torch.float32, device=dev)
            out["waypoint"] = wp[None] if wp.dim() == 1 else wp
        return out

    def _embodiments_of(self, batch: dict, batch_size: int) -> list[str] | None:
        """The ``embodiment`` names of a raw batch (one per sample), or None for a policy without embodiments."""
        if not self.embodiment_names:
            if batch.get(EMBODIMENT_KEY) is not None:
                raise ValueError(f"the batch names an {EMBODIMENT_KEY!r} but the config has no embodiments "
                                 "(config.embodiments)")
            return None
        emb = batch.get(EMBODIMENT_KEY)
        if emb is None:
            raise ValueError(f"observation is missing {EMBODIMENT_KEY!r} (str or list of str, one of "
                             f"{self.embodiment_names}): its statistics and action space depend on it")
        if isinstance(emb, str):
            emb = [emb] * batch_size
        emb = list(emb)
        if len(emb) != batch_size:
            raise ValueError(f"{EMBODIMENT_KEY!r} has {len(emb)} names, expected one per sample ({batch_size})")
        for e in set(emb):
            self.embodiment_state.index(e)  # unknown names raise, naming the known ones
        return emb

    def embodiment_actions(self, chunk: torch.Tensor, embodiment: str) -> torch.Tensor:
        """The embodiment's own action dimensions of a padded chunk (..., action_dim) -> (..., its width)."""
        idx = self.config.embodiments[embodiment]["action_indices"] if self.embodiment_names else None
        if idx is None:
            raise ValueError(f"unknown embodiment {embodiment!r}; the policy knows {self.embodiment_names}")
        return chunk[..., torch.tensor(idx, device=chunk.device)]

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> MoezooVlaOutput:
        """Training loss from a raw batch (adds ``action``, optional ``action_is_pad``, ``camera_label``,
        ``skill_label``)."""
        if ACTION_KEY not in batch:
            raise ValueError(f"the batch is missing {ACTION_KEY!r} (batch, chunk_size={self.config.chunk_size}, "
                             f"action_dim={self.config.action_dim})")
        inputs = self.prepare_inputs(batch)
        embodiments = inputs.pop("_embodiments", None)
        dev = inputs["state"].device
        actions = torch.as_tensor(batch[ACTION_KEY], dtype=torch.float32, device=dev)
        if embodiments is not None and actions.dim() == 3 and actions.shape[-1] < self.config.action_dim:
            e = embodiments[0]
            if len(set(embodiments)) != 1 or actions.shape[-1] != len(self.config.embodiments[e]["action_indices"]):
                raise ValueError(f"{ACTION_KEY} has width {actions.shape[-1]}; give padded actions (action_dim="
                                 f"{self.config.action_dim}) for a batch of several embodiments")
            full = actions.new_zeros(*actions.shape[:2], self.config.action_dim)
            full[..., torch.tensor(self.config.embodiments[e]["action_indices"], device=dev)] = actions
            actions = full
        self._check_state_actions(inputs["state"], actions)
        if embodiments is not None:
            inputs["actions"] = self.embodiment_action.normalize(actions, embodiments)
        else:
            inputs["actions"] = self.normalize_action.normalize(actions)
        for src, dst in (("action_is_pad", "action_is_pad"), ("camera_label", "camera_labels"),
                         ("skill_label", "skill_labels")):
            if batch.get(src) is not None:
                inputs[dst] = torch.as_tensor(batch[src], device=dev)
        return self(**inputs, generator=generator)

    @torch.no_grad()
    def predict_action_chunk(self, observation: dict, generator: torch.Generator | None = None,
                             num_inference_steps: int | None = None, return_output: bool = False):
        """A chunk of ``chunk_size`` actions (B, H, action_dim) in the dataset's units."""
        inputs = self.prepare_inputs(observation)
        embodiments = inputs.pop("_embodiments", None)
        out = self(**inputs, generator=generator, num_inference_steps=num_inference_steps)
        if embodiments is not None:
            chunk = self.embodiment_action.unnormalize(out.prediction, embodiments)
            chunk = chunk * inputs["action_mask"].to(chunk.dtype)[:, None, :]
        else:
            chunk = self.normalize_action.unnormalize(out.prediction)
        return (chunk, out) if return_output else chunk

    @torch.no_grad()
    def select_action(self, observation: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """The next action (B, action_dim): re-plans a chunk when the queue is empty and executes its first
        ``n_action_steps`` actions one per call."""
        if not self._queue:
            chunk = self.predict_action_chunk(observation, generator=generator)
            self._queue.extend(chunk[:, : self.config.n_action_steps].transpose(0, 1))
        return self._queue.popleft()

    def reset(self) -> None:
        """Forget queued actions (call at the start of every episode)."""
        self._queue.clear()

    # ------------------------------------------------------------------------------------------------ helpers
    def example_inputs(self, batch_size: int = 2, seq_len: int = 6, labels: bool = True,
                       generator: torch.Generator | None = None) -> dict:
        cfg = self.config
        g = generator
        Hh, Ww = cfg.image_size
        vocab = self.lm.get_input_embeddings().num_embeddings
        out = dict(pixel_values=torch.rand(batch_size, len(cfg.camera_names), 3, Hh, Ww, generator=g),
                   input_ids=torch.randint(0, vocab, (batch_size, seq_len), generator=g),
                   attention_mask=torch.ones(batch_size, seq_len, dtype=torch.long),
                   state=torch.randn(batch_size, cfg.state_dim, generator=g))
        if self.camera_router is not None:
            out["waypoint"] = torch.randn(batch_size, cfg.waypoint_dim, generator=g)
        if cfg.himoe_layers or cfg.state_with_action_mask:
            # two action spaces: the first sample uses every dimension, the others the first half
            am = torch.ones(batch_size, cfg.action_dim, dtype=torch.bool)
            am[1:, (cfg.action_dim + 1) // 2:] = False
            out["action_mask"] = am
        if labels:
            out["actions"] = torch.randn(batch_size, cfg.chunk_size, cfg.action_dim, generator=g)
            if self.camera_router is not None:
                out["camera_labels"] = torch.randint(0, len(cfg.candidate_cameras), (batch_size,), generator=g)
            if cfg.num_moe_layers:
                out["skill_labels"] = torch.randint(0, cfg.num_experts, (batch_size,), generator=g)
        return out


__all__ = ["MoezooVlaPolicy", "MoezooVlaPreTrainedModel", "MoezooVlaOutput", "MissingStatisticsError", "Normalizer",
           "sinusoidal_time_embedding"]
