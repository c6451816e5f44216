"""``vl_moe``: vision tower (timm or CLIP/SigLIP) -> MLP projector -> any transformers causal LM whose FFNs are
upcycled into MoE layers by :func:`moezoo.core.upcycle.upcycle_model` (MoE-LLaVA, MoIIE).

Layout (as transformers' LLaVA): ``model.vision_tower``, ``model.multi_modal_projector``, ``model.language_model``
(the LM's base model, e.g. ``LlamaModel``) and ``lm_head``. Image features replace the ``image_token_id`` placeholders
of ``input_ids``; every MoE layer gets the per-token modality (0 text, 1 image) as its ``modality_ids`` signal, which
the MoIIE router uses (other routers ignore it).
"""
from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from ...core.layer import MoELayer
from ...core.losses import modality_balance_loss
from ...core.upcycle import clear_router_outputs, collect_router_outputs, find_dense_mlps, upcycle_model
from ...cache_compat import cache_kwargs, output_cache, resolve_cache
from ...modeling_utils import MoezooPreTrainedModel
from .configuration_vl_moe import IMAGE, TEXT, MoezooVlMoeConfig, moe_layer_indices



@dataclasses.dataclass
class MoezooVlMoeModelOutput(MoeModelOutputWithPast):
    """:class:`MoeModelOutputWithPast` + ``image_hidden_states`` (projected image features) + ``aux_loss``."""

    aux_loss: torch.Tensor | None = None
    image_hidden_states: torch.Tensor | None = None


@dataclasses.dataclass
class MoezooVlMoeCausalLMOutput(MoeCausalLMOutputWithPast):
    """:class:`MoeCausalLMOutputWithPast` + ``image_hidden_states``."""

    image_hidden_states: torch.Tensor | None = None


def _supported_mlp_forms() -> str:
    return ("gate_proj + up_proj + down_proj (Llama / Qwen2 / Mistral / Gemma / StableLM), fused gate_up_proj + "
            "down_proj (Phi-3), or fc1 + fc2 (Phi-2)")


class VisionTower(nn.Module):
    """A timm model by name (``forward_features``) or a transformers CLIP / SigLIP vision model, returning
    ``(num_images, tokens, channels)`` features."""

    def __init__(self, config: MoezooVlMoeConfig):
        super().__init__()
        self.strategy = config.vision_feature_select_strategy
        self.feature_layer = config.vision_feature_layer
        if config.vision_config is not None:
            self.kind = "transformers"
            self.model = AutoModel.from_config(config.vision_config)
            self.image_size = int(config.vision_config.image_size)
            self.num_channels = int(getattr(config.vision_config, "num_channels", 3))
            self.num_features = int(config.vision_config.hidden_size)
            # CLIP has a CLS token; SigLIP has none
            self.num_prefix_tokens = 1 if hasattr(getattr(self.model, "vision_model", self.model), "embeddings") and \
                hasattr(getattr(getattr(self.model, "vision_model", self.model), "embeddings", None), "class_embedding") else 0
        else:
            import timm

            self.kind = "timm"
            kw = dict(config.vision_tower_kwargs or {})
            try:
                self.model = timm.create_model(config.vision_tower, pretrained=False, num_classes=0, **kw)
            except RuntimeError as exc:
                raise ValueError(f"vision_tower={config.vision_tower!r} is not a timm model name "
                                 f"(see timm.list_models()): {exc}") from exc
            self.num_features = int(self.model.num_features)
            self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
            size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
            data_cfg = timm.data.resolve_model_data_config(self.model)
            if size is None:
                size = data_cfg["input_size"][1:]
            self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
            self.num_channels = int(kw.get("in_chans", data_cfg["input_size"][0]))
            self.image_mean, self.image_std = list(data_cfg["mean"]), list(data_cfg["std"])
        if config.image_size is not None:
            self.image_size = int(config.image_size)
        if config.num_channels is not None:
            self.num_channels = int(config.num_channels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.kind == "transformers":
            out = self.model(pixel_values=pixel_values, output_hidden_states=True)
            feats = out.hidden_states[self.feature_layer]
        else:
            feats = self.model.forward_features(pixel_values)
            if feats.dim() == 4:  # CNN feature map (N, C, h, w) -> (N, h*w, C)
                feats = feats.flatten(2).transpose(1, 2)
        if self.strategy == "default" and self.num_prefix_tokens:
            feats = feats[:, self.num_prefix_tokens:]
        return feats


def build_projector(projector_type: str, in_features: int, out_features: int) -> nn.Sequential:
    """LLaVA's projectors: ``linear`` or ``mlp<N>x_gelu`` (N linear layers with GELU between)."""
    m = re.match(r"^mlp(\d+)x_gelu$", projector_type)
    if projector_type == "linear":
        return nn.Sequential(nn.Linear(in_features, out_features))
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"projector_type must be 'linear' or 'mlp<N>x_gelu', got {projector_type!r}")
    layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
    for _ in range(1, int(m.group(1))):
        layers += [nn.GELU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)


class MoezooVlMoePreTrainedModel(MoezooPreTrainedModel):
    config_class = MoezooVlMoeConfig
    config: MoezooVlMoeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _no_split_modules = []
    _supports_flash_attn = False
    _supports_flex_attn = False

    # ------------------------------------------------------------------------------------------------ aux loss
    def compute_aux_loss(self, router_outputs, attention_mask=None):
        """MoE-LLaVA (``top2_capacity``): ``router_aux_loss_coef * sum_layers l_aux`` (DeepSpeed's top-1 loss);
        MoIIE (``modality``): ``router_aux_loss_coef * sum_layers sum_modalities`` per-modality Switch loss; any
        other router: the shared :meth:`MoezooPreTrainedModel.compute_aux_loss`."""
        router_outputs = [ro for ro in router_outputs if ro is not None]
        if not router_outputs:
            return None
        coef = float(self.config.router_aux_loss_coef or 0.0)
        if all("l_aux" in ro.extras for ro in router_outputs):
            return coef * torch.stack([ro.extras["l_aux"].float() for ro in router_outputs]).sum()
        if all("pool_logits" in ro.extras for ro in router_outputs):
            mask = attention_mask if attention_mask is not None and attention_mask.numel() == \
                router_outputs[0].indices.shape[0] else None
            return coef * sum(modality_balance_loss(ro, attention_mask=mask).sum() for ro in router_outputs)
        return super().compute_aux_loss(router_outputs, attention_mask)


class MoezooVlMoeModel(MoezooVlMoePreTrainedModel):
    """Vision tower + projector + upcycled language model; returns the LM's last hidden states."""

    def __init__(self, config: MoezooVlMoeConfig):
        super().__init__(config)
        self.vision_tower = VisionTower(config)
        if config.image_size is None:
            config.image_size = self.vision_tower.image_size
        if config.num_channels is None:
            config.num_channels = self.vision_tower.num_channels
        self.language_model = AutoModel.from_config(config.text_config)
        self.multi_modal_projector = build_projector(config.projector_type, self.vision_tower.num_features,
                                                     config.text_config.hidden_size)
        if config.image_seq_length is None:
            with torch.no_grad():
                dummy = torch.zeros(1, config.num_channels, config.image_size, config.image_size)
                config.image_seq_length = int(self.vision_tower(dummy).shape[1])
        self._routing_signals: dict = {}
        self._hooked: set = set()
        if config.moe_mode != "none" or config.moe_layers_idx is not None:
            self._upcycle()
        self.post_init()

    # ------------------------------------------------------------------------------------------------ upcycling
    def _upcycle(self, seed: int | None = 0) -> dict:
        """Turn the dense MLPs of the configured layers into MoE layers (experts = copies of the dense MLP)."""
        cfg = self.config
        mlps = find_dense_mlps(self.language_model, self.language_model)
        wanted = cfg.moe_layers()
        found = {i: m for _, i, m in mlps}
        missing = [i for i in wanted if i not in found]
        if missing:
            layer = self.language_model.get_submodule(f"layers.{missing[0]}") if hasattr(self.language_model, "layers") else None
            mlp = getattr(layer, "mlp", None) if layer is not None else None
            raise ValueError(
                f"the language model ({type(self.language_model).__name__}) has no dense MLP the upcycler knows at "
                f"layers {missing} (found {type(mlp).__name__ if mlp is not None else 'no layers.<i>.mlp'}); supported "
                f"forms: {_supported_mlp_forms()}")
        todo = [i for i in wanted if not isinstance(found[i], MoELayer)]
        router_kwargs = dict(cfg.router_kwargs or {})
        if cfg.router_type == "topk":
            router_kwargs.setdefault("norm_topk_prob", cfg.norm_topk_prob)
        summary = {}
        if todo:
            layer_kwargs = {"capacity_factor": cfg.capacity_factor, "drop_policy": cfg.drop_policy}
            layer_kwargs = {k: v for k, v in layer_kwargs.items() if v is not None}
            _, summary = upcycle_model(
                self.language_model, cfg.num_experts, cfg.num_experts_per_tok, layers=todo,
                router_type=cfg.router_type, router_kwargs=router_kwargs,
                num_shared_experts=cfg.num_shared_experts, shared_expert_gate=cfg.shared_expert_gate,
                shared_expert_fraction=cfg.shared_expert_fraction, router_init_std=cfg.router_init_std,
                expert_noise_std=cfg.expert_noise_std, experts_implementation=None, root=self.language_model,
                layer_kwargs=layer_kwargs, verify=False, seed=seed)
            if hasattr(self.language_model.config, "moezoo_upcycle"):  # the architecture lives in our config
                try:
                    del self.language_model.config.moezoo_upcycle
                except AttributeError:
                    pass
        for name, m in self.language_model.named_modules():
            if isinstance(m, MoELayer) and id(m) not in self._hooked:
                m.experts.config = cfg  # one experts-implementation switch for the whole model
                m.register_forward_pre_hook(self._add_signals, with_kwargs=True)
                self._hooked.add(id(m))
        return summary

    def _add_signals(self, module, args, kwargs):
        return args, {**self._routing_signals, **kwargs}

    # ------------------------------------------------------------------------------------------------ pieces
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """``(num_images, image_seq_length, text hidden)`` projected image features."""
        cfg = self.config
        if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be a 4-D tensor (num_images, channels, height, width), got "
                             f"{tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__}")
        n, c, h, w = pixel_values.shape
        if c != cfg.num_channels:
            raise ValueError(f"pixel_values has {c} channels, expected num_channels={cfg.num_channels}")
        if (h, w) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values has images of size {h}x{w}, expected {cfg.image_size}x{cfg.image_size} "
                             "(resize with the model's processor)")
        dtype = next(self.multi_modal_projector.parameters()).dtype
        feats = self.vision_tower(pixel_values.to(dtype))
        return self.multi_modal_projector(feats)

    def merge_image_features(self, input_ids, inputs_embeds, pixel_values):
        cfg = self.config
        image_mask = (input_ids == cfg.image_token_id) if input_ids is not None else None
        n_tok = int(image_mask.sum()) if image_mask is not None else 0
        if pixel_values is None:
            if n_tok:
                raise ValueError(f"input_ids hold {n_tok} image tokens (id {cfg.image_token_id}) but no pixel_values "
                                 "were given")
            return inputs_embeds, None, image_mask
        if image_mask is None:
            raise ValueError("pixel_values need input_ids with image tokens (inputs_embeds alone cannot place them)")
        feats = self.get_image_features(pixel_values)
        n_img, L = feats.shape[:2]
        if n_tok != n_img * L:
            raise ValueError(f"input_ids hold {n_tok} image tokens but {n_img} image(s) x {L} tokens per image = "
                             f"{n_img * L} are needed: the number of images must match the <image> placeholders "
                             "(each expanded to image_seq_length tokens by the processor)")
        inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1).to(inputs_embeds.device),
                                                     feats.to(inputs_embeds.dtype))
        return inputs_embeds, feats, image_mask

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, modality_ids=None, gumbel_noise=None,
                output_hidden_states=None, output_attentions=None, **kwargs) -> MoezooVlMoeModelOutput:
        cache = resolve_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            ids = input_ids.masked_fill(input_ids == self.config.image_token_id, 0) if pixel_values is None else input_ids
            inputs_embeds = self.get_input_embeddings()(ids)
        inputs_embeds, image_features, image_mask = self.merge_image_features(input_ids, inputs_embeds, pixel_values)
        if modality_ids is None:
            modality_ids = image_mask.long() if image_mask is not None else torch.full(
                inputs_embeds.shape[:2], TEXT, dtype=torch.long, device=inputs_embeds.device)
        signals = {"modality_ids": modality_ids}
        if gumbel_noise is not None:
            signals["gumbel_noise"] = gumbel_noise
        self._routing_signals = signals
        clear_router_outputs(self.language_model)
        try:  # the wrapped transformers decoder takes the cache under the installed transformers' name
            out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, **cache_kwargs(cache), use_cache=use_cache,
                                      output_hidden_states=output_hidden_states,
                                      output_attentions=output_attentions, return_dict=True, **kwargs)
        finally:
            self._routing_signals = {}
        router_outputs = collect_router_outputs(self.language_model)
        clear_router_outputs(self.language_model)
        aux = self.compute_aux_loss(router_outputs, attention_mask)
        logits = tuple(ro.logits.masked_fill(~torch.isfinite(ro.logits), torch.finfo(ro.logits.dtype).min)
                       for ro in router_outputs)
        res = MoezooVlMoeModelOutput(last_hidden_state=out.last_hidden_state, **cache_kwargs(output_cache(out)),
                                     hidden_states=getattr(out, "hidden_states", None),
                                     attentions=getattr(out, "attentions", None),
                                     router_logits=logits or None, aux_loss=aux,
                                     image_hidden_states=image_features)
        res.router_outputs = router_outputs
        return res


class MoezooVlMoeForConditionalGeneration(MoezooVlMoePreTrainedModel, GenerationMixin):
    """LLaVA-style image-text-to-text model with MoE FFNs; ``processor(images=, text=)`` then ``generate(**inputs)``."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: MoezooVlMoeConfig):
        super().__init__(config)
        self.model = MoezooVlMoeModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        if getattr(self, "generation_config", None) is not None:  # generate() never emits the image placeholder
            self.generation_config.suppress_tokens = [int(config.image_token_id)]

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_image_features(self, pixel_values, **kwargs):
        return self.model.get_image_features(pixel_values)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                modality_ids=None, gumbel_noise=None, output_hidden_states=None, output_attentions=None,
                return_dict=None, **kwargs) -> MoezooVlMoeCausalLMOutput:
        cache = resolve_cache(cache, past_key_values)
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         modality_ids=modality_ids, gumbel_noise=gumbel_noise,
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions, **kwargs)
        h = out.last_hidden_state
        sl = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.lm_head(h[:, sl])
        loss = None
        if labels is not None:
            if labels.shape != h.shape[:2]:
                raise ValueError(f"labels must have shape (batch, seq) = {tuple(h.shape[:2])}, got {tuple(labels.shape)}")
            labels = labels.masked_fill(labels == self.config.image_token_id, -100) if input_ids is not None else labels
            full = logits if not logits_to_keep else self.lm_head(h)
            loss = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss.to(loss.dtype)
        res = MoezooVlMoeCausalLMOutput(loss=loss, aux_loss=out.aux_loss, logits=logits, **cache_kwargs(output_cache(out)),
                                        hidden_states=out.hidden_states, attentions=out.attentions,
                                        router_logits=out.router_logits, image_hidden_states=out.image_hidden_states)
        return res

    # ------------------------------------------------------------------------------------------------ helpers
    def example_inputs(self, batch_size: int = 2, seq_len: int = 8, labels: bool = True,
                       generator: torch.Generator | None = None) -> dict:
        """Random images and token ids with one image (``image_seq_length`` placeholders) per sample."""
        cfg = self.config
        L = cfg.image_seq_length
        pix = torch.randn(batch_size, cfg.num_channels, cfg.image_size, cfg.image_size, generator=generator)
        text = torch.randint(0, cfg.image_token_id, (batch_size, seq_len), generator=generator)
        ids = torch.cat([text[:, :1], torch.full((batch_size, L), cfg.image_token_id), text[:, 1:]], dim=1)
        inputs = {"input_ids": ids, "pixel_values": pix, "attention_mask": torch.ones_like(ids)}
        if labels:
            inputs["labels"] = ids.masked_fill(ids == cfg.image_token_id, -100)
        return inputs

    def upcycle(self, **config_updates) -> dict:
        """Upcycle the (dense) language model in place (MoE-tuning stage 3): update MoE fields of the config
        (``moe_mode``, ``num_experts``, ``router_type``, ...), then copy each selected dense MLP into experts."""
        for k, v in config_updates.items():
            if not hasattr(self.config, k):
                raise ValueError(f"unknown config field {k!r}")
            setattr(self.config, k, v)
        if self.config.num_experts_per_tok > self.config.num_experts:
            raise ValueError(f"num_experts_per_tok={self.config.num_experts_per_tok} must be <= num_experts")
        self.config.apply_routing_defaults()
        moe_layer_indices(self.config.moe_mode, self.config.text_config.num_hidden_layers, self.config.moe_layers_idx)
        if self.config.moe_mode == "none" and self.config.moe_layers_idx is None:
            raise ValueError("upcycle() needs moe_mode other than 'none' (or moe_layers_idx)")
        return self.model._upcycle()
