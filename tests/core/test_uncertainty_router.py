"""Uncertainty-aware router: equals the plain top-k router without noise, probit calibration (more confident where the
Monte-Carlo samples agree), gradients in training, eval modes, any token count, no carried state."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from moezoo.core import FMEMoELayer, ROUTERS, TopKRouter, UncertaintyRouter, build_router
from moezoo.core.routing.uncertainty import probit_calibrate


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def _pair(H=16, E=6, k=2, **kw):
    torch.manual_seed(0)
    u = UncertaintyRouter(H, E, k, **kw)
    plain = TopKRouter(H, E, k, softmax_after_topk=True, bias=True)
    with torch.no_grad():
        plain.weight.copy_(u.weight)
        u.bias.normal_()
        plain.bias.copy_(u.bias)
    return u, plain


def test_registered():
    assert ROUTERS["uncertainty"] is UncertaintyRouter
    assert isinstance(build_router("uncertainty", hidden_size=4, num_experts=3, top_k=1), UncertaintyRouter)


@pytest.mark.parametrize("kw", [dict(input_dropout=0.0, logit_noise_std=0.0, num_samples=5),
                                dict(input_dropout=0.0, logit_noise_std=0.0, num_samples=1)])
def test_zero_variance_equals_plain_router_in_training(kw):
    u, plain = _pair(**kw)
    u.train(), plain.train()
    x = torch.randn(23, 16)
    a, b = u(x), plain(x)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.weights, b.weights)
    torch.testing.assert_close(a.logits, b.logits)
    assert torch.equal(a.extras["logit_var"], torch.zeros_like(a.logits))


def test_single_sample_is_the_plain_router_on_that_sample():
    u, plain = _pair(input_dropout=0.3, num_samples=1)
    u.train()
    x = torch.randn(11, 16)
    a = u(x, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    mask = torch.bernoulli(torch.full((1, 11, 16), 0.7), generator=g) / 0.7
    b = plain.eval()((x * mask)[0])
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.weights, b.weights)


def test_deterministic_eval_equals_plain_router():
    u, plain = _pair(input_dropout=0.2, logit_noise_std=1.0)
    u.eval(), plain.eval()
    x = torch.randn(9, 16)
    a, b = u(x), plain(x)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.weights, b.weights)


@settings(max_examples=25, deadline=None)
@given(mu=st.lists(st.floats(-5, 5), min_size=2, max_size=6), v1=st.floats(0, 10), dv=st.floats(0.01, 10))
def test_probit_calibration_flattens_with_variance(mu, v1, dv):
    mu = torch.tensor(mu)
    assert torch.equal(probit_calibrate(mu, torch.zeros_like(mu)), mu)
    lo = probit_calibrate(mu, torch.full_like(mu, v1)).softmax(-1)
    hi = probit_calibrate(mu, torch.full_like(mu, v1 + dv)).softmax(-1)
    assert entropy(hi) >= entropy(lo) - 1e-6  # more disagreement -> less confident
    z = probit_calibrate(torch.tensor([2.0]), torch.tensor([8.0 / math.pi]))
    torch.testing.assert_close(z, torch.tensor([2.0 / math.sqrt(2.0)]))


def test_agreeing_samples_give_more_confident_weights():
    torch.manual_seed(0)
    E = 4
    calm = UncertaintyRouter(8, E, E, input_dropout=0.0, logit_noise_std=0.0, num_samples=16).train()
    noisy = UncertaintyRouter(8, E, E, input_dropout=0.0, logit_noise_std=3.0, num_samples=16).train()
    with torch.no_grad():
        w = torch.randn(E, 8) * 2
        for r in (calm, noisy):
            r.weight.copy_(w)
    x = torch.randn(400, 8)
    a, b = calm(x), noisy(x, generator=torch.Generator().manual_seed(0))
    assert entropy(b.weights).mean() > entropy(a.weights).mean() + 0.05
    # the documented formula, per token: z = mean / sqrt(1 + pi var / 8) over the S dropout samples
    drop = UncertaintyRouter(8, E, 2, input_dropout=0.5, num_samples=32).train()
    x1 = torch.randn(5, 8)
    ro = drop(x1, generator=torch.Generator().manual_seed(1))
    samples = drop.sample_logits(x1, torch.Generator().manual_seed(1))
    torch.testing.assert_close(ro.extras["mean_logits"], samples.mean(0))
    torch.testing.assert_close(ro.extras["logit_var"], samples.var(0, unbiased=False))
    torch.testing.assert_close(ro.logits, samples.mean(0) / torch.sqrt(1 + math.pi / 8 * samples.var(0, unbiased=False)))
    assert (ro.extras["logit_var"] > 0).all()
    # every logit moves towards 0 (the uncertain ones most), never away from it
    assert (ro.logits.abs() <= ro.extras["mean_logits"].abs() + 1e-7).all()


def test_gradients_flow_in_training_and_weights_are_not_vanishing():
    torch.manual_seed(0)
    layer = FMEMoELayer(hidden_size=12, num_experts=5, num_experts_per_tok=2, router_type="uncertainty",
                        router_kwargs={"input_dropout": 0.2, "logit_noise_std": 0.5, "num_samples": 4}).train()
    x = torch.randn(3, 7, 12)  # B=3, N=7, E=5: no B == N == E restriction
    out, ro = layer(x)
    torch.testing.assert_close(ro.weights.sum(-1), torch.ones(21))
    assert ro.weights.min() > 0
    out.pow(2).mean().backward()
    assert layer.gate.weight.grad.abs().sum() > 0 and layer.gate.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(1, 12), (5, 12), (64, 12)])
def test_any_token_count_and_token_independent_in_eval(shape):
    torch.manual_seed(0)
    r = UncertaintyRouter(12, 4, 2, eval_mode="mc", input_dropout=0.3, num_samples=3).eval()
    det = UncertaintyRouter(12, 4, 2).eval()
    x = torch.randn(*shape)
    ro = r(x)
    assert ro.indices.shape == (shape[0], 2) and torch.isfinite(ro.weights).all()
    full = det(x)
    for t in range(min(shape[0], 3)):  # deterministic routing of a token does not depend on the batch
        one = det(x[t:t + 1])
        assert torch.equal(one.indices[0], full.indices[t])
        torch.testing.assert_close(one.weights[0], full.weights[t])


def test_mc_eval_is_reproducible_and_keeps_no_state():
    torch.manual_seed(0)
    r = UncertaintyRouter(10, 4, 2, eval_mode="mc", input_dropout=0.4, num_samples=4, eval_seed=7).eval()
    x = torch.randn(6, 10)
    first = r(x)
    torch.manual_seed(123)  # the global RNG does not matter in mc eval
    second = r(x)
    assert torch.equal(first.weights, second.weights) and torch.equal(first.indices, second.indices)
    assert set(dict(r.state_dict())) == {"weight", "bias"}
    r.train()
    t1, t2 = r(x), r(x)
    assert not torch.equal(t1.logits, t2.logits)  # training samples fresh noise each call


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        UncertaintyRouter(4, 3, 1, num_samples=0)
    with pytest.raises(ValueError, match="input_dropout"):
        UncertaintyRouter(4, 3, 1, input_dropout=1.0)
    with pytest.raises(ValueError, match="logit_noise_std"):
        UncertaintyRouter(4, 3, 1, logit_noise_std=-1)
    with pytest.raises(ValueError, match="eval_mode"):
        UncertaintyRouter(4, 3, 1, eval_mode="sometimes")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        UncertaintyRouter(4, 3, 4)
    with pytest.raises(ValueError, match="hidden_size=4"):
        UncertaintyRouter(4, 3, 1)(torch.randn(2, 5))
