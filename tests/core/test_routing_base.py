"""The Router base class: every registered router derives from it, owns its gate, declares its signals; the registry
refuses other classes; the NaN check is on CPU only unless asked."""
from __future__ import annotations

import pytest
import torch

import moezoo.core.routing.output as routing_output
from moezoo.core import ROUTERS, Router, RouterOutput, register_router
from moezoo.core.routing import router_parameters


def test_every_registered_router_is_a_router_with_declared_signals():
    assert set(ROUTERS) >= {"topk", "topk_null", "moepp", "topp", "expert_choice", "condition", "pooled", "modality",
                            "prototype", "uncertainty"}
    for name, cls in ROUTERS.items():
        assert issubclass(cls, Router), name
        assert isinstance(cls.signals, tuple) and all(isinstance(s, str) for s in cls.signals), name
        params = router_parameters(name)
        assert "num_experts" in params, name


def test_register_router_refuses_non_routers():
    with pytest.raises(TypeError, match="subclass of moezoo.core.Router"):
        register_router("not_a_router")(torch.nn.Linear)
    assert "not_a_router" not in ROUTERS


def test_base_owns_gate_dtype_scoring_and_init():
    torch.manual_seed(0)
    r = Router(6, 4, bias=True, scoring_func="sigmoid", router_dtype=torch.float64)
    assert r.weight.shape == (4, 6) and r.bias.shape == (4,) and torch.all(r.bias == 0)
    x = torch.randn(3, 6)
    logits = r.compute_logits(x)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, x.double() @ r.weight.double().T + r.bias.double())
    torch.testing.assert_close(r.score(logits), torch.sigmoid(logits))
    assert r.jitter(x) is x  # eval / no jitter
    with pytest.raises(ValueError, match="scoring_func"):
        Router(6, 4, scoring_func="relu")
    with pytest.raises(ValueError, match="num_experts"):
        Router(6, 0)


def test_from_selection_zeroes_sentinels():
    idx = torch.tensor([[0, 3], [1, 2]])
    ro = RouterOutput.from_selection(torch.zeros(2, 3), torch.zeros(2, 3), idx, torch.ones(2, 2), 3)
    assert ro.weights.tolist() == [[1.0, 0.0], [1.0, 1.0]] and ro.experts_per_token.tolist() == [1, 2]


def test_nan_check_runs_on_cpu_and_can_be_switched(monkeypatch):
    r = ROUTERS["topk"](4, 4, 2)
    x = torch.full((2, 4), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        r(x)
    monkeypatch.setattr(routing_output, "CHECK_FINITE", False)
    r(x)  # no check, no error
