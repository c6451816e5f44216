"""Balance losses (micro / global batch), the DeepSeek-V3 selection-bias update, coefficient schedules, null usage."""
from __future__ import annotations

import datetime
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moezoo.core import MoELayer, build_moe_layer, RouterOutput, TopKRouter
from moezoo.core.losses import (CoefficientSchedule, null_expert_usage, router_z_loss, switch_balance_loss,
                                update_selection_bias)
from moezoo.core.routing import RouterOutput

H, E, K = 8, 6, 2
N_PER_RANK = 10


def _router(seed=0, **kw):
    torch.manual_seed(seed)
    return TopKRouter(H, E, K, **kw)


def _batch():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2 * N_PER_RANK, H, generator=g)
    mask = torch.ones(2 * N_PER_RANK)
    mask[[1, 4, 5, 13]] = 0  # rank 0 keeps 7 tokens, rank 1 keeps 9: unequal token counts
    return x, mask


def _reference_loss(probs, indices, R, mask=None):
    """E * sum_e f_e P_e written out with explicit loops (independent of the implementation)."""
    T = probs.shape[0]
    m = torch.ones(T) if mask is None else mask.float()
    f = torch.zeros(R)
    for t in range(T):
        for e in indices[t].tolist():
            if e < R:
                f[e] += m[t]
    f = f / m.sum()
    P = (probs * m[:, None]).sum(0) / m.sum()
    return R * (f * P).sum()


# ---------------------------------------------------------------------------------------------------- micro-batch


def test_switch_loss_matches_explicit_formula_with_sentinels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 5, generator=g)
    probs = logits.softmax(-1)
    idx = torch.tensor([[0, 1], [2, 5], [5, 5], [4, 3], [1, 0], [2, 2], [3, 5], [0, 4], [1, 2]])  # 5 = sentinel
    ro = RouterOutput.from_selection(logits, probs, idx, torch.rand(9, 2, generator=g), 5)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1])
    torch.testing.assert_close(switch_balance_loss(ro), _reference_loss(probs, idx, 5))
    torch.testing.assert_close(switch_balance_loss(ro, attention_mask=mask), _reference_loss(probs, idx, 5, mask))
    # num_experts scales the loss like transformers' num_experts argument
    torch.testing.assert_close(switch_balance_loss(ro, num_experts=10), 2 * switch_balance_loss(ro))


def test_switch_loss_layers_of_different_width():
    """Layers with different slot widths (top-p, expert choice) can be mixed: = the mean of equal-sized layer terms."""
    g = torch.Generator().manual_seed(1)
    p1, p2 = torch.randn(6, 4, generator=g).softmax(-1), torch.randn(6, 4, generator=g).softmax(-1)
    ro1 = RouterOutput.from_selection(p1.log(), p1, torch.tensor([[0], [1], [2], [3], [0], [1]]), torch.ones(6, 1), 4)
    ro2 = RouterOutput.from_selection(p2.log(), p2, torch.tensor([[0, 1, 4]] * 6), torch.ones(6, 3), 4)
    both = switch_balance_loss([ro1, ro2])
    ref = _reference_loss(torch.cat([p1, p2]), torch.cat([torch.cat([ro1.indices, torch.full((6, 2), 4)], 1),
                                                          ro2.indices]), 4)
    torch.testing.assert_close(both, ref)
    with pytest.raises(ValueError, match="num_experts"):
        switch_balance_loss([ro1, RouterOutput.from_selection(p2.log(), p2[:, :3].contiguous(), ro1.indices.clamp(max=2), torch.ones(6, 1), 3)])
    with pytest.raises(ValueError, match="attention_mask"):
        switch_balance_loss(ro1, attention_mask=torch.ones(5))


def test_switch_loss_balanced_minimum_and_gradient():
    # perfectly balanced routing with uniform probabilities: loss == k (the minimum of E * sum f P with sum f = k)
    T = 12
    probs = torch.full((T, 4), 0.25, requires_grad=True)
    idx = torch.stack([torch.arange(T) % 4, (torch.arange(T) + 1) % 4], 1)
    ro = RouterOutput.from_selection(probs.log(), probs, idx, torch.ones(T, 2), 4)
    loss = switch_balance_loss(ro)
    torch.testing.assert_close(loss, torch.tensor(2.0))
    loss.backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0


def test_global_batch_without_process_group_is_micro_batch():
    assert not dist.is_initialized()
    x, mask = _batch()
    ro = _router()(x)
    torch.testing.assert_close(switch_balance_loss(ro, global_batch=True, attention_mask=mask),
                               switch_balance_loss(ro, attention_mask=mask))


def test_router_z_loss():
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    ro = RouterOutput.from_selection(logits, logits.softmax(-1), torch.tensor([[0], [0]]), torch.ones(2, 1), 2)
    ref = ((math.log(2.0)) ** 2 + math.log(math.e + math.exp(-1)) ** 2) / 2
    torch.testing.assert_close(router_z_loss(ro), torch.tensor(ref))


# ---------------------------------------------------------------------------------------------------- distributed


def _dist_worker(rank, world, tmpdir, rank_offset=0):
    rank = rank + rank_offset
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/pg", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        x, mask = _batch()
        sl = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        router = _router()
        ro = router(x[sl])
        loss = switch_balance_loss(ro, attention_mask=mask[sl], global_batch=True)
        loss_nomask = switch_balance_loss(router(x[sl]), global_batch=True)
        micro = switch_balance_loss(ro, attention_mask=mask[sl])
        loss.backward()
        biased = _router(use_selection_bias=True)
        with torch.no_grad():
            ro_b = biased(x[sl])
        delta = update_selection_bias(biased, ro_b, gamma=0.01, attention_mask=mask[sl])
        torch.save({"loss": loss.detach(), "loss_nomask": loss_nomask.detach(), "micro": micro.detach(),
                    "grad": router.weight.grad.clone(), "delta": delta, "bias": biased.e_score_correction_bias.clone()},
                   f"{tmpdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_batch_loss_and_bias_update_two_gloo_processes(tmp_path):
    # rank 1 is a spawned process, rank 0 this one (one child: re-importing transformers costs ~7 s per process)
    ctx = mp.spawn(_dist_worker, args=(2, str(tmp_path), 1), nprocs=1, join=False)
    try:
        _dist_worker(0, 2, str(tmp_path))
    finally:
        ctx.join()
    assert not dist.is_initialized()
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, mask = _batch()
    router = _router()
    ro = router(x)
    full = switch_balance_loss(ro, attention_mask=mask)
    full.backward()
    # the mean over ranks of the global-batch loss (and the DDP-averaged gradient) == the concatenated batch's
    torch.testing.assert_close((res[0]["loss"] + res[1]["loss"]) / 2, full.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((res[0]["grad"] + res[1]["grad"]) / 2, router.weight.grad, atol=1e-6, rtol=1e-5)
    full_nomask = switch_balance_loss(router(x))
    torch.testing.assert_close((res[0]["loss_nomask"] + res[1]["loss_nomask"]) / 2, full_nomask.detach(),
                               atol=1e-6, rtol=1e-5)
    # ... which the micro-batch loss is not
    assert abs(float((res[0]["micro"] + res[1]["micro"]) / 2 - full.detach())) > 1e-4
    # the bias update uses the all-reduced load: both ranks apply the single-process update on the whole batch
    biased = _router(use_selection_bias=True)
    with torch.no_grad():
        ro_b = biased(x)
    delta = update_selection_bias(biased, ro_b, gamma=0.01, attention_mask=mask)
    for r in res:
        torch.testing.assert_close(r["delta"], delta)
        torch.testing.assert_close(r["bias"], biased.e_score_correction_bias)
    assert delta.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- bias update


def test_update_selection_bias_sign_rule_and_inputs():
    router = _router(use_selection_bias=True)
    load = torch.tensor([5.0, 1.0, 3.0, 3.0, 0.0, 6.0])  # mean 3
    d = update_selection_bias(router, load, gamma=0.5)
    torch.testing.assert_close(d, torch.tensor([-0.5, 0.5, 0.0, 0.0, 0.5, -0.5]))
    torch.testing.assert_close(router.e_score_correction_bias, d)
    # only the sign matters: a rescaled load (e.g. fractions) gives the same update; a MoELayer and a raw tensor work too
    update_selection_bias(router, load / 8, gamma=0.5)
    torch.testing.assert_close(router.e_score_correction_bias, 2 * d)
    bias = torch.zeros(6)
    update_selection_bias(bias, load, gamma=1.0)
    torch.testing.assert_close(bias, 2 * d)
    layer = build_moe_layer(hidden_size=H, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=4,
                     router_kwargs=dict(scoring_func="sigmoid", use_selection_bias=True))
    update_selection_bias(layer, load, gamma=0.5)
    torch.testing.assert_close(layer.gate.e_score_correction_bias, d)
    for bad, match in ((_router(), "use_selection_bias"), (torch.zeros(2, 3), "1-D bias")):
        with pytest.raises(ValueError, match=match):
            update_selection_bias(bad, load)
    with pytest.raises(ValueError, match="load has 3 experts"):
        update_selection_bias(router, torch.ones(3))
    with pytest.raises(ValueError, match="gamma"):
        update_selection_bias(router, load, gamma=-1.0)
    with pytest.raises(ValueError, match="load must be"):
        update_selection_bias(router, "uniform")


def test_update_selection_bias_balances_a_skewed_router():
    """Run as in a training loop: the bias update alone drives a skewed sigmoid router towards balance."""
    torch.manual_seed(0)
    router = TopKRouter(H, 8, 2, scoring_func="sigmoid", use_selection_bias=True)
    with torch.no_grad():
        router.weight[0] += 2.0  # expert 0 (and the correlated ones) wins for most tokens
    x = torch.randn(128, H) + 0.5
    before = torch.bincount(router(x).indices.flatten(), minlength=8).float()
    for _ in range(150):
        with torch.no_grad():
            ro = router(x)
        update_selection_bias(router, ro, gamma=0.02)
    after = torch.bincount(router(x).indices.flatten(), minlength=8).float()
    ideal = 128 * 2 / 8
    assert before.max() > 2.5 * ideal
    assert after.max() < 1.5 * ideal and after.min() > 0.5 * ideal
    # gradients are untouched: the bias is a buffer and the update runs under no_grad
    assert not router.e_score_correction_bias.requires_grad


# ---------------------------------------------------------------------------------------------------- schedules


def test_coefficient_schedules():
    c = CoefficientSchedule(0.01)
    assert c(0) == c(10 ** 6) == 0.01
    w = CoefficientSchedule(0.02, "linear_warmup", warmup_steps=100)
    assert w(0) == 0.0 and math.isclose(w(50), 0.01) and w(100) == 0.02 and w(5000) == 0.02
    cos = CoefficientSchedule(1.0, "cosine", warmup_steps=10, decay_steps=100, final_value=0.1)
    assert cos(0) == 0.0 and math.isclose(cos(5), 0.5)
    assert math.isclose(cos(10), 1.0) and math.isclose(cos(60), 0.55) and math.isclose(cos(110), 0.1)
    assert math.isclose(cos(10 ** 5), 0.1)
    vals = [cos(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone decay
    assert "cosine" in repr(cos)
    lin = CoefficientSchedule(0.025, "linear_decay", decay_steps=10000, final_value=0.001)  # UniMoE-Audio aux weight
    assert lin(0) == 0.025 and math.isclose(lin(4000), 0.0154) and math.isclose(lin(10000), 0.001)
    assert math.isclose(lin(10 ** 6), 0.001)
    for kwargs, match in ((dict(value=1.0, kind="step"), "kind"),
                          (dict(value=1.0, kind="linear_warmup"), "warmup_steps > 0"),
                          (dict(value=1.0, kind="cosine"), "decay_steps"),
                          (dict(value=1.0, kind="linear_decay"), "decay_steps"),
                          (dict(value=1.0, warmup_steps=-1), "warmup_steps")):
        with pytest.raises(ValueError, match=match):
            CoefficientSchedule(**kwargs)
    with pytest.raises(ValueError, match="step"):
        c(-1)


# ---------------------------------------------------------------------------------------------------- null usage


def test_null_expert_usage():
    layer = build_moe_layer(hidden_size=H, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=4, num_null_experts=2)
    idx = torch.tensor([[0, 4], [5, 4], [1, 2], [3, 6]])  # ids 4, 5 are null; 6 the sentinel
    ro = RouterOutput.from_selection(torch.zeros(4, 6), torch.full((4, 6), 1 / 6), idx, torch.ones(4, 2), 6)
    # 7 non-sentinel slots, 3 of them null
    torch.testing.assert_close(null_expert_usage(ro, layer.zero_flop.null_ids()), torch.tensor(3 / 7))
    torch.testing.assert_close(null_expert_usage([ro, ro], [4, 5], attention_mask=torch.tensor([1, 0, 1, 1])),
                               torch.tensor(1 / 5))
    assert float(null_expert_usage(ro, [])) == 0.0
    with pytest.raises(ValueError, match="null_ids"):
        null_expert_usage(ro, [6])
