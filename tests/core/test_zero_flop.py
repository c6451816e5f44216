"""Zero-FLOP experts (null / zero / copy / constant) and the MoE++ input doubling, checked against hand formulas."""
from __future__ import annotations

import torch

from moezoo.core import build_moe_layer, ZeroFlopExperts


def test_id_layout():
    z = ZeroFlopExperts(6, 4, num_null=2, num_zero=1, num_copy=1, num_constant=2)
    assert z.count == 6 and list(z.null_ids()) == [4, 5, 6]
    assert z.copy_start == 7 and z.constant_start == 8


def test_constant_and_copy_formula():
    torch.manual_seed(0)
    H = 6
    z = ZeroFlopExperts(H, 3, num_zero=1, num_copy=1, num_constant=2)
    x = torch.randn(5, H)
    # ids: 3 zero, 4 copy, 5 const0, 6 const1, 7 sentinel
    idx = torch.tensor([[3, 4], [5, 0], [6, 5], [4, 7], [1, 2]])
    w = torch.tensor([[0.3, 0.7], [0.4, 0.6], [0.2, 0.8], [1.0, 0.0], [0.5, 0.5]])
    out = z(x, idx, w)

    def const(c, v):
        mix = (z.constant_gate[c] @ v).softmax(-1)  # w = softmax(Linear(h, 2)(x))
        return mix[0] * v + mix[1] * z.constant[c]  # w0 * x + w1 * constant

    want = torch.stack([
        0.7 * x[0],
        0.4 * const(0, x[1]),
        0.2 * const(1, x[2]) + 0.8 * const(0, x[2]),
        1.0 * x[3],
        torch.zeros(H),
    ])
    torch.testing.assert_close(out, want)


def test_moepp_layer_doubles_expert_input_only():
    torch.manual_seed(1)
    H = 8
    layer = build_moe_layer(hidden_size=H, num_experts=2, num_experts_per_tok=2, moe_intermediate_size=12,
                     num_zero_experts=1, num_copy_experts=1, num_constant_experts=2, expert_input_scale=2.0,
                     router_type="moepp", router_kwargs={"gate_hidden_size": 16, "zeroed_expert_ids": [2]})
    with torch.no_grad():
        layer.gate.weight.mul_(6)
    x = torch.randn(40, H)
    out, ro = layer(x)
    # the router saw x (not 2x)
    torch.testing.assert_close(ro.logits, torch.tanh(x @ layer.gate.weight_in.T) @ layer.gate.weight.T)
    x2 = 2 * x
    want = torch.zeros_like(x)
    for t in range(40):
        for e, wt in zip(ro.indices[t].tolist(), ro.weights[t].tolist()):
            if e < 2:
                y = layer.experts.expert_forward(e, x2[t:t + 1])[0]
            elif e == 2:
                y = torch.zeros(H)
                assert wt == 0.0
            elif e == 3:
                y = x2[t]
            else:
                c = e - 4
                mix = (layer.zero_flop.constant_gate[c] @ x2[t]).softmax(-1)
                y = mix[0] * x2[t] + mix[1] * layer.zero_flop.constant[c]
            want[t] += wt * y
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    kinds = set(ro.indices.flatten().tolist())
    assert {2, 3}.issubset(kinds) and kinds & {4, 5}


def test_zero_flop_gradients():
    torch.manual_seed(2)
    layer = build_moe_layer(hidden_size=8, num_experts=2, moe_intermediate_size=12, num_constant_experts=1,
                     num_copy_experts=1, router_kwargs={"norm_topk_prob": True})
    x = torch.randn(20, 8, requires_grad=True)
    out, _ = layer(x)
    out.backward(torch.ones_like(out))
    assert layer.zero_flop.constant.grad is not None and layer.zero_flop.constant_gate.grad is not None
    assert layer.gate.weight.grad.abs().sum() > 0
