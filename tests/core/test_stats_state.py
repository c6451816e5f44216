"""RoutingStats.state_dict / load_state_dict: exact round trip through torch.save + torch.load(weights_only=True)."""
from __future__ import annotations

import io

import torch

from moezoo.core import RoutingStats
from moezoo.core.routing import RouterOutput


def _ro(idx, R, seed):
    idx = torch.as_tensor(idx)
    probs = torch.softmax(torch.randn(idx.shape[0], R, generator=torch.Generator().manual_seed(seed)), -1)
    return RouterOutput.from_selection(probs.log(), probs, idx, torch.ones(idx.shape), R, drop_rate=torch.tensor(0.25))


def test_routing_stats_state_round_trip_is_exact_and_detached():
    stats = RoutingStats()
    stats.update("a", _ro([[0, 1], [2, 3], [0, 4]], 4, 0))
    stats.update(1, _ro([[1, 0], [1, 2]], 3, 1), attention_mask=torch.tensor([1, 0]))
    state = stats.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = RoutingStats(keep_history=False)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.summary() == stats.summary() and restored.layers == ["a", 1] and restored.keep_history
    stats.update("a", _ro([[3, 3]], 4, 2))  # later updates change neither the saved state nor the restored copy
    assert state["layers"][0]["counts"].tolist() == [2.0, 1.0, 1.0, 1.0] and len(state["layers"][0]["history"]) == 1
    assert restored.summary()["a"]["steps"] == 1 and stats.summary()["a"]["steps"] == 2
    restored.update("a", _ro([[3, 3]], 4, 2))
    assert restored.summary() == stats.summary()
    torch.testing.assert_close(restored.load("a"), stats.load("a"))
