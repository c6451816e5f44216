"""Parity: MoFME whole model (``models/mowe.py`` ``MoWE`` with ``gate='film'``): conv head, patch embedding, FME
transformer, linear un-patchify, conv tail, sigmoid.

moezoo: :class:`moezoo.models.deweather.MoezooDeweatherForImageRestoration` built by
:func:`moezoo.models.deweather.convert_mofme.load_official` (``official_expert_offset=True``, KeepTopK-softmax router).
Outputs: ``img_hq`` (the reconstruction), the routing weights of every layer, the encoder input (head output) and
output tokens, per-layer FME intermediates and the tail's pre-sigmoid image.
"""
from __future__ import annotations

import torch

from moezoo.parity.mofme import capture_layers

REPO = "RoyZry98/MoFME-Pytorch"
EXACT: set = set()


def matches(config: dict) -> bool:
    return (config.get("_reference") or {}).get("class", "MoWE") == "MoWE"


def convert(config: dict, state_dict: dict[str, torch.Tensor], **overrides):
    from moezoo.models.deweather.convert_mofme import load_official

    return load_official({k: v for k, v in config.items() if not k.startswith("_")}, state_dict, **overrides)


def run(module, config: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    img = inputs["in.img"]
    got: dict[str, torch.Tensor] = {}
    enc = module.model
    handles = capture_layers(enc.layers, got, "out.encoder.transformer.layers.")
    handles.append(enc.head.register_forward_hook(lambda m, a, r: got.__setitem__("out.encoder.input", r.detach().clone())))
    handles.append(module.tail.register_forward_hook(
        lambda m, a, r: got.__setitem__("out.tail_pre_sigmoid", r.detach().clone())))
    try:
        out = module(pixel_values=img, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    B = img.shape[0]
    result = {k: (v.reshape(B, -1, v.shape[-1]) if ".layers." in k else v) for k, v in got.items()}
    result["out.img_hq"] = out.reconstruction
    result["out.encoder.output"] = out.hidden_states[-1]
    for i, w in enumerate(out.routing_weights):
        result[f"out.weights.{i}"] = w
    return result
