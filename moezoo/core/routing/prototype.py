"""Prototypical routing (ProMoE): cosine similarity to learnable prototypes ("cluster centers"), then top-k."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Router, register_router
from .output import RouterOutput, check_router_input, check_top_k, topk_weights


@register_router("prototype")
class PrototypeRouter(Router):
    """ProMoE's prototypical router: ``cos(token, prototype_e)`` for E learnable prototypes, then top-k.

    ``weight`` (E, H) holds the prototypes (so the path stays ``...mlp.gate.weight``); both sides are L2-normalised.
    ``weight_mode`` turns the cosine ``s`` (T, E) into selection scores and combine weights:

    - ``"identity"`` (ProMoE's released configs): top-k of the RAW cosine, weights = those cosines (may be negative);
    - ``"softmax"``: ``softmax(s / temperature)``; ``"sigmoid"``: ``sigmoid(s / temperature)``.

    ``norm_topk_prob`` renormalises the k weights (off in ProMoE). ``logits`` are the raw cosines; ``probs`` the
    distribution the balance loss uses: ``softmax(s / temperature)`` in ``"softmax"`` mode and, as in ProMoE's
    released balance loss, ``softmax(scores)`` of the mode's scores otherwise. ``extras["scores"]`` holds the scores
    (T, E) the top-k ran on, ``extras["prototypes"]`` the (E, H) prototypes this call used (with any adapter applied,
    e.g. a peft LoRA on ``gate.weight``).
    """

    WEIGHT_MODES = ("identity", "softmax", "sigmoid")

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, weight_mode: str = "identity",
                 temperature: float = 1.0, norm_topk_prob: bool = False, renorm_eps: float = 0.0,
                 init_std: float = 0.02, router_dtype: torch.dtype = torch.float32):
        check_top_k(top_k, num_experts)
        if weight_mode not in self.WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {self.WEIGHT_MODES}, got {weight_mode!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        super().__init__(hidden_size, num_experts, router_dtype=router_dtype, init_std=init_std)
        self.top_k = top_k
        self.weight_mode, self.temperature = weight_mode, float(temperature)
        self.norm_topk_prob, self.renorm_eps = norm_topk_prob, renorm_eps

    @property
    def prototypes(self) -> torch.Tensor:
        return self.weight

    def cosine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(T, H) -> (T, E) cosine similarity to every prototype."""
        dt = self.router_dtype
        with torch.autocast(hidden_states.device.type, enabled=False):  # under bf16 autocast it stays in router_dtype
            return F.normalize(hidden_states.to(dt), p=2, dim=-1) @ F.normalize(self.weight.to(dt), p=2, dim=-1).T

    def forward(self, hidden_states: torch.Tensor, **_) -> RouterOutput:
        check_router_input(hidden_states, self.hidden_size)
        cos = self.cosine(hidden_states)
        if self.weight_mode == "identity":
            scores = cos
            probs = cos.softmax(dim=-1)
        elif self.weight_mode == "softmax":
            scores = (cos / self.temperature if self.temperature != 1.0 else cos).softmax(dim=-1)
            probs = scores
        else:
            scores = torch.sigmoid(cos / self.temperature if self.temperature != 1.0 else cos)
            probs = scores.softmax(dim=-1)
        weights, indices = topk_weights(scores, self.top_k, self.norm_topk_prob, self.renorm_eps)
        return RouterOutput.from_selection(cos, probs, indices, weights, self.num_experts, scores=scores,
                                           prototypes=self.weight)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"weight_mode={self.weight_mode!r}, temperature={self.temperature}")
