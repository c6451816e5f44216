"""RoutingStats, expert_load, routing_entropy and the heatmap plots."""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from moezoo.core import build_moe_layer, RoutingStats, expert_load, routing_entropy
from moezoo.core.dispatch import apply_capacity
from moezoo.core.routing import RouterOutput
from moezoo.core.stats import expert_counts


def _ro(idx, R, probs=None, **extras):
    idx = torch.as_tensor(idx)
    T = idx.shape[0]
    probs = torch.full((T, R), 1.0 / R) if probs is None else probs
    return RouterOutput.from_selection(probs.log(), probs, idx, torch.ones(idx.shape, dtype=torch.float32), R, **extras)


def test_expert_load_counts_slots_and_skips_sentinels():
    ro = _ro([[0, 1], [0, 4], [2, 4], [0, 3]], 4)  # 4 = sentinel
    torch.testing.assert_close(expert_counts(ro), torch.tensor([3.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(expert_load(ro), torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6]))
    torch.testing.assert_close(expert_load(ro, torch.tensor([1, 0, 1, 1])), torch.tensor([0.4, 0.2, 0.2, 0.2]))
    torch.testing.assert_close(expert_load(ro, torch.tensor([1, 1, 1, 0])), torch.tensor([0.5, 0.25, 0.25, 0.0]))
    # nothing routed -> all zeros, not NaN
    assert expert_load(_ro([[4, 4]], 4)).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="RouterOutput"):
        expert_load(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="attention_mask"):
        expert_load(ro, torch.ones(3))


def test_routing_entropy():
    uniform = _ro([[0], [1]], 4)
    torch.testing.assert_close(routing_entropy(uniform), torch.tensor(math.log(4)))
    onehot = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 0.5, 0]])
    torch.testing.assert_close(routing_entropy(_ro([[0], [1]], 4, probs=onehot)), torch.tensor(math.log(2) / 2))
    torch.testing.assert_close(routing_entropy(_ro([[0], [1]], 4, probs=onehot), torch.tensor([1, 0])),
                               torch.tensor(0.0))
    # sigmoid scores are normalised per token: constant scores -> uniform
    torch.testing.assert_close(routing_entropy(_ro([[0]], 4, probs=torch.full((1, 4), 0.9))), torch.tensor(math.log(4)))


def test_routing_stats_accumulates_over_steps():
    s = RoutingStats()
    assert s.table() == "RoutingStats: no data" and s.summary() == {}
    s.update(0, _ro([[0, 1], [0, 1]], 4))
    s.update(0, _ro([[2, 3], [2, 4]], 4, drop_rate=torch.tensor(0.25)))
    s.update("layers.1.mlp", _ro([[0, 1]] * 3, 4))
    summ = s.summary()
    assert s.layers == [0, "layers.1.mlp"] and len(s) == 2
    l0 = summ[0]
    assert l0["load"] == pytest.approx([2 / 7, 2 / 7, 2 / 7, 1 / 7])
    assert l0["steps"] == 2 and l0["tokens"] == 4
    assert l0["experts_per_token"] == pytest.approx(7 / 4)
    assert l0["drop_rate"] == pytest.approx(0.25)  # only steps that report one
    assert l0["entropy"] == pytest.approx(math.log(4)) and l0["normalized_entropy"] == pytest.approx(1.0)
    assert l0["max_load_ratio"] == pytest.approx(8 / 7)
    l1 = summ["layers.1.mlp"]
    assert l1["load"] == [0.5, 0.5, 0.0, 0.0] and l1["drop_rate"] is None and l1["max_load_ratio"] == 2.0
    assert l1["load_cv"] == pytest.approx(1.0)
    assert summ["_all"]["max_load_ratio"] == pytest.approx((8 / 7 + 2) / 2)
    assert summ["_all"]["drop_rate"] == pytest.approx(0.25)
    table = s.table()
    assert "layers.1.mlp" in table and "0.250" in table and "0.500 0.500 0.000 0.000" in table
    assert str(s) == table
    torch.testing.assert_close(s.load(0), torch.tensor([2 / 7, 2 / 7, 2 / 7, 1 / 7]))
    with pytest.raises(ValueError, match="4 experts, now with 5"):
        s.update(0, _ro([[0]], 5))
    with pytest.raises(ValueError, match="no statistics"):
        s.load(7)
    s.reset()
    assert len(s) == 0 and s.summary() == {}


def test_routing_stats_from_a_layer_with_capacity_and_mask(tmp_path):
    torch.manual_seed(0)
    layer = build_moe_layer(hidden_size=8, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=8,
                     capacity_factor=0.5)
    stats = RoutingStats()
    mask = torch.ones(2, 16)
    mask[1, 10:] = 0
    for step in range(5):
        _, ro = layer(torch.randn(2, 16, 8))
        stats.update("moe0", ro, attention_mask=mask)
        stats.update("moe0_nomask", ro)
    summ = stats.summary()
    assert summ["moe0"]["tokens"] == 5 * 26 and summ["moe0_nomask"]["tokens"] == 5 * 32
    assert 0 < summ["moe0"]["drop_rate"] < 1  # capacity 0.5 drops pairs
    assert summ["moe0"]["experts_per_token"] < 2
    assert sum(summ["moe0"]["load"]) == pytest.approx(1.0)
    # plots: a layers x experts heatmap and the load over steps (both layers' imbalance, and one layer's experts)
    heat, steps, one = tmp_path / "heat.png", tmp_path / "steps.png", tmp_path / "one.png"
    stats.save_heatmap(heat, steps_path=steps, title="t")
    stats.save_load_over_steps(one, layer="moe0")
    for p in (heat, steps, one):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    m = stats.load_matrix()
    assert m.shape == (2, 6)
    torch.testing.assert_close(m[0], stats.load("moe0"))
    with pytest.raises(ValueError, match="keep_history"):
        s = RoutingStats(keep_history=False)
        s.update(0, ro)
        s.save_load_over_steps(tmp_path / "x.png")
    with pytest.raises(ValueError, match="no data"):
        RoutingStats().save_heatmap(tmp_path / "y.png")


def test_heatmap_pads_layers_with_fewer_experts(tmp_path):
    s = RoutingStats()
    s.update(0, _ro([[0, 1]], 4))
    s.update(1, _ro([[0, 5]], 6))
    m = s.load_matrix()
    assert m.shape == (2, 6) and torch.isnan(m[0, 4:]).all() and m[1, 5] == 0.5
    s.save_heatmap(tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_drop_rate_from_apply_capacity_is_reported():
    probs = torch.full((8, 2), 0.5)
    ro = _ro([[0]] * 8, 2, probs=probs)
    dropped = apply_capacity(ro, 2, capacity_factor=1.0)  # capacity ceil(8*1/2)=4 of 8 pairs on expert 0
    s = RoutingStats()
    s.update(0, dropped)
    assert s.summary()[0]["drop_rate"] == pytest.approx(0.5)
    assert s.summary()[0]["experts_per_token"] == pytest.approx(0.5)
