"""moezoo_lm: experts-implementation switching (really reaching the experts), generation with / without cache,
losses, padding, config plans and errors."""
from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
from moezoo.cache_compat import output_cache  # noqa: E402
from moezoo.core.losses import router_z_loss, switch_balance_loss  # noqa: E402
from moezoo.models.moezoo_lm import MoezooLMConfig, MoezooLMForCausalLM, MoezooLMModel  # noqa: E402

IMPLS = ["eager", "grouped_mm", "batched_mm", "moezoo"]


def tiny(**kw):
    torch.manual_seed(0)
    return moezoo.create_model("lm_small_e16k2", tiny=True, **kw)  # dense first layer + shared expert


@contextmanager
def count_experts_calls():
    """Wrap every entry of transformers' experts interface (and "eager") with a call counter."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    calls = {name: 0 for name in IMPLS}
    originals = {name: ALL_EXPERTS_FUNCTIONS.get(name) for name in IMPLS}
    had_local = {name: name in ALL_EXPERTS_FUNCTIONS._local_mapping for name in IMPLS}

    def make(name, fn):
        def wrapped(module, *args, **kwargs):
            calls[name] += 1
            if fn is None:  # "eager": the experts class's own forward
                return type(module).forward.__wrapped__(module, *args, **kwargs)
            return fn(module, *args, **kwargs)
        return wrapped

    for name in IMPLS:
        ALL_EXPERTS_FUNCTIONS[name] = make(name, originals[name])
    try:
        yield calls
    finally:
        for name in IMPLS:
            del ALL_EXPERTS_FUNCTIONS._local_mapping[name]
            if had_local[name]:
                ALL_EXPERTS_FUNCTIONS[name] = originals[name]


def test_default_experts_implementation_is_moezoo():
    m = tiny()
    assert m.config._experts_implementation == "moezoo"
    assert m.get_correct_experts_implementation(None) == "moezoo"
    assert type(m)._can_set_experts_implementation()
    x = torch.randint(0, 128, (2, 6))
    with count_experts_calls() as calls:
        m(x)
    assert calls["moezoo"] == len(m.moe_layers()) == 2 and sum(calls.values()) == 2


@pytest.mark.parametrize("impl", IMPLS)
def test_set_experts_implementation_reaches_the_experts(impl):
    m = tiny().eval()
    x = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        ref = m(x).logits
    m.set_experts_implementation(impl)
    assert m.config._experts_implementation == impl
    for _, layer in m.moe_layers():
        assert layer.experts.config is m.config  # the experts read the model's config
    with count_experts_calls() as calls:
        with torch.no_grad():
            got = m(x).logits
    assert calls[impl] == 2, calls
    assert sum(calls.values()) == 2, calls
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_implementations_agree_on_gradients():
    m = tiny()
    x = torch.randint(0, 128, (2, 9))
    grads = {}
    for impl in IMPLS:
        m.set_experts_implementation(impl)
        m.zero_grad()
        m(x, labels=x).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    for impl in IMPLS[1:]:
        for n, g in grads["eager"].items():
            torch.testing.assert_close(grads[impl][n], g, atol=1e-5, rtol=1e-4, msg=f"{impl}: {n}")


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_from_pretrained_experts_implementation(impl, tmp_path):
    from transformers import AutoModelForCausalLM

    m = tiny().eval()
    m.save_pretrained(tmp_path)
    x = torch.randint(0, 128, (1, 5))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=impl).eval()
    assert loaded.config._experts_implementation == impl
    with count_experts_calls() as calls:
        with torch.no_grad():
            got = loaded(x).logits
    assert calls[impl] == 2 and sum(calls.values()) == 2, calls
    with torch.no_grad():
        torch.testing.assert_close(got, m(x).logits, atol=1e-5, rtol=1e-5)
    # the saved config does not pin an implementation: a plain reload is back on moezoo
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._experts_implementation == "moezoo"


def test_unknown_experts_implementation_raises():
    m = tiny()
    with pytest.raises(ValueError, match="not supported"):
        m.set_experts_implementation("nope")


@pytest.mark.parametrize("impl", ["moezoo", "eager"])
def test_greedy_generate_with_and_without_cache(impl):
    m = tiny(experts_implementation=impl).eval()
    prompt = torch.randint(0, 128, (2, 5))
    a = m.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
    b = m.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=0)
    assert a.shape == (2, 15)
    assert torch.equal(a, b)
    # the cached forward matches a full forward on the last position
    with torch.no_grad():
        full = m(a[:, :-1]).logits[:, -1]
        out = m(a[:, :-2], use_cache=True)
        step = m(a[:, -2:-1], cache=output_cache(out), use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_loss_is_ce_plus_aux_only_with_labels():
    m = tiny()
    x = torch.randint(0, 128, (2, 8))
    out = m(x)
    assert out.loss is None and out.aux_loss is not None
    out = m(x, labels=x)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), x[:, 1:].reshape(-1))
    ros = list(out.router_outputs)
    aux = (m.config.router_aux_loss_coef * switch_balance_loss(ros) + m.config.router_z_loss_coef * router_z_loss(ros))
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.loss, ce + aux)
    assert out.aux_loss > 0
    # coefficients 0 -> loss is plain CE
    m0 = tiny(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    o0 = m0(x, labels=x)
    ce0 = F.cross_entropy(o0.logits[:, :-1].reshape(-1, 128), x[:, 1:].reshape(-1))
    torch.testing.assert_close(o0.loss, ce0)


def test_router_logits_shapes_and_switch():
    m = tiny()
    x = torch.randint(0, 128, (3, 4))
    out = m(x)
    assert len(out.router_logits) == 2 and all(t.shape == (12, 4) for t in out.router_logits)
    assert m(x, output_router_logits=False).router_logits is None
    tup = m(x, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[1], out.logits)  # (aux_loss, logits, ...) without loss


def test_left_padding_matches_unpadded():
    m = tiny().eval()
    x = torch.randint(1, 128, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = m(x).logits
        got = m(padded, attention_mask=mask, position_ids=pos).logits[:, 3:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_padding_excluded_from_balance_loss():
    m = tiny()
    x = torch.randint(1, 128, (2, 6))
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    out = m(x, attention_mask=mask, labels=x)
    ros = list(out.router_outputs)
    expected = (m.config.router_aux_loss_coef * switch_balance_loss(ros, attention_mask=mask)
                + m.config.router_z_loss_coef * router_z_loss(ros))
    torch.testing.assert_close(out.aux_loss, expected)


def test_dense_layers_and_shared_experts():
    m = tiny()
    layers = m.model.layers
    assert not layers[0].is_moe and layers[1].is_moe and layers[2].is_moe
    assert layers[1].mlp.shared_expert is not None
    names = {n for n, _ in m.named_parameters()}
    assert "model.layers.1.mlp.gate.weight" in names
    assert "model.layers.1.mlp.experts.gate_up_proj" in names and "model.layers.1.mlp.experts.down_proj" in names


def test_parallel_plans_mirror_transformers():
    from transformers import Qwen3MoeConfig

    assert MoezooLMConfig.base_model_ep_plan == Qwen3MoeConfig.base_model_ep_plan
    names = {n for n, _ in tiny().model.named_parameters()}
    for key in MoezooLMConfig.base_model_ep_plan:
        pattern = key.replace("*", "1")
        assert any(n == pattern or n.startswith(pattern + ".") for n in names), key
    assert MoezooLMConfig.base_model_tp_plan["layers.*.mlp.experts.gate_up_proj"] == "packed_colwise"


def test_gradient_checkpointing_same_gradients():
    m = tiny()
    x = torch.randint(0, 128, (2, 6))
    m(x, labels=x).loss.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
    m.train()
    m(x, labels=x).loss.backward()
    for n, g in ref.items():
        torch.testing.assert_close(m.get_parameter(n).grad, g, atol=1e-6, rtol=1e-5)


def test_base_model_and_inputs_embeds():
    m = tiny()
    x = torch.randint(0, 128, (1, 4))
    base = m.model
    assert isinstance(base, MoezooLMModel)
    a = base(input_ids=x).last_hidden_state
    b = base(inputs_embeds=m.get_input_embeddings()(x)).last_hidden_state
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="exactly one"):
        base()


def test_config_errors():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        MoezooLMConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="hidden_size"):
        MoezooLMConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoezooLMConfig(num_experts=2, num_experts_per_tok=3)
    c = MoezooLMConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=4, first_k_dense_replace=1,
                       decoder_sparse_step=2)
    assert [c.is_moe_layer(i) for i in range(4)] == [False, True, False, True] and c.num_moe_layers == 2


def test_model_class_is_plain_causal_lm():
    from transformers import GenerationMixin

    assert issubclass(MoezooLMForCausalLM, GenerationMixin)
    assert MoezooLMConfig.model_type == "moezoo_lm"
