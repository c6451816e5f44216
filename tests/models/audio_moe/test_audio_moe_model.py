"""audio_moe: layouts and delay pattern, forward / backward / loss weighting for every MoE type, save/load round trip,
generate through GenerationMixin (delay pattern, cache == no cache, continuation from a returned cache), errors."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
from moezoo.core import MoELayer  # noqa: E402
from moezoo.models.audio_moe import (MoezooAudioMoeConfig, MoezooAudioMoeForCausalLM, apply_delay,  # noqa: E402
                                     flat_from_parts, official_to_flat, split_flat, undo_delay)
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.modeling_outputs import MoeCausalLMOutputWithPast  # noqa: E402

MOE_TYPES = [dict(moe_type="topp"), dict(moe_type="topp", topp_weighting="official", num_shared_experts=2),
             dict(moe_type="topk", num_null_experts=0), dict(moe_type="adamoe", num_null_experts=2),
             dict(moe_type="moepp", num_null_experts=0, num_zero_experts=1, num_copy_experts=1,
                  num_constant_experts=1)]


def tiny(**kw):
    torch.manual_seed(0)
    return moezoo.create_model("audio_moe_small_e8k2", tiny=True, **kw).eval()


def batch(cfg, B=2, n_text=4, n_frames=5, seed=0):
    """Text prompt + one delayed utterance per sample, flat layout; labels = inputs."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.vocab_size, (B, n_text), generator=g)
    codes = torch.randint(0, cfg.codebook_size, (B, n_frames, cfg.num_codebooks), generator=g)
    frames = apply_delay(cfg, codes)
    T = n_text + frames.shape[1]
    tid = torch.cat([text, torch.zeros(B, frames.shape[1], dtype=torch.long)], 1)
    cd = torch.cat([torch.zeros(B, n_text, cfg.num_codebooks, dtype=torch.long), frames], 1)
    audio = torch.zeros(B, T, dtype=torch.bool)
    audio[:, n_text:] = True
    return flat_from_parts(cfg, tid, cd, audio), codes


def test_delay_pattern_roundtrip_and_layout():
    cfg = MoezooAudioMoeConfig(num_codebooks=3, codebook_size=8, delay_pattern=[0, 1, 3], num_experts=4,
                               moe_intermediate_size=8, hidden_size=16, num_attention_heads=2)
    codes = torch.randint(0, 8, (2, 5, 3))
    fr = apply_delay(cfg, codes)
    assert fr.shape == (2, 1 + 5 + 3 + 1, 3)
    assert (fr[:, 0] == cfg.codec_bos_id).all() and (fr[:, :4, 2] == cfg.codec_bos_id).all()
    assert torch.equal(fr[:, 1:6, 0], codes[..., 0]) and torch.equal(fr[:, 4:9, 2], codes[..., 2])
    assert (fr[:, 6, 0] == cfg.codec_eos_id).all() and (fr[:, 7:, 0] == cfg.codec_pad_id).all()
    assert (fr[:, 9, 2] == cfg.codec_eos_id).all()
    assert all(torch.equal(a, b) for a, b in zip(undo_delay(cfg, fr), codes))
    # flat layout <-> parts, official layout -> flat
    text = torch.randint(0, cfg.vocab_size - 1, (2, 3))
    tid = torch.cat([text, torch.full((2, fr.shape[1]), 255)], 1)
    flat_off = official_to_flat(MoezooAudioMoeConfig(**{**cfg.to_dict(), "codec_placeholder_id": 255}), tid,
                                fr.reshape(-1, 3))
    t, c, a = split_flat(cfg, flat_off)
    assert torch.equal(t[:, :3], text) and torch.equal(c[:, 3:], fr) and a[:, 3:].all() and not a[:, :3].any()
    with pytest.raises(ValueError, match="codebook_size"):
        apply_delay(cfg, codes + 8)


@pytest.mark.parametrize("kw", MOE_TYPES, ids=lambda k: k["moe_type"] + ("_off" if "topp_weighting" in k else ""))
def test_forward_backward_every_moe_type(kw):
    m = tiny(**kw).train()
    cfg = m.config
    ids, _ = batch(cfg)
    out = m(input_ids=ids, labels=ids)
    assert isinstance(out, MoeCausalLMOutputWithPast)
    B, T = ids.shape[0] // cfg.num_codebooks, ids.shape[1]
    assert out.logits.shape == (B * cfg.num_codebooks, T, cfg.flat_vocab_size)
    assert out.codec_logits.shape == (B, T, cfg.num_codebooks, cfg.codec_vocab_size)
    assert len(out.router_logits) == cfg.num_hidden_layers >= 2
    assert torch.isfinite(out.loss) and out.aux_loss is not None and out.aux_loss > 0
    out.loss.backward()
    for name, p in m.named_parameters():
        if "gate_map" in name and "layers.0." in name:  # MoE++: the first layer has no gating residual
            continue
        if "mlp.gate" in name or "codec_head" in name or "experts.gate_up_proj" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(isinstance(mod, MoELayer) for mod in (layer.mlp for layer in m.model.layers))


def test_topp_dynamic_capacity_and_null_experts():
    m = tiny(router_top_p=0.9)
    with torch.no_grad():
        for layer in m.model.layers:  # spread the router so that top-p keeps several experts
            layer.mlp.gate.weight.normal_(0, 0.05)
    ids, _ = batch(m.config, B=3, n_frames=8)
    out = m(input_ids=ids)
    k = torch.cat([ro.experts_per_token for ro in out.router_outputs])
    assert k.min() >= 1 and k.max() > 1 and len(k.unique()) > 1  # a varying number of experts per token
    null_id = m.config.num_experts  # the null expert follows the routed ones
    assert any((ro.indices == null_id).any() for ro in out.router_outputs)


def test_codebook_loss_weights_and_text_loss():
    m = tiny()
    ids, _ = batch(m.config)
    with torch.no_grad():
        base = m(input_ids=ids, labels=ids)
        per = base.codebook_losses
        assert torch.allclose(base.loss - base.aux_loss, per.sum(), atol=1e-5)
        m.config.codebook_loss_weights = [3.0, 1.0, 0.0, 0.5]
        w = m(input_ids=ids, labels=ids)
        assert torch.allclose(w.loss - w.aux_loss, (per * torch.tensor([3.0, 1.0, 0.0, 0.5])).sum(), atol=1e-5)
        # the per-codebook CE is the shifted cross-entropy of that codebook's head
        _, codes, audio = split_flat(m.config, ids)
        lab = torch.where(audio.unsqueeze(-1), codes, torch.full_like(codes, -100))
        ce2 = F.cross_entropy(base.codec_logits[:, :-1, 2].reshape(-1, m.config.codec_vocab_size),
                              lab[:, 1:, 2].reshape(-1), ignore_index=-100)
        assert torch.allclose(per[2], ce2, atol=1e-6)
        m.config.codebook_loss_weights = [1.0] * 4
        m.config.text_loss_weight = 0.5
        t = m(input_ids=ids, labels=ids)
        text_lab = torch.where(audio, torch.full_like(audio, -100, dtype=torch.long), ids[::4])
        ce_t = F.cross_entropy(base.text_logits[:, :-1].reshape(-1, m.config.vocab_size), text_lab[:, 1:].reshape(-1))
        assert torch.allclose(t.loss - base.loss, 0.5 * ce_t, atol=1e-5)


def test_aux_weight_counter_default_vs_official():
    m = tiny(router_aux_loss_coef=0.025, router_aux_loss_min_coef=0.001, router_aux_loss_decay_steps=10)
    ids, _ = batch(m.config)
    with torch.no_grad():
        a, b = m(input_ids=ids, labels=ids).loss, m(input_ids=ids, labels=ids).loss
    assert torch.equal(a, b) and m.aux_loss_step == 0  # identical eval calls -> identical losses
    m.config.aux_loss_counter = "official"
    with torch.no_grad():
        c, d = m(input_ids=ids, labels=ids).loss, m(input_ids=ids, labels=ids).loss
    assert m.aux_loss_step == 2 and not torch.equal(c, d)  # the released code's counter
    assert m.aux_loss_coef(0) == 0.025 and abs(m.aux_loss_coef(5) - 0.013) < 1e-9
    assert abs(m.aux_loss_coef(99) - 0.001) < 1e-12


def test_save_load_roundtrip(tmp_path):
    m = tiny(topp_weighting="official", num_shared_experts=2)
    m.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    r = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(r) is MoezooAudioMoeForCausalLM and r.config.topp_weighting == "official"
    ids, _ = batch(m.config)
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, r(input_ids=ids).logits)
    # narrower shared experts are zero-padded inside the 3-D expert tensor, and stay exactly zero
    inter, s = m.config.moe_intermediate_size, m.config.shared_intermediate_size
    ex = r.model.layers[0].mlp.experts
    assert (ex.down_proj[m.config.num_experts:, :, s:] == 0).all() and s < inter


def _prompt(cfg, B=2, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, n), generator=g).repeat_interleave(cfg.num_codebooks, 0)


def test_generate_delay_pattern_and_cache_equivalence():
    m = tiny()
    cfg = m.config
    with torch.no_grad():
        m.codec_head.weight.normal_(0, 0.3)
    prompt = _prompt(cfg)
    a = m.generate(prompt, max_new_tokens=14, min_new_tokens=4, use_cache=True)
    b = m.generate(prompt, max_new_tokens=14, min_new_tokens=4, use_cache=False)
    assert torch.equal(a, b)  # greedy with a KV cache == without, token for token
    K, V = cfg.num_codebooks, cfg.vocab_size
    gen = a[:, prompt.shape[1]:].view(2, K, -1) - V  # frame 0 = BOS frame
    assert (gen[:, :, 0] == cfg.codec_bos_id).all()
    for c, d in enumerate(cfg.delay_pattern):
        assert (gen[:, c, : d + 1] == cfg.codec_bos_id).all()
        if gen.shape[-1] > d + 1:
            assert (gen[:, c, d + 1] != cfg.codec_bos_id).all()
    for b_ in range(2):  # codebook c gets its EOS delay[c] frames after codebook 0, PAD after
        s = int((gen[b_, 0] == cfg.codec_eos_id).nonzero()[0])
        assert s > 4  # min_new_tokens respected
        for c, d in enumerate(cfg.delay_pattern):
            row = gen[b_, c]
            if s + d < row.shape[0]:
                assert row[s + d] == cfg.codec_eos_id and (row[s + d + 1:] == cfg.codec_pad_id).all()
            assert not (row[:s + d] == cfg.codec_eos_id).any()
    _, codes, _ = split_flat(cfg, a)
    assert all(x.shape[1] == K for x in undo_delay(cfg, codes[:, prompt.shape[1]:]))


def test_generate_max_frames_forces_eos():
    m = tiny()
    cfg = m.config
    with torch.no_grad():
        m.codec_head.weight.zero_()  # all logits equal: never an EOS by choice
        m.codec_head.weight[:, 0] = 0.0
    out = m.generate(_prompt(cfg, B=1), max_new_tokens=9, use_cache=True)
    gen = out[:, 5:].view(1, cfg.num_codebooks, -1) - cfg.vocab_size
    assert gen.shape[-1] == 1 + 9  # BOS frame + max_new_tokens frames
    assert (gen[0, :, -1] == cfg.codec_eos_id).any()
    assert all((gen[0, c] == cfg.codec_eos_id).sum() == 1 for c in range(cfg.num_codebooks))


def test_cache_convention_and_continuation():
    m = tiny()
    cfg = m.config
    ids, _ = batch(cfg)
    T = ids.shape[1]
    with torch.no_grad():
        full = m(input_ids=ids, use_cache=False).logits
        first = m(input_ids=ids[:, :6], use_cache=True)
        cache = first.cache if hasattr(first, "cache") and first.cache is not None else first.past_key_values
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 6
        rest = m(input_ids=ids[:, 6:], cache=cache, attention_mask=torch.ones(2, T, dtype=torch.long)).logits
        assert torch.allclose(torch.cat([first.logits, rest], 1), full, atol=1e-5)
        c2 = m(input_ids=ids[:, :6], use_cache=True)
        c2 = getattr(c2, "cache", None) or c2.past_key_values
        rest2 = m(input_ids=ids[:, 6:], past_key_values=c2).logits  # the older name still works
        assert torch.allclose(rest2, rest, atol=1e-6)
        with pytest.raises(ValueError, match="both `cache` and `past_key_values`"):
            m(input_ids=ids, cache=DynamicCache(), past_key_values=DynamicCache())
        with pytest.raises(TypeError, match="Cache"):
            m(input_ids=ids, cache=[(torch.zeros(1), torch.zeros(1))])
    # generation continued from a returned cache == generation from scratch
    prompt = _prompt(cfg, B=1)
    full_gen = m.generate(prompt, max_new_tokens=10, min_new_tokens=3, use_cache=True)
    out = m.generate(prompt, max_new_tokens=10, min_new_tokens=3, use_cache=True, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert torch.equal(out.sequences, full_gen) and cache is not None
    with torch.no_grad():
        seq = out.sequences
        step = m(input_ids=seq[:, -1:], cache=cache, attention_mask=torch.ones(1, seq.shape[1], dtype=torch.long))
        again = m(input_ids=seq, use_cache=False)
    assert torch.allclose(step.logits[:, -1], again.logits[:, -1], atol=1e-5)


def test_bad_inputs():
    m = tiny()
    cfg = m.config
    ids, _ = batch(cfg)
    with pytest.raises(ValueError, match="num_codebooks rows"):
        m(input_ids=ids[:3])
    bad = ids.clone()
    bad[1, 0] = bad[0, 0] + 1  # text position with different ids across the codebook rows
    with pytest.raises(ValueError, match="same id"):
        m(input_ids=bad)
    with pytest.raises(ValueError, match=r"vocab_size \+ codec_vocab_size"):
        m(input_ids=ids + cfg.flat_vocab_size)
    with pytest.raises(ValueError, match="labels must be in the flat layout"):
        m(input_ids=ids, labels=ids[:2])
    with pytest.raises(ValueError, match="codec_placeholder_id"):
        m(input_ids=ids[::4], codec_input_ids=torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_beams"):
        m.generate(_prompt(cfg), num_beams=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(_prompt(cfg), max_new_tokens=0)
    for kw, match in ((dict(delay_pattern=[0, 1]), "delay_pattern"), (dict(moe_type="x"), "moe_type"),
                      (dict(router_top_p=1.5), "router_top_p"), (dict(codebook_loss_weights=[1.0]), "loss_weights"),
                      (dict(topp_weighting="eq3"), "topp_weighting"), (dict(aux_loss_counter="x"), "aux_loss_counter")):
        with pytest.raises(ValueError, match=match):
            MoezooAudioMoeConfig(**kw)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_experts_implementation_switch(impl):
    m = tiny(topp_weighting="official", num_shared_experts=2)  # dynamic k + null + router-weighted shared experts
    ids, _ = batch(m.config)
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        m.set_experts_implementation(impl)
        assert m.model.layers[0].mlp.experts.config._experts_implementation == impl
        torch.testing.assert_close(m(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-4)
