"""``vla``: π0-style vision-language-action policies on the shared MoE backbone - Drive-π0, DriveMoE, HiMoE-VLA.

Registry: ``drivemoe_<size>_e<E>k<K>`` (camera router + skill action MoE; the Drive-π0 baseline is the same entry with
``use_camera_router=False, num_moe_layers=0``); ``himoe_vla_<size>_e<E>k<K>`` (hierarchical action MoE: AS-MoE in the
outer action-expert layers, HB-MoE with E experts top-K + 1 shared in the middle ones, for heterogeneous robots). ``_tiny_`` models run on a CPU (tiny timm ViT, 3-layer Llama-style LM
built from a config); ``_s_`` a small model for the highway-env recipe. Nothing is downloaded: the LM and vision tower
are built from configs (``vision_pretrained=True`` / a larger ``text_config`` for real backbones).
"""
from ...registry import register_family, register_model
from .configuration_vla import MoezooVlaConfig, himoe_layer_types
from .modeling_vla import MissingStatisticsError, MoezooVlaOutput, MoezooVlaPolicy, MoezooVlaPreTrainedModel

register_family("vla", config_class=MoezooVlaConfig, model_class=MoezooVlaPolicy, card="vla",
                description="π0-style vision-language-action policies: camera router + skill action MoE (DriveMoE), "
                            "hierarchical action-space / heterogeneity-balancing action MoE (HiMoE-VLA)")

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


# HiMoE-VLA on two simulated robots (moezoo.models.vla.robots): MuJoCo Reacher (2 joint torques) and Pusher (7 joint
# torques), padded to 8 action dims; the state is each robot's observation vector padded to 24 (+ the action mask)
ROBOT_EMBODIMENTS = {"reacher": {"action_indices": [0, 1], "state_dim": 10},
                     "pusher": {"action_indices": [0, 1, 2, 3, 4, 5, 6], "state_dim": 23}}
_HIMOE_TEXT = dict(model_type="llama", vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                   rms_norm_eps=1e-6, tie_word_embeddings=False)
# equal active FFN width per layer (48 = AS top-1 x 48 = HB (top-2 + 1 shared) x 16 = top-k 2 x 24 = dense 48), so the
# recipe's variants (dense / plain top-k / HiMoE / AS only / HB only) compare at equal active parameters
_HIMOE_TINY = dict(image_size=32, text_config=_HIMOE_TEXT, vision_model_kwargs=None, camera_names=["front"],
                   hidden_size=32, intermediate_size=48, num_attention_heads=2, state_dim=24, action_dim=8,
                   chunk_size=4, n_action_steps=2, num_inference_steps=3, action_moe_layout="himoe",
                   as_num_experts=3, as_num_experts_per_tok=1, as_moe_intermediate_size=48, hb_num_experts=8,
                   hb_num_experts_per_tok=2, hb_moe_intermediate_size=16, hb_num_shared_experts=1,
                   num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, state_with_action_mask=True,
                   embodiments=ROBOT_EMBODIMENTS)


@register_model(family="vla", config=dict(_HIMOE_TINY), tiny=dict(_HIMOE_TINY))
def himoe_vla_tiny_e8k2(config):
    """Tiny HiMoE-VLA (CPU) for two MuJoCo robots (Reacher 2-D / Pusher 7-D torques padded to 8): 6 action-expert
    layers in the official placement (AS-MoE 0,1,4,5: 3 experts top-1 on the action mask; HB-MoE 2,3: 8 experts top-2
    + 1 shared), 32x32 view, 6-layer LM (32)."""
    return MoezooVlaPolicy(config)


@register_model(family="vla", config=dict(camera_names=["front", "wrist"], state_dim=48, action_dim=24, chunk_size=50,
                                          n_action_steps=50, hidden_size=1024, intermediate_size=4096,
                                          num_attention_heads=8, action_moe_layout="himoe",
                                          num_experts=32, num_experts_per_tok=4, state_with_action_mask=False,
                                          text_config=dict(model_type="gemma", vocab_size=257152, hidden_size=2048,
                                                           intermediate_size=16384, num_hidden_layers=18,
                                                           num_attention_heads=8, num_key_value_heads=1,
                                                           head_dim=256, max_position_embeddings=8192,
                                                           rms_norm_eps=1e-6),
                                          vision_model_name="vit_so400m_patch14_siglip_224", image_size=224,
                                          vision_model_kwargs={}, projector_type="linear", max_text_tokens=96),
                tiny=dict(_HIMOE_TINY, vision_model_name="vit_tiny_patch16_224", max_text_tokens=32))
def himoe_vla_e32k4(config):
    """HiMoE-VLA at the official size: 18-layer Gemma-2B-shaped LM prefix (PaliGemma-like, SigLIP so400m tower) and an
    action expert of width 1024 with AS-MoE (3 experts top-1, width 4096) in layers 0,1,16,17 and HB-MoE (32 experts
    top-4 + 1 shared, width 1024) in 2-5 and 12-15; 24-D padded actions, 48-D state ([state, data_mask] as the
    official code feeds it). Built from configs only (no weights are downloaded); convert official checkpoints with
    ``moezoo convert himoe``."""
    return MoezooVlaPolicy(config)


__all__ = ["MoezooVlaConfig", "himoe_layer_types", "ROBOT_EMBODIMENTS", "MoezooVlaPolicy", "MoezooVlaPreTrainedModel", "MoezooVlaOutput",
           "MissingStatisticsError"]
