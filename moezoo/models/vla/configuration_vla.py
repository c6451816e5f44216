"""Configuration of ``vla``: π0-style vision-language-action policies (Drive-π0, DriveMoE, HiMoE-VLA)."""
from __future__ import annotations

from ...modeling_utils import MoezooConfig

NORM_MODES = ("mean_std", "min_max", "identity")
PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
# per-layer FFN kinds of the action expert: dense; DriveMoE's skill MoE; HiMoE-VLA's action-space MoE (AS-MoE) and
# heterogeneity-balancing MoE (HB-MoE); a plain token-level top-k MoE (the comparison's baseline)
MLP_LAYER_TYPES = ("dense", "skill_moe", "as_moe", "hb_moe", "topk_moe")
MOE_LAYOUTS = ("drivemoe", "himoe")


def himoe_layer_types(num_layers: int, as_moe: bool = True, hb_moe: bool = True) -> list[str]:
    """HiMoE-VLA's official placement (``HiMoEDecoderLayer``): AS-MoE where ``i <= 1 or i >= L - 2``, else HB-MoE where
    ``i <= 5 or i >= L - 6``, dense elsewhere (L = 18: AS 0,1,16,17; HB 2-5,12-15; dense 6-11). ``as_moe=False`` /
    ``hb_moe=False`` put dense FFNs in those slots (the ablations)."""
    out = []
    for i in range(num_layers):
        if i <= 1 or i >= num_layers - 2:
            out.append("as_moe" if as_moe else "dense")
        elif i <= 5 or i >= num_layers - 6:
            out.append("hb_moe" if hb_moe else "dense")
        else:
            out.append("dense")
    return out


TINY_TEXT_CONFIG = dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY_VISION_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)


class MoezooVlaConfig(MoezooConfig):
    """A π0-style VLA: vision tower (timm) + projector + causal LM (transformers) as the prefix, and an action expert
    (a smaller transformer, one layer per LM layer) over the suffix [state token, H noisy action tokens] that attends to
    the LM's keys/values of every layer (π0's block-causal joint attention: prefix tokens see the prefix, the state token
    sees prefix + itself, action tokens see everything). A flow-matching head turns the action tokens into a velocity;
    sampling integrates ``num_inference_steps`` Euler steps from noise to an action chunk (``chunk_size`` x
    ``action_dim``).

    DriveMoE on it (both off = Drive-π0):
      - scene-specialised vision MoE (``use_camera_router``): the ``context_cameras`` are always encoded; a
        :class:`moezoo.core.CameraRouter` reads their tokens and the ``waypoint`` and picks ``num_cameras_selected`` of
        the remaining (candidate) views; Gumbel-softmax (straight-through) in training, top-k in eval (only the chosen
        views are encoded); optional supervision by camera labels (``camera_router_loss_coef``, focal ``router_focal_gamma``)
        and teacher forcing by the labels (``camera_teacher_forcing``, stage 1).
      - skill-specialised action MoE (``num_moe_layers`` > 0): the last ``num_moe_layers`` FFNs of the action expert are
        :class:`moezoo.core.MoELayer` with per-sample routing (``router_type="pooled"``: DriveMoE's ``MLPRouter``); the
        router runs once, on the FFN input of the action tokens of layer ``L - num_moe_layers - 1``, and its logits are
        reused by every MoE layer (its weights live in the first MoE layer's ``mlp.gate``); ``num_shared_experts``
        shared experts; optional skill supervision (``action_router_loss_coef``).

    HiMoE-VLA on it (``action_moe_layout="himoe"``, or any ``mlp_layer_types`` with ``"as_moe"`` / ``"hb_moe"``):
      - action vectors of every embodiment are padded to ``action_dim`` (HiMoE's ``max_action_dim``); the per-sample
        action-space descriptor ``action_mask`` (B, action_dim) (HiMoE's ``data_mask``) says which dimensions an
        embodiment uses; the flow-matching loss ignores the others, sampled chunks are zero there;
      - AS-MoE (``"as_moe"``): :class:`moezoo.core.MoELayer` with the ``"condition"`` router on ``action_mask`` (every
        token of a sample gets the same experts), ``as_num_experts`` SwiGLU experts top-``as_num_experts_per_tok``,
        top-1 weight = the raw softmax probability (official: renormalised only when k > 1), aux loss = HiMoE's
        InfoNCE mutual-information loss x ``as_aux_loss_alpha`` (training only);
      - HB-MoE (``"hb_moe"``): token-level softmax top-``hb_num_experts_per_tok`` of ``hb_num_experts`` (renormalised,
        eps 1e-20) + ``hb_num_shared_experts`` shared expert(s) added unweighted; aux loss = DeepSeek's sequence-level
        balance loss (``hb_seq_aux``; else the token-level one) x ``hb_aux_loss_alpha``;
      - official placement (:func:`himoe_layer_types`), widths and coefficients are the defaults (AS: 3 experts top-1
        of width 4x hidden, alpha 0.002; HB: 32 experts top-4 of width = hidden + 1 shared, alpha 0.001);
      - ``embodiments``: ``{name: {"action_indices": [...], "state_dim": n}}``: where an embodiment's actions sit in the
        padded vector (its ``action_mask``) and its own state width (padded with zeros to ``state_dim``); raw
        observations name their ``embodiment`` and are normalised with that embodiment's statistics;
      - ``state_with_action_mask``: the state token reads ``[padded state, action_mask]`` (official layout).
      ``"topk_moe"`` layers are a plain token-level top-k MoE (``num_experts`` / ``num_experts_per_tok`` /
      ``moe_intermediate_size``, ``router_aux_loss_coef`` Switch balance), the comparison's baseline.

    Args (besides the MoE fields of :class:`moezoo.MoezooConfig`, which describe the action expert's MoE FFNs):
        vision_model_name, vision_model_kwargs, vision_pretrained: ``timm.create_model(name, pretrained, num_classes=0,
            **kwargs)`` (pretrained weights are only fetched when ``vision_pretrained=True``).
        image_size: [H, W] every camera image must have; image_mean / image_std: per-channel normalisation of [0, 1]
            images before the vision tower.
        camera_names: the views of an observation (``observation.images.<name>``), in order.
        projector_type: ``"linear"`` or ``"mlp2x_gelu"`` (vision features -> LM width).
        text_config: kwargs of a transformers decoder config (``model_type`` + fields), built with ``AutoModel``;
            the decoder must expose ``embed_tokens`` / ``get_input_embeddings`` and return a per-layer KV cache.
        max_text_tokens: instruction tokens kept (truncated beyond).
        hidden_size, intermediate_size, num_attention_heads: the action expert (its depth is the LM's; its KV heads and
            head_dim are the LM's so both attend jointly).
        state_dim, action_dim, chunk_size, n_action_steps: proprioception width, action width, chunk length H,
            actions executed from each chunk before re-planning (``select_action``'s queue).
        num_inference_steps: Euler steps of the flow-matching sampler; flow_sig_min: σ_min of the probability path
            ``x_t = (1 - (1 - σ_min) t) x_0 + t x_1`` (x_0 noise, x_1 actions, t: 0 -> 1);
            time_beta_alpha / time_beta_beta / time_max: training times ``t = (time_max - z) / time_max``,
            ``z ~ Beta(alpha, beta)`` (π0's emphasis on noisy times).
        mlp_layer_types: FFN kind per action-expert layer (one of :data:`MLP_LAYER_TYPES`); default by
            ``action_moe_layout``: ``"drivemoe"``: the last ``num_moe_layers`` layers are ``"skill_moe"``; ``"himoe"``:
            :func:`himoe_layer_types`.
        as_num_experts, as_num_experts_per_tok, as_moe_intermediate_size (None = 4 x hidden_size), as_aux_loss_alpha,
            as_norm_topk_prob, as_mi_temperature: AS-MoE; hb_num_experts, hb_num_experts_per_tok,
            hb_moe_intermediate_size (None = hidden_size), hb_num_shared_experts, hb_aux_loss_alpha, hb_seq_aux,
            hb_norm_topk_prob: HB-MoE; himoe_hidden_act: their experts' activation (SwiGLU with silu).
        embodiments, state_with_action_mask: see above.
        normalization_mapping: ``{"state": mode, "action": mode}``, mode in ``mean_std`` / ``min_max`` / ``identity``;
            the statistics are buffers saved with the model (:meth:`MoezooVlaPolicy.set_normalization_stats`).
        waypoint_dim: size of the route / target-point input of the camera router.
    """

    model_type = "moezoo_vla"

    # vision
    vision_model_name: str = "vit_tiny_patch16_224"
    vision_model_kwargs: dict | None = None
    vision_pretrained: bool = False
    image_size: list[int] | int = 32
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    camera_names: list[str] | None = None
    projector_type: str = "linear"
    # language model
    text_config: dict | None = None
    max_text_tokens: int = 32
    # action expert
    hidden_size: int = 32
    intermediate_size: int = 64
    num_attention_heads: int = 4
    rms_norm_eps: float = 1e-6
    state_dim: int = 4
    action_dim: int = 2
    chunk_size: int = 8
    n_action_steps: int = 4
    num_inference_steps: int = 10
    flow_sig_min: float = 0.001
    time_beta_alpha: float = 1.5
    time_beta_beta: float = 1.0
    time_max: float = 0.999
    # action MoE (DriveMoE skill experts: GemmaMLP experts, 1 shared expert, per-sample pooled router)
    num_moe_layers: int = 0
    mlp_layer_types: list[str] | None = None
    num_experts: int = 6
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 48
    num_shared_experts: int = 1
    router_type: str = "pooled"
    hidden_act: str = "gelu_tanh"
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    action_router_loss_coef: float = 0.0
    router_focal_gamma: float = 0.0
    # HiMoE-VLA (AS-MoE / HB-MoE; official ASMoEConfig / HBMoEConfig values)
    action_moe_layout: str = "drivemoe"
    as_num_experts: int = 3
    as_num_experts_per_tok: int = 1
    as_moe_intermediate_size: int | None = None
    as_aux_loss_alpha: float = 0.002
    as_norm_topk_prob: bool = True
    as_mi_temperature: float = 0.1
    hb_num_experts: int = 32
    hb_num_experts_per_tok: int = 4
    hb_moe_intermediate_size: int | None = None
    hb_num_shared_experts: int = 1
    hb_aux_loss_alpha: float = 0.001
    hb_seq_aux: bool = True
    hb_norm_topk_prob: bool = True
    himoe_hidden_act: str = "silu"
    embodiments: dict | None = None
    state_with_action_mask: bool = False
    # camera (scene) router
    use_camera_router: bool = False
    context_cameras: list[str] | None = None
    num_cameras_selected: int = 1
    camera_router_heads: int = 4
    waypoint_dim: int = 2
    camera_router_loss_coef: float = 0.0
    camera_gumbel_tau: float = 1.0
    camera_teacher_forcing: bool = False
    # data statistics
    normalization_mapping: dict | None = None

    def __post_init__(self, **kwargs):
        if self.text_config is None:
            self.text_config = dict(TINY_TEXT_CONFIG)
        if not isinstance(self.text_config, dict) or "model_type" not in self.text_config:
            raise ValueError("text_config must be a dict of transformers config fields with a 'model_type' "
                             f"(e.g. {{'model_type': 'llama', ...}}), got {self.text_config!r}")
        if self.vision_model_kwargs is None:
            self.vision_model_kwargs = dict(TINY_VISION_KWARGS) if self.vision_model_name == "vit_tiny_patch16_224" else {}
        size = self.image_size
        sizes = [size, size] if isinstance(size, int) and not isinstance(size, bool) else list(size or [])
        if len(sizes) != 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(f"image_size must be a positive int or [height, width], got {size!r}")
        self.image_size = sizes
        self.image_mean = list(self.image_mean or [0.485, 0.456, 0.406])
        self.image_std = list(self.image_std or [0.229, 0.224, 0.225])
        if self.camera_names is None:
            self.camera_names = ["front"]
        if not self.camera_names or len(set(self.camera_names)) != len(self.camera_names) or \
                not all(isinstance(c, str) and c for c in self.camera_names):
            raise ValueError(f"camera_names must be a non-empty list of distinct names, got {self.camera_names!r}")
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "state_dim", "action_dim",
                     "chunk_size", "n_action_steps", "num_inference_steps", "max_text_tokens", "waypoint_dim",
                     "camera_router_heads", "num_cameras_selected"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.n_action_steps > self.chunk_size:
            raise ValueError(f"n_action_steps={self.n_action_steps} must be <= chunk_size={self.chunk_size}")
        if not 0 <= self.flow_sig_min < 1:
            raise ValueError(f"flow_sig_min must be in [0, 1), got {self.flow_sig_min!r}")
        n_layers = int(self.text_config.get("num_hidden_layers", 0) or 0)
        if self.action_moe_layout not in MOE_LAYOUTS:
            raise ValueError(f"action_moe_layout must be one of {MOE_LAYOUTS}, got {self.action_moe_layout!r}")
        if self.mlp_layer_types is None and self.action_moe_layout == "himoe":
            self.mlp_layer_types = himoe_layer_types(n_layers)
        if self.mlp_layer_types is None:
            if not isinstance(self.num_moe_layers, int) or self.num_moe_layers < 0:
                raise ValueError(f"num_moe_layers must be a non-negative int, got {self.num_moe_layers!r}")
            if self.num_moe_layers and self.num_moe_layers > n_layers - 1:
                raise ValueError(f"num_moe_layers={self.num_moe_layers} must be <= num_hidden_layers - 1 = "
                                 f"{n_layers - 1} (the action router runs on the layer before the first MoE layer)")
            self.mlp_layer_types = ["dense"] * (n_layers - self.num_moe_layers) + ["skill_moe"] * self.num_moe_layers
        types = list(self.mlp_layer_types)
        if len(types) != n_layers or any(t not in MLP_LAYER_TYPES for t in types):
            raise ValueError(f"mlp_layer_types must list one of {MLP_LAYER_TYPES} per LM layer ({n_layers}), "
                             f"got {types!r}")
        moe = [i for i, t in enumerate(types) if t == "skill_moe"]
        if moe and (moe[0] == 0 or moe != list(range(moe[0], moe[0] + len(moe)))):
            raise ValueError(f"skill_moe layers must be consecutive and not start at layer 0 (the router reads the "
                             f"layer before them), got {types!r}")
        self.mlp_layer_types, self.num_moe_layers = types, len(moe)
        self._check_himoe()
        mapping = {"state": "mean_std", "action": "mean_std"}
        mapping.update(self.normalization_mapping or {})
        if set(mapping) != {"state", "action"} or any(m not in NORM_MODES for m in mapping.values()):
            raise ValueError(f"normalization_mapping must map 'state' and 'action' to one of {NORM_MODES}, "
                             f"got {self.normalization_mapping!r}")
        self.normalization_mapping = mapping
        if self.context_cameras is None:
            self.context_cameras = self.camera_names[:1]
        unknown = [c for c in self.context_cameras if c not in self.camera_names]
        if unknown or not self.context_cameras:
            raise ValueError(f"context_cameras {self.context_cameras!r} must be a non-empty subset of camera_names "
                             f"{self.camera_names!r}")
        if self.use_camera_router:
            n_cand = len(self.camera_names) - len(self.context_cameras)
            if n_cand < 2:
                raise ValueError(f"the camera router needs >= 2 candidate views besides context_cameras; "
                                 f"camera_names={self.camera_names!r}, context_cameras={self.context_cameras!r}")
            if self.num_cameras_selected >= n_cand:
                raise ValueError(f"num_cameras_selected={self.num_cameras_selected} must be < the {n_cand} candidate "
                                 "views (otherwise there is nothing to choose)")
        super().__post_init__(**kwargs)

    def _check_himoe(self) -> None:
        H = self.hidden_size
        if self.as_moe_intermediate_size is None:
            self.as_moe_intermediate_size = 4 * H
        if self.hb_moe_intermediate_size is None:
            self.hb_moe_intermediate_size = H
        for name in ("as_num_experts", "as_num_experts_per_tok", "as_moe_intermediate_size", "hb_num_experts",
                     "hb_num_experts_per_tok", "hb_moe_intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.hb_num_shared_experts, int) or self.hb_num_shared_experts < 0:
            raise ValueError(f"hb_num_shared_experts must be a non-negative int, got {self.hb_num_shared_experts!r}")
        for pre in ("as", "hb"):
            E, k = getattr(self, f"{pre}_num_experts"), getattr(self, f"{pre}_num_experts_per_tok")
            if k > E:
                raise ValueError(f"{pre}_num_experts_per_tok={k} must be <= {pre}_num_experts={E}")
            if getattr(self, f"{pre}_aux_loss_alpha") < 0:
                raise ValueError(f"{pre}_aux_loss_alpha must be >= 0")
        if self.as_mi_temperature <= 0:
            raise ValueError(f"as_mi_temperature must be > 0, got {self.as_mi_temperature!r}")
        emb = self.embodiments
        if emb is None:
            return
        if not isinstance(emb, dict) or not emb:
            raise ValueError(f"embodiments must be a non-empty dict {{name: {{'action_indices': [...], 'state_dim': n}}}}"
                             f", got {emb!r}")
        out = {}
        for name, spec in emb.items():
            if not isinstance(spec, dict) or "action_indices" not in spec:
                raise ValueError(f"embodiments[{name!r}] must be a dict with 'action_indices' (where its actions sit "
                                 f"in the padded action vector of width action_dim={self.action_dim}), got {spec!r}")
            idx = [int(i) for i in spec["action_indices"]]
            if not idx or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= self.action_dim:
                raise ValueError(f"embodiments[{name!r}]['action_indices']={idx} must be distinct indices in "
                                 f"[0, action_dim={self.action_dim})")
            sd = int(spec.get("state_dim", self.state_dim))
            if not 0 < sd <= self.state_dim:
                raise ValueError(f"embodiments[{name!r}]['state_dim']={sd} must be in [1, state_dim={self.state_dim}]"
                                 " (states are padded with zeros to state_dim)")
            out[str(name)] = {**spec, "action_indices": idx, "state_dim": sd}
        self.embodiments = out

    def action_mask_of(self, embodiment: str) -> list[bool]:
        """The action-space descriptor (HiMoE ``data_mask``) of a named embodiment: True where it has actions."""
        emb = self.embodiments or {}
        if embodiment not in emb:
            raise ValueError(f"unknown embodiment {embodiment!r}; the config knows {sorted(emb)} (config.embodiments)")
        keep = set(emb[embodiment]["action_indices"])
        return [i in keep for i in range(self.action_dim)]

    @property
    def himoe_layers(self) -> bool:
        """Whether the action expert has AS-MoE or HB-MoE layers (the action-space descriptor is read)."""
        return any(t in ("as_moe", "hb_moe") for t in self.mlp_layer_types)

    @property
    def candidate_cameras(self) -> list[str]:
        """Views the camera router chooses from (all views but the context ones)."""
        return [c for c in self.camera_names if c not in self.context_cameras]


__all__ = ["MoezooVlaConfig", "NORM_MODES", "MLP_LAYER_TYPES", "MOE_LAYOUTS", "himoe_layer_types", "TINY_TEXT_CONFIG", "TINY_VISION_KWARGS"]
