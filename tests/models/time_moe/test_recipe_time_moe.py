"""The Time-MoE training recipe: YAML configs, model/data building, a 3-step Trainer run with exact resume, fine-tune
from the resulting folder."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
from moezoo.models.time_moe import MoezooTimeMoeForPrediction  # noqa: E402
from moezoo.models.time_moe.recipe import (DATA_KEYS, EVAL_KEYS, MODEL_KEYS, build_model,  # noqa: E402
                                           build_train_dataset, train_from_config)
from moezoo.trainer import TrainerConfig, load_yaml_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "training" / "time_moe" / "configs"


def _load_script():
    spec = importlib.util.spec_from_file_location("time_moe_train_script", ROOT / "training" / "time_moe" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    """An ETT-layout CSV (hourly dates + 2 channels, daily season) small enough for a 3-step run."""
    rng = np.random.default_rng(0)
    n = 400
    t = np.arange(n)
    df = pd.DataFrame({"date": pd.date_range("2021-01-01", periods=n, freq="h").astype(str),
                       "load": np.sin(2 * np.pi * t / 24) + 0.1 * rng.normal(size=n),
                       "temp": np.cos(2 * np.pi * t / 24) + 0.01 * t})
    p = tmp_path_factory.mktemp("data") / "toy.csv"
    df.to_csv(p, index=False)
    return p


@pytest.mark.parametrize("name", ["tiny.yaml", "time_moe_50m.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_yaml_config(CONFIGS / name, ["trainer.max_steps=7"])
    assert set(cfg) <= {"model", "data", "eval", "trainer"}
    assert set(cfg["model"]) <= set(MODEL_KEYS) and set(cfg["data"]) <= set(DATA_KEYS)
    assert set(cfg["eval"]) <= set(EVAL_KEYS)
    tc = TrainerConfig.from_dict(cfg["trainer"])
    assert tc.max_steps == 7 and tc.lr_schedule == "cosine" and tc.save_every and tc.resume == "auto"
    entry = moezoo.get_model_entry(cfg["model"]["name"])
    assert entry.family == "time_moe"
    mpe = entry.config_kwargs()["max_position_embeddings"]
    assert cfg["data"]["window_length"] <= mpe
    assert cfg["eval"]["context_length"] + cfg["eval"]["prediction_length"] <= mpe


def test_build_model_variants_and_errors(tmp_path):
    m = build_model({"name": "time_moe_tiny_e4k2", "tiny": True})
    assert isinstance(m, MoezooTimeMoeForPrediction) and not m.config.use_dense
    d = build_model({"name": "time_moe_tiny_e4k2", "tiny": True, "dense": True})
    sm, sd = m.parameter_summary(), d.parameter_summary()
    assert d.config.use_dense and not sd["moe_layers"]
    assert abs(sd["active"] - sm["active"]) <= m.config.hidden_size * m.config.num_hidden_layers   # equal active
    with pytest.raises(ValueError, match="unknown key"):
        build_model({"name": "time_moe_tiny_e4k2", "layers": 3})
    with pytest.raises(ValueError, match="not both"):
        build_model({"name": "time_moe_tiny_e4k2", "init_from": str(tmp_path)})
    with pytest.raises(ValueError, match="give name"):
        build_model({})
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        build_model({"init_from": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="not a Time-MoE"):
        build_model({"name": "lm_tiny_e8k2", "tiny": True})


def test_train_dataset_from_config(small_csv):
    ds, infos = build_train_dataset({"path": str(small_csv), "window_length": 32, "stride": 8})
    assert infos[0]["protocol"] == "ratio" and infos[0]["train_rows"] == 280
    assert infos[0]["channels"] == ["load", "temp"]
    assert len(ds.series) == 2 and all(len(s) == 280 for s in ds.series)
    # split=train+val appends the validation rows (scaled with the train scaler)
    ds2, infos2 = build_train_dataset({"path": [str(small_csv)], "split": "train+val", "window_length": 32})
    assert infos2[0]["train_rows"] == 320
    with pytest.raises(ValueError, match="data.split"):
        build_train_dataset({"path": str(small_csv), "split": "test"})
    with pytest.raises(ValueError, match="data.path"):
        build_train_dataset({})


def test_recipe_three_steps_resume_exact_and_finetune(small_csv, tmp_path):
    def config(out, steps, save_every):
        return load_yaml_config(CONFIGS / "tiny.yaml", [
            "model.tiny=true", f"data.path={small_csv}", "data.window_length=48", "data.stride=4",
            "eval.context_length=24", "eval.prediction_length=8", "eval.max_windows=2", "eval.batch_size=2",
            f"trainer.output_dir={out}", f"trainer.max_steps={steps}", f"trainer.save_every={save_every}",
            "trainer.batch_size=4", "trainer.warmup_steps=1", "trainer.log_every=1", "trainer.eval_every=3",
            "trainer.progress_bar=false"])

    # 3 steps through the command-line script, a checkpoint after every step
    script = _load_script()
    cfg_path = tmp_path / "run.yaml"
    import yaml

    out = tmp_path / "run"
    cfg_path.write_text(yaml.safe_dump(config(out, 3, 1)))
    straight = script.main(["--config", str(cfg_path)])
    assert straight["step"] == 3 and len(straight["losses"]) == 3 and all(np.isfinite(straight["losses"]))
    assert straight["eval_history"][-1]["step"] == 3 and np.isfinite(straight["eval_history"][-1]["val_mse"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    routed = [e for e in log if "routing/max_load" in e]
    assert routed and all(v >= 1.0 for v in routed[-1]["routing/max_load"].values())       # expert load logged
    assert any("aux_loss" in e for e in log)
    assert all(Path(p).is_file() for p in straight["routing_plots"])
    a = MoezooTimeMoeForPrediction.from_pretrained(straight["model_dir"])
    assert Path(straight["model_dir"]).name == "checkpoint-3"

    # "kill" after step 2 (drop the step-3 checkpoint), resume with resume=auto: identical losses and weights
    import shutil

    shutil.rmtree(straight["model_dir"])
    resumed = train_from_config(config(out, 3, 1))
    assert resumed["start_step"] == 2 and resumed["step"] == 3
    assert resumed["losses"] == straight["losses"]
    b = MoezooTimeMoeForPrediction.from_pretrained(resumed["model_dir"])
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na

    # fine-tune from the trained folder: the model starts from those weights
    ft = build_model({"init_from": straight["model_dir"]})
    assert all(torch.equal(p, q) for p, q in zip(ft.parameters(), a.parameters()))
    with pytest.raises(ValueError, match="unknown config section"):
        train_from_config({"trainer": {}, "optimizer": {}})
