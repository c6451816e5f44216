"""``deweather``: MoWE-layout image-restoration transformers with MoFME (FME) or conventional FFN experts.

conv head -> patch embedding -> N x [pre-norm attention, MoE FFN] -> Linear + un-patchify -> conv tail -> sigmoid.
The MoE FFN is :class:`moezoo.core.FMEMoELayer` (``expert_type="fme"``: shared basenet + FiLM experts + adaptor; the
router sees the un-normalised residual stream, as in MoFME) or :class:`moezoo.core.MoELayer` with GELU FFN experts
on a pre-LayerNorm (``expert_type="ffn"``, the conventional MoE counterpart of the paper).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from ...core.fme import FMEExperts, FMEMoELayer
from ...core.layer import MoELayer, build_moe_layer
from ...core import RouterOutput
from ...modeling_utils import MoezooPreTrainedModel
from .configuration_deweather import MoezooDeweatherConfig


@dataclass
class MoezooDeweatherModelOutput(ModelOutput):
    """Encoder output.

    Attributes:
        last_hidden_state: (B, N, H) tokens after the last transformer layer (N = (H_img / p) * (W_img / p)).
        hidden_states: patch embeddings + each layer's output (when ``output_hidden_states``).
        router_logits: one (B*N, E) tensor per MoE layer (when ``output_router_logits``).
        routing_weights: one (B, N, E) dense combine-weight tensor per MoE layer (0 for unselected experts).
        router_outputs: the full :class:`moezoo.core.RouterOutput` of every MoE layer.
        head_features: (B, head_channels, H, W) conv-head features (only with the config's ``tail_skip``).
        global_context: (B, global_context_size) image-level features (only with the config's ``global_context``).
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    routing_weights: tuple[torch.FloatTensor, ...] | None = None
    router_outputs: tuple[RouterOutput, ...] | None = None
    head_features: torch.FloatTensor | None = None
    global_context: torch.FloatTensor | None = None


@dataclass
class MoezooDeweatherRestorationOutput(ModelOutput):
    """Restoration output.

    Attributes:
        loss: L1(reconstruction, labels) + ``aux_loss`` (only when ``labels`` are given).
        aux_loss: ``router_aux_loss_coef * switch balance (+ z-loss)`` over the MoE layers.
        reconstruction: (B, out_channels, H, W) restored image (per the config's ``output_mode``).
        router_logits, routing_weights, router_outputs, hidden_states: as in :class:`MoezooDeweatherModelOutput`.
    """

    loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    routing_weights: tuple[torch.FloatTensor, ...] | None = None
    router_outputs: tuple[RouterOutput, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


class ResBlock(nn.Module):
    """EDSR residual block ``x + conv(relu(conv(x)))`` (``body.0``, ``body.2``)."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.body = nn.Sequential(_conv(channels, channels, kernel_size), nn.ReLU(), _conv(channels, channels, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


class PatchEmbed(nn.Module):
    """Conv2d(k = stride = patch) + LayerNorm: (B, C, H, W) -> (B, H/p * W/p, D)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int, eps: float = 1e-5):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class GlobalContext(nn.Module):
    """Image-level features: per-channel mean and std of (B, C, H, W) over H, W -> Linear -> GELU: (B, size); and their
    projection to the token width (``to_tokens``, zero-initialised: adding it changes nothing before training)."""

    def __init__(self, channels: int, size: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(2 * channels, size)
        self.act = nn.GELU()
        self.to_tokens = nn.Linear(size, hidden_size)
        self.to_tokens._moezoo_zero_init = True

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        flat = feats.flatten(2)
        return self.act(self.proj(torch.cat([flat.mean(-1), flat.std(-1, unbiased=False)], dim=-1)))


class DeweatherAttention(nn.Module):
    """Multi-head self-attention without positions: ``qkv_proj`` (no bias, inner = heads * head_dim), ``o_proj``."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(hidden_size, 3 * inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)
        return self.dropout(self.o_proj(out.transpose(1, 2).reshape(B, N, -1)))


class DeweatherTransformerBlock(nn.Module):
    """``x = x + attn(LN x)``; then ``x = x + FME(x)`` (fme) or ``x = x + MoE(LN x)`` (ffn).  Returns (x, RouterOutput).

    Built from explicit keyword arguments (``init_kwargs``), so parity references can rebuild a lone block.
    """

    def __init__(self, *, hidden_size: int, num_heads: int, head_dim: int, num_experts: int,
                 num_experts_per_tok: int, intermediate_size: int, expert_type: str = "fme",
                 fme_intermediate_size: int | None = None, fme_implementation: str = "sparse",
                 official_expert_offset: bool = False, router_type: str = "topk", router_kwargs: dict | None = None,
                 hidden_act: str = "gelu", dropout: float = 0.0, layer_norm_eps: float = 1e-5,
                 moe_layer: dict | None = None, experts_config=None):
        super().__init__()
        self.init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "experts_config", "__class__")}
        self.expert_type = expert_type
        self.attn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.attn = DeweatherAttention(hidden_size, num_heads, head_dim, dropout)
        moe_layer = dict(moe_layer or {})
        if expert_type == "fme":
            unsupported = sorted(k for k, v in moe_layer.items() if v not in (None, 0, False, "probs"))
            if unsupported:
                raise ValueError(f"expert_type='fme' (MoFME) does not support {unsupported}; use expert_type='ffn' "
                                 "for shared experts or capacity mode")
            self.mlp_norm = None
            self.mlp = FMEMoELayer(hidden_size=hidden_size, num_experts=num_experts,
                                   num_experts_per_tok=num_experts_per_tok, fme_intermediate_size=fme_intermediate_size,
                                   adaptor_size=intermediate_size, hidden_act=hidden_act, norm_eps=layer_norm_eps,
                                   dropout=dropout, official_expert_offset=official_expert_offset,
                                   router_type=router_type, router_kwargs=router_kwargs,
                                   implementation=fme_implementation)
        elif expert_type == "ffn":
            self.mlp_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
            self.mlp = build_moe_layer(hidden_size=hidden_size, num_experts=num_experts,
                                       num_experts_per_tok=num_experts_per_tok, moe_intermediate_size=intermediate_size,
                                       hidden_act=hidden_act, expert_bias=True, gated_experts=False,
                                       router_type=router_type, router_kwargs=router_kwargs,
                                       experts_config=experts_config, **moe_layer)
        else:
            raise ValueError(f"expert_type must be 'fme' or 'ffn', got {expert_type!r}")

    def forward(self, x: torch.Tensor, **signals) -> tuple[torch.Tensor, RouterOutput]:
        x = x + self.attn(self.attn_norm(x))
        h, ro = self.mlp(x if self.mlp_norm is None else self.mlp_norm(x), **signals)
        return x + h, ro


def block_kwargs(config: MoezooDeweatherConfig) -> dict:
    """:class:`DeweatherTransformerBlock` keyword arguments of ``config``."""
    return dict(hidden_size=config.hidden_size, num_heads=config.num_attention_heads, head_dim=config.head_dim,
                num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                intermediate_size=config.intermediate_size, expert_type=config.expert_type,
                fme_intermediate_size=config.fme_intermediate_size, fme_implementation=config.fme_implementation,
                official_expert_offset=config.official_expert_offset, router_type=config.router_type,
                router_kwargs=config.router_layer_kwargs(), hidden_act=config.hidden_act, dropout=config.dropout,
                layer_norm_eps=config.layer_norm_eps,
                moe_layer={name: getattr(config, name) for name in BLOCK_MOE_LAYER_FIELDS})


# MoELayerConfig fields of the block's MoE layer taken from the config as they are (the others are block arguments)
BLOCK_MOE_LAYER_FIELDS = ("num_shared_experts", "shared_intermediate_size", "shared_expert_gate", "capacity_factor",
                          "drop_policy")


class MoezooDeweatherPreTrainedModel(MoezooPreTrainedModel):
    config_class = MoezooDeweatherConfig
    config: MoezooDeweatherConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    _no_split_modules = ["DeweatherTransformerBlock"]
    supports_gradient_checkpointing = False  # blocks return RouterOutputs whose weights feed the aux loss
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False

    def moe_layers(self) -> list[tuple[str, nn.Module]]:
        """(qualified name, module) of every MoE layer (:class:`MoELayer` or :class:`FMEMoELayer`), in order."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, (MoELayer, FMEMoELayer))]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = getattr(self.config, "initializer_range", 0.02) or 0.02
        if isinstance(module, FMEExperts):  # near-identity FiLM (scale ~ 1, shift ~ 0)
            init.normal_(module.film_proj, mean=0.0, std=std)
            if not getattr(module.film_proj_bias, "_is_hf_initialized", False):
                module.film_proj_bias[:, : module.hidden_dim].fill_(1.0)
                module.film_proj_bias[:, module.hidden_dim:].zero_()
        elif isinstance(module, nn.Linear) and getattr(module, "_moezoo_zero_init", False):
            if not getattr(module.weight, "_is_hf_initialized", False):  # global-context outputs start at zero
                init.zeros_(module.weight)
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):  # PyTorch's default conv init keeps the conv head/tail signal alive
            if not getattr(module.weight, "_is_hf_initialized", False):
                if getattr(module, "_moezoo_near_zero_init", False):  # residual output: tail starts near 0
                    init.normal_(module.weight, mean=0.0, std=1e-3)
                    if module.bias is not None:
                        init.zeros_(module.bias)
                else:
                    module.reset_parameters()

    def example_inputs(self, batch_size: int = 2, seq_len: int | None = None, labels: bool = True,
                       generator: torch.Generator | None = None) -> dict:
        """Random ``pixel_values`` in [0, 1] of the config's ``image_size`` (+ clean ``labels``)."""
        H, W = self.config.image_hw
        x = torch.rand(batch_size, self.config.in_channels, H, W, generator=generator)
        if not labels:
            return {"pixel_values": x}
        return {"pixel_values": x, "labels": torch.rand(batch_size, self.config.out_channels, H, W, generator=generator)}


class MoezooDeweatherModel(MoezooDeweatherPreTrainedModel):
    """Conv head + patch embedding + MoE transformer (the encoder; no restoration tail)."""

    def __init__(self, config: MoezooDeweatherConfig):
        super().__init__(config)
        C, k = config.head_channels, config.kernel_size
        self.head = nn.Sequential(_conv(config.in_channels, C, k), *[ResBlock(C, k) for _ in range(config.num_head_resblocks)])
        self.patch_embed = PatchEmbed(C, config.hidden_size, config.patch_size, config.layer_norm_eps)
        self.embed_dropout = nn.Dropout(config.embed_dropout)
        self.global_context = (GlobalContext(C, config.global_context_size, config.hidden_size)
                               if config.global_context else None)
        kwargs = block_kwargs(config)
        self.layers = nn.ModuleList([DeweatherTransformerBlock(**kwargs, experts_config=config)
                                     for _ in range(config.num_hidden_layers)])
        self.post_init()

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.in_channels:
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must have shape (batch, in_channels={self.config.in_channels}, height, "
                             f"width), got {shape}")
        p = self.config.patch_size
        if pixel_values.shape[-2] % p or pixel_values.shape[-1] % p:
            raise ValueError(f"pixel_values height and width {tuple(pixel_values.shape[-2:])} must be divisible by "
                             f"patch_size={p} (pad or crop the image)")

    def forward(self, pixel_values: torch.Tensor, output_router_logits: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **signals) -> MoezooDeweatherModelOutput:
        self.check_pixel_values(pixel_values)
        output_router_logits = (output_router_logits if output_router_logits is not None
                                else self.config.output_router_logits)
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        feats = self.head(pixel_values)
        x = self.embed_dropout(self.patch_embed(feats))
        g = None
        if self.global_context is not None:  # image-level context for every token (routers included)
            g = self.global_context(feats)
            x = x + self.global_context.to_tokens(g)[:, None]
        B, N, _ = x.shape
        all_hidden = (x,) if output_hidden_states else None
        router_outputs = []
        for layer in self.layers:
            x, ro = layer(x, **signals)
            router_outputs.append(ro)
            if output_hidden_states:
                all_hidden += (x,)
        result = MoezooDeweatherModelOutput(
            last_hidden_state=x, hidden_states=all_hidden,
            router_logits=tuple(ro.logits for ro in router_outputs) if output_router_logits else None,
            routing_weights=tuple(ro.combine_weights()[:, : layer.mlp.num_experts].reshape(B, N, -1)
                                  for ro, layer in zip(router_outputs, self.layers)),
            router_outputs=tuple(router_outputs), head_features=feats if self.config.tail_skip else None,
            global_context=g)
        return result if return_dict is not False else result.to_tuple()


class MoezooDeweatherForImageRestoration(MoezooDeweatherPreTrainedModel):
    """:class:`MoezooDeweatherModel` + token-to-image projection + conv tail; L1 loss (+ aux) with clean ``labels``."""

    def __init__(self, config: MoezooDeweatherConfig):
        super().__init__(config)
        self.model = MoezooDeweatherModel(config)
        p, ch, k = config.patch_size, config.head_channels * config.out_ch_scale, config.kernel_size
        half = max(ch // 2, 1)
        self.tail_proj = nn.Linear(config.hidden_size, ch * p * p)
        self.tail = nn.Sequential(ResBlock(ch, k), _conv(ch, half, k), ResBlock(half, k), _conv(half, config.out_channels, k))
        # full-resolution path around the transformer (see the config's tail_skip)
        self.tail_skip = nn.Conv2d(config.head_channels, ch, 1) if config.tail_skip else None
        if config.output_mode == "residual":  # start near the identity map (see the config's output_mode)
            self.tail[-1]._moezoo_near_zero_init = True
        # per-image affine map of the input from the global context (see the config's global_context)
        self.global_affine = None
        if config.global_context and config.output_mode == "residual":
            self.global_affine = nn.Linear(config.global_context_size, 2 * config.out_channels)
            self.global_affine._moezoo_zero_init = True
        self.post_init()

    def unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, h*w, p*p*c) -> (B, c, h*p, w*p) (``b (h w) (p1 p2 c) -> b c (h p1) (w p2)``)."""
        B, _, D = tokens.shape
        p = self.config.patch_size
        h, w, c = height // p, width // p, D // (p * p)
        return tokens.view(B, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, h * p, w * p)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                output_router_logits: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **signals) -> MoezooDeweatherRestorationOutput:
        """Restore ``pixel_values`` (B, in_channels, H, W) in [0, 1]; ``labels`` = the clean image (B, out_channels, H, W)."""
        output_router_logits = (output_router_logits if output_router_logits is not None
                                else self.config.output_router_logits)
        out = self.model(pixel_values, output_router_logits=output_router_logits,
                         output_hidden_states=output_hidden_states, **signals)
        H, W = pixel_values.shape[-2:]
        t = self.unpatchify(self.tail_proj(out.last_hidden_state), H, W)
        if self.tail_skip is not None:
            t = t + self.tail_skip(out.head_features)
        pre = self.tail(t)
        mode = self.config.output_mode
        if mode == "residual":
            base = pixel_values.to(pre.dtype)
            if self.global_affine is not None:  # input * (1 + a) + b, per image and channel
                a, b = self.global_affine(out.global_context).to(pre.dtype)[:, :, None, None].chunk(2, dim=1)
                base = base * (1.0 + a) + b
            recon = base + pre
            if not self.training:
                recon = recon.clamp(0.0, 1.0)
        else:
            recon = torch.sigmoid(pre)
            if mode == "sigmoid_residual":
                recon = recon + pixel_values
        loss = aux_loss = None
        if labels is not None or output_router_logits:
            aux_loss = self.compute_aux_loss(list(out.router_outputs))
        if labels is not None:
            if not torch.is_tensor(labels) or labels.shape != recon.shape:
                shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
                raise ValueError(f"labels (the clean image) must have shape {tuple(recon.shape)}, got {shape}")
            loss = F.l1_loss(recon, labels.to(recon.dtype))
            if aux_loss is not None:
                loss = loss + aux_loss.to(loss.dtype)
        result = MoezooDeweatherRestorationOutput(loss=loss, aux_loss=aux_loss, reconstruction=recon,
                                                  router_logits=out.router_logits, routing_weights=out.routing_weights,
                                                  router_outputs=out.router_outputs, hidden_states=out.hidden_states)
        return result if return_dict is not False else result.to_tuple()


__all__ = ["MoezooDeweatherModel", "MoezooDeweatherForImageRestoration", "MoezooDeweatherPreTrainedModel",
           "MoezooDeweatherModelOutput", "MoezooDeweatherRestorationOutput", "DeweatherTransformerBlock",
           "DeweatherAttention", "GlobalContext", "PatchEmbed", "ResBlock", "block_kwargs"]
