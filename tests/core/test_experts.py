"""The experts module and its fast ``moezoo`` implementation against the eager per-expert loop."""
import pytest
import torch

from moezoo.core import build_moe_layer, build_experts
from moezoo.core.experts import moezoo_experts_forward, sort_by_expert


def _grads(ex, x, idx, w, impl):
    ex.config._experts_implementation = impl
    y = ex(x, idx, w)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    grads = torch.autograd.grad(y, [x, w] + list(ex.parameters()), g)
    return y.detach(), grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gated,up_first", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_moezoo_matches_eager(bias, gated, act, up_first):
    torch.manual_seed(0)
    ex = build_experts(num_experts=5, hidden_size=12, intermediate_size=20, hidden_act=act, bias=bias, gated=gated,
                       up_first=up_first)
    if bias:
        torch.nn.init.normal_(ex.in_proj_bias)
        torch.nn.init.normal_(ex.down_proj_bias)
    x = torch.randn(17, 12, requires_grad=True)
    idx = torch.randint(0, 6, (17, 3))  # id 5 is the sentinel
    w = torch.rand(17, 3, requires_grad=True)
    y1, g1 = _grads(ex, x, idx, w, "moezoo")
    y2, g2 = _grads(ex, x, idx, w, "eager")
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sentinel_slots_cost_nothing_and_output_zero():
    ex = build_experts(num_experts=4, hidden_size=8, intermediate_size=8)
    x = torch.randn(3, 8)
    idx = torch.tensor([[4, 4], [0, 4], [4, 1]])
    w = torch.ones(3, 2)
    order, tok, counts, _ = sort_by_expert(idx, 4)
    assert counts.tolist() == [1, 1, 0, 0] and sorted(tok.tolist()) == [1, 2]
    y = moezoo_experts_forward(ex, x, idx, w)
    assert torch.equal(y[0], torch.zeros(8))


def test_gradients_reach_router_through_weights():
    torch.manual_seed(0)
    layer = build_moe_layer(hidden_size=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=8)
    x = torch.randn(2, 7, 16, requires_grad=True)
    y, ro = layer(x)
    y.backward(torch.ones_like(y))
    assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0
    assert layer.experts.gate_up_proj.grad.abs().sum() > 0
    assert x.grad.shape == x.shape


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_experts"):
        build_experts(num_experts=0, hidden_size=8, intermediate_size=8)
    with pytest.raises(ValueError, match="hidden_act"):
        build_experts(num_experts=2, hidden_size=8, intermediate_size=8, hidden_act="tanhh")


def test_buffer_pool_never_hands_out_a_referenced_buffer():
    from moezoo.core.cpu_pool import BufferPool

    pool = BufferPool()
    assert pool.empty((512, 1024), torch.float32, torch.device("cpu")).data_ptr() != 0 and not pool._bufs  # off
    pool.enable()
    a = pool.empty((512, 1024), torch.float32, torch.device("cpu"))
    b = pool.empty((512, 1024), torch.float32, torch.device("cpu"))
    assert a.data_ptr() != b.data_ptr()
    ptr = a.data_ptr()
    del a
    c = pool.empty((512, 1024), torch.float32, torch.device("cpu"))
    assert c.data_ptr() == ptr  # freed buffer reused
    pool.empty_cache()
    assert c.data_ptr() == ptr and c.shape == (512, 1024)


def _big_layer():
    torch.manual_seed(0)
    # big enough (>= 1 MiB temporaries) that the buffer pool is used
    return build_moe_layer(hidden_size=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256)


@pytest.fixture
def cpu_pool_on():
    from moezoo.core import cpu_pool

    was = cpu_pool.enabled()
    cpu_pool.enable()
    yield
    cpu_pool.enable(was)


def test_pool_is_safe_under_retain_graph_and_repeated_calls(cpu_pool_on):
    layer = _big_layer()
    x1, x2 = torch.randn(2048, 64), torch.randn(2048, 64)

    def grads(impl, retain):
        layer.experts.config._experts_implementation = impl
        layer.zero_grad(set_to_none=True)
        xa, xb = x1.clone().requires_grad_(True), x2.clone().requires_grad_(True)
        ya, _ = layer(xa)
        yb, _ = layer(xb)  # the same layer twice before any backward
        loss = (ya * torch.linspace(-1, 1, 64)).sum() + (yb ** 2).mean()
        loss.backward(retain_graph=retain)
        if retain:
            loss.backward()  # second backward through the same saved buffers
        return [xa.grad, xb.grad, layer.experts.gate_up_proj.grad.clone(), layer.experts.down_proj.grad.clone(),
                layer.gate.weight.grad.clone()]

    for retain in (False, True):
        fast = grads("moezoo", retain)
        ref = grads("eager", retain)
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def test_gradients_kept_by_caller_are_not_overwritten():
    layer = _big_layer()
    x = torch.randn(2048, 64)
    params = [layer.experts.gate_up_proj, layer.experts.down_proj]
    y, _ = layer(x)
    g1 = torch.autograd.grad(y.sum(), params)
    kept = [g.clone() for g in g1]
    y2, _ = layer(torch.randn(2048, 64))
    torch.autograd.grad(y2.sum() * 3, params)
    for g, k in zip(g1, kept):
        assert torch.equal(g, k)
