"""Configuration of ``vl_moe``: a LLaVA-layout vision-language model whose language-model FFNs are upcycled into MoE
layers by the core (MoE-LLaVA, MoIIE)."""
from __future__ import annotations

import re

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from ...modeling_utils import MoezooConfig

MOE_MODES = ("sparse", "dense", "first_half", "second_half", "none")
PROJECTOR_RE = re.compile(r"^(linear|mlp(\d+)x_gelu)$")
TEXT, IMAGE = 0, 1  # modality ids routed by the MoIIE router


def moe_layer_indices(mode: str, num_layers: int, explicit=None) -> list[int]:
    """Decoder layers that become MoE layers. MoE-LLaVA's ``moe_mode``: ``sparse`` = every other layer starting at 0
    (``range(n)[::2]``), ``dense`` = every layer, ``first_half`` / ``second_half``; ``none`` = a dense model
    (stages 1-2 of MoE-tuning). ``explicit`` (a list of indices) overrides the mode."""
    if explicit is not None:
        bad = [i for i in explicit if not isinstance(i, int) or not 0 <= i < num_layers]
        if bad or not explicit:
            raise ValueError(f"moe_layers_idx must be a non-empty list of layer indices in [0, {num_layers}), got {explicit!r}")
        return sorted(set(explicit))
    if mode == "sparse":
        return list(range(num_layers))[::2]
    if mode == "dense":
        return list(range(num_layers))
    if mode == "first_half":
        return list(range(num_layers // 2))
    if mode == "second_half":
        return list(range(num_layers // 2, num_layers))
    if mode == "none":
        return []
    raise ValueError(f"moe_mode must be one of {MOE_MODES}, got {mode!r}")


def moiie_expert_pools(num_experts: int, num_intra_experts: int) -> list[list[int]]:
    """MoIIE pools ``[text pool, image pool]``: image-only experts ``[0, n)``, inter-modality experts ``[n, E - n)``
    shared by both, text-only experts ``[E - n, E)`` (E=4, n=1: image [0, 1, 2], text [1, 2, 3], as in the official
    ``phi3_moe_mm_s``)."""
    n = num_intra_experts
    if not isinstance(n, int) or n < 0 or 2 * n > num_experts:
        raise ValueError(f"moiie_num_intra_experts must be an int in [0, num_experts/2={num_experts // 2}], got {n!r}")
    return [list(range(n, num_experts)), list(range(num_experts - n))]


class MoezooVlMoeConfig(MoezooConfig):
    """Vision tower + projector + causal LM with MoE FFNs (LLaVA layout).

    Args (besides the MoE fields of :class:`moezoo.MoezooConfig`, which configure every upcycled layer):
        text_config: any transformers causal-LM config (Llama, Qwen2, Phi-3, StableLM, Gemma, ...); its dense MLPs of
            the layers picked by ``moe_mode`` / ``moe_layers_idx`` are turned into MoE layers by
            :func:`moezoo.core.upcycle.upcycle_model` (gated ``gate_proj``/``up_proj``/``down_proj``, fused
            ``gate_up_proj`` or plain ``fc1``/``fc2`` MLPs).
        vision_tower: a timm model name (built with ``pretrained=False, num_classes=0`` and ``vision_tower_kwargs``),
            used when ``vision_config`` is None.
        vision_config: a transformers vision config (``clip_vision_model``, ``siglip_vision_model``) instead of timm.
        vision_feature_layer: hidden-state index of a transformers tower (LLaVA: -2); timm towers use
            ``forward_features``.
        vision_feature_select_strategy: ``"default"`` drops the tower's prefix (CLS) tokens, ``"full"`` keeps them.
        image_size, num_channels: expected image shape (None: read from the tower).
        image_seq_length: image tokens per image (None: measured from the tower at model init).
        projector_type: ``"linear"`` or ``"mlp<N>x_gelu"`` (LLaVA-1.5: ``mlp2x_gelu``).
        image_token_id: the placeholder id of one image feature in ``input_ids``.
        moe_mode, moe_layers_idx: which LM layers are MoE (see :func:`moe_layer_indices`).
        moiie_num_intra_experts: with ``router_type="modality"`` and no ``expert_pools`` in ``router_kwargs``: the
            number of image-only and of text-only experts; the rest form the shared inter-modality pool.
        moiie_next_token_vision_mask: MoIIE's official quirk (the last token of an image run is routed as text).
        router_init_std, expert_noise_std, shared_expert_fraction: upcycling options (see ``upcycle_mlp``).

    Routing: ``router_type="top2_capacity"`` is MoE-LLaVA (DeepSpeed top-2 with capacity factor and token dropping;
    ``router_kwargs`` defaults ``capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=0``, deterministic
    second expert unless ``second_expert_sampling=True``); ``router_type="modality"`` is MoIIE; any other core router
    name works as well.
    """

    model_type = "moezoo_vl_moe"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model", optional=True),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    vision_tower: str | None = "vit_tiny_patch16_224"
    vision_tower_kwargs: dict | None = None
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    image_size: int | None = None
    num_channels: int | None = None
    image_seq_length: int | None = None
    projector_type: str = "mlp2x_gelu"
    image_token_id: int | None = None
    moe_mode: str = "sparse"
    moe_layers_idx: list | None = None
    moiie_num_intra_experts: int = 1
    moiie_next_token_vision_mask: bool = False
    router_init_std: float | None = None
    expert_noise_std: float = 0.0
    shared_expert_fraction: float = 0.5
    router_z_loss_coef: float = 0.0
    tie_word_embeddings: bool = False
    hidden_size: int | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        # the text config decides the hidden size; the expert width defaults to the dense MLP's (set by upcycling)
        if self.sub_configs_defaults:
            for key, spec in self.sub_configs_defaults.items():
                sub = getattr(self, key)
                if sub is None and spec.optional:
                    continue
                sub, kwargs = spec.create_subconfig(key, sub, **kwargs)
                setattr(self, key, sub)
        tc = self.text_config
        self.hidden_size = int(tc.hidden_size)
        inter = getattr(tc, "intermediate_size", None)
        if isinstance(inter, int) and inter > 0:
            self.moe_intermediate_size = inter
        if self.vision_config is None and not self.vision_tower:
            raise ValueError("set vision_tower (a timm model name) or vision_config (a CLIP / SigLIP vision config)")
        if self.vision_config is not None and not hasattr(self.vision_config, "image_size"):
            raise ValueError(f"vision_config of type {self.vision_config.model_type!r} has no image_size; "
                             "expected a CLIP / SigLIP-style vision config")
        if not PROJECTOR_RE.match(str(self.projector_type)):
            raise ValueError(f"projector_type must be 'linear' or 'mlp<N>x_gelu' (e.g. 'mlp2x_gelu'), got {self.projector_type!r}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {self.vision_feature_select_strategy!r}")
        if self.moe_mode not in MOE_MODES:
            raise ValueError(f"moe_mode must be one of {MOE_MODES}, got {self.moe_mode!r}")
        moe_layer_indices(self.moe_mode, tc.num_hidden_layers, self.moe_layers_idx)
        if self.image_token_id is None:
            self.image_token_id = int(tc.vocab_size) - 1
        if not 0 <= int(self.image_token_id) < int(tc.vocab_size):
            raise ValueError(f"image_token_id={self.image_token_id} must be a token id of the language model "
                             f"(vocab_size={tc.vocab_size})")
        if getattr(tc, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(self, name, None) is None and getattr(tc, name, None) is not None:
                setattr(self, name, getattr(tc, name))
        self.apply_routing_defaults()
        MoezooConfig.__post_init__(self, **kwargs)


    def apply_routing_defaults(self) -> None:
        """Fill ``router_kwargs`` for the MoE-LLaVA (``top2_capacity``) and MoIIE (``modality``) routers."""
        if self.router_type == "top2_capacity":
            rk = dict(self.router_kwargs or {})
            rk.setdefault("capacity_factor", 1.5)
            rk.setdefault("eval_capacity_factor", 2.0)
            rk.setdefault("min_capacity", 0)
            self.router_kwargs = rk
            if self.num_experts_per_tok != 2:
                raise ValueError(f"router_type='top2_capacity' (MoE-LLaVA) is top-2: num_experts_per_tok must be 2, "
                                 f"got {self.num_experts_per_tok}")
        if self.router_type == "modality":
            rk = dict(self.router_kwargs or {})
            rk.setdefault("expert_pools", moiie_expert_pools(self.num_experts, self.moiie_num_intra_experts))
            if self.moiie_next_token_vision_mask:
                rk.setdefault("next_token_modalities", [IMAGE])
                rk.setdefault("fallback_modality", TEXT)
            self.router_kwargs = rk

    def moe_layers(self) -> list[int]:
        return moe_layer_indices(self.moe_mode, self.text_config.num_hidden_layers, self.moe_layers_idx)
