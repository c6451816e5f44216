"""``moezoo convert time-moe SRC DST`` round trips: the shared reference folder, the official hub layout (extra config
keys, bf16 weights, sharded safetensors), pickled weights only with the opt-in, and clear errors."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402,F401
from moezoo.cli import main  # noqa: E402
from moezoo.convert import convert  # noqa: E402
from moezoo.models.time_moe import MoezooTimeMoeConfig, MoezooTimeMoeForPrediction, MoezooTimeMoeModel  # noqa: E402
from moezoo.models.time_moe.convert_time_moe import config_from_official, convert_state_dict  # noqa: E402
from moezoo.safety import PickleCheckpointError  # noqa: E402

PARITY = Path(os.environ.get("MOEZOO_PARITY_DIR", Path(__file__).resolve().parents[3].parent / "shared" / "parity"))
REF = PARITY / "time_moe"
pytestmark = pytest.mark.skipif(not REF.is_dir(), reason="shared parity folder absent")

# the keys of Maple728/TimeMoE-50M's config.json (hub metadata included), at the reference folder's sizes
HUB_EXTRA = {"_name_or_path": "time_moe_50m", "architectures": ["TimeMoeForPrediction"],
             "auto_map": {"AutoConfig": "configuration_time_moe.TimeMoeConfig",
                          "AutoModelForCausalLM": "modeling_time_moe.TimeMoeForPrediction"},
             "model_type": "time_moe", "torch_dtype": "bfloat16", "transformers_version": "4.40.1"}


def _official_config() -> dict:
    return json.loads((REF / "config.json").read_text())


def test_cli_convert_then_auto_from_pretrained(tmp_path, capsys):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForTimeSeriesPrediction

    dst = tmp_path / "converted"
    assert main(["convert", "time-moe", str(REF), str(dst)]) == 0
    assert "converted time-moe" in capsys.readouterr().out
    assert (dst / "model.safetensors").is_file() and (dst / "config.json").is_file()
    cfg = AutoConfig.from_pretrained(dst)
    assert isinstance(cfg, MoezooTimeMoeConfig) and cfg.label_padding == "official"
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.horizon_lengths, cfg.moe_intermediate_size) == (4, 2, [1, 4, 8], 64)
    assert type(AutoModel.from_pretrained(dst)) is MoezooTimeMoeModel
    assert type(AutoModelForCausalLM.from_pretrained(dst)) is MoezooTimeMoeForPrediction
    model = AutoModelForTimeSeriesPrediction.from_pretrained(dst).eval()
    io = load_file(str(REF / "io.safetensors"))
    with torch.no_grad():
        out = model(input_ids=io["in.input_ids"], labels=io["in.labels"], loss_masks=io["in.loss_masks"])
        gen = model.generate(io["in.input_ids"], max_new_tokens=11)
    torch.testing.assert_close(out.loss, io["out.loss_masked"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gen, io["out.generate_pred11"], atol=1e-5, rtol=1e-4)
    # the folder is also a registry-compatible config: create_model-style construction from its kwargs
    rebuilt = MoezooTimeMoeForPrediction(MoezooTimeMoeConfig(**{k: v for k, v in cfg.to_dict().items()
                                                               if k not in ("model_type", "transformers_version")}))
    assert rebuilt.parameter_summary()["total"] == model.parameter_summary()["total"]


def test_hub_layout_bf16_sharded(tmp_path):
    src = tmp_path / "hub"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**{k: v for k, v in _official_config().items()
                                                    if not k.startswith("_")}, **HUB_EXTRA}))
    sd = {k: v.to(torch.bfloat16) for k, v in load_file(str(REF / "model.safetensors")).items()}
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(src / name))
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    (src / "io.safetensors").write_bytes(b"not weights")  # stray files next to the shards are not read
    dst = tmp_path / "out"
    assert main(["convert", "time_moe", str(src), str(dst)]) == 0
    model = MoezooTimeMoeForPrediction.from_pretrained(dst)
    assert model.dtype == torch.float32
    conv = convert_state_dict(sd, model.config, dtype=torch.float32)
    got = model.state_dict()
    assert set(conv) == set(got)
    for k, v in conv.items():
        assert torch.equal(got[k], v), k


def test_pickled_weights_need_opt_in(tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(REF / "config.json", src / "config.json")
    torch.save(load_file(str(REF / "model.safetensors")), src / "pytorch_model.bin")
    with pytest.raises(PickleCheckpointError, match="allow_pickle"):
        convert("time-moe", src, tmp_path / "no")
    assert main(["convert", "time-moe", str(src), str(tmp_path / "no2")]) == 2  # CLI: one clear error line
    assert main(["convert", "time-moe", str(src), str(tmp_path / "yes"), "--allow-pickle"]) == 0
    assert (tmp_path / "yes" / "model.safetensors").is_file()


def test_convert_errors_are_clear():
    cfg = _official_config()
    sd = load_file(str(REF / "model.safetensors"))
    with pytest.raises(ValueError, match="num_experts=3 but the weights hold 4"):
        config_from_official({**cfg, "num_experts": 3}, sd)
    with pytest.raises(ValueError, match="hidden_size=32 but the weights imply 64"):
        config_from_official({**cfg, "hidden_size": 32}, sd)
    with pytest.raises(ValueError, match="horizon_lengths"):
        config_from_official({**cfg, "horizon_lengths": [1, 4]}, sd)
    with pytest.raises(ValueError, match="model_type"):
        config_from_official({**cfg, "model_type": "llama"})
    config = config_from_official(cfg, sd)
    with pytest.raises(ValueError, match="does not use"):
        convert_state_dict({**sd, "model.extra.weight": torch.zeros(1)}, config)
    sd.pop("model.norm.weight")
    with pytest.raises(ValueError, match="lacks 'model.norm.weight'"):
        convert_state_dict(sd, config)
