"""``moezoo_dit_moe``: class-conditional diffusion transformers with MoE FFNs (DiT-MoE, ProMoE).

patchify (timm ``PatchEmbed``) + fixed 2-D sin-cos positions -> N x adaLN-Zero blocks [LayerNorm -> modulate ->
attention (timm ``Attention``, fused SDPA) -> gate; LayerNorm -> modulate -> :class:`moezoo.core.MoELayer` (or a dense
GELU MLP) -> gate] -> adaLN final layer -> unpatchify. Conditioning ``c = timestep embedding + label embedding``
(diffusers' ``Timesteps`` sinusoidal features + MLP; a label table with a null row for classifier-free guidance).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import Timesteps, get_2d_sincos_pos_embed
from timm.layers import Attention, Mlp, PatchEmbed
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from ...core.experts import ZeroFlopExperts, _ExpertsBase
from ...core import build_moe_layer, data_check
from ...core.losses import routing_contrastive_loss
from ...core.routing import PrototypeRouter, Router, RouterOutput, router_parameters
from ...modeling_utils import MoezooPreTrainedModel
from .configuration_dit_moe import MoezooDiTMoeConfig


@dataclass
class MoezooDiTMoeOutput(ModelOutput):
    """Output of :class:`MoezooDiTMoeModel`.

    Attributes:
        sample: (B, out_channels, H, W) prediction (eps / velocity in the first ``in_channels`` channels, the variance
            interpolation in the rest when ``learn_sigma``).
        loss: ``MSE(sample[:, :in_channels], target) + aux_loss + routing_contrastive_loss`` (only with ``target``).
        aux_loss: ``router_aux_loss_coef * sum over MoE layers of the balance loss`` (+ z-loss, + routers' own losses),
            already weighted; in training or with ``target`` only.
        routing_contrastive_loss: ``routing_contrastive_coef * sum over MoE layers of RCL`` (already weighted), or None.
        router_logits: one (B*T, R) tensor per MoE layer (when ``output_router_logits``).
        router_outputs: the :class:`moezoo.core.RouterOutput` of every MoE layer.
        class_labels: the labels actually used (after label dropout / ``force_drop_ids``).
    """

    loss: torch.FloatTensor | None = None
    sample: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    routing_contrastive_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    router_outputs: tuple[RouterOutput, ...] | None = None
    class_labels: torch.LongTensor | None = None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of (B, T, H) tokens by per-sample (B, H) shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def classifier_free_guidance(pred: torch.Tensor, guidance_scale: float, cfg_channels: int | None,
                             in_channels: int) -> tuple[torch.Tensor, int]:
    """The one classifier-free guidance of DiT-MoE: a ``[cond; uncond]`` prediction batch (2N, C_out, H, W) ->
    (``uncond + s (cond - uncond)`` of the first ``n`` channels (N, n, H, W), ``n``); ``cfg_channels`` None = all
    ``in_channels`` (the whole eps / velocity; the official code guides 3)."""
    if pred.shape[0] % 2:
        raise ValueError(f"a classifier-free-guidance batch must have an even size ([cond; uncond]), got {pred.shape[0]}")
    n = in_channels if cfg_channels is None else int(cfg_channels)
    if not 0 < n <= pred.shape[1]:
        raise ValueError(f"cfg_channels must be in 1..{pred.shape[1]} or None, got {cfg_channels!r}")
    cond, uncond = pred[:, :n].chunk(2, dim=0)
    return uncond + guidance_scale * (cond - uncond), n


def sincos_pos_embed(hidden_size: int, grid_size: int) -> torch.Tensor:
    """(grid^2, H) fixed 2-D sin-cos positions (MAE/DiT layout: first half encodes the column, second the row)."""
    return get_2d_sincos_pos_embed(hidden_size, grid_size, base_size=grid_size, interpolation_scale=1.0,
                                   output_type="pt").float()


class MoezooDiTMoeTimestepEmbedder(nn.Module):
    """Sinusoidal features of the (possibly fractional) timesteps (diffusers ``Timesteps``, [cos, sin]) + MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.time_proj = Timesteps(frequency_embedding_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.time_proj(t)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class MoezooDiTMoeLabelEmbedder(nn.Module):
    """Class-label table with a null row (classifier-free guidance) and label dropout."""

    def __init__(self, num_embeddings: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_embeddings, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class MoezooDiTMoeBlock(GradientCheckpointingLayer):
    """adaLN-Zero DiT block; the FFN is a :class:`MoELayer` on MoE blocks, else a dense GELU-tanh MLP (timm ``Mlp``)."""

    def __init__(self, config: MoezooDiTMoeConfig, layer_idx: int):
        super().__init__()
        H = config.hidden_size
        self.layer_idx = layer_idx
        self.config = config
        self.norm1 = nn.LayerNorm(H, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(H, num_heads=config.num_attention_heads, attn_head_dim=config.head_dim, qkv_bias=True,
                              qk_norm=config.qk_norm, norm_layer=nn.LayerNorm)
        self.norm2 = nn.LayerNorm(H, elementwise_affine=False, eps=1e-6)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = build_moe_layer(config)
        else:
            self.mlp = Mlp(in_features=H, hidden_features=int(H * config.mlp_ratio),
                           act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(H, 6 * H, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, signals: dict | None = None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        if self.is_moe:
            out, ro = self.mlp(h, **(signals or {}))
        else:
            out, ro = self.mlp(h), None
        return x + gate_mlp.unsqueeze(1) * out, ro, h


class MoezooDiTMoeFinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + linear to ``patch_size^2 * out_channels`` per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MoezooDiTMoePreTrainedModel(MoezooPreTrainedModel):
    config_class = MoezooDiTMoeConfig
    config: MoezooDiTMoeConfig
    base_model_prefix = "dit"
    main_input_name = "sample"
    _no_split_modules = ["MoezooDiTMoeBlock"]
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # transformers marks parameter-less modules of custom code as initialised without calling _init_weights; the
        # DiT init lives in such parents (adaLN-Zero of a block, label table, timestep MLP). Every init below uses
        # transformers.initialization, which skips parameters loaded from a checkpoint, so no shortcut is needed.
        return super()._initialize_weights(module, False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The official DiT init: xavier-uniform linears (and patch embedding, experts per slice), zero biases,
        N(0, 0.02) label table / timestep MLP / prototypes, kaiming-uniform linear routers, adaLN-Zero."""
        cfg = self.config
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, _ExpertsBase):
            for w in (module.in_proj, module.down_proj):
                out_f = w.shape[1] // 2 if (w is module.in_proj and module.gated) else w.shape[1]
                bound = math.sqrt(6.0 / (out_f + w.shape[2]))
                init.uniform_(w, -bound, bound)
            if module._bias:
                init.zeros_(module.in_proj_bias)
                init.zeros_(module.down_proj_bias)
        elif isinstance(module, PrototypeRouter):
            init.normal_(module.weight, mean=0.0, std=cfg.initializer_range)
        elif isinstance(module, Router):
            for name, p in module.named_parameters(recurse=False):
                if p.dim() == 2:
                    init.kaiming_uniform_(p, a=math.sqrt(5))
                elif name == "bias":
                    init.zeros_(p)
            if getattr(module, "e_score_correction_bias", None) is not None:
                init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, ZeroFlopExperts):
            super()._init_weights(module)
        elif isinstance(module, PatchEmbed):
            w = module.proj.weight
            bound = math.sqrt(6.0 / (w.shape[0] + w[0].numel()))
            init.uniform_(w, -bound, bound)
            if module.proj.bias is not None:
                init.zeros_(module.proj.bias)
        elif isinstance(module, MoezooDiTMoeLabelEmbedder):
            init.normal_(module.embedding_table.weight, mean=0.0, std=cfg.initializer_range)
        elif isinstance(module, MoezooDiTMoeTimestepEmbedder):
            init.normal_(module.mlp[0].weight, mean=0.0, std=cfg.initializer_range)
            init.normal_(module.mlp[2].weight, mean=0.0, std=cfg.initializer_range)
        elif isinstance(module, MoezooDiTMoeBlock) and cfg.adaln_zero_init:
            init.zeros_(module.adaLN_modulation[-1].weight)
            init.zeros_(module.adaLN_modulation[-1].bias)
        elif isinstance(module, MoezooDiTMoeFinalLayer) and cfg.adaln_zero_init:
            init.zeros_(module.adaLN_modulation[-1].weight)
            init.zeros_(module.adaLN_modulation[-1].bias)
            init.zeros_(module.linear.weight)
            init.zeros_(module.linear.bias)
        elif isinstance(module, MoezooDiTMoeModel):
            init.copy_(module.pos_embed, sincos_pos_embed(cfg.hidden_size, cfg.sample_size // cfg.patch_size)[None])


class MoezooDiTMoeModel(MoezooDiTMoePreTrainedModel):
    """The DiT-MoE / ProMoE denoiser: ``forward(sample, timestep, class_labels) -> MoezooDiTMoeOutput``."""

    def __init__(self, config: MoezooDiTMoeConfig):
        super().__init__(config)
        H, p = config.hidden_size, config.patch_size
        self.x_embedder = PatchEmbed(config.sample_size, p, config.in_channels, H, bias=True)
        self.t_embedder = MoezooDiTMoeTimestepEmbedder(H, config.frequency_embedding_size)
        self.y_embedder = MoezooDiTMoeLabelEmbedder(config.num_label_embeddings, H)
        grid = config.sample_size // p
        self.register_buffer("pos_embed", sincos_pos_embed(H, grid)[None], persistent=True)
        self.blocks = nn.ModuleList([MoezooDiTMoeBlock(config, i) for i in range(config.num_hidden_layers)])
        self.final_layer = MoezooDiTMoeFinalLayer(H, p, config.out_channels)
        self.gradient_checkpointing = False
        self.post_init()

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def null_class_id(self) -> int:
        return self.config.null_class_id

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        c, p = self.config.out_channels, self.config.patch_size
        h = w = self.config.sample_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def drop_labels(self, class_labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Label dropout: in training each label becomes the null class with probability ``class_dropout_prob``
        (``torch.rand``); ``force_drop_ids`` (B,) (1 = drop) replaces the random draw (training or not)."""
        cfg = self.config
        if force_drop_ids is not None:
            force = torch.as_tensor(force_drop_ids, device=class_labels.device)
            if force.shape != class_labels.shape:
                raise ValueError(f"force_drop_ids has shape {tuple(force.shape)}, expected {tuple(class_labels.shape)} "
                                 "(one 0/1 flag per sample)")
            drop = force == 1
        elif self.training and cfg.class_dropout_prob > 0:
            drop = torch.rand(class_labels.shape[0], device=class_labels.device) < cfg.class_dropout_prob
        else:
            return class_labels
        if not cfg.use_null_class_embedding:  # (no host read on the usual path: a table with a null row)
            data_check(drop.logical_not().all(), "labels are dropped to the null class but the label table has no "
                       "null row (use_null_class_embedding=False / class_dropout_prob=0)")
        return torch.where(drop, torch.full_like(class_labels, cfg.null_class_id), class_labels)

    def _check_inputs(self, sample, timestep, class_labels):
        cfg = self.config
        if not torch.is_tensor(sample) or sample.dim() != 4:
            raise ValueError(f"sample must be a (batch, {cfg.in_channels}, {cfg.sample_size}, {cfg.sample_size}) "
                             f"tensor, got {tuple(sample.shape) if torch.is_tensor(sample) else type(sample).__name__}")
        B = sample.shape[0]
        if tuple(sample.shape[1:]) != (cfg.in_channels, cfg.sample_size, cfg.sample_size):
            raise ValueError(f"sample has shape {tuple(sample.shape)}, expected (batch, in_channels={cfg.in_channels}, "
                             f"{cfg.sample_size}, {cfg.sample_size})")
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(B)
        if timestep.shape != (B,):
            raise ValueError(f"timestep must be a scalar or have shape (batch={B},), got {tuple(timestep.shape)}")
        if class_labels is None:
            raise ValueError("class_labels (batch,) are required (use null_class_id for unconditional samples)")
        class_labels = torch.as_tensor(class_labels, device=sample.device)
        if class_labels.shape != (B,) or class_labels.is_floating_point():
            raise ValueError(f"class_labels must be integer ids of shape (batch={B},), got "
                             f"{tuple(class_labels.shape)} {class_labels.dtype}")
        n_rows = self.y_embedder.embedding_table.num_embeddings
        if B:  # a host read only in eager CPU runs (data_check: an async assert when compiling / on accelerators)
            data_check(((class_labels >= 0) & (class_labels < n_rows)).all(),
                       lambda: f"class_labels must lie in [0, {n_rows}) (classes 0..{cfg.num_classes - 1}, null class "
                               f"{cfg.null_class_id}), got values in [{int(class_labels.min())}, "
                               f"{int(class_labels.max())}]")
        return timestep, class_labels.long()

    def _router_signals(self, c: torch.Tensor, labels: torch.Tensor, num_tokens: int) -> dict:
        cfg = self.config
        null = labels == cfg.null_class_id
        signals = {}
        if cfg.unconditional_expert:
            signals["uncond_mask"] = null
        if cfg.router_type == "condition":
            signals["condition"] = c
        elif cfg.router_type == "modality":  # two pools: conditional (0) and null-class (1) samples
            signals["modality_ids"] = null.long()[:, None].expand(-1, num_tokens)
        return signals

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor, *,
                force_drop_ids: torch.Tensor | None = None, target: torch.Tensor | None = None,
                output_router_logits: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> MoezooDiTMoeOutput:
        """Denoise ``sample`` (B, C, H, W) at ``timestep`` (B,) (int or float) for ``class_labels`` (B,).

        ``force_drop_ids`` (B,) 0/1 forces label dropout; ``target`` (B, in_channels, H, W) adds the MSE loss on the
        first ``in_channels`` output channels (+ the weighted aux and contrastive losses) as ``loss``.
        """
        cfg = self.config
        if kwargs:
            raise TypeError(f"MoezooDiTMoeModel.forward got unexpected keyword argument(s) {sorted(kwargs)} (inputs: "
                            "sample, timestep, class_labels, force_drop_ids, target (the diffusion regression target), "
                            "output_router_logits, return_dict)")
        output_router_logits = output_router_logits if output_router_logits is not None else cfg.output_router_logits
        timestep, class_labels = self._check_inputs(sample, timestep, class_labels)
        labels = self.drop_labels(class_labels, force_drop_ids)
        x = self.x_embedder(sample) + self.pos_embed.to(sample.dtype)
        c = self.t_embedder(timestep) + self.y_embedder(labels)
        signals = self._router_signals(c, labels, x.shape[1])
        router_outputs, moe_inputs = [], []
        for block in self.blocks:
            x, ro, h = block(x, c, signals)
            if ro is not None:
                router_outputs.append(ro)
                moe_inputs.append((block, h))
        x = self.final_layer(x, c)
        out = self.unpatchify(x)

        aux_loss = rcl = loss = None
        if (self.training or target is not None) and router_outputs:
            aux_loss = self.compute_aux_loss(router_outputs)
            if cfg.routing_contrastive_coef:
                rcl = cfg.routing_contrastive_coef * self.routing_contrastive_loss(moe_inputs, router_outputs)
        if target is not None:
            if tuple(target.shape) != (out.shape[0], cfg.in_channels, *out.shape[2:]):
                raise ValueError(f"target has shape {tuple(target.shape)}, expected "
                                 f"{(out.shape[0], cfg.in_channels, *out.shape[2:])}")
            loss = F.mse_loss(out[:, :cfg.in_channels].float(), target.float())
            if aux_loss is not None:
                loss = loss + aux_loss
            if rcl is not None:
                loss = loss + rcl
        result = MoezooDiTMoeOutput(
            loss=loss, sample=out, aux_loss=aux_loss, routing_contrastive_loss=rcl,
            router_logits=tuple(ro.logits for ro in router_outputs) if output_router_logits else None,
            router_outputs=tuple(router_outputs), class_labels=labels)
        return result if return_dict is not False else result.to_tuple()

    @staticmethod
    def routed_output(ro: RouterOutput) -> RouterOutput:
        """The router's own decision (without the unconditional expert) of a layer's output."""
        return ro.extras.get("routed_output", ro)

    def aux_loss_options(self) -> dict:
        """DiT-MoE / ProMoE: the balance loss summed over layers with the config's ``balance_loss_normalize``, over the
        routed tokens and experts only (tokens sent to the unconditional expert are left out, as in ProMoE)."""
        return dict(per_layer_balance=True, normalize=self.config.balance_loss_normalize, select=self.routed_output)

    def routing_contrastive_loss(self, moe_inputs, router_outputs) -> torch.Tensor:
        """Sum over MoE layers of ProMoE's routing contrastive loss (unweighted; prototypes = the router's weight)."""
        cfg = self.config
        total = None
        for (block, h), ro in zip(moe_inputs, router_outputs):
            base = self.routed_output(ro)
            # the prototypes the router used in this forward (a peft adapter on gate.weight applies only inside it)
            protos = base.extras.get("prototypes", getattr(block.mlp.gate, "weight", None))
            E = block.mlp.num_experts
            if not torch.is_tensor(protos) or protos.dim() != 2 or protos.shape[-1] != cfg.hidden_size:
                raise ValueError(f"routing_contrastive_coef > 0 needs a router with (experts, hidden) weights "
                                 f"(prototypes); router_type={cfg.router_type!r} has none")
            x = h.reshape(-1, h.shape[-1])
            if "routed_token_index" in ro.extras:
                x = x.index_select(0, ro.extras["routed_token_index"])
            loss = routing_contrastive_loss(protos[:E], x, base.indices, temperature=cfg.routing_contrastive_tau,
                                            use_top_k=cfg.routing_contrastive_top_k,
                                            token_mask=base.extras.get("token_mask"))
            total = loss if total is None else total + loss
        return total

    def forward_with_cfg(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                         guidance_scale: float, cfg_channels: int | None = None, *, return_dict: bool = True,
                         **kwargs):
        """Classifier-free guidance in one batched call (the official API).

        ``sample`` (2N, ...) holds [cond; uncond] halves of which only the first half is used (duplicated);
        ``class_labels`` (2N,) are the real labels then the null class. The first ``cfg_channels`` output channels
        (default ``config.cfg_channels``, None = all ``in_channels``; the official code guides 3) become
        ``uncond + guidance_scale * (cond - uncond)`` in both halves; the other channels pass through.
        Returns a :class:`MoezooDiTMoeOutput` whose ``sample`` is the guided (2N, out_channels, H, W) tensor
        (``return_dict=False``: the tensor).
        """
        n = sample.shape[0]
        if n % 2:
            raise ValueError(f"forward_with_cfg needs an even batch ([cond; uncond] halves), got {n}")
        cc = cfg_channels if cfg_channels is not None else self.config.cfg_channels
        half = sample[: n // 2]
        out = self.forward(torch.cat([half, half], dim=0), timestep, class_labels, return_dict=True, **kwargs)
        guided, cc = classifier_free_guidance(out.sample, guidance_scale, cc, self.config.in_channels)
        result = torch.cat([torch.cat([guided, guided], dim=0), out.sample[:, cc:]], dim=1)
        if not return_dict:
            return result
        out.sample = result
        return out

    def example_inputs(self, batch_size: int = 2, seq_len: int | None = None, labels: bool = True,
                       generator: torch.Generator | None = None) -> dict:
        """Random ``sample`` / ``timestep`` / ``class_labels`` (+ ``target`` with ``labels=True``); with a null row in
        the table and ``batch_size >= 2`` the last sample is unconditional (exercises the unconditional expert)."""
        cfg = self.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        inputs = {
            "sample": torch.randn(shape, generator=generator),
            "timestep": torch.randint(0, 1000, (batch_size,), generator=generator).float(),
            "class_labels": torch.randint(0, cfg.num_classes, (batch_size,), generator=generator),
        }
        if cfg.use_null_class_embedding and batch_size >= 2:
            inputs["class_labels"][-1] = cfg.null_class_id
        if labels:
            inputs["target"] = torch.randn(shape, generator=generator)
        return inputs


__all__ = ["classifier_free_guidance", "MoezooDiTMoeModel", "MoezooDiTMoePreTrainedModel", "MoezooDiTMoeOutput", "MoezooDiTMoeBlock",
           "sincos_pos_embed", "modulate"]
