"""MoezooDiTMoeModel: shapes, forward_with_cfg semantics, label dropout, ProMoE conditional routing and RCL, every core
router switchable by config, experts-implementation switch, input validation."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dit_moe_reference as ref  # noqa: E402
import moezoo  # noqa: E402
from moezoo.core import MoELayer, switch_balance_loss  # noqa: E402
from moezoo.core.routing import ROUTERS  # noqa: E402
from moezoo.models.dit_moe import MoezooDiTMoeConfig, MoezooDiTMoeModel  # noqa: E402

SMALL = dict(sample_size=8, in_channels=3, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_classes=5, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_intermediate_size=16, frequency_embedding_size=32, adaln_zero_init=False)


def _model(**kw):
    torch.manual_seed(0)
    return MoezooDiTMoeModel(MoezooDiTMoeConfig(**dict(SMALL, **kw))).eval()


def _inputs(B=4, C=3, S=8, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, S, S, generator=g), torch.rand(B, generator=g) * 999, torch.randint(0, classes, (B,),
                                                                                                  generator=g)


def test_shapes_and_out_channels():
    m = _model()
    x, t, y = _inputs()
    out = m(x, t, y)
    assert out.sample.shape == (4, 6, 8, 8) and m.config.out_channels == 6
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (4 * 16, 4)
    assert out.loss is None and out.aux_loss is None  # eval without target
    m2 = _model(learn_sigma=False)
    assert m2(x, t.long(), y).sample.shape == (4, 3, 8, 8)
    assert m2(x, torch.tensor(3.0), y).sample.shape == (4, 3, 8, 8)  # scalar timestep broadcasts


def test_pos_embed_is_the_dit_table():
    m = _model()
    torch.testing.assert_close(m.pos_embed[0], ref.pos_embed_2d(32, 4))
    assert "pos_embed" not in dict(m.named_parameters()) and "pos_embed" in m.state_dict()


def test_loss_with_target_and_aux_formula():
    m = _model().train()
    x, t, y = _inputs()
    target = torch.randn_like(x)
    out = m(x, t, y, target=target, force_drop_ids=torch.zeros(4))
    mse = torch.nn.functional.mse_loss(out.sample[:, :3], target)
    per_layer = sum(0.01 * switch_balance_loss(ro, normalize="slots") for ro in out.router_outputs)
    torch.testing.assert_close(out.aux_loss, per_layer)
    torch.testing.assert_close(out.loss, mse + out.aux_loss)
    out.loss.backward()
    assert m.blocks[0].mlp.gate.weight.grad.abs().sum() > 0


def test_forward_with_cfg_semantics():
    m = _model()
    x, t, y = _inputs(B=2)
    xx = torch.cat([x[:1], x[:1]])
    tt = torch.cat([t[:1], t[:1]])
    yy = torch.tensor([int(y[0]), m.config.null_class_id])
    with torch.no_grad():
        raw = m(xx, tt, yy).sample
        cond, uncond = raw[:1], raw[1:]
        full = m.forward_with_cfg(xx, tt, yy, 3.0).sample  # default: all in_channels guided
        g = uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3])
        torch.testing.assert_close(full[:1, :3], g)
        torch.testing.assert_close(full[1:, :3], full[:1, :3])  # both halves hold the guided prediction
        torch.testing.assert_close(full[:, 3:], raw[:, 3:])  # variance channels pass through
        official = m.forward_with_cfg(xx, tt, yy, 3.0, cfg_channels=2, return_dict=False)
        torch.testing.assert_close(official[:, 2:], raw[:, 2:])
        torch.testing.assert_close(official[:1, :2], g[:, :2])
        one = m.forward_with_cfg(xx, tt, yy, 1.0).sample
        torch.testing.assert_close(one[:1, :3], cond[:, :3], atol=1e-6, rtol=1e-5)
        # only the first half of the samples is used
        other = m.forward_with_cfg(torch.cat([x[:1], torch.randn_like(x[:1])]), tt, yy, 3.0).sample
        torch.testing.assert_close(other, full)
    with pytest.raises(ValueError, match="even batch"):
        m.forward_with_cfg(x[:1], t[:1], y[:1], 2.0)
    with pytest.raises(ValueError, match="cfg_channels"):
        m.forward_with_cfg(xx, tt, yy, 2.0, cfg_channels=7)


def test_label_dropout():
    m = _model(class_dropout_prob=0.5).train()
    x, t, y = _inputs(B=4)
    out = m(x, t, y, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert out.class_labels.tolist() == [5, int(y[1]), 5, int(y[3])]
    torch.manual_seed(0)
    dropped = torch.cat([m(x, t, y).class_labels for _ in range(8)])
    assert 0 < (dropped == 5).sum() < dropped.numel()
    m.eval()
    assert torch.equal(m(x, t, y).class_labels, y)
    no_null = _model(class_dropout_prob=0.0)
    assert no_null.y_embedder.embedding_table.num_embeddings == 5
    with pytest.raises(ValueError, match="null row"):
        no_null(x, t, y, force_drop_ids=torch.ones(4))


def test_promoe_conditional_routing_and_rcl():
    m = moezoo.create_model("promoe_tiny_e4k1", tiny=True).train()
    inputs = m.example_inputs(batch_size=3, generator=torch.Generator().manual_seed(0))
    inputs["class_labels"] = torch.tensor([1, m.config.null_class_id, 2])
    out = m(**inputs, force_drop_ids=torch.zeros(3))
    T = (m.config.sample_size // m.config.patch_size) ** 2
    E = m.config.num_experts
    assert len(out.router_outputs) == 2  # odd blocks of 4
    for ro in out.router_outputs:
        null_rows = ro.indices[T:2 * T]
        assert (null_rows[:, 0] == E).all() and not (torch.cat([ro.indices[:T], ro.indices[2 * T:]]) == E).any()
    assert out.routing_contrastive_loss is not None and out.routing_contrastive_loss > 0
    assert out.aux_loss == 0  # ProMoE configs: no balance loss
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.sample[:, :4], inputs["target"])
                               + out.routing_contrastive_loss)
    out.loss.backward()
    protos = m.blocks[1].mlp.gate.weight
    assert protos.grad.abs().sum() > 0


def test_promoe_dense_blocks_are_gelu_mlps():
    m = moezoo.create_model("promoe_tiny_e4k1", tiny=True)
    assert [b.is_moe for b in m.blocks] == [False, True, False, True]
    assert not isinstance(m.blocks[0].mlp, MoELayer) and hasattr(m.blocks[0].mlp, "fc1")
    assert m.blocks[1].mlp.experts.num_experts == m.config.num_experts + 1  # + unconditional expert


ROUTER_KW = {"topp": {"top_p": 0.5}, "topk_null": {"num_true_experts": 4}, "modality": {"num_modalities": 2},
             "uncertainty": {}}


@pytest.mark.parametrize("router_type", sorted(ROUTERS))
@pytest.mark.parametrize("uncond", [False, True])
def test_every_core_router_switchable_by_config(router_type, uncond):
    kw = dict(router_type=router_type, router_kwargs=ROUTER_KW.get(router_type, {}), unconditional_expert=uncond)
    # a new router that needs constructor arguments fails here: give them in ROUTER_KW (no router is skipped)
    m = _model(**kw).train()
    x, t, y = _inputs(B=3)
    y[1] = m.config.null_class_id
    out = m(x, t, y, target=torch.randn_like(x), force_drop_ids=torch.zeros(3))
    assert out.sample.shape == (3, 6, 8, 8) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(isinstance(layer.gate, ROUTERS[router_type]) for _, layer in m.moe_layers())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "experts" in n)
    if uncond:
        E = m.config.num_experts
        assert all((ro.indices[16:32, 0] == E).all() for ro in out.router_outputs)


def test_experts_implementation_switch_gives_same_output():
    m = _model()
    x, t, y = _inputs()
    with torch.no_grad():
        ref_out = m(x, t, y).sample
        m.set_experts_implementation("eager")
        assert m.config._experts_implementation == "eager"
        torch.testing.assert_close(m(x, t, y).sample, ref_out, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_same_gradients():
    m = _model().train()
    x, t, y = _inputs()
    target = torch.randn_like(x)
    m(x, t, y, target=target, force_drop_ids=torch.zeros(4)).loss.backward()
    g1 = m.blocks[0].attn.qkv.weight.grad.clone()
    m.zero_grad()
    m.activation_checkpointing_enable()
    m(x, t, y, target=target, force_drop_ids=torch.zeros(4)).loss.backward()
    torch.testing.assert_close(m.blocks[0].attn.qkv.weight.grad, g1, atol=1e-6, rtol=1e-5)


def test_input_validation():
    m = _model()
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="sample has shape"):
        m(x[:, :2], t, y)
    with pytest.raises(ValueError, match="timestep"):
        m(x, t[:2], y)
    with pytest.raises(ValueError, match="class_labels must lie"):
        m(x, t, torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="class_labels must be integer"):
        m(x, t, y.float())
    with pytest.raises(ValueError, match="target has shape"):
        m(x, t, y, target=x[:, :1])
    with pytest.raises(ValueError, match="force_drop_ids"):
        m(x, t, y, force_drop_ids=torch.zeros(2))
    with pytest.raises(TypeError, match="labels"):
        m(x, t, y, labels=y)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        MoezooDiTMoeConfig(**dict(SMALL, sample_size=9))
    with pytest.raises(ValueError, match="moe_layers"):
        MoezooDiTMoeConfig(**dict(SMALL, moe_layers=[0, 5]))
    with pytest.raises(ValueError, match="routing_contrastive_coef > 0 needs"):
        _model(router_type="moepp", router_kwargs={"gate_hidden_size": 8}, routing_contrastive_coef=1.0).train()(x, t, y)


def test_registry_entries_match_papers():
    c = moezoo.get_model_config("dit_moe_xl2_e8k2")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.patch_size) == (1152, 28, 16, 2)
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (8, 2, 4608)
    g = moezoo.get_model_config("dit_moe_g2_e16k2")
    assert (g.hidden_size, g.num_hidden_layers, g.num_experts) == (1408, 40, 16)
    p = moezoo.get_model_config("promoe_xl2_e12k1")
    assert (p.num_experts, p.num_experts_per_tok, p.moe_intermediate_size, p.moe_every) == (12, 1, 2304, 2)
    assert p.unconditional_expert and p.router_type == "prototype" and p.routing_contrastive_coef == 1.0
    tiny = moezoo.get_model_config("dit_moe_tiny_e4k2")
    assert (tiny.sample_size, tiny.in_channels, tiny.num_classes, tiny.learn_sigma) == (28, 1, 10, True)


def test_model_card_renders_in_push_dry_run(tmp_path, capsys):
    import yaml

    from moezoo.cli import main as cli_main

    m = moezoo.create_model("promoe_tiny_e4k1", tiny=True)
    m.save_pretrained(tmp_path / "model")
    stage = tmp_path / "stage"
    assert cli_main(["push", str(tmp_path / "model"), "someone/promoe-tiny", "--dry-run", "--staging-dir",
                     str(stage)]) == 0
    text = (stage / "README.md").read_text()
    meta = yaml.safe_load(text.split("---", 2)[1])
    for key in ("library_name", "tags", "license", "pipeline_tag", "metrics"):  # empty lists are dropped
        assert key in meta
    assert {"moezoo", "mixture-of-experts", "diffusion"} <= set(meta["tags"])
    from moezoo import hub

    template = yaml.safe_load(hub.card_template_path("dit_moe").read_text().split("---", 2)[1])
    for key in ("library_name", "tags", "license", "pipeline_tag", "datasets", "metrics", "base_model"):
        assert key in template
    assert "moezoo_dit_moe" in text and "router `prototype`" in text and "{{" not in text
    assert 'AutoModel.from_pretrained("someone/promoe-tiny")' in text
