"""MoELayer: shapes, options and clear errors."""
import types

import pytest
import torch

from moezoo.core import MoELayer, build_moe_layer


def test_forward_shapes_and_router_output():
    torch.manual_seed(0)
    layer = build_moe_layer(hidden_size=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=12)
    y, ro = layer(torch.randn(3, 5, 16))
    assert y.shape == (3, 5, 16)
    assert ro.indices.shape == (15, 2) and ro.logits.shape == (15, 8)
    torch.testing.assert_close(ro.weights.sum(-1), torch.ones(15))
    assert (ro.experts_per_token == 2).all()


def test_matches_explicit_mixture():
    torch.manual_seed(1)
    layer = build_moe_layer(hidden_size=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=6, num_shared_experts=1,
                     shared_expert_gate=True)
    x = torch.randn(10, 8)
    y, ro = layer(x)
    want = torch.zeros_like(x)
    for t in range(10):
        for s in range(2):
            e = int(ro.indices[t, s])
            want[t] += ro.weights[t, s] * layer.experts.expert_forward(e, x[t:t + 1])[0]
    want += torch.sigmoid(layer.shared_expert_gate(x)) * layer.shared_expert(x)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_capacity_mode_reports_drop_rate_and_respects_capacity():
    torch.manual_seed(0)
    layer = build_moe_layer(hidden_size=8, num_experts=4, num_experts_per_tok=1, moe_intermediate_size=8, capacity_factor=0.5)
    y, ro = layer(torch.randn(40, 8))
    cap = ro.extras["capacity"]
    assert cap == 5
    counts = torch.bincount(ro.indices.reshape(-1), minlength=5)[:4]
    assert (counts <= cap).all()
    assert 0 < float(ro.extras["drop_rate"]) < 1


def test_bad_inputs_name_the_argument():
    layer = build_moe_layer(hidden_size=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
    with pytest.raises(ValueError, match="hidden_size=8"):
        layer(torch.randn(3, 9))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        build_moe_layer(hidden_size=8, num_experts=4, num_experts_per_tok=5, moe_intermediate_size=8)
    with pytest.raises(ValueError, match="NaN or inf"):
        layer(torch.tensor([[float("nan")] * 8]))
    with pytest.raises(ValueError, match="router_type"):
        build_moe_layer(hidden_size=8, num_experts=4, moe_intermediate_size=8, router_type="nope")
    with pytest.raises(ValueError, match="capacity_factor"):
        build_moe_layer(hidden_size=8, num_experts=4, moe_intermediate_size=8, capacity_factor=0)


def test_copy_and_constant_experts():
    torch.manual_seed(0)
    layer = build_moe_layer(hidden_size=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8, num_copy_experts=1,
                     num_constant_experts=1, router_kwargs={"norm_topk_prob": True})
    x = torch.randn(64, 8)
    y, ro = layer(x)
    copy_rows = ro.indices[:, 0] == 2
    assert copy_rows.any()
    torch.testing.assert_close(y[copy_rows], x[copy_rows])


def test_compositional_layer_from_parts_equals_build_moe_layer():
    from moezoo.core import Capacity, MoELayerConfig, SharedExpert, TopKRouter, ZeroFlopExperts, build_experts

    torch.manual_seed(0)
    built = build_moe_layer(MoELayerConfig(hidden_size=8, num_experts=4, moe_intermediate_size=6, num_null_experts=1,
                                           num_shared_experts=1, capacity_factor=2.0))
    parts = MoELayer(TopKRouter(8, 5, 2), build_experts(num_experts=4, hidden_size=8, intermediate_size=6),
                     SharedExpert(8, 6), ZeroFlopExperts(8, 4, num_null=1), Capacity(2.0))
    parts.load_state_dict(built.state_dict())
    assert sorted(built.state_dict()) == sorted(parts.state_dict())
    assert {"gate.weight", "experts.gate_up_proj", "experts.down_proj"} <= set(built.state_dict())
    x = torch.randn(10, 8)
    torch.testing.assert_close(built(x)[0], parts(x)[0])
    assert built.init_kwargs["num_null_experts"] == 1 and built.capacity_factor == 2.0
    with pytest.raises(ValueError, match="routes over 4 experts but the layer has 5"):
        MoELayer(TopKRouter(8, 4, 2), build_experts(num_experts=4, hidden_size=8, intermediate_size=6),
                 zero_flop=ZeroFlopExperts(8, 4, num_null=1))
    with pytest.raises(TypeError, match="unknown argument"):
        build_moe_layer(types.SimpleNamespace(hidden_size=8, num_experts=4, moe_intermediate_size=6), nope=1)
    with pytest.raises(ValueError, match="drop_policy"):
        Capacity(1.0, "random")


def test_build_moe_layer_reads_transformers_named_config_fields():
    cfg = types.SimpleNamespace(hidden_size=8, num_experts=4, num_experts_per_tok=1, moe_intermediate_size=6,
                                norm_topk_prob=False, num_shared_experts=2, shared_intermediate_size=3,
                                capacity_factor=1.5, drop_policy="position", unrelated_field=True,
                                _experts_implementation="eager")
    layer = build_moe_layer(cfg)
    assert layer.gate.top_k == 1 and layer.gate.norm_topk_prob is False
    assert layer.shared_expert.up_proj.weight.shape == (6, 8)  # 2 shared experts of width 3 fused
    assert layer.capacity == __import__("moezoo.core", fromlist=["Capacity"]).Capacity(1.5, "position")
    assert layer.experts.config is cfg  # the config is the experts config: set_experts_implementation reaches it
