"""The experts kernel's compiled path (custom op ``moezoo::sorted_experts``) and its static-shape sort (used on
accelerators without a host sync) against the eager kernel: outputs and every gradient."""
import pytest
import torch

from moezoo.core import build_experts, build_moe_layer
from moezoo.core.experts import _experts_op, moezoo_experts_forward, sort_by_expert, sort_by_expert_static


def _run(fn, ex, x, idx, w):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    y = fn(ex, x, idx, w)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    grads = torch.autograd.grad(y, [x, w] + list(ex.parameters()), g)
    return [y.detach(), *grads]


def _op_forward(ex, x, idx, w):
    return _experts_op(x, idx, w, ex.in_proj, ex.down_proj, ex.in_proj_bias, ex.down_proj_bias if ex._bias else None,
                       ex.hidden_act, ex.up_first, ex.gated)[0]


@pytest.mark.parametrize("bias,gated,act,up_first", [(False, True, "silu", False), (True, False, "gelu_tanh", False),
                                                     (False, True, "gelu", True)])
def test_custom_op_matches_eager_kernel(bias, gated, act, up_first):
    torch.manual_seed(0)
    ex = build_experts(num_experts=5, hidden_size=12, intermediate_size=20, hidden_act=act, bias=bias, gated=gated,
                       up_first=up_first)
    if bias:
        torch.nn.init.normal_(ex.in_proj_bias)
        torch.nn.init.normal_(ex.down_proj_bias)
    x = torch.randn(17, 12)
    idx = torch.randint(0, 6, (17, 3))  # id 5 is the sentinel
    w = torch.rand(17, 3)
    ref = _run(moezoo_experts_forward, ex, x, idx, w)
    got = _run(_op_forward, ex, x, idx, w)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_custom_op_passes_opcheck():
    torch.manual_seed(0)
    ex = build_experts(num_experts=4, hidden_size=8, intermediate_size=6)
    x = torch.randn(9, 8, requires_grad=True)
    idx = torch.randint(0, 5, (9, 2))
    w = torch.rand(9, 2, requires_grad=True)
    torch.library.opcheck(_experts_op, (x, idx, w, ex.gate_up_proj, ex.down_proj, None, None, "silu", False, True),
                           test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_static_sort_has_static_shapes_and_same_groups():
    idx = torch.tensor([[4, 1], [0, 4], [1, 2]])
    w = torch.tensor([[0.5, 0.2], [0.3, 0.9], [0.1, 0.7]])
    order, tok, ws, valid, counts, offs = sort_by_expert_static(idx, w, 4)
    assert order.shape == (6,) and counts.tolist() == [1, 2, 1, 2] and offs.tolist() == [1, 3, 4, 6]
    # the sentinels land on the last expert with weight 0; the real slots keep their weights
    assert ws[~valid].tolist() == [0.0, 0.0] and torch.equal(ws[valid].sort().values, torch.tensor([0.1, 0.2, 0.3, 0.7]))
    o2, t2, c2, _ = sort_by_expert(idx, 4)
    assert c2.tolist() == [1, 2, 1, 0] and torch.equal(tok[valid], t2)


def _layer_grads(fn, layer, x):
    x = x.clone().requires_grad_(True)
    y = fn(x)[0]
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    return [y.detach(), *torch.autograd.grad(y, [x] + list(layer.parameters()), g)]


def test_compiled_layer_matches_eager_and_does_not_recompile():
    torch.manual_seed(0)
    from torch._dynamo.utils import counters

    layer = build_moe_layer(hidden_size=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=8,
                            num_shared_experts=1)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend="aot_eager")
    frames = []
    for step in range(3):
        x = torch.randn(2, 7, 16)
        ref = _layer_grads(layer, layer, x)
        got = _layer_grads(compiled, layer, x)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        frames.append(counters["stats"]["unique_graphs"])
    assert frames[0] >= 1 and frames[-1] == frames[0], f"recompiled: graphs per step {frames}"
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_sync_free_path_matches_eager(monkeypatch):
    """The accelerator path (static-shape sort, no host sync) run on CPU: same outputs and gradients."""
    import moezoo.core.experts as experts_mod

    torch.manual_seed(0)
    ex = build_experts(num_experts=5, hidden_size=12, intermediate_size=20)
    x, idx, w = torch.randn(17, 12), torch.randint(0, 6, (17, 3)), torch.rand(17, 3)
    ref = _run(moezoo_experts_forward, ex, x, idx, w)
    monkeypatch.setattr(experts_mod, "_sync_free_routing", lambda device: True)
    monkeypatch.setattr(experts_mod, "sort_by_expert", None)  # the syncing sort must not run
    got = _run(moezoo_experts_forward, ex, x, idx, w)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
