"""Parity of ``moezoo.core.MoELayer`` with transformers' own MoE blocks (Mixtral, Qwen2-MoE, DeepSeek-V3, OLMoE).

Each transformers block is built from a tiny random config with *all* weights randomised (router weights large enough
that routing is decisive, DeepSeek's correction bias included), the same weights are mapped onto a MoELayer, and
outputs, router logits / probabilities / top-k selections, gradients and the Switch balance loss are compared.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from moezoo.core import MoELayer, build_moe_layer
from moezoo.core.losses import switch_balance_loss

from transformers import DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen2MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as mixtral_lb_loss
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func as olmoe_lb_loss
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func as qwen2_moe_lb_loss

IMPLEMENTATIONS = ["moezoo", "eager", "grouped_mm", "batched_mm"]
ATOL = 1e-5


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter and floating buffer ~ N(0, std); the router gets std 1 so its top-k is far from ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point():
                continue
            if name.endswith("e_score_correction_bias"):
                std = 0.3  # comparable to the spread of sigmoid scores: it changes which experts are chosen
            elif name == "gate.weight":
                std = 1.0
            else:
                std = 0.2
            p.copy_(torch.randn(p.shape, generator=g) * std)


# --- one entry per model: (config, transformers block, MoELayer kwargs, parameter name map, scoring, loss func) -----

def _mixtral(E=8, k=2, H=16, I=12, norm=True):
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
    kw = dict(hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=I,
              router_kwargs=dict(norm_topk_prob=True))
    return cfg, MixtralSparseMoeBlock(cfg), kw, {}, "softmax", mixtral_lb_loss


def _qwen2_moe(E=8, k=3, H=16, I=12, norm=False):
    cfg = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k,
                         shared_expert_intermediate_size=20, norm_topk_prob=norm)
    kw = dict(hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=I,
              router_kwargs=dict(norm_topk_prob=norm), num_shared_experts=1, shared_intermediate_size=20,
              shared_expert_gate=True)
    return cfg, Qwen2MoeSparseMoeBlock(cfg), kw, {}, "softmax", qwen2_moe_lb_loss


def _deepseek_v3(E=16, k=4, H=16, I=12, norm=True):
    cfg = DeepseekV3Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=k,
                           n_group=4, topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=norm)
    kw = dict(hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=I,
              router_kwargs=dict(scoring_func="sigmoid", norm_topk_prob=norm, n_group=4, topk_group=2,
                                 use_selection_bias=True, routed_scaling_factor=2.5, renorm_eps=1e-20),
              num_shared_experts=2, shared_intermediate_size=I)
    return cfg, DeepseekV3MoE(cfg), kw, {"shared_experts.": "shared_expert."}, "sigmoid", None


def _olmoe(E=8, k=2, H=16, I=12, norm=False):
    cfg = OlmoeConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=k, norm_topk_prob=norm)
    kw = dict(hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=I,
              router_kwargs=dict(norm_topk_prob=norm))
    return cfg, OlmoeSparseMoeBlock(cfg), kw, {}, "softmax", olmoe_lb_loss


MODELS = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen2_moe_norm": lambda **kw: _qwen2_moe(norm=True, **kw),
    "deepseek_v3": _deepseek_v3,
    "deepseek_v3_nonorm": lambda **kw: _deepseek_v3(norm=False, **kw),
    "olmoe": _olmoe,
    "olmoe_norm": lambda **kw: _olmoe(norm=True, **kw),
}


def _build(name: str, seed: int = 0, **sizes):
    cfg, block, kw, rename, scoring, lb = MODELS[name](**sizes)
    _randomise(block, seed)
    block.eval()
    layer = build_moe_layer(**kw).eval()
    src = dict(block.named_parameters()) | dict(block.named_buffers())
    dst = dict(layer.named_parameters()) | dict(layer.named_buffers())
    mapped = set()
    with torch.no_grad():
        for k_src, t in src.items():
            k_dst = k_src
            for a, b in rename.items():
                k_dst = k_dst.replace(a, b)
            assert k_dst in dst, f"{name}: no MoELayer tensor for {k_src} (-> {k_dst}); have {sorted(dst)}"
            assert dst[k_dst].shape == t.shape, (k_src, dst[k_dst].shape, t.shape)
            dst[k_dst].copy_(t)
            mapped.add(k_dst)
    assert mapped == set(dst), f"{name}: MoELayer tensors left unmapped: {set(dst) - mapped}"
    return cfg, block, layer, scoring, lb


def _hf_route(block, x2d):
    logits, weights, indices = block.gate(x2d)
    return logits, weights, indices


def _dense(indices, weights, E):
    return torch.zeros(indices.shape[0], E, dtype=torch.float32).scatter_add_(1, indices, weights.float())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_block_parity(name, impl):
    cfg, block, layer, scoring, _ = _build(name, seed=1)
    layer.experts.config._experts_implementation = impl
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = block(x.clone())
        out, ro = layer(x.clone())
        logits, weights, indices = _hf_route(block, x.reshape(-1, 16))
    assert out.shape == ref.shape == x.shape
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)
    # router: logits, probabilities, the chosen experts (as sets: DeepSeek's top-k is unsorted) and their weights
    torch.testing.assert_close(ro.logits, logits.float(), atol=1e-6, rtol=1e-5)
    probs = torch.sigmoid(logits.float()) if scoring == "sigmoid" else F.softmax(logits.float(), -1)
    torch.testing.assert_close(ro.probs, probs, atol=1e-6, rtol=1e-5)
    assert torch.equal(ro.indices.sort(-1).values, indices.sort(-1).values)
    E = ro.num_experts
    torch.testing.assert_close(ro.combine_weights().float(), _dense(indices, weights, E), atol=1e-6, rtol=1e-5)
    assert torch.equal(ro.experts_per_token, torch.full((21,), indices.shape[-1]))
    # routing is decisive (no near-tie at the k-th choice could make the comparison flaky) and the output non-trivial
    if scoring == "softmax":
        top = logits.float().topk(indices.shape[-1] + 1, dim=-1).values
        assert (top[:, -2] - top[:, -1]).min() > 1e-4
    assert out.abs().max() > 0.05


def test_deepseek_bias_changes_selection():
    """The correction bias must matter for the test above to test it: zeroing it changes the selected experts."""
    _, block, layer, _, _ = _build("deepseek_v3", seed=1)
    x = torch.randn(21, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, ro = layer(x)
        layer.gate.e_score_correction_bias.zero_()
        _, ro0 = layer(x)
    assert not torch.equal(ro.indices.sort(-1).values, ro0.indices.sort(-1).values)
    # weights come from the un-biased scores: the same expert gets the same raw sigmoid score either way
    torch.testing.assert_close(ro.probs, ro0.probs)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "deepseek_v3", "olmoe_norm"])
def test_block_gradients(name):
    """Backward of the moezoo grouped-mm autograd function equals autograd through transformers' eager loop."""
    _, block, layer, _, _ = _build(name, seed=3)
    layer.experts.config._experts_implementation = "moezoo"
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(4))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(5))
    block(xa).backward(g)
    out, _ = layer(xb)
    out.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, atol=ATOL, rtol=1e-4)
    rename = {"shared_experts.": "shared_expert."}
    lp = dict(layer.named_parameters())
    for n, p in block.named_parameters():
        for a, b in rename.items():
            n = n.replace(a, b)
        assert lp[n].grad is not None, n
        torch.testing.assert_close(lp[n].grad, p.grad, atol=ATOL, rtol=1e-4, msg=lambda m: f"{name} {n}: {m}")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen2_moe_norm", "olmoe"])
def test_balance_loss_matches_transformers(name, masked):
    """``switch_balance_loss`` over two layers == transformers' ``load_balancing_loss_func`` of the model."""
    cfg, block1, layer1, _, lb = _build(name, seed=6)
    _, block2, layer2, _, _ = _build(name, seed=7)
    B, S = 3, 5
    gen = torch.Generator().manual_seed(8)
    x1, x2 = torch.randn(B, S, 16, generator=gen), torch.randn(B, S, 16, generator=gen)
    mask = None
    if masked:
        mask = torch.ones(B, S, dtype=torch.long)
        mask[0, :2] = 0
        mask[2, 4:] = 0
    with torch.no_grad():
        _, ro1 = layer1(x1)
        _, ro2 = layer2(x2)
        hf_logits = (block1.gate(x1.reshape(-1, 16))[0], block2.gate(x2.reshape(-1, 16))[0])
    E, k = cfg.num_experts if hasattr(cfg, "num_experts") and cfg.num_experts else cfg.num_local_experts, cfg.num_experts_per_tok
    ref = lb(hf_logits, E, k, mask)
    ours = switch_balance_loss([ro1, ro2], attention_mask=mask)
    torch.testing.assert_close(ours, ref.float(), atol=1e-6, rtol=1e-5)
    # a single layer too (transformers wants a tuple)
    torch.testing.assert_close(switch_balance_loss(ro1, attention_mask=mask), lb(hf_logits[:1], E, k, mask).float(),
                               atol=1e-6, rtol=1e-5)
    if masked:  # the mask matters
        assert not torch.allclose(switch_balance_loss([ro1, ro2]), ours)


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_parity_other_sizes(name):
    """Mapping and parity do not depend on the sizes used above."""
    sizes = dict(E=32, k=6, H=16, I=24) if name == "deepseek_v3" else dict(E=5, k=1, H=16, I=4)
    _, block, layer, _, _ = _build(name, seed=9, **sizes)
    x = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], block(x), atol=ATOL, rtol=1e-4)


def test_transformers_block_switches_implementation(monkeypatch):
    """transformers' own block accepts the moezoo experts implementation (registered in ALL_EXPERTS_FUNCTIONS)."""
    import moezoo.core.experts  # noqa: F401  (registers "moezoo")

    _, block, layer, _, _ = _build("olmoe", seed=11)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        ref = block(x)
        block.experts.config._experts_implementation = "moezoo"
        calls = []
        orig = moezoo.core.experts._SortedExpertsFunction.apply

        def spy(*a):
            calls.append(a[0].shape)
            return orig(*a)

        monkeypatch.setattr(moezoo.core.experts._SortedExpertsFunction, "apply", spy)
        out = block(x)
    assert calls, "transformers' block did not dispatch to the moezoo implementation"
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)


def test_transformers_model_set_experts_implementation_moezoo(monkeypatch):
    """A whole transformers MoE model switched to "moezoo": same logits, loss and gradients as its eager loop."""
    import moezoo.core.experts as experts_mod
    from transformers import Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                         shared_expert_intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, output_router_logits=True)
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    model.set_experts_implementation("eager")
    ref = model(ids, labels=ids)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls = []
    orig = experts_mod._SortedExpertsFunction.apply
    monkeypatch.setattr(experts_mod._SortedExpertsFunction, "apply", lambda *a: calls.append(1) or orig(*a))
    model.set_experts_implementation("moezoo")
    out = model(ids, labels=ids)
    out.loss.backward()
    assert len(calls) == 2  # one call per MoE layer
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=ATOL, rtol=1e-4, msg=lambda m: f"{n}: {m}")
