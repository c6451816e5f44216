"""Compile-clean families: a training step under ``torch.compile`` captures one set of graphs on the first batch and
reuses it for further batches of the same shape (no recompilation per batch, no graph break in the model), with the
eager loss and gradients. ``aot_eager`` traces forward and backward like inductor does, without its code generation
(eval/speed/official.py --compile measures the inductor speed-up)."""
import pytest
import torch
from torch._dynamo.utils import counters

import moezoo


def _loss_and_grads(fn, model, inputs):
    out = fn(**inputs)
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return out.loss.detach(), grads


# ProMoE: its unconditional-expert router and routing contrastive loss on static shapes (one MoE layer keeps the
# compile time low); MoFME: the FME experts' grouped product as the custom op moezoo::fme_grouped_linear
@pytest.mark.parametrize("name,overrides", [("time_moe_tiny_e4k2", {}), ("dit_moe_tiny_e4k2", {}),
                                            ("promoe_tiny_e4k1", {"num_hidden_layers": 2}),
                                            ("deweather_mofme_tiny_e4k2", {"num_hidden_layers": 1})])
def test_compiled_training_step_is_stable_and_matches_eager(name, overrides):
    torch.manual_seed(0)
    model = moezoo.create_model(name, tiny=True, **overrides)
    if hasattr(model.config, "class_dropout_prob"):
        model.config.class_dropout_prob = 0.0  # the same labels in both runs
    model.train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    graphs = []
    for step in range(3):
        inputs = model.example_inputs(generator=torch.Generator().manual_seed(step))
        torch.manual_seed(step)
        ref_loss, ref_grads = _loss_and_grads(model, model, inputs)
        torch.manual_seed(step)
        loss, grads = _loss_and_grads(compiled, model, inputs)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-4)
        for a, b in zip(grads, ref_grads):
            if b is None:
                assert a is None
            else:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[1], f"recompiled on a new batch of the same shape: graphs per step {graphs}"
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_time_moe_decoding_step_compiles_without_breaks():
    torch.manual_seed(0)
    model = moezoo.create_model("time_moe_tiny_e4k2", tiny=True).eval()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(2, 16)
    with torch.no_grad():
        for _ in range(2):
            got = compiled(input_ids=x, use_cache=False, max_horizon_length=8, logits_to_keep=1).logits
        ref = model(input_ids=x, use_cache=False, max_horizon_length=8).logits[:, -1:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
