"""deweather model: shapes at any patch-divisible size, clear errors, FME vs conventional MoE sizes, the uncertainty
router inside the model (trains, gradients), the official offset option, residual learning, sparse == dense FME,
experts-implementation switching of the conventional twin, and the model card through ``moezoo push --dry-run``."""
from __future__ import annotations

import math
import os

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
from moezoo.core import FMEMoELayer, MoELayer, UncertaintyRouter  # noqa: E402
from moezoo.models.deweather import MoezooDeweatherConfig, MoezooDeweatherForImageRestoration  # noqa: E402

TINY = "deweather_mofme_tiny_e4k2"


def _tiny(name=TINY, **kw):
    torch.manual_seed(0)
    return moezoo.create_model(name, tiny=True, **kw)


def test_any_size_divisible_by_patch_and_outputs():
    model = _tiny().eval()
    x = torch.rand(2, 3, 12, 20)
    with torch.no_grad():
        out = model(pixel_values=x)
    assert out.reconstruction.shape == (2, 3, 12, 20) and out.loss is None
    assert ((out.reconstruction >= 0) & (out.reconstruction <= 1)).all()  # residual output, clamped in eval
    n_tok = (12 // 4) * (20 // 4)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (2 * n_tok, 4)
    w = out.routing_weights[0]
    assert w.shape == (2, n_tok, 4) and ((w > 0).sum(-1) == 2).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, n_tok))
    base = model.model(x)
    assert base.last_hidden_state.shape == (2, n_tok, model.config.hidden_size)


def test_bad_inputs_raise_clear_errors():
    model = _tiny().eval()
    with pytest.raises(ValueError, match="divisible by patch_size=4"):
        model(pixel_values=torch.rand(1, 3, 10, 16))
    with pytest.raises(ValueError, match="in_channels=3"):
        model(pixel_values=torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="labels"):
        model(pixel_values=torch.rand(1, 3, 16, 16), labels=torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="expert_type"):
        MoezooDeweatherConfig(expert_type="moe")
    with pytest.raises(ValueError, match="image_size"):
        MoezooDeweatherConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="adds the input image"):
        MoezooDeweatherConfig(residual_learning=True, out_channels=1)
    with pytest.raises(ValueError, match="fme_implementation"):
        MoezooDeweatherConfig(fme_implementation="fast")


def test_fme_is_smaller_than_conventional_moe_with_the_same_backbone():
    fme, ffn = _tiny(), _tiny("deweather_moe_tiny_e4k2")
    assert all(isinstance(m, FMEMoELayer) for _, m in fme.moe_layers())
    assert all(isinstance(m, MoELayer) for _, m in ffn.moe_layers())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(fme) < n(ffn)
    # same everything outside the MoE layers
    rest = lambda m: {k: v.shape for k, v in m.state_dict().items() if ".mlp" not in k and "mlp_norm" not in k}  # noqa: E731
    assert rest(fme) == rest(ffn)
    # marginal cost of one more expert per layer (2 layers): FiLM 2W^2 + 2W vs FFN 2HI + I + H, + a router row with bias
    H, W, I = 48, 48, 96
    for kind, per_expert in (("mofme", 2 * W * W + 2 * W), ("moe", 2 * H * I + I + H)):
        a = sum(p.numel() for p in _tiny(f"deweather_{kind}_tiny_e4k2").parameters())
        b = sum(p.numel() for p in _tiny(f"deweather_{kind}_tiny_e4k2", num_experts=5).parameters())
        assert b - a == 2 * (per_expert + H + 1)
    s = fme.parameter_summary()
    assert len(s["moe_layers"]) == 2 and s["active"] < s["total"]


def test_uncertainty_router_model_trains():
    model = _tiny(router_type="uncertainty", router_kwargs={"num_samples": 3, "input_dropout": 0.2})
    assert all(isinstance(m.gate, UncertaintyRouter) for _, m in model.moe_layers())
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 3, 16, 16, generator=g)
    noisy = (clean + 0.3 * torch.rand(4, 3, 16, 16, generator=g)).clamp(0, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(12):
        out = model(pixel_values=noisy, labels=clean)
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            for _, layer in model.moe_layers():
                assert layer.gate.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():  # deterministic eval routing
        torch.testing.assert_close(model(pixel_values=noisy).reconstruction, model(pixel_values=noisy).reconstruction)


def test_official_offset_leaves_last_expert_without_gradient():
    model = _tiny(official_expert_offset=True).train()
    out = model(**model.example_inputs(generator=torch.Generator().manual_seed(0)))
    out.loss.backward()
    for _, layer in model.moe_layers():
        g = layer.experts.film_proj.grad
        assert g[-1].abs().sum() == 0 and g[:-1].abs().sum() > 0


def test_residual_learning_adds_the_input():
    model = _tiny(output_mode="sigmoid_residual").eval()
    assert model.config.residual_learning
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        r = model(pixel_values=x).reconstruction - x
    assert ((r > 0) & (r < 1)).all()


def test_sparse_and_dense_fme_give_the_same_model_output():
    a = _tiny(fme_implementation="sparse").eval()
    b = _tiny(fme_implementation="dense").eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(a(pixel_values=x).reconstruction, b(pixel_values=x).reconstruction,
                                   atol=1e-6, rtol=1e-5)


def test_conventional_twin_switches_experts_implementation():
    model = _tiny("deweather_moe_tiny_e4k2").eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ref = model(pixel_values=x).reconstruction
        model.set_experts_implementation("eager")
        torch.testing.assert_close(model(pixel_values=x).reconstruction, ref, atol=1e-6, rtol=1e-5)


def test_card_renders_through_push_dry_run(tmp_path):
    from moezoo.cli import main

    model = _tiny()
    model.save_pretrained(tmp_path / "m")
    stage = tmp_path / "stage"
    assert main(["push", str(tmp_path / "m"), "someone/mofme-tiny", "--dry-run", "--staging-dir", str(stage)]) == 0
    text = (stage / "README.md").read_text()
    meta = yaml.safe_load(text.split("---", 2)[1])
    assert meta["pipeline_tag"] == "image-to-image" and "psnr" in meta["metrics"]
    assert "deweather" in meta["tags"] or "moezoo_deweather" in " ".join(meta["tags"])
    assert "AutoModelForImageToImage" in text and "someone/mofme-tiny" in text


def test_registry_names_and_full_configs():
    names = moezoo.list_models(family="deweather")
    for E, K in ((4, 2), (8, 2), (16, 4)):
        for kind, et in (("mofme", "fme"), ("moe", "ffn")):
            cfg = moezoo.get_model_config(f"deweather_{kind}_s_e{E}k{K}")
            assert (cfg.expert_type, cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size) == (et, E, K, 256)
    assert {"deweather_mofme_tiny_e4k2", "deweather_moe_tiny_e4k2"} <= set(names)
    assert isinstance(moezoo.create_model(TINY, tiny=True), MoezooDeweatherForImageRestoration)


def test_residual_output_starts_near_identity_and_is_clamped_in_eval():
    model = _tiny()
    assert model.config.output_mode == "residual"
    x = torch.rand(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        y = model(pixel_values=x).reconstruction
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    assert (y - x).abs().max() < 0.05  # the tail's last conv starts at std 1e-3: almost the identity
    model.train()
    out = model(pixel_values=x, labels=x.flip(-1))
    out.loss.backward()
    assert model.tail[-1].weight.grad.abs().sum() > 0 and model.tail[0].body[0].weight.grad.abs().sum() > 0


def test_output_mode_validation_and_official_default():
    assert MoezooDeweatherConfig().output_mode == "sigmoid"
    assert MoezooDeweatherConfig(residual_learning=True).output_mode == "sigmoid_residual"
    with pytest.raises(ValueError, match="output_mode"):
        MoezooDeweatherConfig(output_mode="tanh")
    with pytest.raises(ValueError, match="in_channels"):
        MoezooDeweatherConfig(output_mode="residual", out_channels=1)


def test_conventional_moe_honours_capacity_factor_and_shared_experts():
    """The deweather MoE layers are built by the core's build_moe_layer: capacity mode and shared experts in the
    config reach them (they used to be silently ignored)."""
    plain = _tiny("deweather_moe_tiny_e4k2")
    model = _tiny("deweather_moe_tiny_e4k2", capacity_factor=0.5, drop_policy="position", num_shared_experts=1,
                  shared_intermediate_size=8, shared_expert_gate=True)
    H = model.config.hidden_size
    for _, layer in model.moe_layers():
        assert layer.capacity_factor == 0.5 and layer.capacity.drop_policy == "position"
        assert layer.shared_expert is not None and layer.shared_expert.up_proj.weight.shape == (8, H)
        assert layer.shared_expert_gate is not None
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 2 * (3 * H * 8 + 2 * 8 + H + H)  # per layer: gated shared MLP (I=8) with biases + gate row
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=torch.rand(2, 3, 16, 16))
    ro = out.router_outputs[0]
    n_tok = ro.indices.shape[0]
    cap = math.ceil(0.5 * n_tok * 2 / 4)
    counts = torch.bincount(ro.indices[ro.indices < 4], minlength=4)
    assert int(counts.max()) <= cap and float(ro.extras["drop_rate"]) > 0
    # the shared expert contributes: zeroing its down projection changes the output
    with torch.no_grad():
        for _, layer in model.moe_layers():
            layer.shared_expert.down_proj.weight.zero_()
            layer.shared_expert.down_proj.bias.zero_()
        assert not torch.allclose(model(pixel_values=torch.rand(2, 3, 16, 16)).reconstruction, out.reconstruction)
    with pytest.raises(ValueError, match="does not support"):
        _tiny(TINY, num_shared_experts=1)


def test_tail_skip_adds_a_full_resolution_path(tmp_path):
    plain = _tiny()
    assert plain.tail_skip is None and "tail_skip" not in {n.split(".")[0] for n, _ in plain.named_parameters()}
    model = _tiny(tail_skip=True)
    x = torch.rand(2, 3, 16, 16)
    out = model(pixel_values=x, labels=x.flip(-1))
    out.loss.backward()
    assert model.tail_skip.weight.grad.abs().sum() > 0
    assert model.model(x).head_features.shape == (2, model.config.head_channels, 16, 16)
    model.eval()
    with torch.no_grad():
        y = model(pixel_values=x).reconstruction
        model.tail_skip.weight.mul_(10.0)
        assert not torch.allclose(model(pixel_values=x).reconstruction, y)   # the skip reaches the output
        model.tail_skip.weight.div_(10.0)
    model.save_pretrained(tmp_path / "m")
    again = MoezooDeweatherForImageRestoration.from_pretrained(tmp_path / "m").eval()
    assert again.config.tail_skip
    with torch.no_grad():
        assert torch.allclose(again(pixel_values=x).reconstruction, y, atol=1e-6)


def test_global_context_branch(tmp_path):
    """global_context: image-level mean/std features reach every token (and so the routers) and a per-image affine
    map of the input; both start at zero (identity model), both learn, and the affine is exactly input*(1+a)+b."""
    plain = _tiny()
    assert plain.model.global_context is None and plain.global_affine is None
    model = _tiny(global_context=True, global_context_size=8)
    x = torch.rand(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        y0 = model(pixel_values=x).reconstruction
        base = _tiny()
        base.load_state_dict(model.state_dict(), strict=False)       # same weights without the branch
        assert torch.allclose(base.eval()(pixel_values=x).reconstruction, y0, atol=1e-6)   # zero-initialised
    model.train()
    out = model(pixel_values=x, labels=(x * 0.7 + 0.1))
    out.loss.backward()
    assert model.global_affine.weight.grad.abs().sum() > 0 and model.model.global_context.to_tokens.weight.grad.abs().sum() > 0
    g = model.model(x).global_context
    assert g.shape == (2, 8)
    model.eval()
    with torch.no_grad():
        model.global_affine.bias.copy_(torch.tensor([0.5, 0.0, 0.0, 0.1, 0.0, 0.0]))   # a = (0.5, 0, 0), b = (0.1, 0, 0)
        y = model(pixel_values=x).reconstruction
        assert torch.allclose(y[:, 1:], y0[:, 1:], atol=1e-6)
        assert torch.allclose(y[:, 0], (y0[:, 0] + 0.5 * x[:, 0] + 0.1).clamp(0, 1), atol=1e-5)
        model.model.global_context.to_tokens.bias.fill_(0.3)            # the tokens (routers) see the context
        r0 = model.model(x).routing_weights[0]
        model.model.global_context.to_tokens.bias.zero_()
        assert not torch.allclose(model.model(x).routing_weights[0], r0)
    model.save_pretrained(tmp_path / "m")
    again = MoezooDeweatherForImageRestoration.from_pretrained(tmp_path / "m").eval()
    assert again.config.global_context and again.config.global_context_size == 8
    with torch.no_grad():
        assert torch.allclose(again(pixel_values=x).reconstruction, y, atol=1e-6)
    with pytest.raises(ValueError, match="global_context_size"):
        _tiny(global_context=True, global_context_size=0)
