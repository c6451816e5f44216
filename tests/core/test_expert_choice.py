"""Expert-choice routing and training-time router jitter."""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from moezoo.core import build_moe_layer, RoutingStats, build_router, switch_balance_loss
from moezoo.core.routing import ROUTERS, ExpertChoiceRouter, TopKRouter, jitter


def _reference_expert_choice(probs: torch.Tensor, capacity: int) -> torch.Tensor:
    """(T, E) 0/1 choice written with explicit loops: each expert takes its `capacity` highest-score tokens."""
    T, E = probs.shape
    chosen = torch.zeros(T, E, dtype=torch.bool)
    for e in range(E):
        col = probs[:, e].tolist()
        best = sorted(range(T), key=lambda t: -col[t])[:capacity]
        chosen[best, e] = True
    return chosen


@pytest.mark.parametrize("T,E,k,cf", [(16, 4, 2, 1.0), (10, 8, 1, 2.0), (7, 3, 2, 0.5), (5, 8, 2, 1.0)])
def test_expert_choice_matches_reference(T, E, k, cf):
    torch.manual_seed(T * E)
    router = ExpertChoiceRouter(12, E, k, capacity_factor=cf)
    x = torch.randn(T, 12)
    ro = router(x)
    C = min(T, max(1, math.ceil(cf * T * k / E)))
    assert ro.extras["capacity"] == C == router.capacity(T)
    probs = (x @ router.weight.t()).softmax(-1)
    torch.testing.assert_close(ro.probs, probs)
    ref = _reference_expert_choice(probs, C)
    assert torch.equal(ro.expert_mask().bool(), ref)
    # every expert gets exactly C tokens: balanced by construction
    assert torch.equal(ro.expert_mask().sum(0), torch.full((E,), C))
    # per token: variable count, sentinel-padded to width E, best expert first, weights = router scores
    assert ro.indices.shape == (T, E)
    assert torch.equal(ro.experts_per_token, ref.sum(-1))
    valid = ro.indices < E
    assert torch.equal(valid, torch.arange(E).expand(T, E) < ro.experts_per_token[:, None])  # sentinels at the end
    torch.testing.assert_close(ro.combine_weights(), probs * ref)
    w = ro.weights.masked_fill(~valid, -1)
    assert (w[:, :-1] >= w[:, 1:]).all()
    assert float(ro.extras["unrouted_fraction"]) == pytest.approx(float((ref.sum(-1) == 0).float().mean()))
    assert float(ro.extras["drop_rate"]) == 0.0


def test_expert_choice_max_experts_per_token_and_mask():
    torch.manual_seed(0)
    router = ExpertChoiceRouter(8, 6, 3, capacity_factor=2.0, max_experts_per_token=2)
    x = torch.randn(12, 8)
    ro = router(x)
    full = ExpertChoiceRouter(8, 6, 3, capacity_factor=2.0)
    full.load_state_dict(router.state_dict())
    ro_full = full(x)
    assert ro.indices.shape == (12, 2)
    torch.testing.assert_close(ro.indices, ro_full.indices[:, :2])
    cut = int((ro_full.experts_per_token - 2).clamp_min(0).sum())
    assert cut > 0
    assert float(ro.extras["drop_rate"]) == pytest.approx(cut / int(ro_full.experts_per_token.sum()))
    # padding tokens are never chosen and do not count in the capacity
    mask = torch.ones(12, dtype=torch.long)
    mask[8:] = 0
    ro_m = full(x, attention_mask=mask)
    assert (ro_m.experts_per_token[8:] == 0).all()
    assert ro_m.extras["capacity"] == full.capacity(8) == math.ceil(2.0 * 8 * 3 / 6)
    ro_8 = full(x[:8])
    torch.testing.assert_close(ro_m.combine_weights()[:8], ro_8.combine_weights())
    with pytest.raises(ValueError, match="attention_mask"):
        full(x, attention_mask=torch.ones(5))


def test_expert_choice_validation():
    assert ROUTERS["expert_choice"] is ExpertChoiceRouter
    for kwargs, match in ((dict(top_k=0), "num_experts_per_tok"), (dict(capacity_factor=0), "capacity_factor"),
                          (dict(scoring_func="relu"), "scoring_func"), (dict(max_experts_per_token=9), "max_experts"),
                          (dict(min_capacity=0), "min_capacity")):
        with pytest.raises(ValueError, match=match):
            ExpertChoiceRouter(**{"hidden_size": 4, "num_experts": 4, "top_k": 2, **kwargs})
    with pytest.raises(ValueError, match="hidden_size=4"):
        build_router("expert_choice", hidden_size=4, num_experts=4)(torch.randn(3, 5))


def test_expert_choice_in_moe_layer_trains_and_matches_eager():
    torch.manual_seed(0)
    layer = build_moe_layer(hidden_size=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                     router_type="expert_choice", router_kwargs=dict(capacity_factor=1.25, scoring_func="sigmoid"),
                     num_null_experts=1)
    assert isinstance(layer.gate, ExpertChoiceRouter) and layer.gate.top_k == 2 and layer.gate.num_experts == 5
    x = torch.randn(2, 10, 8)
    out, ro = layer(x)
    assert ro.indices.shape == (20, 5)
    # reference: explicit sum over (token, chosen routed expert) pairs; the null expert contributes nothing
    ref = torch.zeros(20, 8)
    xf = x.reshape(20, 8)
    for t in range(20):
        for slot in range(5):
            e, w = int(ro.indices[t, slot]), ro.weights[t, slot]
            if e < 4:
                ref[t] += w * layer.experts.expert_forward(e, xf[t:t + 1])[0]
    torch.testing.assert_close(out.reshape(20, 8), ref, atol=1e-5, rtol=1e-4)
    # gradients reach the router through the combine weights; stats and balance loss accept the wide slots
    out.backward(torch.ones_like(out))
    assert layer.gate.weight.grad.abs().sum() > 0
    stats = RoutingStats()
    stats.update(0, ro)
    assert stats.summary()[0]["load"] == pytest.approx([0.2] * 5)
    assert torch.isfinite(switch_balance_loss(ro))


# ---------------------------------------------------------------------------------------------------- jitter


def test_jitter_function_bounds():
    x = torch.randn(1000, 4) + 3.0
    y = jitter(x, 0.1, training=True)
    ratio = y / x
    assert (ratio >= 0.9 - 1e-6).all() and (ratio <= 1.1 + 1e-6).all()
    assert ratio.std() > 0.03  # really random (uniform on +-0.1 has std ~0.058)
    assert jitter(x, 0.1, training=False) is x
    assert jitter(x, 0.0, training=True) is x


@pytest.mark.parametrize("cls,kw", [(TopKRouter, dict(top_k=2)), (ExpertChoiceRouter, dict(top_k=2))])
def test_router_jitter_only_in_training(cls, kw):
    torch.manual_seed(0)
    eps = 0.05
    noisy = cls(16, 8, jitter_noise=eps, **kw)
    clean = cls(16, 8, **kw)
    clean.load_state_dict(noisy.state_dict())
    x = torch.randn(64, 16)
    noisy.eval(), clean.eval()
    a, b = noisy(x), clean(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.indices, b.indices)
    noisy.train()
    c = noisy(x)
    assert not torch.equal(c.logits, b.logits)
    # |W (x * u) - W x| <= eps * |W| |x| row-wise (u in [1 - eps, 1 + eps])
    bound = eps * (x.abs() @ noisy.weight.abs().t())
    assert ((c.logits - b.logits).abs() <= bound + 1e-5).all()
    torch.manual_seed(1)
    d1 = noisy(x).logits
    torch.manual_seed(1)
    d2 = noisy(x).logits
    assert torch.equal(d1, d2)  # the noise comes from torch's RNG: reproducible under a seed
