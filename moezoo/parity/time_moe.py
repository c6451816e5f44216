"""Parity: the official Time-MoE ``TimeMoeForPrediction`` (Time-MoE/Time-MoE, ``modeling_time_moe.py`` +
``ts_generation_mixin.py``).

:func:`convert` builds a :class:`~moezoo.models.time_moe.MoezooTimeMoeForPrediction` with
:mod:`moezoo.models.time_moe.convert_time_moe` (sizes from the weights, so any config converts), and :func:`run`
reproduces every ``out.*`` of the reference folder:

- ``logits_default`` / ``logits_maxh6``: ``model(input_ids)`` / ``model(input_ids, max_horizon_length=6)`` (official
  head choice, :meth:`select_horizon`); any ``logits_maxh<N>`` is computed the same way.
- ``hidden_states``: ``output_hidden_states=True`` stacked (embedding, layer outputs, last = final norm).
- ``router_logits``: each MoE layer's gate logits stacked (L, B*T, E).
- ``logits_h<h>``: head h on the final hidden state; ``ar_loss_h<h>``: its Huber loss on ``labels`` without mask.
- ``loss`` / ``loss_masked``: ``model(input_ids, labels[, loss_masks]).loss``; ``aux_loss``: the UNSCALED balance loss.
- ``generate_pred<N>``: ``model.generate(input_ids, max_new_tokens=N)`` (KV-cached official loop).

Quirk handled: the official ``load_balancing_loss_func`` hard-codes top-2 in an ``expand`` when an attention mask is
given (so it fails for k != 2); moezoo's :func:`~moezoo.core.losses.switch_balance_loss` masks padding for any k and
equals the official value for k = 2. The reference folder calls it without a mask. Converted configs use
``label_padding="official"`` (zero-padded targets counted when no ``loss_masks``), as the reference does.
"""
from __future__ import annotations

import re

import torch

REPO = "Time-MoE/Time-MoE"
EXACT: set[str] = set()


def matches(config: dict) -> bool:
    return (config.get("_reference") or {}).get("class", "TimeMoeForPrediction") == "TimeMoeForPrediction"


def convert(config: dict, state_dict: dict[str, torch.Tensor], **options):
    from moezoo.models.time_moe.convert_time_moe import build_model

    model = build_model(config, state_dict, **options)
    model.config._attn_implementation = "eager"  # the reference ran the official eager attention
    return model


def run(module, config: dict, inputs: dict[str, torch.Tensor], expected=()) -> dict[str, torch.Tensor]:
    """Every ``out.*`` of the folder; ``expected`` names the parametrised ones (``logits_maxh<N>``,
    ``generate_pred<N>``)."""
    model = module
    x = inputs["in.input_ids"]
    labels = inputs.get("in.labels")
    masks = inputs.get("in.loss_masks")
    out: dict[str, torch.Tensor] = {}
    base = model(input_ids=x, use_cache=False, output_hidden_states=True, output_router_logits=True)
    out["out.logits_default"] = base.logits
    out["out.hidden_states"] = torch.stack(base.hidden_states)
    if base.router_logits:
        out["out.router_logits"] = torch.stack(base.router_logits)
    last = base.hidden_states[-1]
    for head, h in zip(model.lm_heads, model.config.horizon_lengths):
        logits = head(last)
        out[f"out.logits_h{h}"] = logits
        if labels is not None:
            out[f"out.ar_loss_h{h}"] = model.ar_loss(logits, labels, None, h)
    if labels is not None:
        lab = model(input_ids=x, labels=labels, use_cache=False)
        out["out.loss"] = lab.loss
        if lab.router_outputs:
            out["out.aux_loss"] = model.balance_loss(lab.router_outputs)
        if masks is not None:
            out["out.loss_masked"] = model(input_ids=x, labels=labels, loss_masks=masks, use_cache=False).loss
    for name in expected:
        if m := re.fullmatch(r"out\.logits_maxh(\d+)", name):
            out[name] = model(input_ids=x, use_cache=False, max_horizon_length=int(m.group(1))).logits
        elif m := re.fullmatch(r"out\.generate_pred(\d+)", name):
            out[name] = model.generate(x, max_new_tokens=int(m.group(1)))
    return out
