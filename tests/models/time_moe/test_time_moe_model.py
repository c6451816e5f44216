"""Time-MoE model: registry sizes (total/active parameters), dense baseline of equal active parameters, head selection,
loss semantics (label padding, masks), KV cache, attention masks (left padding), experts implementations, errors."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
from moezoo.cache_compat import output_cache  # noqa: E402
from moezoo.core import MoELayer  # noqa: E402
from moezoo.models.time_moe import (MoezooTimeMoeConfig, MoezooTimeMoeForPrediction,  # noqa: E402
                                    dense_config_like)


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return moezoo.create_model("time_moe_tiny_e4k2", tiny=True).eval()


def _meta(name_or_config):
    with torch.device("meta"):
        if isinstance(name_or_config, str):
            return moezoo.create_model(name_or_config)
        return MoezooTimeMoeForPrediction(name_or_config)


def test_registered_sizes_match_the_paper():
    assert {"time_moe_50m", "time_moe_200m", "time_moe_tiny_e4k2"} <= set(moezoo.list_models(family="time_moe"))
    s50 = _meta("time_moe_50m").parameter_summary()
    assert 112e6 < s50["total"] < 114e6 and 49e6 < s50["active"] < 51e6  # paper: 113M total / 50M active
    s200 = _meta("time_moe_200m").parameter_summary()
    assert 450e6 < s200["total"] < 456e6 and 197e6 < s200["active"] < 201e6  # paper: 453M / 200M
    cfg = moezoo.get_model_config("time_moe_50m")
    assert cfg.moe_intermediate_size == 768 and cfg.horizon_lengths == [1, 8, 32, 64]
    assert cfg.norm_topk_prob is False and cfg.shared_expert_gate and cfg.router_aux_loss_coef == 0.02


@pytest.mark.parametrize("name", ["time_moe_50m", "time_moe_tiny_e4k2"])
def test_dense_config_like_has_equal_active_parameters(name):
    cfg = moezoo.get_model_config(name)
    dense = dense_config_like(cfg)
    assert dense.use_dense and not cfg.use_dense
    moe, den = _meta(cfg).parameter_summary(), _meta(dense).parameter_summary()
    assert den["moe_layers"] == [] and den["total"] == den["active"]
    if (cfg.num_experts + 1) % 3 == 0:  # the documented exact case
        assert den["active"] == moe["active"]
    assert abs(den["active"] - moe["active"]) <= cfg.num_hidden_layers * cfg.hidden_size
    assert dense_config_like(dense).dense_intermediate_size == dense.dense_intermediate_size
    with pytest.raises(TypeError, match="MoezooTimeMoeConfig"):
        dense_config_like(moezoo.get_model_config("lm_tiny_e8k2"))


def test_dense_model_trains_without_aux_loss():
    cfg = dense_config_like(moezoo.get_model_config("time_moe_tiny_e4k2", tiny=True))
    model = MoezooTimeMoeForPrediction(cfg)
    out = model(**model.example_inputs())
    assert out.aux_loss is None and out.router_logits == () and torch.isfinite(out.loss)
    out.loss.backward()


def test_head_selection_and_truncation(tiny):
    assert tiny.config.horizon_lengths == [1, 4, 8]
    assert [tiny.select_horizon(n)[1] for n in (None, 1, 3, 4, 7, 8, 100)] == [1, 1, 1, 4, 4, 8, 8]
    x = torch.randn(2, 6)
    with torch.no_grad():
        assert tiny(input_ids=x).logits.shape == (2, 6, 1)
        assert tiny(input_ids=x, max_horizon_length=5).logits.shape == (2, 6, 4)
        assert tiny(input_ids=x, max_horizon_length=50).logits.shape == (2, 6, 8)
    cfg = moezoo.get_model_config("time_moe_tiny_e4k2", tiny=True, horizon_lengths=[4, 8])
    m = MoezooTimeMoeForPrediction(cfg).eval()
    with torch.no_grad():  # first head larger than asked: truncated (official)
        full = m(input_ids=x).logits
        assert torch.equal(m(input_ids=x, max_horizon_length=2).logits, full[..., :2])
    with pytest.raises(ValueError, match="max_horizon_length"):
        tiny(input_ids=x, max_horizon_length=0)


def test_loss_is_mean_huber_over_heads_plus_aux(tiny):
    inp = tiny.example_inputs(seq_len=10, generator=torch.Generator().manual_seed(0))
    x, y = inp["input_ids"], inp["labels"]
    with torch.no_grad():
        out = tiny(**inp)
        h = tiny.model(input_ids=x).last_hidden_state
        per_head = []
        for head, hl in zip(tiny.lm_heads, tiny.config.horizon_lengths):
            pred = head(h).view(2, 10, hl)
            losses = []
            for t in range(10):
                n = min(hl, 10 - t)  # "exclude": only targets inside the window
                losses.append(F.huber_loss(pred[:, t, :n], y[:, t + 1 - 1:t + n], reduction="none", delta=2.0))
            per_head.append(torch.cat([l.reshape(-1) for l in losses]).mean())
        want = sum(per_head) / 3 + out.aux_loss
    torch.testing.assert_close(out.loss, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(out.logits, tiny.lm_heads[0](h))  # with labels: the first head (official)
    # the official padding counts zero-padded targets; with loss masks both conventions agree
    tiny.config.label_padding = "official"
    with torch.no_grad():
        off = tiny(**inp).loss
        masks = torch.ones(2, 10)
        masks[0, -2:] = 0
        off_m = tiny(**inp, loss_masks=masks).loss
    tiny.config.label_padding = "exclude"
    with torch.no_grad():
        exc_m = tiny(**inp, loss_masks=masks).loss
    assert not torch.allclose(off, out.loss)
    torch.testing.assert_close(off_m, exc_m)


def test_kv_cache_forward_equals_full_forward(tiny):
    x = torch.randn(2, 12)
    with torch.no_grad():
        full = tiny(input_ids=x, use_cache=False, max_horizon_length=8).logits
        first = tiny(input_ids=x[:, :7], use_cache=True, max_horizon_length=8)
        second = tiny(input_ids=x[:, 7:], cache=output_cache(first), use_cache=True, max_horizon_length=8)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        nocache = tiny.generate(x, max_new_tokens=13, use_cache=False)
        cache = tiny.generate(x, max_new_tokens=13)
    assert cache.shape == (2, 25) and torch.equal(cache[:, :12], x)
    torch.testing.assert_close(cache, nocache, atol=1e-5, rtol=1e-4)
    # generate runs through transformers' GenerationMixin (max_length, streamer) with the Time-MoE decoding loop
    with torch.no_grad():
        torch.testing.assert_close(tiny.generate(inputs=x, max_length=25), cache)

    class Streamer:
        chunks = []

        def put(self, v):
            self.chunks.append(v.shape[1])

        def end(self):
            self.chunks.append("end")

    streamer = Streamer()
    with torch.no_grad():
        tiny.generate(x, max_new_tokens=13, streamer=streamer)
    assert streamer.chunks == [12, 8, 4, 1, "end"]  # the prompt, then the official head choice: 8, 4, 1


def test_left_padding_with_attention_mask_matches_unpadded(tiny):
    x = torch.randn(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    padded = x.clone()
    padded[1, :4] = 0.0
    for impl in ("sdpa", "eager"):
        tiny.config._attn_implementation = impl
        with torch.no_grad():
            got = tiny.generate(padded, attention_mask=mask, max_new_tokens=9)
            want = tiny.generate(x[1:, 4:], max_new_tokens=9)
        torch.testing.assert_close(got[1, -9:], want[0, -9:], atol=1e-5, rtol=1e-4)


def test_experts_implementation_switch_keeps_outputs(tiny):
    x = torch.randn(2, 9)
    with torch.no_grad():
        ref = tiny(input_ids=x).logits
        tiny.set_experts_implementation("eager")
        assert tiny.config._experts_implementation == "eager"
        got = tiny(input_ids=x).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert all(isinstance(m, MoELayer) for _, m in tiny.moe_layers()) and len(tiny.moe_layers()) == 2


def test_input_size_two_and_3d_inputs():
    cfg = moezoo.get_model_config("time_moe_tiny_e4k2", tiny=True, input_size=2)
    m = MoezooTimeMoeForPrediction(cfg).eval()
    inp = m.example_inputs(seq_len=6)
    assert inp["input_ids"].shape == (2, 6, 2)
    out = m(**inp)
    assert out.logits.shape == (2, 6, 2) and torch.isfinite(out.loss)
    with torch.no_grad():
        assert m.generate(inp["input_ids"], max_new_tokens=5).shape == (2, 11, 2)
    with pytest.raises(ValueError, match="input_size=2"):
        m(input_ids=torch.randn(2, 6))
    with pytest.raises(ValueError, match="input_size=1"):
        m.forecast(torch.randn(6), 3)


def test_bad_inputs_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match="NaN or inf"):
        tiny(input_ids=torch.tensor([[1.0, float("nan"), 2.0]]))
    with pytest.raises(TypeError, match="real numbers"):
        tiny(input_ids=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels must have"):
        tiny(input_ids=torch.randn(2, 5), labels=torch.randn(2, 4))
    with pytest.raises(ValueError, match="loss_masks"):
        tiny(input_ids=torch.randn(2, 5), labels=torch.randn(2, 5), loss_masks=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        tiny(input_ids=torch.randn(2, 5), attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny.generate(torch.randn(1, 4), max_new_tokens=0)
    with pytest.raises(ValueError, match="do_sample"):
        tiny.generate(torch.randn(1, 4), max_new_tokens=2, do_sample=True)
    int_in = tiny(input_ids=torch.arange(6).view(1, 6)).logits  # integer values are accepted as floats
    torch.testing.assert_close(int_in, tiny(input_ids=torch.arange(6.0).view(1, 6)).logits)


def test_config_validation():
    with pytest.raises(ValueError, match="strictly increasing"):
        MoezooTimeMoeConfig(horizon_lengths=[8, 1])
    with pytest.raises(ValueError, match="label_padding"):
        MoezooTimeMoeConfig(label_padding="zeros")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        MoezooTimeMoeConfig(num_attention_heads=12, num_key_value_heads=5)
    assert MoezooTimeMoeConfig(intermediate_size=96, num_experts_per_tok=3).moe_intermediate_size == 32
    assert MoezooTimeMoeConfig(horizon_lengths=16).horizon_lengths == [16]
