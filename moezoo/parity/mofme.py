"""Parity: MoFME FME layer (``models/moe/film.py`` ``Transformer_MoE_FiLM``: attention + KeepTopK router + shared
basenet + FiLM experts + adaptor, ``depth`` layers).

moezoo: a ``ModuleList`` of :class:`moezoo.models.deweather.modeling_deweather.DeweatherTransformerBlock` with
``expert_type="fme"`` (:class:`moezoo.core.FMEMoELayer`), ``official_expert_offset=True`` (slot 0 = GELU(y), slot i =
expert i-1, last expert unused) and the ``"topk"`` router with ``softmax_after_topk`` and a bias (KeepTopK + softmax).
Sizes come from the config and the weights (:func:`moezoo.models.deweather.convert_mofme.layer_hparams`).
Official KeepTopK keeps ties at the k-th logit (more than k experts); continuous logits never tie in practice.
"""
from __future__ import annotations

import torch
from torch import nn

REPO = "RoyZry98/MoFME-Pytorch"
EXACT: set = set()


def matches(config: dict) -> bool:
    return (config.get("_reference") or {}).get("class", "Transformer_MoE_FiLM") == "Transformer_MoE_FiLM"


def convert(config: dict, state_dict: dict[str, torch.Tensor], *, official_expert_offset: bool = True) -> nn.ModuleList:
    from moezoo.models.deweather.convert_mofme import convert_layers, layer_hparams
    from moezoo.models.deweather.modeling_deweather import DeweatherTransformerBlock

    if config.get("gate", "film") != "film":
        raise ValueError(f"only gate='film' (MoFME) layers convert, got gate={config.get('gate')!r}")
    hp = layer_hparams(config, state_dict, "")
    blocks = nn.ModuleList([
        DeweatherTransformerBlock(hidden_size=hp["hidden_size"], num_heads=hp["num_attention_heads"],
                                  head_dim=hp["head_dim"], num_experts=hp["num_experts"],
                                  num_experts_per_tok=hp["num_experts_per_tok"],
                                  intermediate_size=hp["intermediate_size"], expert_type="fme",
                                  fme_intermediate_size=hp["fme_intermediate_size"],
                                  official_expert_offset=official_expert_offset, router_type="topk",
                                  router_kwargs={"softmax_after_topk": True, "bias": True}, hidden_act="gelu",
                                  dropout=hp["dropout"])
        for _ in range(hp["num_hidden_layers"])])
    tensors = convert_layers(state_dict, "", hp["num_hidden_layers"], hp["num_experts"], out_prefix="")
    missing, unexpected = blocks.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"converted layer weights do not fit (missing {sorted(missing)}, unexpected {sorted(unexpected)})")
    return blocks


def capture_layers(blocks, out: dict, prefix: str) -> list:
    """Forward hooks recording ``fme_in``, ``router_logits``, ``basenet_out``, ``expert_mix`` of every block."""
    handles = []
    for i, block in enumerate(blocks):
        p = f"{prefix}{i}."
        handles.append(block.mlp.register_forward_pre_hook(
            lambda m, args, p=p: out.__setitem__(p + "fme_in", args[0].detach().clone())))
        handles.append(block.mlp.gate.register_forward_hook(
            lambda m, args, ro, p=p: out.__setitem__(p + "router_logits", ro.logits.detach().clone())))

        def experts_hook(m, args, res, p=p):
            out[p + "basenet_out"] = args[0].detach().clone()
            out[p + "expert_mix"] = res.detach().clone()

        handles.append(block.mlp.experts.register_forward_hook(experts_hook))
    return handles


def run(module: nn.ModuleList, config: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    x = inputs["in.x"]
    B, N, _ = x.shape
    result: dict[str, torch.Tensor] = {}
    handles = capture_layers(module, result, "out.layers.")
    try:
        for i, block in enumerate(module):
            x, ro = block(x)
            result[f"out.weights.{i}"] = ro.combine_weights().reshape(B, N, -1)
    finally:
        for h in handles:
            h.remove()
    result["out.x"] = x
    return {k: (v.reshape(B, N, -1) if k.startswith("out.layers.") else v) for k, v in result.items()}
