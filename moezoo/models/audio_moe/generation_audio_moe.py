"""UniMoE-Audio's classifier-free-guidance decoding loop on :class:`MoezooAudioMoeForCausalLM` (KV cache via ``cache=``).

Rows ``(2i, 2i+1)`` of the prompt are (unconditional, conditional) of sample ``i``; prompts are in the official layout
(text ids with ``codec_placeholder_id`` at audio positions + ``codec_input_ids``), left-padded. The decoder starts from
the BOS frame; every step feeds the current frame to both rows of a pair, combines the codec logits as
``cond + cfg_scale * (cond - uncond)``, masks special ids, picks (argmax or sampling) and keeps the delay pattern.

``eos_handling``:
    ``"complete"`` (default): after codebook 0's EOS every codebook gets its EOS (the loop runs ``max_delay + 1`` more
        frames) and ``eos_prob_mul_factor`` scales the EOS *probability* (``logit += log(factor)``).
    ``"official"``: the released loop: its countdown stops before the codebook(s) with the largest delay get their EOS,
        and the factor multiplies the EOS *logit* (so a negative logit grows and EOS becomes MORE likely).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from .modeling_audio_moe import official_to_flat, position_ids_from_mask, split_flat

EOS_HANDLING = ("complete", "official")


@dataclass
class CfgGenerationOutput:
    """codes: (S, len + max_delay [+1], K) delayed frames from the first generated frame (PAD-filled); lengths: (S,)
    frames until codebook 0's EOS; decoder_tokens: (S, steps + 1, K) every frame incl. the BOS frame;
    step_codec_logits: (steps, 2S, K, Vc) raw codec logits of each decoder call; step_position_ids: (steps, 2S, 1);
    prefill_inputs_embeds / prefill_position_ids: the prompt prefill's inputs; prefill_tokens: (S, max_delay+1, K)
    the initial frames (BOS within each codebook's delay, -1 = to be generated)."""

    codes: torch.Tensor
    lengths: torch.Tensor
    decoder_tokens: torch.Tensor
    step_codec_logits: torch.Tensor
    step_position_ids: torch.Tensor
    prefill_inputs_embeds: torch.Tensor
    prefill_position_ids: torch.Tensor
    prefill_tokens: torch.Tensor


def initial_frames(config, num_samples: int, device=None) -> torch.Tensor:
    """(S, max_delay + 1, K): frame 0 all BOS; codebook c BOS up to frame delay[c]; -1 elsewhere (to be generated)."""
    K, D = config.num_codebooks, config.max_delay
    f = torch.full((num_samples, D + 1, K), -1, dtype=torch.long, device=device)
    for c, d in enumerate(config.delay_pattern):
        f[:, : d + 1, c] = config.codec_bos_id
    return f


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, top_k: int | None, eos: int,
          generator=None) -> torch.Tensor:
    if not do_sample or temperature == 0.0:
        return logits.argmax(-1)
    logits = logits / temperature
    top = logits.argmax(-1)
    eos_masked = logits.clone()
    eos_masked[top != eos, eos] = -math.inf  # EOS only when it is the most likely id (official sampling rule)
    logits = eos_masked
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sp, si = logits.softmax(-1).sort(-1, descending=True)
        remove = sp.cumsum(-1) > top_p
        remove = torch.roll(remove, 1, -1)
        remove[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, si, remove), -math.inf)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def cfg_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, codec_input_ids: torch.Tensor | None,
                 *, max_tokens: int, min_tokens: int | None = None, cfg_scale: float = 3.0,
                 eos_prob_mul_factor: float = 0.8, do_sample: bool = False, temperature: float = 1.2,
                 top_p: float = 0.95, top_k: int | None = 45, eos_handling: str = "complete",
                 generator: torch.Generator | None = None) -> CfgGenerationOutput:
    """UniMoE-Audio generation with CFG pairs (see the module docstring). ``max_tokens``: decoder frames budget."""
    cfg = model.config
    if eos_handling not in EOS_HANDLING:
        raise ValueError(f"eos_handling must be one of {EOS_HANDLING}, got {eos_handling!r}")
    if input_ids.dim() != 2 or input_ids.shape[0] % 2:
        raise ValueError(f"input_ids must be (2 * samples, seq) with (unconditional, conditional) row pairs, got "
                         f"{tuple(input_ids.shape)}")
    if attention_mask is None or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}")
    if not isinstance(max_tokens, int) or max_tokens <= cfg.max_delay:
        raise ValueError(f"max_tokens must be an int > max delay ({cfg.max_delay}), got {max_tokens!r}")
    if eos_handling == "complete" and eos_prob_mul_factor <= 0:
        raise ValueError(f"eos_prob_mul_factor must be > 0, got {eos_prob_mul_factor}")
    dev = input_ids.device
    S, K, Vc, D = input_ids.shape[0] // 2, cfg.num_codebooks, cfg.codec_vocab_size, cfg.max_delay
    EOS, PAD = cfg.codec_eos_id, cfg.codec_pad_id
    delay = torch.tensor(cfg.delay_pattern, device=dev)
    flat = official_to_flat(cfg, input_ids, codec_input_ids)
    embeds = model.model.embed(*split_flat(cfg, flat))
    mask = attention_mask.long()
    pos = position_ids_from_mask(mask)
    cache = DynamicCache(config=cfg)
    model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
          logits_to_keep=1)
    mask = torch.cat([mask, mask.new_ones(2 * S, 1)], 1)
    prefill = initial_frames(cfg, S, dev)
    tokens = torch.full((S, max_tokens + D + 3, K), -1, dtype=torch.long, device=dev)
    tokens[:, : D + 1] = prefill
    countdown_start = D if eos_handling == "official" else D + 1
    countdown = torch.full((S,), -1, dtype=torch.long, device=dev)
    detected = torch.zeros(S, dtype=torch.bool, device=dev)
    finished = torch.full((S,), -1, dtype=torch.long, device=dev)
    step_logits, step_pos = [], []
    dec_step = 0
    while dec_step < max_tokens:
        if (countdown == 0).all():
            break
        cur = dec_step + 1
        frame = tokens[:, dec_step].repeat_interleave(2, 0)  # (2S, K)
        x = model.model.embed(torch.zeros(2 * S, 1, dtype=torch.long, device=dev), frame.unsqueeze(1),
                              torch.ones(2 * S, 1, dtype=torch.bool, device=dev))
        p = position_ids_from_mask(mask)[:, -1:]
        out = model(inputs_embeds=x, attention_mask=mask, position_ids=p, cache=cache, use_cache=True)
        cl = out.codec_logits[:, -1]  # (2S, K, Vc)
        step_logits.append(cl)
        step_pos.append(p)
        mask = torch.cat([mask, mask.new_ones(2 * S, 1)], 1)
        pair = cl.view(S, 2, K, Vc)
        lg = pair[:, 1] + cfg_scale * (pair[:, 1] - pair[:, 0]) if cfg_scale != 0 else pair[:, 1].clone()
        if min_tokens is None or dec_step >= min_tokens:
            lg[:, :, EOS + 1:] = -math.inf
            lg[:, 1:, EOS:] = -math.inf
        else:
            lg[:, :, EOS:] = -math.inf
        if eos_handling == "official":
            lg[:, 0, EOS] = lg[:, 0, EOS] * eos_prob_mul_factor
        else:
            lg[:, 0, EOS] = lg[:, 0, EOS] + math.log(eos_prob_mul_factor)
        pred = _pick(lg.reshape(S * K, Vc), do_sample, temperature, top_p, top_k, EOS, generator).view(S, K)
        active = countdown != 0
        trigger = active & ((~detected & (pred[:, 0] == EOS)) | torch.tensor(cur >= max_tokens - D, device=dev))
        detected |= trigger
        start = trigger & (countdown < 0)
        countdown[start] = countdown_start
        finished[start] = cur
        padding = countdown > 0
        if padding.any():
            after = (countdown_start - countdown).unsqueeze(1)  # frames since EOS
            eos_m = padding.unsqueeze(1) & (after == delay.unsqueeze(0))
            pad_m = padding.unsqueeze(1) & (after > delay.unsqueeze(0))
            pred = torch.where(eos_m, torch.full_like(pred, EOS), torch.where(pad_m, torch.full_like(pred, PAD), pred))
            countdown[padding] -= 1
        slot = tokens[:, cur]
        tokens[:, cur] = torch.where(slot == -1, pred, slot)
        dec_step += 1
    final = dec_step + 1
    finished[finished == -1] = final - D
    lengths = (finished - 1).clamp(min=0)  # prefill step is 1 (the BOS frame)
    extra = D if eos_handling == "official" else D + 1
    L = int(lengths.max()) + extra
    codes = torch.full((S, L, K), PAD, dtype=torch.long, device=dev)
    for i in range(S):
        n = int(lengths[i]) + extra
        codes[i, :n] = tokens[i, 1: 1 + n]
    return CfgGenerationOutput(
        codes=codes, lengths=lengths, decoder_tokens=tokens[:, : max(dec_step + 1, D + 1)],
        step_codec_logits=torch.stack(step_logits), step_position_ids=torch.stack(step_pos),
        prefill_inputs_embeds=embeds, prefill_position_ids=pos, prefill_tokens=prefill)


__all__ = ["cfg_generate", "CfgGenerationOutput", "initial_frames", "EOS_HANDLING"]
