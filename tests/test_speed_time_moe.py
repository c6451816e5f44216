"""Time-MoE decoding fast paths: pruned last layer (``logits_to_keep``), the shared RoPE table, the in-place eager
attention, and the pre-allocated decoding loop, each against the plain computation."""
import pytest
import torch

import moezoo
from moezoo.modeling_layers import RotaryEmbedding


def _model(**kw):
    torch.manual_seed(0)
    return moezoo.create_model("time_moe_tiny_e4k2", tiny=True, **kw).eval()


@pytest.mark.parametrize("keep", [1, 3])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_to_keep_equals_the_last_positions_of_the_full_forward(keep, attn):
    model = _model(attn_implementation=attn)
    x = torch.randn(3, 20)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, :4] = 0  # left padding on one series
    with torch.no_grad():
        for m in (None, mask):
            full = model(input_ids=x, attention_mask=m, use_cache=False, max_horizon_length=8)
            part = model(input_ids=x, attention_mask=m, use_cache=False, max_horizon_length=8, logits_to_keep=keep)
            assert part.logits.shape[1] == keep
            torch.testing.assert_close(part.logits, full.logits[:, -keep:], atol=1e-5, rtol=1e-4)


def test_logits_to_keep_keeps_the_whole_cache_and_refuses_labels():
    model = _model()
    ex = model.example_inputs(batch_size=2, seq_len=12)
    with torch.no_grad():
        full = model(input_ids=ex["input_ids"], use_cache=True)
        part = model(input_ids=ex["input_ids"], use_cache=True, logits_to_keep=1)
    for a, b in zip(full.cache.layers, part.cache.layers):
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(**ex, logits_to_keep=1)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ex["input_ids"], logits_to_keep=-1)


def test_eager_and_sdpa_generate_the_same_forecast():
    x = torch.randn(2, 30)
    outs = []
    for attn in ("eager", "sdpa"):
        with torch.no_grad():
            outs.append(_model(attn_implementation=attn).generate(x, max_new_tokens=19))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    # the cached loop (pre-allocated output, pruned last layer) equals re-running the whole sequence each step
    with torch.no_grad():
        nocache = _model().generate(x, max_new_tokens=19, use_cache=False)
    torch.testing.assert_close(outs[1], nocache, atol=1e-5, rtol=1e-4)


def test_rope_table_matches_direct_computation_and_grows():
    rope = RotaryEmbedding(8, 10000.0)
    pos = torch.tensor([[0, 5, 4095], [7, 8, 9]])
    cos, sin = rope(pos, torch.float32)
    ref_cos, ref_sin = rope._compute(pos, torch.float32)
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)
    far = torch.tensor([[10000, 20000]])  # beyond the first table: it grows
    torch.testing.assert_close(rope(far, torch.float32)[0], rope._compute(far, torch.float32)[0])
    assert rope._tables[(far.device, torch.float32)][0].shape[0] > 20000
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)


def test_bf16_autocast_switch_forecasts_close_to_fp32_with_fp32_routers():
    model = _model()
    ctx = torch.randn(3, 40).cumsum(-1)
    ref = model.forecast(ctx, 12)
    got = model.forecast(ctx, 12, autocast=torch.bfloat16)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    err = abs(got - ref).max() / (abs(ref).max() + 1e-6)
    assert 0 < err < 0.1, err  # bf16 matmuls really ran, and stay close
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(input_ids=torch.randn(2, 16), output_router_logits=True)
    assert all(r.dtype == torch.float32 for r in out.router_logits)
    with pytest.raises(ValueError, match="autocast"):
        model.generate(torch.randn(1, 8), max_new_tokens=2, autocast="bf16")


def test_preallocated_cache_generation_equals_dynamic_cache_and_no_cache():
    """generate's default cache (written in place) against transformers' DynamicCache (concatenation per step) and
    against re-running the whole sequence; the horizon heads make steps of several points (64 / 32 / 8 / 1)."""
    from transformers import DynamicCache

    from moezoo.cache_compat import PreallocatedCache

    model = _model()
    x = torch.randn(3, 25)
    mask = torch.ones(3, 25, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        for m in (None, mask):
            new = model.generate(x, attention_mask=m, max_new_tokens=21)
            old = model.generate(x, attention_mask=m, max_new_tokens=21, cache=DynamicCache(config=model.config))
            ref = model.generate(x, attention_mask=m, max_new_tokens=21, use_cache=False)
            torch.testing.assert_close(new, old, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(new, ref, atol=1e-5, rtol=1e-4)
    # the layer: views of one buffer, filled in place; growing past max_cache_len and a replaced tensor reallocate
    cache = PreallocatedCache(1, 4)
    k = torch.randn(2, 1, 3, 5)
    a, _ = cache.update(k, k + 1, 0)
    b, bv = cache.update(k[:, :, :1] * 2, k[:, :, :1], 0)
    assert a.shape[-2] == 3 and b.shape[-2] == 4 and cache.get_seq_length() == 4 and b._base is cache.layers[0]._kbuf
    c, cv = cache.update(k, k, 0)  # 7 > 4: the buffer doubles, the prefix is kept
    assert c.shape[-2] == 7 and cache.layers[0]._kbuf.shape[-2] == 8
    torch.testing.assert_close(c, torch.cat([k, k[:, :, :1] * 2, k], -2))
    torch.testing.assert_close(cv, torch.cat([k + 1, k[:, :, :1], k], -2))
    cache.layers[0].reorder_cache(torch.tensor([1, 0]))
    d, _ = cache.update(k[:, :, :1], k[:, :, :1], 0)
    torch.testing.assert_close(d, torch.cat([c.flip(0), k[:, :, :1]], -2))
    with pytest.raises(ValueError, match="max_cache_len"):
        PreallocatedCache(1, 0)
