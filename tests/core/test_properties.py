"""Hypothesis property tests of routers, dispatch, capacity and MoELayer invariants."""
from __future__ import annotations

import os
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import moezoo.core.experts as experts_mod
from moezoo.core import MoELayer, build_moe_layer
from moezoo.core.dispatch import apply_capacity, expert_capacity
from moezoo.core.experts import build_experts, sort_by_expert
from moezoo.core.routing import ROUTERS, ExpertChoiceRouter, RouterOutput, TopKRouter

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- routers


@st.composite
def router_cases(draw):
    """(router, renormalised_sum or None) over the registered token routers and their main options."""
    H = draw(st.integers(2, 12))
    kind = draw(st.sampled_from(["topk", "topk_group", "topk_after", "expert_choice", "topp", "topk_null"]))
    seed = draw(st.integers(0, 2 ** 16))
    torch.manual_seed(seed)
    if kind in ("topk", "topk_group", "topk_after"):
        n_group = draw(st.sampled_from([1, 2, 4])) if kind == "topk_group" else 1
        E = n_group * draw(st.integers(2 if n_group > 1 else 1, 4))
        k = draw(st.integers(1, E))
        scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
        norm = draw(st.booleans())
        scale = draw(st.sampled_from([1.0, 2.5]))
        kw = dict(scoring_func=scoring, norm_topk_prob=norm, routed_scaling_factor=scale)
        if kind == "topk_group":
            topk_group = draw(st.integers(1, n_group))
            k = min(k, topk_group * (E // n_group))
            kw.update(n_group=n_group, topk_group=topk_group, use_selection_bias=draw(st.booleans()))
        if kind == "topk_after":
            kw = dict(softmax_after_topk=True)
            norm, scale = True, 1.0
        router = TopKRouter(H, E, k, **kw)
        if getattr(router, "e_score_correction_bias", None) is not None:
            router.e_score_correction_bias.normal_()
        return router, (scale if norm else None), k
    if kind == "expert_choice":
        E = draw(st.integers(1, 8))
        k = draw(st.integers(1, E))
        cf = draw(st.sampled_from([0.5, 1.0, 2.0]))
        return ExpertChoiceRouter(H, E, k, capacity_factor=cf), None, None
    if kind not in ROUTERS:  # another engineer's router not there yet
        return TopKRouter(H, 3, 2), None, 2
    E = draw(st.integers(2, 8))
    if kind == "topp":
        norm = draw(st.booleans())
        router = ROUTERS["topp"](H, E, top_p=draw(st.floats(0.05, 1.0)), norm_topp_prob=norm)
        return router, (1.0 if norm else None), None
    k = draw(st.integers(1, E))
    return ROUTERS["topk_null"](H, E, k, num_true_experts=draw(st.integers(1, E))), None, k


@SETTINGS
@given(case=router_cases(), T=st.integers(1, 24), seed=st.integers(0, 2 ** 16))
def test_router_output_invariants(case, T, seed):
    router, renorm_sum, k = case
    x = torch.randn(T, router.hidden_size, generator=_gen(seed)) * 2
    ro = router(x)
    assert isinstance(ro, RouterOutput)
    R = ro.num_experts
    assert ro.logits.shape == ro.probs.shape == (T, R)
    assert ro.indices.shape == ro.weights.shape and ro.indices.shape[0] == T
    assert ro.indices.dtype == torch.long
    valid = ro.indices < R
    assert ((ro.indices >= 0) & (ro.indices <= R)).all(), "indices must be expert ids or the sentinel"
    assert (ro.weights >= 0).all(), "combine weights must be non-negative"
    assert (ro.weights[~valid] == 0).all(), "sentinel slots carry weight 0"
    assert torch.equal(ro.experts_per_token, valid.sum(-1))
    for t in range(T):  # no expert twice for one token
        ids = ro.indices[t][valid[t]]
        assert ids.unique().numel() == ids.numel()
    assert torch.isfinite(ro.probs).all() and (ro.probs >= 0).all() and (ro.probs <= 1).all()
    if k is not None:
        assert (ro.experts_per_token <= k).all()
    if renorm_sum is not None:
        torch.testing.assert_close(ro.weights.sum(-1), torch.full((T,), renorm_sum), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- dispatch


@st.composite
def routing(draw, max_T=12):
    T = draw(st.integers(1, max_T))
    E = draw(st.integers(1, 6))
    k = draw(st.integers(1, 4))
    extra = draw(st.integers(1, 3))  # ids E .. E+extra-1 are sentinels / zero-FLOP experts
    seed = draw(st.integers(0, 2 ** 16))
    g = _gen(seed)
    idx = torch.randint(0, E + extra, (T, k), generator=g)
    w = torch.rand(T, k, generator=g)
    return E, idx, w, seed


def _pairwise_reference(experts, x, idx, w):
    """sum over every (token, slot) pair with a routed expert, one pair at a time."""
    out = torch.zeros_like(x)
    for t in range(idx.shape[0]):
        for s in range(idx.shape[1]):
            e = int(idx[t, s])
            if e < experts.num_experts:
                out[t] += w[t, s] * experts.expert_forward(e, x[t:t + 1])[0]
    return out


@SETTINGS
@given(case=routing(), bias=st.booleans(), gated=st.booleans(), act=st.sampled_from(["silu", "gelu", "relu"]))
def test_dropless_dispatch_conserves_pairs(case, bias, gated, act):
    E, idx, w, seed = case
    H, I = 6, 5
    torch.manual_seed(seed)
    experts = build_experts(None, num_experts=E, hidden_size=H, intermediate_size=I, hidden_act=act, bias=bias,
                            gated=gated)
    if bias:
        with torch.no_grad():
            for n, p in experts.named_parameters():
                if n.endswith("bias"):
                    p.normal_()
    x = torch.randn(idx.shape[0], H, generator=_gen(seed + 1))
    ref = _pairwise_reference(experts, x, idx, w)
    outs, grads = {}, {}
    g = torch.randn_like(x)
    for impl in ("moezoo", "eager"):
        experts.config._experts_implementation = impl
        experts.zero_grad()
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = experts(xi, idx, wi)
        if y.requires_grad:  # the eager loop returns a constant zero tensor when no slot hits an expert
            y.backward(g)
        outs[impl] = y.detach()
        grads[impl] = [t.grad if t.grad is not None else torch.zeros_like(t)
                       for t in [xi, wi, *experts.parameters()]]
    torch.testing.assert_close(outs["moezoo"], ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs["eager"], ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads["moezoo"], grads["eager"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # every routed pair is dispatched exactly once, sentinels never
    order, tok, counts, offs = sort_by_expert(idx, E)
    valid = idx.reshape(-1) < E
    assert int(counts.sum()) == int(valid.sum()) == order.numel()
    assert torch.equal(torch.sort(order).values, valid.nonzero().squeeze(-1))
    assert torch.equal(counts, torch.bincount(idx.reshape(-1)[valid], minlength=E))
    assert torch.equal(idx.reshape(-1)[order], torch.sort(idx.reshape(-1)[valid], stable=True).values)
    assert torch.equal(tok, order // idx.shape[1])
    assert torch.equal(offs.long(), counts.cumsum(0))


@SETTINGS
@given(case=routing(max_T=20), cf=st.floats(0.1, 2.0), policy=st.sampled_from(["probs", "position"]))
def test_apply_capacity_never_exceeds_capacity(case, cf, policy):
    E, idx, w, _ = case
    R = E  # ids >= E are sentinels here
    T, K = idx.shape
    ro = RouterOutput.from_selection(torch.zeros(T, R), torch.full((T, R), 1.0 / R), idx, w, R)
    out = apply_capacity(ro, R, cf, policy=policy)
    cap = expert_capacity(T, R, K, cf)
    assert out.extras["capacity"] == cap
    new = out.indices
    kept = new < R
    counts = torch.bincount(new[kept], minlength=R)
    assert (counts <= cap).all()
    # kept pairs are original pairs with their original weights; dropped slots become weight-0 sentinels
    assert torch.equal(new[kept], idx[kept])
    torch.testing.assert_close(out.weights[kept], ro.weights[kept])
    assert (out.weights[~kept] == 0).all() and (new[~kept] == R).all()
    before = ro.indices < R
    n_before, n_after = int(before.sum()), int(kept.sum())
    # dropless when nothing is over capacity; otherwise full experts keep exactly `cap` pairs
    before_counts = torch.bincount(idx[before], minlength=R)
    assert torch.equal(counts, before_counts.clamp(max=cap))
    assert abs(float(out.extras["drop_rate"]) - (n_before - n_after) / max(n_before, 1)) < 1e-6
    # the policy decides which pairs survive
    flat_idx, flat_kept, flat_w = idx.reshape(-1), kept.reshape(-1), ro.weights.reshape(-1)
    for e in range(R):
        pos = (flat_idx == e).nonzero().squeeze(-1)
        kept_pos, dropped_pos = pos[flat_kept[pos]], pos[~flat_kept[pos]]
        if dropped_pos.numel() and kept_pos.numel():
            if policy == "probs":
                assert flat_w[dropped_pos].max() <= flat_w[kept_pos].min()
            else:
                assert dropped_pos.min() > kept_pos.max()


# ---------------------------------------------------------------------------------------------------- MoELayer


@SETTINGS
@given(seed=st.integers(0, 2 ** 16), T=st.integers(2, 16),
       variant=st.sampled_from(["topk", "sigmoid_group", "shared_null", "capacity_probs", "expert_choice", "copy"]))
def test_moe_layer_is_token_permutation_equivariant(seed, T, variant):
    torch.manual_seed(seed)
    kw = dict(hidden_size=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=6)
    if variant == "sigmoid_group":
        kw["router_kwargs"] = dict(scoring_func="sigmoid", n_group=2, topk_group=1, use_selection_bias=True)
    elif variant == "shared_null":
        kw.update(num_shared_experts=1, shared_expert_gate=True, num_null_experts=2)
    elif variant == "capacity_probs":
        kw.update(capacity_factor=0.75, drop_policy="probs")
    elif variant == "expert_choice":
        kw.update(router_type="expert_choice", router_kwargs=dict(capacity_factor=1.5))
    elif variant == "copy":
        kw.update(num_copy_experts=1, num_constant_experts=1, num_zero_experts=1)
    layer = build_moe_layer(**kw)
    x = torch.randn(T, 8, generator=_gen(seed))
    perm = torch.randperm(T, generator=_gen(seed + 1))
    with torch.no_grad():
        out, ro = layer(x)
        out_p, ro_p = layer(x[perm])
    torch.testing.assert_close(out_p, out[perm], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ro_p.combine_weights(), ro.combine_weights()[perm], atol=1e-6, rtol=1e-5)


class _FixedRouter(nn.Module):
    """Returns a given routing decision (for testing what the layer does with it)."""

    def __init__(self, indices, weights, num_experts):
        super().__init__()
        self.indices, self.weights, self.num_experts = indices, weights, num_experts

    def forward(self, x, **_):
        T = x.shape[0]
        probs = torch.full((T, self.num_experts), 1.0 / self.num_experts)
        return RouterOutput.from_selection(probs.log(), probs, self.indices, self.weights, self.num_experts)


@SETTINGS
@given(seed=st.integers(0, 2 ** 16), T=st.integers(1, 12), k=st.integers(1, 3), n_null=st.integers(1, 3),
       impl=st.sampled_from(["moezoo", "eager"]))
def test_null_routed_tokens_cost_no_expert_flops(seed, T, k, n_null, impl):
    E = 4
    R = E + n_null
    g = _gen(seed)
    idx = torch.randint(0, R + 1, (T, k), generator=g)  # routed, null, or sentinel ids
    only_null = torch.rand(T, generator=g) < 0.5
    idx[only_null] = torch.randint(E, R + 1, (int(only_null.sum()), k), generator=g)  # null experts / sentinel only
    w = torch.rand(T, k, generator=g)
    torch.manual_seed(seed)
    layer = build_moe_layer(hidden_size=8, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=6,
                     num_null_experts=n_null, router=_FixedRouter(idx, w, R))
    layer.experts.config._experts_implementation = impl
    x = torch.randn(T, 8, generator=g)
    rows = []
    if impl == "moezoo":
        orig = experts_mod._SortedExpertsFunction.apply

        def spy(x_, tok, *a):
            rows.append(tok.clone())
            return orig(x_, tok, *a)

        target = mock.patch.object(experts_mod._SortedExpertsFunction, "apply", spy)
    else:
        orig = experts_mod._ExpertsBase.expert_forward

        def spy(self, e, xs):
            rows.append(xs.clone())
            return orig(self, e, xs)

        target = mock.patch.object(experts_mod._ExpertsBase, "expert_forward", spy)
    with target, torch.no_grad():
        out, ro = layer(x)
    n_routed_pairs = int((idx < E).sum())
    if impl == "moezoo":
        assert len(rows) == 1
        tok = rows[0]
        assert tok.numel() == n_routed_pairs  # one expert row per routed pair, none for null / sentinel slots
        assert not torch.isin(tok, only_null.nonzero().squeeze(-1)).any()
    else:
        assert sum(r.shape[0] for r in rows) == n_routed_pairs
    # tokens routed only to null experts get an exact zero output (no shared expert here)
    assert (out[only_null] == 0).all()
    ref = torch.zeros_like(x)
    for t in range(T):
        for s in range(k):
            e = int(idx[t, s])
            if e < E:
                ref[t] += w[t, s] * layer.experts.expert_forward(e, x[t:t + 1])[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
