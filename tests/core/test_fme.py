"""FME (MoFME) experts and layer: the FiLM math against a naive per-token, per-expert loop, the official off-by-one
slot mapping, sparse == dense (values and gradients), sentinels, errors, rebuild from ``init_kwargs``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from moezoo.core import FMEExperts, FMEMoELayer, TopKRouter
from moezoo.core.fme import FME_IMPLEMENTATIONS


def naive_mix(P: torch.Tensor, Pb: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
              offset: bool) -> torch.Tensor:
    """sum over slots of w * f_slot(y), one token and one slot at a time (written from the MoFME formula)."""
    E, W = P.shape[0], y.shape[1]
    out = torch.zeros_like(y)
    for t in range(y.shape[0]):
        for s in range(idx.shape[1]):
            r = int(idx[t, s])
            if r >= E:
                continue  # sentinel
            if offset and r == 0:
                f = F.gelu(y[t])
            else:
                e = r - 1 if offset else r
                A, B = P[e, :W], P[e, W:]
                a, b = Pb[e, :W], Pb[e, W:]
                f = (A @ y[t] + a) * y[t] + (B @ y[t] + b)
            out[t] += w[t, s] * f
    return out


def _routing(T, E, k, g):
    logits = torch.randn(T, E, generator=g)
    top = logits.topk(k, dim=-1)
    return top.indices, top.values.softmax(-1)


@settings(max_examples=15, deadline=None)
@given(E=st.integers(2, 6), k=st.integers(1, 3), T=st.integers(1, 9), W=st.integers(1, 7), offset=st.booleans(),
       impl=st.sampled_from(FME_IMPLEMENTATIONS), seed=st.integers(0, 1000))
def test_fme_experts_match_naive_loop(E, k, T, W, offset, impl, seed):
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    m = FMEExperts(num_experts=E, hidden_size=W, official_expert_offset=offset, implementation=impl)
    with torch.no_grad():
        m.film_proj.copy_(torch.randn(m.film_proj.shape, generator=g))
        m.film_proj_bias.copy_(torch.randn(m.film_proj_bias.shape, generator=g))
    y = torch.randn(T, W, generator=g)
    idx, w = _routing(T, E, k, g)
    got = m(y, idx, w)
    want = naive_mix(m.film_proj.detach(), m.film_proj_bias.detach(), y, idx, w, offset)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("offset", [False, True])
def test_sparse_equals_dense_values_and_gradients(offset):
    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(40, 12, generator=g)
    idx, w0 = _routing(40, 5, 2, g)
    results = {}
    for impl in FME_IMPLEMENTATIONS:
        torch.manual_seed(3)
        m = FMEExperts(num_experts=5, hidden_size=12, official_expert_offset=offset, implementation=impl)
        y, w = y0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = m(y, idx, w)
        out.backward(torch.ones_like(out))
        results[impl] = (out.detach(), y.grad, w.grad, m.film_proj.grad, m.film_proj_bias.grad)
    for a, b in zip(results["sparse"], results["dense"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_official_offset_slot_zero_is_gelu_and_last_expert_unused():
    torch.manual_seed(0)
    E, W, T = 4, 8, 30
    m = FMEExperts(num_experts=E, hidden_size=W, official_expert_offset=True)
    y = torch.randn(T, W)
    only0 = m(y, torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1))
    torch.testing.assert_close(only0, F.gelu(y))
    idx = torch.arange(E).repeat(T, 1)  # every slot used
    w = torch.rand(T, E)
    before = m(y, idx, w)
    with torch.no_grad():
        m.film_proj[E - 1].add_(5.0)  # the last expert: never read with the official mapping
        m.film_proj_bias[E - 1].add_(5.0)
    torch.testing.assert_close(m(y, idx, w), before, atol=0.0, rtol=0.0)
    with torch.no_grad():
        m.film_proj[0].add_(1.0)  # expert 0 is slot 1
    assert not torch.allclose(m(y, idx, w), before)
    # default mapping: slot e is expert e, so the last expert matters
    d = FMEExperts(num_experts=E, hidden_size=W)
    ref = d(y, idx, w)
    with torch.no_grad():
        d.film_proj_bias[E - 1].add_(1.0)
    assert not torch.allclose(d(y, idx, w), ref)


def test_sentinel_slots_cost_nothing():
    torch.manual_seed(0)
    m = FMEExperts(num_experts=3, hidden_size=4)
    y = torch.randn(5, 4)
    idx = torch.tensor([[0, 3]] * 5)  # 3 = sentinel (num_experts)
    w = torch.tensor([[1.0, 7.0]] * 5)
    torch.testing.assert_close(m(y, idx, w), m(y, idx[:, :1], w[:, :1]))
    all_sentinel = m(y, torch.full((5, 2), 3), torch.ones(5, 2))
    assert torch.equal(all_sentinel, torch.zeros_like(y))


def test_layer_is_router_basenet_film_adaptor():
    torch.manual_seed(0)
    H, E, k, W, A = 16, 4, 2, 12, 24
    layer = FMEMoELayer(hidden_size=H, num_experts=E, num_experts_per_tok=k, fme_intermediate_size=W, adaptor_size=A,
                        router_kwargs={"softmax_after_topk": True, "bias": True}).eval()
    assert isinstance(layer.gate, TopKRouter) and layer.gate.bias is not None
    x = torch.randn(2, 7, H)
    out, ro = layer(x)
    assert out.shape == x.shape and ro.indices.shape == (14, k)
    xt = x.reshape(-1, H)
    logits = F.linear(xt, layer.gate.weight, layer.gate.bias)
    top = logits.topk(k, -1)
    g, u = layer.basenet(F.layer_norm(xt, (H,), layer.norm.weight, layer.norm.bias)).chunk(2, -1)
    y = F.gelu(g) * u  # exact erf GELU
    mix = naive_mix(layer.experts.film_proj.detach(), layer.experts.film_proj_bias.detach(), y, top.indices,
                    top.values.softmax(-1), False)
    want = layer.adaptor_down(F.gelu(layer.adaptor_up(mix)))
    torch.testing.assert_close(out.reshape(-1, H), want, atol=1e-5, rtol=1e-5)
    # rebuilt from its JSON-able init_kwargs
    twin = FMEMoELayer(**layer.init_kwargs)
    twin.load_state_dict(layer.state_dict())
    torch.testing.assert_close(twin.eval()(x)[0], out)


def test_layer_gradients_reach_router_and_experts():
    torch.manual_seed(0)
    layer = FMEMoELayer(hidden_size=8, num_experts=4, num_experts_per_tok=2).train()
    out, ro = layer(torch.randn(3, 5, 8))
    out.pow(2).sum().backward()
    assert layer.gate.weight.grad.abs().sum() > 0
    assert layer.experts.film_proj.grad.abs().sum() > 0 and layer.basenet.weight.grad.abs().sum() > 0


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="implementation"):
        FMEExperts(num_experts=2, hidden_size=4, implementation="fast")
    with pytest.raises(ValueError, match="num_experts"):
        FMEExperts(num_experts=0, hidden_size=4)
    m = FMEExperts(num_experts=2, hidden_size=4)
    with pytest.raises(ValueError, match="FME input"):
        m(torch.randn(3, 5), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    with pytest.raises(ValueError, match="top_k_index"):
        m(torch.randn(3, 4), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    with pytest.raises(ValueError, match="adaptor_size"):
        FMEMoELayer(hidden_size=4, num_experts=2, adaptor_size=0)
    with pytest.raises(ValueError, match="hidden_size=4"):
        FMEMoELayer(hidden_size=4, num_experts=2, num_experts_per_tok=1)(torch.randn(2, 5))


def test_sorted_grouped_linear_backward_matches_autograd_float64():
    """The custom backward of the sparse FiLM product equals autograd of the per-expert formula (float64)."""
    from moezoo.core.fme import FMEExperts

    torch.manual_seed(0)
    E, W, T, k = 5, 6, 9, 2
    fme = FMEExperts(num_experts=E, hidden_size=W, implementation="sparse").double()
    with torch.no_grad():
        fme.film_proj.normal_()
        fme.film_proj_bias.normal_()
    y = torch.randn(T, W, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)])  # expert E-1 never chosen: no rows
    idx[0, 1] = E  # a sentinel slot
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y_, w_: fme(y_, idx, w_), (y, w))
    out = fme(y, idx, w)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (y, w, fme.film_proj, fme.film_proj_bias), g)
    ref = torch.zeros_like(out)
    for t in range(T):
        for s in range(k):
            e = int(idx[t, s])
            if e < E:
                ref[t] += w[t, s] * fme.expert_forward(e, y[t:t + 1])[0]
    ref_grads = torch.autograd.grad(ref, (y, w, fme.film_proj, fme.film_proj_bias), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert grads[2][E - 1].abs().sum() == 0  # an expert without tokens gets an exact zero gradient
