"""Conditional routers (condition / pooled / modality), their losses, and the DriveMoE camera router."""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from moezoo.core import build_moe_layer, build_router
from moezoo.core.losses import (modality_balance_loss, mutual_information_loss, sequence_balance_loss,
                                switch_balance_loss)
from moezoo.core.modules import CameraRouter
from moezoo.core.routing import (ConditionRouter, ModalityRouter, PooledRouter, RouterOutput, expand_per_sample,
                                 next_token_modality_ids)

H = 12


# ---------------------------------------------------------------------------------------------------------------- condition


def test_condition_router_per_sample_experts():
    torch.manual_seed(0)
    B, S, C, E, k = 4, 5, 6, 5, 2
    layer = build_moe_layer(hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=8,
                     router_type="condition", router_kwargs=dict(condition_dim=C))
    assert isinstance(layer.gate, ConditionRouter) and layer.gate.weight.shape == (E, C)
    x = torch.randn(B, S, H)
    cond = torch.randint(0, 2, (B, C)).bool()
    cond[0] = True  # samples differ
    y, ro = layer(x, condition=cond)
    assert y.shape == x.shape
    idx = ro.indices.view(B, S, k)
    w = ro.weights.view(B, S, k)
    assert (idx == idx[:, :1]).all() and torch.equal(w, w[:, :1].expand_as(w))
    # the routing depends on the condition only, not on the tokens
    _, ro2 = layer(torch.randn(B, S, H), condition=cond)
    assert torch.equal(ro.indices, ro2.indices)
    logits = cond.float() @ layer.gate.weight.T
    assert torch.allclose(ro.logits.view(B, S, E), logits[:, None].expand(B, S, E))
    # renormalised top-2
    assert torch.allclose(ro.weights.sum(-1), torch.ones(B * S))
    # per-token conditions (B, S, C) are accepted and give the same result
    _, ro3 = layer(x, condition=cond[:, None].expand(B, S, C))
    assert torch.equal(ro3.indices, ro.indices)


def test_condition_router_top1_raw_weight_and_grad():
    torch.manual_seed(1)
    layer = build_moe_layer(hidden_size=H, num_experts=3, num_experts_per_tok=1, moe_intermediate_size=8,
                     router_type="condition", router_kwargs=dict(condition_dim=4, norm_topk_prob=False))
    x = torch.randn(2, 3, H)
    cond = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]])
    y, ro = layer(x, condition=cond)
    assert torch.allclose(ro.weights[:, 0], ro.probs.max(-1).values) and (ro.weights < 1).all()
    y.sum().backward()
    assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0


def test_condition_router_bad_condition():
    r = ConditionRouter(4, 3, 1)
    x = torch.randn(6, 8)
    with pytest.raises(ValueError, match="condition="):
        r(x)
    with pytest.raises(ValueError, match="condition_dim=4"):
        r(x, condition=torch.ones(2, 5))
    with pytest.raises(ValueError, match="batch size 4"):
        r(x, condition=torch.ones(4, 4))  # 4 does not divide 6 tokens
    with pytest.raises(ValueError, match="batch size 3"):
        r(x, condition=torch.ones(3, 4), token_shape=(2, 3))
    with pytest.raises(ValueError, match="tokens"):
        r(x, condition=torch.ones(2, 2, 4))
    with pytest.raises(ValueError, match="condition must be a tensor"):
        r(x, condition=[[1, 0, 1, 0]])


def test_condition_router_mi_loss_only_in_training():
    torch.manual_seed(2)
    r = build_router("condition", condition_dim=3, num_experts=4, top_k=1, mi_loss_coef=0.5)
    x = torch.randn(6, H)
    cond = torch.tensor([[1.0, 0, 1], [0, 1, 1], [1.0, 0, 1]])
    r.train()
    out = r(x, condition=cond)
    expected = 0.5 * mutual_information_loss(out.probs, expand_per_sample(cond, 6))
    assert out.aux_loss is not None and torch.allclose(out.aux_loss, expected)
    r.eval()
    assert r(x, condition=cond).aux_loss is None


def test_mutual_information_loss_formula():
    torch.manual_seed(3)
    T = 7
    f = torch.rand(T, 4)
    c = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1], [0, 2], [1, 1], [1, 0]])
    got = mutual_information_loss(f, c, temperature=0.2, threshold=0.99)
    fn = f / f.norm(dim=-1, keepdim=True)
    sim = torch.exp(fn @ fn.T / 0.2)
    cn = c / c.norm(dim=-1, keepdim=True)
    pos = ((cn @ cn.T) > 0.99).float() - torch.eye(T)
    want = (-torch.log((sim * pos).sum(1) / (sim.sum(1) + 1e-8) + 1e-8)).mean()
    assert torch.allclose(got, want, atol=1e-6)
    # token 5 has no positive: its term is -log(1e-8)
    assert got > -math.log(1e-8) / T
    # tiny temperatures stay finite (shifted exponent)
    assert torch.isfinite(mutual_information_loss(f, c, temperature=0.005))
    with pytest.raises(ValueError, match="one per token"):
        mutual_information_loss(f, c[:3])


# ------------------------------------------------------------------------------------------------------------------- pooled


def test_pooled_router_per_sample_and_temperature():
    torch.manual_seed(4)
    B, S, E, k = 3, 6, 5, 2
    layer = build_moe_layer(hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=8,
                     hidden_act="gelu_tanh", router_type="pooled")
    r = layer.gate
    assert isinstance(r, PooledRouter)
    with torch.no_grad():
        r.temperature.fill_(-0.5)
    x = torch.randn(B, S, H)
    y, ro = layer(x)
    want_logits = (x @ r.weight.T).mean(1) / 0.5
    assert torch.allclose(ro.extras["sample_logits"], want_logits, atol=1e-6)
    idx = ro.indices.view(B, S, k)
    assert (idx == idx[:, :1]).all()
    assert torch.equal(ro.extras["sample_indices"], idx[:, 0])
    assert torch.allclose(ro.extras["sample_weights"].sum(-1), torch.ones(B))
    # each token's output only depends on its own features given the sample's experts: recompute sample 0 by hand
    e = ro.extras["sample_indices"][0]
    w = ro.extras["sample_weights"][0]
    ref = sum(w[j] * layer.experts.expert_forward(int(e[j]), x[0]) for j in range(k))
    assert torch.allclose(y[0], ref, atol=1e-5)
    # gradient reaches the temperature and the weight
    y.sum().backward()
    assert r.temperature.grad is not None and r.temperature.grad.abs().item() > 0
    assert r.weight.grad.abs().sum() > 0


def test_pooled_router_signals():
    torch.manual_seed(5)
    r = PooledRouter(H, 4, 2)
    x = torch.randn(2 * 3, H)
    other = torch.randn(2, 7, H)
    ro = r(x, token_shape=(2, 3), router_hidden_states=other)
    assert torch.allclose(ro.extras["sample_logits"], (other @ r.weight.T).mean(1))
    logits = torch.randn(2, 4)
    ro2 = r(x, router_logits=logits)  # batch from the logits, tokens per sample = 6 / 2
    assert torch.equal(ro2.extras["sample_logits"], logits)
    assert torch.equal(ro2.logits, logits.repeat_interleave(3, 0))
    # attention_mask: padding left out of the mean (default) or kept (official plain mean)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    xs = x.view(2, 3, H)
    got = r(x, token_shape=(2, 3), attention_mask=mask).extras["sample_logits"]
    tok = xs @ r.weight.T
    assert torch.allclose(got[0], tok[0, :2].mean(0), atol=1e-6)
    plain = PooledRouter(H, 4, 2, mask_padding=False)
    plain.load_state_dict(r.state_dict())
    assert torch.allclose(plain(x, token_shape=(2, 3), attention_mask=mask).extras["sample_logits"][0], tok[0].mean(0),
                          atol=1e-6)


def test_pooled_router_errors():
    r = PooledRouter(H, 4, 2)
    x = torch.randn(6, H)
    with pytest.raises(ValueError, match="token_shape"):
        r(x)
    with pytest.raises(ValueError, match="router_logits"):
        r(x, router_logits=torch.randn(2, 5))
    with pytest.raises(ValueError, match="does not divide"):
        r(x, router_logits=torch.randn(4, 4))
    with pytest.raises(ValueError, match="batch"):
        r(x, token_shape=(3, 2), router_logits=torch.randn(2, 4))
    with pytest.raises(ValueError, match="use_linear=False"):
        PooledRouter(H, 4, 2, use_linear=False)(x, token_shape=(2, 3))
    with pytest.raises(ValueError, match="temperature"):
        PooledRouter(H, 4, 2, temperature=0.0)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        PooledRouter(H, 4, 5)


def test_sequence_balance_loss_formula():
    torch.manual_seed(6)
    B, S, E, k = 3, 4, 5, 2
    r = build_router("topk", hidden_size=H, num_experts=E, top_k=k)
    ro = r(torch.randn(B * S, H))
    got = sequence_balance_loss(ro, batch_size=B)
    want = 0.0
    for b in range(B):
        cnt = torch.bincount(ro.indices.view(B, -1)[b], minlength=E).float()
        want += (cnt * E / (S * k) * ro.probs.view(B, S, E)[b].mean(0)).sum()
    assert torch.allclose(got, torch.as_tensor(want / B), atol=1e-6)
    assert torch.allclose(sequence_balance_loss(ro.reshape_tokens(B, S)), got)
    # masking out padding equals the loss of the shortened batch
    mask = torch.ones(B, S)
    mask[:, -1] = 0
    sub = RouterOutput(ro.logits.view(B, S, E)[:, :-1].reshape(-1, E), ro.probs.view(B, S, E)[:, :-1].reshape(-1, E),
                       ro.indices.view(B, S, k)[:, :-1].reshape(-1, k), ro.weights.view(B, S, k)[:, :-1].reshape(-1, k),
                       ro.experts_per_token.view(B, S)[:, :-1].reshape(-1), E)
    assert torch.allclose(sequence_balance_loss(ro, batch_size=B, attention_mask=mask),
                          sequence_balance_loss(sub, batch_size=B), atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        sequence_balance_loss(ro)
    with pytest.raises(ValueError, match="does not divide"):
        sequence_balance_loss(ro, batch_size=5)


# ----------------------------------------------------------------------------------------------------------------- modality


def test_modality_router_pools_respected():
    torch.manual_seed(7)
    E, k = 6, 2
    pools = [[1, 2, 3, 4], [0, 1, 2], [5, 4]]
    layer = build_moe_layer(hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=8,
                     router_type="modality", router_kwargs=dict(expert_pools=pools))
    r = layer.gate
    assert isinstance(r, ModalityRouter) and r.weight.shape == (9, H)
    x = torch.randn(3, 8, H)
    mids = torch.randint(0, 3, (3, 8))
    y, ro = layer(x, modality_ids=mids)
    flat = mids.reshape(-1)
    for m, pool in enumerate(pools):
        sel = flat == m
        assert torch.isin(ro.indices[sel], torch.tensor(pool)).all()
        outside = [e for e in range(E) if e not in pool]
        assert (ro.probs[sel][:, outside] == 0).all() and torch.isinf(ro.logits[sel][:, outside]).all()
        # the pool's own gate rows give the logits; the pool's softmax / top-k / renorm the weights
        lm = x.reshape(-1, H)[sel] @ r.gate_weight(m).T
        assert torch.allclose(ro.extras["pool_logits"][m], lm, atol=1e-6)
        p = lm.softmax(-1)
        w, li = p.topk(k)
        assert torch.equal(ro.indices[sel], torch.tensor(pool)[li])
        assert torch.allclose(ro.weights[sel], w / w.sum(-1, keepdim=True), atol=1e-6)
    assert y.shape == x.shape
    # per-modality Switch loss equals the generic one restricted to the pool
    losses = modality_balance_loss(ro)
    for m, pool in enumerate(pools):
        sel = flat == m
        p = ro.probs[sel][:, pool]
        li = p.topk(k).indices
        sub = RouterOutput(p, p, li, torch.ones_like(p[:, :k]), torch.full((li.shape[0],), k), len(pool))
        assert torch.allclose(losses[m], switch_balance_loss(sub))


def test_modality_router_default_pools_and_next_token_rule():
    tt = torch.tensor([[0, 1, 1, 1, 0, 1], [1, 1, 0, 0, 1, 1]])
    assert torch.equal(next_token_modality_ids(tt), torch.tensor([[0, 1, 1, 0, 0, 0], [1, 0, 0, 0, 1, 0]]))
    r = ModalityRouter(H, 4, 2, next_token_modalities=(1,), fallback_modality=0)
    assert r.expert_pools == [[0, 1, 2, 3]] * 2
    ro = r(torch.randn(12, H), modality_ids=tt)
    assert torch.equal(ro.extras["modality_ids"].view(2, 6), next_token_modality_ids(tt))
    # flattened ids need token_shape for the next-token rule
    ro2 = r(torch.randn(12, H), modality_ids=tt.reshape(-1), token_shape=(2, 6))
    assert torch.equal(ro2.extras["modality_ids"], ro.extras["modality_ids"])
    with pytest.raises(ValueError, match="token_shape"):
        r(torch.randn(12, H), modality_ids=tt.reshape(-1))


def test_modality_router_errors():
    with pytest.raises(ValueError, match="expert_pools"):
        ModalityRouter(H, 4, 1, expert_pools=[[0, 4]])
    with pytest.raises(ValueError, match="expert_pools"):
        ModalityRouter(H, 4, 1, expert_pools=[[0, 0]])
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModalityRouter(H, 4, 3, expert_pools=[[0, 1], [1, 2, 3]])
    with pytest.raises(ValueError, match="next_token_modalities"):
        ModalityRouter(H, 4, 1, next_token_modalities=(2,))
    r = ModalityRouter(H, 4, 1)
    x = torch.randn(4, H)
    with pytest.raises(ValueError, match="modality_ids="):
        r(x)
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        r(x, modality_ids=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="one id per token"):
        r(x, modality_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        r(x, modality_ids=torch.zeros(4))
    ro = build_router("topk", hidden_size=H, num_experts=4, top_k=1)(x)
    with pytest.raises(ValueError, match="ModalityRouter"):
        modality_balance_loss(ro)


def test_modality_router_empty_modality_and_grad():
    torch.manual_seed(8)
    layer = build_moe_layer(hidden_size=H, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                     router_type="modality", router_kwargs=dict(expert_pools=[[1, 2, 3], [0, 1, 2]]))
    x = torch.randn(2, 3, H, requires_grad=True)
    y, ro = layer(x, modality_ids=torch.zeros(2, 3, dtype=torch.long))
    losses = modality_balance_loss(ro)
    assert losses[1] == 0 and losses[0] > 0
    (y.sum() + losses.sum()).backward()
    g = layer.gate.weight.grad
    assert g[:3].abs().sum() > 0 and g[3:].abs().sum() == 0  # only the language gate was used


# ------------------------------------------------------------------------------------------------------------------ camera


def test_camera_router_shapes_select_and_errors():
    torch.manual_seed(9)
    r = CameraRouter(16, 4, num_heads=4)
    ft, wp = torch.randn(3, 5, 16), torch.randn(3, 2)
    r.eval()
    logits = r(ft, wp)
    assert logits.shape == (3, 4)
    assert torch.equal(r(ft, wp), logits)  # eval: dropout off
    sel = r.select(logits)
    assert torch.equal(sel.argmax(-1), logits.argmax(-1)) and torch.equal(sel.sum(-1), torch.ones(3))
    r.train()
    s = r.select(r(ft, wp))
    assert torch.allclose(s.sum(-1), torch.ones(3)) and ((s == 0) | (s == 1)).all()
    (s * torch.arange(4.0)).sum().backward()
    assert r.router_query.grad is not None and r.router_query.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="front_tokens"):
        r(torch.randn(3, 5, 8), wp)
    with pytest.raises(ValueError, match="waypoint"):
        r(ft, torch.randn(2, 2))
    with pytest.raises(ValueError, match="divisible"):
        CameraRouter(10, 3, num_heads=4)
    assert set(k.split(".")[0] for k in r.state_dict()) == {"router_query", "waypoint_projector", "cross_attn", "ln", "mlp"}


def test_camera_router_matches_plain_attention():
    torch.manual_seed(10)
    D, heads = 8, 2
    r = CameraRouter(D, 3, num_heads=heads, waypoint_hidden=6).eval()
    ft, wp = torch.randn(2, 4, D), torch.randn(2, 2)
    sd = r.state_dict()
    kv = torch.cat([(F.relu(wp @ sd["waypoint_projector.0.weight"].T + sd["waypoint_projector.0.bias"])
                     @ sd["waypoint_projector.2.weight"].T + sd["waypoint_projector.2.bias"])[:, None], ft], 1)
    wq, wk, wv = sd["cross_attn.in_proj_weight"].chunk(3)
    bq, bk, bv = sd["cross_attn.in_proj_bias"].chunk(3)
    q = (sd["router_query"] @ wq.T + bq).expand(2, -1, -1).view(2, 1, heads, D // heads).transpose(1, 2)
    k = (kv @ wk.T + bk).view(2, -1, heads, D // heads).transpose(1, 2)
    v = (kv @ wv.T + bv).view(2, -1, heads, D // heads).transpose(1, 2)
    a = ((q @ k.transpose(-1, -2)) / math.sqrt(D // heads)).softmax(-1) @ v
    a = a.transpose(1, 2).reshape(2, 1, D) @ sd["cross_attn.out_proj.weight"].T + sd["cross_attn.out_proj.bias"]
    h = F.layer_norm(a, (D,), sd["ln.weight"], sd["ln.bias"])
    want = (F.relu(h @ sd["mlp.0.weight"].T + sd["mlp.0.bias"]) @ sd["mlp.3.weight"].T + sd["mlp.3.bias"]).squeeze(1)
    with torch.no_grad():
        assert torch.allclose(r(ft, wp), want, atol=1e-5)
