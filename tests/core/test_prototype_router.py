"""Prototype router, unconditional-expert routing (any base router), routing contrastive loss, switch loss
normalisation ("slots" = DiT-MoE / DeepSeek formula)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moezoo.core import build_moe_layer, PrototypeRouter, RouterOutput, routing_contrastive_loss, switch_balance_loss
from moezoo.core.routing import ROUTERS

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def test_prototype_identity_weights_are_raw_cosines():
    torch.manual_seed(0)
    r = PrototypeRouter(16, 5, 2)
    x = torch.randn(12, 16)
    ro = r(x)
    cos = F.normalize(x, dim=-1) @ F.normalize(r.weight, dim=-1).T
    torch.testing.assert_close(ro.logits, cos)
    w, i = cos.topk(2, dim=-1)
    assert torch.equal(ro.indices, i)
    torch.testing.assert_close(ro.weights, w)  # no softmax, no renormalisation (may be negative)
    torch.testing.assert_close(ro.probs, cos.softmax(-1))  # the balance-loss distribution (ProMoE)
    assert ro.weights.min() < 0 or (cos < 0).sum() == 0


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_prototype_softmax_sigmoid_with_temperature(mode):
    torch.manual_seed(1)
    r = PrototypeRouter(8, 4, 3, weight_mode=mode, temperature=0.5, norm_topk_prob=True)
    x = torch.randn(10, 8)
    ro = r(x)
    cos = r.cosine(x)
    scores = (cos / 0.5).softmax(-1) if mode == "softmax" else torch.sigmoid(cos / 0.5)
    w, i = scores.topk(3, dim=-1)
    assert torch.equal(ro.indices, i)
    torch.testing.assert_close(ro.weights, w / w.sum(-1, keepdim=True))
    torch.testing.assert_close(ro.extras["scores"], scores)


def test_prototype_bad_arguments():
    with pytest.raises(ValueError, match="weight_mode"):
        PrototypeRouter(8, 4, 1, weight_mode="relu")
    with pytest.raises(ValueError, match="temperature"):
        PrototypeRouter(8, 4, 1, temperature=0)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        PrototypeRouter(8, 4, 5)


def test_prototype_param_path_in_layer():
    layer = build_moe_layer(hidden_size=8, num_experts=4, num_experts_per_tok=1, moe_intermediate_size=8,
                     router_type="prototype")
    assert "gate.weight" in dict(layer.named_parameters()) and isinstance(layer.gate, PrototypeRouter)


# ------------------------------------------------------------------------------------------------ unconditional expert
BASE_ROUTERS = {
    "topk": {}, "prototype": {"weight_mode": "identity"}, "topp": {"top_p": 0.5}, "expert_choice": {},
    "condition": {"condition_dim": 6}, "pooled": {}, "moepp": {}, "topk_null": {"num_true_experts": 4},
}


def _uncond_layer(router_type, E=4, k=2, **kw):
    torch.manual_seed(0)
    return build_moe_layer(hidden_size=8, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=16,
                    router_type=router_type, router_kwargs=dict(BASE_ROUTERS.get(router_type, {})),
                    unconditional_expert=True, **kw)


@pytest.mark.parametrize("router_type", sorted(BASE_ROUTERS))
def test_unconditional_expert_with_any_router(router_type):
    layer = _uncond_layer(router_type)
    B, S = 4, 5
    x = torch.randn(B, S, 8, requires_grad=True)
    null = torch.tensor([True, False, False, True])
    signals = {"condition": torch.randn(B, 6)} if router_type == "condition" else {}
    out, ro = layer(x, uncond_mask=null, **signals)
    E = layer.num_experts
    tok_null = null.repeat_interleave(S)
    assert out.shape == x.shape and ro.num_experts == E + 1
    assert (ro.indices[tok_null, 0] == E).all() and torch.equal(ro.weights[tok_null, 0], torch.ones(int(tok_null.sum())))
    assert (ro.indices[tok_null, 1:] == ro.num_experts).all()  # sentinels
    assert not (ro.indices[~tok_null] == E).any(), "conditional tokens never reach the unconditional expert"
    assert ro.extras["routed_output"].indices.shape[0] == int((~tok_null).sum())
    assert torch.isfinite(ro.logits).all() and torch.allclose(ro.probs[tok_null, E], torch.ones(()))
    # null-token output = unconditional expert alone (+ nothing else)
    xf = x.reshape(-1, 8)
    ref_null = layer.experts.expert_forward(E, xf[tok_null])
    torch.testing.assert_close(out.reshape(-1, 8)[tok_null], ref_null, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert layer.experts.gate_up_proj.grad[E].abs().sum() > 0


def test_unconditional_expert_matches_base_router_on_conditional_tokens():
    layer = _uncond_layer("topk")
    x = torch.randn(3, 4, 8)
    null = torch.tensor([False, True, False])
    out, ro = layer(x, uncond_mask=null)
    cond_x = x[~null].reshape(-1, 8)
    base = layer.gate.route_tokens(cond_x)
    rows = (~null).repeat_interleave(4)
    assert torch.equal(ro.indices[rows], base.indices)
    torch.testing.assert_close(ro.weights[rows], base.weights)
    per_token = torch.tensor([0, 1, 0]).repeat_interleave(4).bool()  # a per-token mask gives the same routing
    out2, ro2 = layer(x, uncond_mask=per_token.reshape(3, 4))
    torch.testing.assert_close(out2, out)


@pytest.mark.parametrize("router_type", ["prototype", "pooled", "expert_choice"])
def test_unconditional_expert_all_null(router_type):
    layer = _uncond_layer(router_type, k=1)
    x = torch.randn(2, 3, 8)
    out, ro = layer(x, uncond_mask=torch.tensor([True, True]))
    assert (ro.indices[:, 0] == layer.num_experts).all() and ro.extras["routed_output"].indices.shape[0] == 0
    torch.testing.assert_close(out.reshape(-1, 8), layer.experts.expert_forward(layer.num_experts, x.reshape(-1, 8)))


def test_unconditional_expert_errors():
    layer = _uncond_layer("prototype", k=1)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="uncond_mask"):
        layer(x)
    with pytest.raises(ValueError, match="uncond_mask"):
        layer(x, uncond_mask=torch.tensor([0.5, 0.1]))


def test_unconditional_expert_with_zero_flop_and_capacity():
    layer = _uncond_layer("topk", num_null_experts=2, capacity_factor=1.0)
    x = torch.randn(2, 6, 8)
    out, ro = layer(x, uncond_mask=torch.tensor([False, True]))
    E = layer.num_experts
    assert ro.num_experts == E + 1 + 2 and layer.num_routable == E + 3
    routed = ro.indices[:6]
    assert ((routed < E) | (routed > E)).all()  # null experts shifted past the unconditional id
    assert "drop_rate" in ro.extras["routed_output"].extras


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 6), st.integers(2, 6), st.data())
def test_property_null_tokens_always_go_to_uncond_expert(B, S, E, data):
    k = data.draw(st.integers(1, E))
    router = data.draw(st.sampled_from(["topk", "prototype"]))
    null = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B, max_size=B)))
    layer = build_moe_layer(hidden_size=4, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=4,
                     router_type=router, unconditional_expert=True)
    x = torch.randn(B, S, 4)
    out, ro = layer(x, uncond_mask=null)
    tok_null = null.repeat_interleave(S)
    assert ro.indices.shape == (B * S, k) and ro.weights.shape == (B * S, k) and out.shape == x.shape
    assert (ro.indices[tok_null, 0] == E).all() and (ro.weights[tok_null, 0] == 1).all()
    assert ((ro.indices[~tok_null] < E)).all()
    assert torch.equal(ro.experts_per_token, torch.where(tok_null, 1, k))


# ------------------------------------------------------------------------------------------------ RCL
def naive_rcl(protos, x, idx, tau, use_top_k):
    assign = idx if use_top_k else idx[:, :1]
    means, valid = [], []
    for c in range(protos.shape[0]):
        sel = (assign == c).any(1)
        if sel.sum() > 0:
            means.append(x[sel].mean(0))
            valid.append(c)
    if len(valid) < 2:
        return torch.zeros(())
    sim = F.normalize(protos[valid], dim=1) @ F.normalize(torch.stack(means), dim=1).T
    return F.cross_entropy(sim / tau, torch.arange(len(valid)))


@SETTINGS
@given(st.integers(1, 20), st.integers(2, 6), st.data())
def test_property_rcl_matches_naive_loop(T, E, data):
    k = data.draw(st.integers(1, E))
    use_top_k = data.draw(st.booleans())
    tau = data.draw(st.sampled_from([0.07, 0.5, 1.0]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    protos, x = torch.randn(E, 5, generator=g), torch.randn(T, 5, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    got = routing_contrastive_loss(protos, x, idx, temperature=tau, use_top_k=use_top_k)
    torch.testing.assert_close(got, naive_rcl(protos, x, idx, tau, use_top_k), atol=1e-5, rtol=1e-5)


def test_rcl_zero_with_fewer_than_two_valid_and_masks():
    protos, x = torch.randn(4, 3), torch.randn(6, 3)
    assert routing_contrastive_loss(protos, x, torch.full((6, 1), 2)) == 0
    assert routing_contrastive_loss(protos, x, torch.full((6, 2), 9)) == 0  # sentinels / uncond ids assign nothing
    idx = torch.tensor([[0], [1], [0], [1], [2], [2]])
    keep = torch.tensor([True, True, False, False, False, False])
    torch.testing.assert_close(routing_contrastive_loss(protos, x, idx, token_mask=keep),
                               naive_rcl(protos, x[:2], idx[:2], 0.07, True))
    protos.requires_grad_(True)
    routing_contrastive_loss(protos, x, idx).backward()
    assert protos.grad[:3].abs().sum() > 0 and protos.grad[3].abs().sum() == 0
    with pytest.raises(ValueError, match="temperature"):
        routing_contrastive_loss(protos, x, idx, temperature=0)


# ------------------------------------------------------------------------------------------------ balance loss
def test_switch_slots_normalisation_is_the_dit_moe_formula():
    torch.manual_seed(0)
    T, E, k = 30, 5, 2
    logits = torch.randn(T, E)
    probs = logits.softmax(-1)
    w, idx = probs.topk(k, -1)
    ro = RouterOutput(logits, probs, idx, w, torch.full((T,), k), E)
    counts = torch.stack([(idx == e).sum() for e in range(E)]).float()
    official = 0.01 * E * (probs.mean(0) * counts / (T * k)).sum()
    torch.testing.assert_close(0.01 * switch_balance_loss(ro, normalize="slots"), official)
    torch.testing.assert_close(switch_balance_loss(ro), k * switch_balance_loss(ro, normalize="slots"))
    with pytest.raises(ValueError, match="normalize"):
        switch_balance_loss(ro, normalize="experts")


def test_prototype_router_registered():
    assert ROUTERS["prototype"] is PrototypeRouter
    torch.manual_seed(0)
    assert math.isclose(PrototypeRouter(64, 32, 1).weight.std().item(), 0.02, rel_tol=0.1)  # ProMoE's N(0, 0.02)
