"""Dynamic capacity costs only the selected pairs: sentinel slots (top-p padding, zero-FLOP experts) are compacted away
before the experts kernel sorts and runs, for any mix of sentinels, with the same slot order as a full sort."""
import torch

import moezoo.core.experts as experts_mod
from moezoo.core import build_moe_layer
from moezoo.core.experts import sort_by_expert


def test_sort_by_expert_compacts_sentinels_in_full_sort_order():
    g = torch.Generator().manual_seed(0)
    for width, share in ((1, 0.0), (2, 0.0), (5, 0.6), (9, 0.9)):
        idx = torch.randint(0, 6, (37, width), generator=g)
        idx = torch.where(torch.rand(37, width, generator=g) < share, torch.randint(6, 9, (37, width), generator=g), idx)
        order, tok, counts, offs = sort_by_expert(idx, 6)
        flat = idx.reshape(-1)
        full = torch.sort(flat, stable=True)[1]
        expected = full[flat[full] < 6]
        assert torch.equal(order, expected) and torch.equal(tok, expected // width)
        assert torch.equal(counts, torch.bincount(flat[flat < 6], minlength=6))
        assert torch.equal(offs, counts.cumsum(0).to(torch.int32))


def test_top_p_layer_dispatches_only_real_slots(monkeypatch):
    torch.manual_seed(0)
    layer = build_moe_layer(hidden_size=16, num_experts=6, moe_intermediate_size=8, router_type="topp",
                            router_kwargs={"top_p": 0.5}, num_null_experts=2)
    x = torch.randn(40, 16)
    with torch.no_grad():
        ro = layer.route(x)
    real = int((ro.indices < 6).sum())
    assert ro.indices.shape[-1] == 8 and real < ro.indices.numel()
    seen = []
    apply = experts_mod._SortedExpertsFunction.apply

    def spy(*args):
        seen.append(args[1].shape[0])  # rows (token, expert pairs) handed to the grouped matmuls
        return apply(*args)

    monkeypatch.setattr(experts_mod._SortedExpertsFunction, "apply", spy)
    y, _ = layer(x)
    assert seen == [real]
    # the same as evaluating the selected experts one by one
    ref = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(ro.indices[t].tolist(), ro.weights[t].tolist()):
            if e < 6:
                ref[t] += w * layer.experts.expert_forward(e, x[t:t + 1])[0]
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)


def test_routers_with_their_own_logits_stay_fp32_under_bf16_autocast():
    """The prototype (ProMoE) and two-layer (MoE++ weight_in) routers compute their logits outside autocast like the base."""
    from moezoo.core import build_router

    torch.manual_seed(0)
    x = torch.randn(10, 16)
    for router in (build_router("prototype", hidden_size=16, num_experts=4, top_k=1),
                   build_router("moepp", hidden_size=16, num_experts=4, top_k=2, gate_hidden_size=8)):
        ref = router(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = router(x)
        assert got.logits.dtype == torch.float32
        torch.testing.assert_close(got.logits, ref.logits)
