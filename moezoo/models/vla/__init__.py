"""``vla``: π0-style vision-language-action policies on the shared MoE backbone - Drive-π0 and DriveMoE.

Registry: ``drivemoe_<size>_e<E>k<K>`` (camera router + skill action MoE; the Drive-π0 baseline is the same entry with
``use_camera_router=False, num_moe_layers=0``). ``_tiny_`` models run on a CPU (tiny timm ViT, 3-layer Llama-style LM
built from a config); ``_s_`` a small model for the highway-env recipe. Nothing is downloaded: the LM and vision tower
are built from configs (``vision_pretrained=True`` / a larger ``text_config`` for real backbones).
"""
from ...registry import register_family, register_model
from .configuration_vla import MoezooVlaConfig
from .modeling_vla import MissingStatisticsError, MoezooVlaOutput, MoezooVlaPolicy, MoezooVlaPreTrainedModel

register_family("vla", config_class=MoezooVlaConfig, model_class=MoezooVlaPolicy, card="vla",
                description="π0-style vision-language-action policies: camera router + skill action MoE (DriveMoE)")

# driving (moezoo.models.vla.driving): the ego-centred top-down view is always seen, the router picks 1 of 4 shifted
# views (ahead / behind / left / right); DriveMoE: front + front history always, 1 of 5 other cameras
_DRIVE_CAMERAS = ["ego", "ahead", "behind", "left", "right"]
_DRIVE = dict(camera_names=_DRIVE_CAMERAS, context_cameras=["ego"], use_camera_router=True, num_cameras_selected=1,
              state_dim=6, action_dim=2, chunk_size=8, n_action_steps=4, waypoint_dim=2,
              num_experts_per_tok=1, num_shared_experts=1, camera_router_loss_coef=1.0, action_router_loss_coef=0.1,
              camera_router_heads=4)
_TINY = dict(image_size=32, text_config=None, hidden_size=32, intermediate_size=64, num_attention_heads=4,
             num_moe_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
             vision_model_kwargs=None, num_inference_steps=3, chunk_size=4, n_action_steps=2)
_S_TEXT = dict(model_type="llama", vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
               rms_norm_eps=1e-6, tie_word_embeddings=False)
_S_VISION = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)


@register_model(family="vla", config=dict(_DRIVE, **dict(_TINY, num_experts=6, num_experts_per_tok=1)),
                tiny=dict(_TINY, num_experts=6, num_experts_per_tok=1))
def drivemoe_tiny_e6k1(config):
    """Tiny DriveMoE (CPU): 32x32 views, camera router over 4 candidate views, 6 skill experts (one per driving
    skill of moezoo.models.vla.driving.SKILLS) top-1 + 1 shared."""
    return MoezooVlaPolicy(config)


@register_model(family="vla", config=dict(_DRIVE, image_size=64, text_config=_S_TEXT, vision_model_kwargs=_S_VISION,
                                          hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                          num_moe_layers=2, num_experts=6, moe_intermediate_size=64),
                tiny=dict(_TINY, num_experts=6, num_experts_per_tok=1))
def drivemoe_s_e6k1(config):
    """Small DriveMoE for the highway-env recipe: 64x64 views, 4-layer LM (128), 6 skill experts top-1 + 1 shared."""
    return MoezooVlaPolicy(config)


@register_model(family="vla", config=dict(camera_names=["front", "wrist"], state_dim=8, action_dim=7, chunk_size=8,
                                          n_action_steps=4, num_moe_layers=2, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=32),
                tiny=dict(_TINY))
def vla_tiny_e4k2(config):
    """Tiny π0-style robot VLA (two views, 7-D actions) with a skill MoE (4 experts top-2 + 1 shared) in the action
    expert's last 2 FFNs; no camera router."""
    return MoezooVlaPolicy(config)


__all__ = ["MoezooVlaConfig", "MoezooVlaPolicy", "MoezooVlaPreTrainedModel", "MoezooVlaOutput",
           "MissingStatisticsError"]
