"""Configuration of ``deweather``: MoFME / MoWE multi-weather restoration transformers."""
from __future__ import annotations

from ...core.fme import FME_IMPLEMENTATIONS
from ...core.parallel import base_model_ep_plan
from ...modeling_utils import MoezooConfig

EXPERT_TYPES = ("fme", "ffn")


OUTPUT_MODES = ("sigmoid", "sigmoid_residual", "residual")


class MoezooDeweatherConfig(MoezooConfig):
    """An image-restoration transformer whose FFNs are MoE layers (MoWE layout, MoFME experts).

    ``pixel_values`` (B, in_channels, H, W) -> conv head (conv + ``num_head_resblocks`` ResBlocks, ``head_channels``)
    -> patch embedding (conv k = stride = ``patch_size`` + LayerNorm; no position embedding, as the official forward)
    -> ``num_hidden_layers`` x [pre-norm attention + residual, MoE FFN + residual] -> Linear to
    ``head_channels * out_ch_scale * patch_size**2`` per token, un-patchified -> tail (ResBlock, conv to half, ResBlock,
    conv to ``out_channels``) -> sigmoid [+ input when ``residual_learning``].  Any H, W divisible by ``patch_size``.

    Args (besides the MoE fields of :class:`moezoo.MoezooConfig`):
        image_size: default (training / example) image size, int or [H, W].
        in_channels, out_channels: image channels in / out.
        patch_size, hidden_size, num_hidden_layers, num_attention_heads, head_dim: the transformer
            (attention inner width = heads * head_dim, may differ from hidden_size, as the official).
        mlp_ratio / intermediate_size: FME adaptor width and the conventional experts' width
            (``intermediate_size`` wins; default ``int(hidden_size * mlp_ratio)``); ``moe_intermediate_size`` follows it.
        expert_type: ``"fme"`` (MoFME: shared basenet + FiLM experts, :class:`moezoo.core.FMEMoELayer`) or ``"ffn"``
            (conventional MoE: E GELU FFN experts with biases, :class:`moezoo.core.MoELayer` on a pre-LayerNorm).
        fme_intermediate_size: FME basenet / FiLM width (default ``hidden_size``, as official).
        fme_implementation: ``"sparse"`` (default) or ``"dense"`` FiLM evaluation.
        official_expert_offset: the official off-by-one expert mapping (slot 0 = GELU(y), slot i = expert i-1).
        router_type: ``"topk"`` (official KeepTopK + softmax = softmax over the top-k logits, router with bias),
            ``"uncertainty"`` (:class:`moezoo.core.UncertaintyRouter`) or any core router; ``router_kwargs`` extra args.
        residual_learning: add the input image to the sigmoid output (official default True; their training
            script disables it -> default False here). Kept for converted checkpoints; ``output_mode`` says it all.
        output_mode: how the tail output ``t`` becomes the image: ``"sigmoid"`` (``sigmoid(t)``, official),
            ``"sigmoid_residual"`` (``sigmoid(t) + input``, official ``residual_learning=True``, range [0, 2]) or
            ``"residual"`` (``input + t``; the tail's last conv starts near zero (std 1e-3), so an untrained model is
            almost the identity and training starts at the degraded input's PSNR; clamped to [0, 1] in eval mode).
            ``None`` (default) = ``"sigmoid_residual"`` if ``residual_learning`` else ``"sigmoid"``. The registered
            models use ``"residual"``; converted official checkpoints keep the official mode.
        head_channels, num_head_resblocks, out_ch_scale, kernel_size: conv head / tail (official ``out_ch``,
            2 ResBlocks, ``out_ch_scale``, 3).
        tail_skip: add the conv head's full-resolution features (1x1 conv to the tail width) to the un-patchified
            tokens before the tail (default False = the official layout, whose only path from the head to the tail
            goes through one ``hidden_size`` token per patch; a tiny model with ``hidden_size`` < 3 * patch_size**2
            cannot carry a per-pixel correction through it).
        global_context: an image-level branch (default False = the official layout). The mean and standard deviation
            of the conv-head features over the whole image go through a small MLP (``global_context_size`` wide, GELU);
            its output is added to every token before the transformer (so routers and experts see the image's
            degradation, not only their patch), and, with ``output_mode="residual"``, a per-image, per-channel affine
            map of the input is predicted from it: ``input * (1 + a) + b + t`` (fog / haze is about
            ``I = J t + A (1 - t)``, a per-image affine change that a patch cannot estimate). Both projections start
            at zero, so the untrained model is still the identity.
        dropout: attention-output and adaptor/expert dropout (official 0.1); embed_dropout after the patch embedding.
        layer_norm_eps: eps of every LayerNorm.
    """

    model_type = "moezoo_deweather"

    @property
    def base_model_ep_plan(self) -> dict[str, str] | None:
        """transformers' expert-parallel plan (``expert_type="ffn"``: GELU experts ``up_proj`` with biases); MoFME's
        FiLM experts (``"fme"``) share one basenet and are not sharded over experts."""
        return base_model_ep_plan("layers.*.mlp", gated=False, bias=True) if self.expert_type == "ffn" else None

    image_size: int | list[int] = 64
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int = 8
    hidden_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    head_dim: int = 64
    mlp_ratio: float = 4.0
    intermediate_size: int | None = None
    moe_intermediate_size: int | None = None
    expert_type: str = "fme"
    fme_intermediate_size: int | None = None
    fme_implementation: str = "sparse"
    official_expert_offset: bool = False
    num_experts: int = 4
    num_experts_per_tok: int = 2
    router_type: str = "topk"
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    hidden_act: str = "gelu"
    residual_learning: bool = False
    output_mode: str | None = None
    head_channels: int = 32
    num_head_resblocks: int = 2
    out_ch_scale: int = 4
    kernel_size: int = 3
    tail_skip: bool = False
    global_context: bool = False
    global_context_size: int = 64
    dropout: float = 0.0
    embed_dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self, **kwargs):
        for name in ("in_channels", "out_channels", "patch_size", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "head_dim", "head_channels", "out_ch_scale", "kernel_size",
                     "global_context_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.num_head_resblocks, int) or self.num_head_resblocks < 0:
            raise ValueError(f"num_head_resblocks must be a non-negative int, got {self.num_head_resblocks!r}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {self.kernel_size}")
        size = self.image_size
        sizes = [size, size] if isinstance(size, int) and not isinstance(size, bool) else list(size or [])
        if len(sizes) != 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(f"image_size must be a positive int or [height, width], got {size!r}")
        if any(s % self.patch_size for s in sizes):
            raise ValueError(f"image_size={size} must be divisible by patch_size={self.patch_size}")
        if self.expert_type not in EXPERT_TYPES:
            raise ValueError(f"expert_type must be one of {EXPERT_TYPES}, got {self.expert_type!r}")
        if self.fme_implementation not in FME_IMPLEMENTATIONS:
            raise ValueError(f"fme_implementation must be one of {FME_IMPLEMENTATIONS}, got {self.fme_implementation!r}")
        if self.output_mode is None:
            self.output_mode = "sigmoid_residual" if self.residual_learning else "sigmoid"
        if self.output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES} or None, got {self.output_mode!r}")
        self.residual_learning = self.output_mode == "sigmoid_residual"
        if self.output_mode != "sigmoid" and self.in_channels != self.out_channels:
            raise ValueError(f"output_mode={self.output_mode!r} adds the input image: in_channels={self.in_channels} must equal "
                             f"out_channels={self.out_channels}")
        if self.intermediate_size is None:
            if not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
                raise ValueError(f"mlp_ratio must be a number > 0, got {self.mlp_ratio!r}")
            self.intermediate_size = int(self.hidden_size * self.mlp_ratio)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.fme_intermediate_size is None:
            self.fme_intermediate_size = self.hidden_size
        for name in ("intermediate_size", "fme_intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("dropout", "embed_dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        super().__post_init__(**kwargs)

    @property
    def image_hw(self) -> tuple[int, int]:
        s = self.image_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    def router_layer_kwargs(self) -> dict:
        """Router kwargs of the MoE layers: MoFME's KeepTopK-softmax with bias for ``"topk"``, else as given."""
        kwargs = dict(self.router_kwargs or {})
        if self.router_type == "topk":
            kwargs.setdefault("softmax_after_topk", True)
            kwargs.setdefault("bias", True)
            kwargs.setdefault("norm_topk_prob", self.norm_topk_prob)
        return kwargs


__all__ = ["MoezooDeweatherConfig", "EXPERT_TYPES", "OUTPUT_MODES"]
