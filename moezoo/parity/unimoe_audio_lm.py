"""Parity: the whole official UniMoE-Audio model (``UniAudioRVQQwen2_5VLMoEForConditionalGeneration``).

:func:`convert` builds a :class:`~moezoo.models.audio_moe.MoezooAudioMoeForCausalLM` with
:mod:`moezoo.models.audio_moe.convert_unimoe_audio` (sizes from the weights, so any config converts; the
aux-weight counter in its ``"official"`` mode, sdpa attention as the reference) and :func:`run` reproduces:

- the forward with loss (``codec_labels``, ``aux_balance_weight``): ``logits`` (text head), ``codec_logits``,
  ``hidden_states.*``, ``inputs_embeds``, ``position_ids``, per layer ``router_logits`` / ``combine_weights`` /
  ``expert_mask`` (columns mapped back to the official ``[dynamic | null | fixed]`` order), ``dynamic_top_k``,
  ``aux_loss`` (weighted by ``aux_balance_weight * attention_mask``), ``aux_balance_loss`` (their mean), the same
  without ``aux_balance_weight``, the loss at aux-weight steps 0 and 4000, and ``d loss / d gate.weight`` per layer;
- the official greedy ``generate()`` with CFG pairs and KV cache (:func:`moezoo.models.audio_moe.generation_audio_moe.
  cfg_generate` with ``eos_handling="official"``): returned codes and lengths, all decoder frames, the initial frames,
  per-step raw codec logits and position ids, the prefill embeddings / positions.

Generation settings: ``in.gen.settings`` if the folder has it (``[max_tokens, min_tokens, cfg_scale,
eos_prob_mul_factor]``), else the fixture's (10, 2, 3.0, 0.6).
"""
from __future__ import annotations

import torch

REPO = "HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs"
EXACT = {"dynamic_top_k", "expert_mask", "position_ids", "gen.decoder_tokens", "gen.generated_codes", "gen.lengths",
         "gen.prefill_position_ids", "gen.prefill_tokens", "gen.step_position_ids"}
EXACT |= {f"{n}.{i}" for n in ("dynamic_top_k", "expert_mask") for i in range(64)}
GEN_SETTINGS = (10, 2, 3.0, 0.6)


def matches(config: dict) -> bool:
    return (config.get("_reference") or {}).get("class") == "UniAudioRVQQwen2_5VLMoEForConditionalGeneration"


def convert(config: dict, state_dict: dict[str, torch.Tensor], **options):
    from moezoo.models.audio_moe.convert_unimoe_audio import build_model

    options.setdefault("aux_loss_counter", "official")
    model = build_model(config, state_dict, **options)
    model.config._attn_implementation = "sdpa"  # what the official loader requests
    return model


def _inverse_order(model) -> torch.Tensor:
    from moezoo.models.audio_moe.convert_unimoe_audio import official_gate_order

    c = model.config
    return torch.argsort(torch.tensor(official_gate_order(c.num_experts, c.num_null_experts, c.num_shared_experts)))


def run(module, config: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from moezoo.core.losses import unimoe_audio_balance_loss
    from moezoo.models.audio_moe.generation_audio_moe import cfg_generate
    from moezoo.models.audio_moe.modeling_audio_moe import position_ids_from_mask

    model = module
    inv = _inverse_order(model)
    ids, mask = inputs["in.input_ids"], inputs["in.attention_mask"]
    kw = dict(input_ids=ids, codec_input_ids=inputs["in.codec_input_ids"], attention_mask=mask,
              labels=inputs.get("in.labels"), codec_labels=inputs["in.codec_labels"], use_cache=False)
    abw = inputs.get("in.aux_balance_weight")
    out: dict[str, torch.Tensor] = {}

    model.aux_loss_step = 0
    o = model(**kw, aux_balance_weight=abw, output_hidden_states=True)
    out["out.logits"] = o.text_logits
    out["out.codec_logits"] = o.codec_logits
    out["out.inputs_embeds"] = o.hidden_states[0]
    for i, h in enumerate(o.hidden_states):
        out[f"out.hidden_states.{i}"] = h
    out["out.position_ids"] = position_ids_from_mask(mask).unsqueeze(0).expand(3, -1, -1)
    w = abw * mask if abw is not None else None
    aux, aux_nw = [], []
    for i, ro in enumerate(o.router_outputs):
        out[f"out.router_logits.{i}"] = ro.logits[:, inv]
        out[f"out.combine_weights.{i}"] = ro.combine_weights()[:, inv]
        out[f"out.expert_mask.{i}"] = ro.expert_mask()[:, inv]
        out[f"out.dynamic_top_k.{i}"] = ro.extras["dynamic_top_k"]
        aux.append(unimoe_audio_balance_loss(ro, aux_balance_weight=w))
        aux_nw.append(unimoe_audio_balance_loss(ro))
        out[f"out.aux_loss.{i}"] = aux[-1].reshape(1)
        out[f"out.aux_loss_no_balance_weight.{i}"] = aux_nw[-1].reshape(1)
    out["out.aux_balance_loss"] = torch.stack(aux).mean().reshape(1)
    out["out.aux_balance_loss_no_balance_weight"] = torch.stack(aux_nw).mean().reshape(1)
    out["out.loss"] = o.loss.reshape(1)
    model.aux_loss_step = 0
    out["out.loss_no_balance_weight"] = model(**kw).loss.reshape(1)
    model.aux_loss_step = 4000
    out["out.loss_training_steps_4000"] = model(**kw, aux_balance_weight=abw).loss.reshape(1)
    model.aux_loss_step = 0
    with torch.enable_grad():
        model.zero_grad(set_to_none=True)
        model(**kw, aux_balance_weight=abw).loss.backward()
        for i, layer in enumerate(model.model.layers):
            out[f"out.grad.gate_weight.{i}"] = layer.mlp.gate.weight.grad[inv].detach().clone()
        model.zero_grad(set_to_none=True)
    model.aux_loss_step = 0

    if "in.gen.input_ids" in inputs:
        s = inputs.get("in.gen.settings")
        max_tokens, min_tokens, cfg_scale, eos_factor = (
            (int(s[0]), int(s[1]), float(s[2]), float(s[3])) if s is not None else GEN_SETTINGS)
        g = cfg_generate(model, inputs["in.gen.input_ids"], inputs["in.gen.attention_mask"],
                         inputs.get("in.gen.codec_input_ids"), max_tokens=max_tokens, min_tokens=min_tokens,
                         cfg_scale=cfg_scale, eos_prob_mul_factor=eos_factor, do_sample=False,
                         eos_handling="official")
        out.update({"out.gen.generated_codes": g.codes, "out.gen.lengths": g.lengths,
                    "out.gen.decoder_tokens": g.decoder_tokens, "out.gen.prefill_tokens": g.prefill_tokens,
                    "out.gen.step_codec_logits": g.step_codec_logits, "out.gen.step_position_ids": g.step_position_ids,
                    "out.gen.prefill_inputs_embeds": g.prefill_inputs_embeds,
                    "out.gen.prefill_position_ids": g.prefill_position_ids})
    return out
