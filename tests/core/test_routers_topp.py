"""Top-p router (Dynamic-MoE and UniMoE-Audio conventions), AdaMoE null-expert router, MoE++ gating router, losses."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from moezoo.core import build_moe_layer
from moezoo.core.losses import switch_balance_loss, unimoe_audio_balance_loss
from moezoo.core.routing import (GatingResidualRouter, NullExpertTopKRouter, TopPRouter, build_router,
                                 sparsemixer_eval_multipliers)


def make(R, H=8, seed=0, scale=1.0, **kw):
    torch.manual_seed(seed)
    r = TopPRouter(H, R, **kw)
    with torch.no_grad():
        r.weight.mul_(scale)
    return r


def check_common(ro, R, T):
    assert ro.indices.shape == (T, R) and ro.weights.shape == (T, R)  # K = max possible
    assert ((ro.indices >= 0) & (ro.indices <= R)).all()
    assert (ro.weights >= 0).all()
    assert (ro.weights[ro.indices == R] == 0).all()
    assert (ro.experts_per_token >= 1).all()
    for row in ro.indices.tolist():
        valid = [i for i in row if i < R]
        assert len(valid) == len(set(valid))


@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 9), T=st.integers(1, 12), top_p=st.floats(0.01, 1.0), scale=st.floats(0.1, 8.0),
       seed=st.integers(0, 1000))
def test_dynamic_moe_properties(R, T, top_p, scale, seed):
    r = make(R, seed=seed, scale=scale, top_p=top_p)
    x = torch.randn(T, 8, generator=torch.Generator().manual_seed(seed))
    ro = r(x)
    check_common(ro, R, T)
    probs = x @ r.weight.T
    probs = probs.softmax(-1)
    torch.testing.assert_close(ro.probs, probs)
    for t in range(T):
        k = int(ro.experts_per_token[t])
        sel = ro.indices[t, :k]
        # weights are the raw probs, in descending order
        torch.testing.assert_close(ro.weights[t, :k], probs[t, sel])
        assert (ro.weights[t, :k].diff() <= 0).all()
        mass = probs[t, sel].sum().item()
        prefix = probs[t, sel[:-1]].sum().item()
        assert k == R or mass > top_p  # enough mass
        assert prefix <= top_p + 1e-6  # and minimal: without the last pick the mass is <= p
    assert torch.equal(ro.extras["dynamic_top_k"], ro.experts_per_token)


@settings(max_examples=40, deadline=None)
@given(D=st.integers(1, 7), Fx=st.integers(0, 3), T=st.integers(1, 10), top_p=st.floats(0.01, 1.0),
       seed=st.integers(0, 1000), pad=st.booleans())
def test_unimoe_properties(D, Fx, T, top_p, seed, pad):
    R = D + Fx
    fixed = list(range(D, R))
    r = make(R, seed=seed, scale=3.0, top_p=top_p, convention="unimoe_audio", fixed_expert_ids=fixed)
    x = torch.randn(T, 8, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(T, dtype=torch.long)
    if pad:
        mask[-1] = 0
    ro = r(x, attention_mask=mask)
    assert ro.indices.shape == (T, R)
    assert ((ro.indices >= 0) & (ro.indices <= R)).all() and (ro.weights >= 0).all()
    em = ro.expert_mask()
    assert (em[:, fixed] == 1).all()
    n_dyn = em[:, :D].sum(-1)
    real = mask.bool()
    assert (n_dyn[real] >= 1).all() and (n_dyn[~real] == 0).all()
    assert torch.equal(n_dyn[real], ro.extras["dynamic_top_k"][real])
    # total weight: dynamic multipliers sum to ~1 times the dynamic mass, so the row sums to ~1 for real tokens
    total = ro.weights.sum(-1)
    assert (total <= 1 + 1e-5).all()
    if Fx:
        assert torch.allclose(total, torch.ones(T), atol=1e-4)
        if pad:  # padding token: fixed experts weighted by softmax over the fixed columns only
            logits = x[-1] @ r.weight.T
            torch.testing.assert_close(ro.combine_weights()[-1, fixed], logits[fixed].softmax(-1))


def test_top_p_one_selects_everything():
    x = torch.randn(6, 8)
    ro = make(5, scale=5.0, top_p=1.0)(x)
    assert (ro.experts_per_token == 5).all()
    torch.testing.assert_close(ro.weights.sum(-1), torch.ones(6))
    ro = make(6, scale=5.0, top_p=1.0, convention="unimoe_audio", fixed_expert_ids=[4, 5])(x)
    assert (ro.extras["dynamic_top_k"] == 4).all() and (ro.experts_per_token == 6).all()


def test_small_top_p_is_top1():
    x = torch.randn(6, 8)
    for conv in ("dynamic_moe", "unimoe_audio"):
        r = make(5, scale=2.0, top_p=1e-6, convention=conv)
        ro = r(x)
        assert (ro.experts_per_token == 1).all()
        assert torch.equal(ro.indices[:, 0], (x @ r.weight.T).argmax(-1))


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, 2, float("nan"), "0.5", None, True])
def test_bad_top_p(bad):
    with pytest.raises(ValueError, match="top_p"):
        TopPRouter(8, 4, top_p=bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="convention"):
        TopPRouter(8, 4, top_p=0.5, convention="nope")
    with pytest.raises(ValueError, match="fixed_expert_ids"):
        TopPRouter(8, 4, top_p=0.5, fixed_expert_ids=[1])  # dynamic_moe convention
    with pytest.raises(ValueError, match="fixed_expert_ids"):
        TopPRouter(8, 4, top_p=0.5, convention="unimoe_audio", fixed_expert_ids=[4])
    r = TopPRouter(8, 4, top_p=0.5, convention="unimoe_audio")
    with pytest.raises(ValueError, match="attention_mask"):
        r(torch.randn(5, 8), attention_mask=torch.ones(4))
    with pytest.raises(ValueError, match="hidden_size"):
        r(torch.randn(5, 7))


def test_norm_topp_prob_and_registry():
    r = build_router("topp", hidden_size=8, num_experts=5, top_p=0.5, norm_topp_prob=True)
    assert isinstance(r, TopPRouter)
    ro = r(torch.randn(7, 8))
    torch.testing.assert_close(ro.weights.sum(-1), torch.ones(7))


def test_sparsemixer_multipliers():
    s = torch.tensor([[2.0, 1.98, -1.0, -3.0], [1.0, 0.5, 0.2, 0.1]])
    m = sparsemixer_eval_multipliers(s, 0.01)
    torch.testing.assert_close(m[0], torch.tensor([torch.tensor([2.0, 1.98]).softmax(0)[0].item(), 1.0, 1.0, 1.0]))
    torch.testing.assert_close(m[1], torch.ones(4))
    assert (sparsemixer_eval_multipliers(s, 0.0)[0] == 1).all()


def test_layer_with_topp_router_backward():
    layer = build_moe_layer(hidden_size=8, num_experts=4, moe_intermediate_size=16, router_type="topp",
                     router_kwargs={"top_p": 0.6}, num_null_experts=1)
    x = torch.randn(2, 5, 8, requires_grad=True)
    out, ro = layer(x)
    assert out.shape == x.shape and ro.indices.shape == (10, 5)
    out.backward(torch.ones_like(out))
    assert layer.gate.weight.grad.abs().sum() > 0 and x.grad is not None
    assert torch.isfinite(layer.experts.gate_up_proj.grad).all()


def test_null_expert_router():
    torch.manual_seed(0)
    r = NullExpertTopKRouter(8, 6, 3, num_true_experts=3)
    with torch.no_grad():
        r.weight.mul_(4)
    x = torch.randn(40, 8)
    ro = r(x)
    true = ro.indices < 3
    s = (ro.weights * true).sum(-1)
    has = true.any(-1)
    assert has.any() and (~has).any()
    torch.testing.assert_close(s[has], torch.ones(int(has.sum())))
    assert (s[~has] == 0).all()
    torch.testing.assert_close(ro.weights[~true], ro.probs.gather(1, ro.indices)[~true])  # nulls keep raw probs
    with pytest.raises(ValueError, match="num_true_experts"):
        NullExpertTopKRouter(8, 6, 3, num_true_experts=7)


def test_null_balance_loss_is_switch_over_all_experts():
    torch.manual_seed(1)
    r = NullExpertTopKRouter(8, 10, 4, num_true_experts=6)
    x = torch.randn(12, 8)
    ro = r(x)
    mask = torch.ones(12)
    mask[-5:] = 0
    for m in (None, mask):
        oh = F.one_hot(ro.indices, 10).float()
        w = torch.ones(12) if m is None else m
        f = (oh * w[:, None, None]).sum(0) / w.sum()
        p = (ro.probs * w[:, None]).sum(0) / w.sum()
        want = (f * p[None]).sum() * 10
        torch.testing.assert_close(switch_balance_loss(ro, attention_mask=m), want)


def test_gating_residual_router():
    torch.manual_seed(2)
    r = GatingResidualRouter(8, 5, 2, gate_hidden_size=12, zeroed_expert_ids=[4])
    assert r.weight.shape == (5, 12) and r.weight_in.shape == (12, 8)
    x = torch.randn(30, 8)
    res = torch.randn(30, 5)
    ro = r(x, gate_residual=res)
    base = torch.tanh(x @ r.weight_in.T) @ r.weight.T
    torch.testing.assert_close(ro.logits, base + res @ r.gate_map.weight.T)
    assert ro.extras["gate_residual"] is ro.logits
    zero = ro.indices == 4
    assert zero.any()
    assert (ro.weights[zero] == 0).all()
    torch.testing.assert_close(ro.weights.sum(-1), torch.ones(30))
    rows = zero.any(-1)
    assert (ro.weights[rows].max(-1).values == 1).all()  # (zero, X) -> X weight 1
    # default: zero expert keeps its share
    r2 = GatingResidualRouter(8, 5, 2, gate_hidden_size=12)
    r2.load_state_dict(r.state_dict())
    ro2 = r2(x, gate_residual=res)
    assert (ro2.weights[zero] > 0).all()
    torch.testing.assert_close(r2(x).logits, base)  # no residual on the first layer
    with pytest.raises(ValueError, match="gate_residual"):
        r(x, gate_residual=torch.randn(30, 4))


def test_unimoe_balance_loss_by_hand():
    # 2 dynamic + 1 fixed expert, 3 tokens, last one padded
    r = TopPRouter(4, 3, top_p=0.5, convention="unimoe_audio", fixed_expert_ids=[2])
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 1.0, 0]]))
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0]])
    ro = r(x, attention_mask=torch.tensor([1, 1, 0]))
    # token 0 -> expert 0 only, token 1 -> expert 1 only, token 2 padded (uniform probs, no selection)
    assert ro.expert_mask().tolist() == [[1, 0, 1], [0, 1, 1], [0, 0, 1]]
    f = torch.tensor([1 / 3, 1 / 3])
    p = torch.tensor([(1 + 0 + 0.5) / 3, (0 + 1 + 0.5) / 3])
    torch.testing.assert_close(unimoe_audio_balance_loss(ro), (f * p).sum() * 2)
    w = torch.tensor([1, 0, 0])
    torch.testing.assert_close(unimoe_audio_balance_loss(ro, aux_balance_weight=w), torch.tensor(1.0 * 1.0 * 2))
    with pytest.raises(ValueError, match="aux_balance_weight"):
        unimoe_audio_balance_loss(ro, aux_balance_weight=torch.ones(4))
    assert math.isfinite(unimoe_audio_balance_loss(ro, aux_balance_weight=torch.zeros(3)).item())
