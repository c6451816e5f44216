"""Top-2 capacity gating (GShard / DeepSpeed, MoE-LLaVA) in the core: router + ``apply_capacity(policy="choice")``."""
from __future__ import annotations

import math

import pytest
import torch

from moezoo.core import RouterOutput, Top2CapacityRouter, apply_capacity, build_moe_layer, build_router
from moezoo.core.routing.output import RouterOutput
from moezoo.core.routing.top2_capacity import sample_gumbel, top2_capacity


def _ro(idx, w, E):
    idx = torch.tensor(idx)
    T = idx.shape[0]
    return RouterOutput.from_selection(torch.zeros(T, E), torch.zeros(T, E), idx, torch.tensor(w, dtype=torch.float32), E)


def test_choice_policy_queues_first_choices_before_second_choices():
    # expert 0: second choice of token 0, first choice of tokens 1, 2; capacity 2 -> token 0's second choice dropped
    ro = _ro([[1, 0], [0, 1], [0, 1]], [[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]], 2)
    out = apply_capacity(ro, 2, 1.0, policy="choice", capacity=2)
    assert out.indices.tolist() == [[1, 2], [0, 1], [0, 2]]
    assert out.extras["capacity_slot"].tolist() == [[0, -1], [0, 1], [1, -1]]
    assert out.extras["capacity"] == 2
    # the token-major "position" policy would keep token 0's second choice instead
    pos = apply_capacity(ro, 2, 1.0, policy="position", capacity=2)
    assert pos.indices[0].tolist() == [1, 0]


def test_capacity_matches_deepspeed_formula():
    assert top2_capacity(14, 4, 1.5, 0) == 11 and top2_capacity(14, 4, 2.0, 0) == 14
    assert top2_capacity(3, 8, 1.0, 4) == 4
    r = Top2CapacityRouter(8, 4, 2, capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=0)
    assert r.capacity(14) == 11
    r.eval()
    assert r.capacity(14) == 14


def _slow_reference(logits, noise, cap):
    """Loop form of the gate written from the DeepSpeed description (no moezoo code)."""
    T, E = logits.shape
    p = logits.softmax(-1)
    t1 = p.argmax(-1)
    masked = (logits + noise).clone()
    masked[torch.arange(T), t1] = -math.inf
    t2 = masked.argmax(-1)
    fill = [0] * E
    kept1 = []
    for t in range(T):
        e = int(t1[t])
        kept1.append(fill[e] < cap)
        fill[e] += 1
    kept2 = []
    for t in range(T):
        e = int(t2[t])
        kept2.append(fill[e] < cap)
        fill[e] += 1
    w = torch.zeros(T, E)
    for t in range(T):
        a = p[t, t1[t]] * kept1[t]
        b = p[t, t2[t]] * kept2[t]
        d = max(float(a + b), torch.finfo(torch.float32).eps)
        w[t, t1[t]] += a / d
        w[t, t2[t]] += b / d
    l_aux = (p.mean(0) * torch.bincount(t1, minlength=E).float() / T).sum() * E
    return w, t1, t2, l_aux


@pytest.mark.parametrize("E,T,cf,seed", [(4, 14, 1.0, 0), (6, 9, 0.5, 1), (3, 20, 0.75, 2), (8, 5, 2.0, 3)])
def test_router_matches_loop_reference(E, T, cf, seed):
    g = torch.Generator().manual_seed(seed)
    H = 12
    r = Top2CapacityRouter(H, E, 2, capacity_factor=cf, eval_capacity_factor=cf, min_capacity=0)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, H, generator=g))
    x = torch.randn(T, H, generator=g)
    x[: T // 2] += 3 * r.weight[0] / r.weight[0].norm()  # pile up on one expert to force drops
    noise = sample_gumbel((T, E), generator=g)
    ro = r(x, gumbel_noise=noise)
    with torch.no_grad():
        w, t1, t2, l_aux = _slow_reference(x @ r.weight.T, noise, r.capacity(T))
    torch.testing.assert_close(ro.combine_weights(), w, atol=1e-6, rtol=1e-5)
    assert torch.equal(ro.extras["top1"], t1) and torch.equal(ro.extras["top2"], t2)
    torch.testing.assert_close(ro.extras["l_aux"], l_aux, atol=1e-6, rtol=1e-5)
    assert (ro.extras["capacity_slot"] < r.capacity(T)).all()


def test_default_is_deterministic_and_sampling_uses_torch_gumbel():
    r = Top2CapacityRouter(8, 5, 2, min_capacity=100)
    x = torch.randn(30, 8)
    a, b = r(x), r(x)
    assert torch.equal(a.indices, b.indices)
    second = a.logits.clone()
    second[torch.arange(30), a.extras["top1"]] = -math.inf
    assert torch.equal(a.extras["top2"], second.argmax(-1))  # no noise: second-largest
    r.second_expert_sampling = True
    torch.manual_seed(7)
    got = r(x)
    torch.manual_seed(7)
    g = torch.distributions.Gumbel(torch.tensor(0.0), torch.tensor(1.0)).rsample((30, 5))
    torch.testing.assert_close(got.extras["top2"], r(x, gumbel_noise=g).extras["top2"])


def test_layer_gradients_and_drop_everything_gives_zero_rows():
    layer = build_moe_layer(hidden_size=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=6,
                     router_type="top2_capacity", router_kwargs=dict(capacity_factor=0.1, min_capacity=1))
    x = torch.randn(2, 10, 8, requires_grad=True)
    y, ro = layer(x)
    assert isinstance(ro, RouterOutput) and ro.extras["capacity"] == 1
    dropped = (ro.indices >= 4).all(-1)
    assert dropped.any() and torch.equal(y.reshape(-1, 8)[dropped], torch.zeros(int(dropped.sum()), 8))
    (y.sum() + ro.extras["l_aux"]).backward()
    assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0
    assert x.grad is not None


def test_no_drop_keeps_every_pair_and_renormalises():
    r = Top2CapacityRouter(8, 4, 2, capacity_factor=0.01, drop_tokens=False)
    ro = r(torch.randn(40, 8))
    assert (ro.indices < 4).all()
    torch.testing.assert_close(ro.weights.sum(-1), torch.ones(40))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_experts_per_tok must be 2"):
        build_router("top2_capacity", hidden_size=8, num_experts=4, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        Top2CapacityRouter(8, 4, 2, capacity_factor=0)
    with pytest.raises(ValueError, match="gumbel_noise must have shape"):
        Top2CapacityRouter(8, 4, 2)(torch.randn(5, 8), gumbel_noise=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="drop_policy"):
        apply_capacity(_ro([[0, 1]], [[0.5, 0.5]], 2), 2, 1.0, policy="nope")
