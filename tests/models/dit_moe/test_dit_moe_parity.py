"""DiT-MoE / ProMoE parity and converters.

1. ``run_parity`` on the shared fixtures (``../shared/parity/{dit_moe,promoe}`` or ``$MOEZOO_PARITY_DIR``).
2. DIFFERENT configs (expert counts, top-k, depth, patch, learn_sigma, ProMoE weight modes, interleave, shared expert,
   qk-norm, balance loss): random official-layout weights, expected outputs from an independent plain-torch
   re-implementation written from the READMEs (``dit_moe_reference.py``), checked with ``run_parity``.
3. ``moezoo convert dit-moe|promoe SRC DST`` round trip through the CLI, pickle refusal / opt-in.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dit_moe_reference as ref  # noqa: E402
from moezoo.cli import main as cli_main  # noqa: E402
from moezoo.models.dit_moe import MoezooDiTMoeModel  # noqa: E402
from moezoo.safety import PickleCheckpointError  # noqa: E402
from moezoo.parity import run_parity  # noqa: E402

SHARED = Path(os.environ.get("MOEZOO_PARITY_DIR", Path(__file__).resolve().parents[3].parent / "shared" / "parity"))


def _assert_all_ok(results, expected_names=None):
    bad = [(c.name, c.max_abs_diff, c.note) for c in results if not c.ok]
    assert not bad, bad
    if expected_names is not None:
        assert {c.name for c in results} == set(expected_names)


@pytest.mark.parametrize("reference", ["dit_moe", "promoe"])
def test_shared_fixture(reference):
    folder = SHARED / reference
    if not (folder / "io.safetensors").is_file():
        pytest.skip(f"shared parity fixture {folder} is absent")
    results = run_parity(reference, folder, verbose=False)
    _assert_all_ok(results)
    assert len(results) >= 9
    assert any(c.exact for c in results), "selected expert ids must be compared exactly"


DIT_CFG = dict(input_size=16, patch_size=4, in_channels=4, hidden_size=32, depth=3, num_heads=2, mlp_ratio=2,
               class_dropout_prob=0.1, num_classes=5, num_experts=6, num_experts_per_tok=3, pretraining_tp=2,
               learn_sigma=False, use_flash_attn=False)

PROMOE_CFGS = {
    "softmax_top2_interleave_balance_qknorm": dict(
        input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2, mlp_ratio=2.0, qk_norm=True,
        class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, use_swiglu=False, head_dim=None,
        MoE_config=dict(num_routed_experts=3, moe_intermediate_size=48, shared_expert_intermediate_size=40,
                        load_balance_loss_coef=0.01, norm_topk_prob=False, seq_aux=False, use_shared_expert=True,
                        interleave=True, init_MoeMLP=False, top_k=2, router_weight_mode="softmax",
                        routing_contrastive_lam=0.5, use_top_k_for_routing_contrastive=False,
                        routing_contrastive_temperature=0.1)),
    "sigmoid_top1_all_blocks_no_shared": dict(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, mlp_ratio=4.0,
        qk_norm=False, class_dropout_prob=0.1, num_classes=1000, learn_sigma=False, use_swiglu=False, head_dim=None,
        MoE_config=dict(num_routed_experts=5, moe_intermediate_size=24, shared_expert_intermediate_size=24,
                        load_balance_loss_coef=0, norm_topk_prob=False, seq_aux=False, use_shared_expert=False,
                        interleave=False, init_MoeMLP=False, top_k=1, router_weight_mode="sigmoid",
                        routing_contrastive_lam=1, use_top_k_for_routing_contrastive=True,
                        routing_contrastive_temperature=0.07)),
}


def _dit_folder(tmp_path: Path) -> Path:
    sd = ref.random_dit_moe_state(DIT_CFG)
    io = ref.dit_moe_outputs(sd, DIT_CFG)
    return ref.make_folder(tmp_path / "dit_moe_other", DIT_CFG, sd, io, "feizc/DiT-MoE", "DiT", "models.py")


def test_dit_moe_other_config_matches_independent_reimplementation(tmp_path):
    folder = _dit_folder(tmp_path)
    results = run_parity("dit_moe", folder, verbose=False)
    _assert_all_ok(results)
    names = {c.name for c in results}
    assert "out.cfg.output" in names and "out.train.grad_of_output_sum.blocks.2.moe.gate.weight" in names
    assert sum(c.exact for c in results) == 3  # topk_idx of the 3 blocks


@pytest.mark.parametrize("name", sorted(PROMOE_CFGS))
def test_promoe_other_configs_match_independent_reimplementation(tmp_path, name):
    cfg = PROMOE_CFGS[name]
    sd = ref.random_promoe_state(cfg)
    io = ref.promoe_outputs(sd, cfg, labels=[3, 1000, 7, 1000, 12])
    folder = ref.make_folder(tmp_path / name, cfg, sd, io, "ali-vilab/ProMoE", "DiT", "models/models_ProMoE_TC.py")
    results = run_parity("promoe", folder, verbose=False)
    _assert_all_ok(results)
    assert any(c.name.endswith("routing_contrastive_loss") for c in results)
    assert any(c.exact for c in results)


def test_convert_cli_round_trip_dit_moe(tmp_path, capsys):
    src = _dit_folder(tmp_path)
    dst = tmp_path / "converted"
    assert cli_main(["convert", "dit-moe", str(src), str(dst)]) == 0
    assert "converted dit-moe" in capsys.readouterr().out
    model = MoezooDiTMoeModel.from_pretrained(dst).eval()
    assert model.config.cfg_channels == 3 and model.config.num_experts == 6 and model.config.num_experts_per_tok == 3
    from safetensors.torch import load_file

    io = load_file(str(src / "io.safetensors"))
    with torch.no_grad():
        out = model(io["in.x"], io["in.t"], io["in.y"]).sample
    torch.testing.assert_close(out, io["out.eval.output"], atol=1e-5, rtol=1e-4)


def test_convert_promoe_and_pickle_opt_in(tmp_path):
    from moezoo.convert import convert

    cfg = PROMOE_CFGS["sigmoid_top1_all_blocks_no_shared"]
    sd = ref.random_promoe_state(cfg)
    src = tmp_path / "pt_src"
    src.mkdir()
    (src / "config.json").write_text(__import__("json").dumps(cfg))
    torch.save({"ema": sd, "model": {k: v * 0 for k, v in sd.items()}}, src / "checkpoint.pt")
    with pytest.raises(PickleCheckpointError, match="allow_pickle"):
        convert("promoe", src, tmp_path / "refused")
    dst = convert("promoe", src, tmp_path / "ok", allow_pickle=True)
    model = MoezooDiTMoeModel.from_pretrained(dst).eval()
    assert model.config.unconditional_expert and model.config.router_kwargs == {"weight_mode": "sigmoid"}
    io = ref.promoe_outputs(sd, cfg, labels=[5, 1000])  # the "ema" weights were picked
    with torch.no_grad():
        out = model(io["in.x"], io["in.t"], io["in.y"]).sample
    torch.testing.assert_close(out, io["out.eval.output"], atol=1e-5, rtol=1e-4)


def test_converter_rejects_inconsistent_config(tmp_path):
    from moezoo.models.dit_moe.convert_dit_moe import config_from_official

    sd = ref.random_dit_moe_state(DIT_CFG)
    with pytest.raises(ValueError, match="num_experts=8 but the weights hold 6"):
        config_from_official(dict(DIT_CFG, num_experts=8), sd)
    with pytest.raises(ValueError, match="depth=5"):
        config_from_official(dict(DIT_CFG, depth=5), sd)
    # sizes the config does not state come from the shapes (num_heads from the DiT table is unknown for hidden 32)
    with pytest.raises(ValueError, match="num_heads"):
        config_from_official({}, sd)
    cfg = config_from_official({"num_heads": 2}, sd)
    assert (cfg.sample_size, cfg.patch_size, cfg.num_hidden_layers, cfg.num_experts, cfg.learn_sigma) == (16, 4, 3, 6,
                                                                                                          False)
