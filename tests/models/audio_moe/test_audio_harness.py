"""eval/audio_moe/run.py on a tiny model + tiny codec: per-task loss, capacity analytics, wav + PNG outputs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "eval" / "audio_moe" / "run.py"


def test_harness_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("audio_moe_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--model", "audio_moe_small_e8k2", "--tiny", "--codec", "random:dac", "--items", "2",
                     "--max-frames", "12", "--max-new-tokens", "12", "--generate", "2", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["tasks"]) == {"speech", "music"}
    for r in res["tasks"].values():
        assert r["clips"] == 2 and r["codec_token_loss"] > 0 and len(r["layers"]) == 2
        for layer in r["layers"].values():
            assert 0 <= layer["real_experts_per_token"] <= 4 and 0 <= layer["null_rate"] <= 1
            assert layer["ffn_flops_per_token"] > 0
    for g in res["generated"]:
        if "wav" in g:
            assert Path(g["wav"]).is_file() and Path(g["png"]).is_file()
    mcd = res["speech_mcd"]
    assert mcd["clips"] == 2 and 0 < mcd["codec_reconstruction_mcd_db"] and 0 < mcd["other_utterance_mcd_db"]
    style = res["music_style"]
    assert style["clips"] == 2 and style["styles"] >= 10 and style["chance_accuracy"] == 1 / style["styles"]
    assert 0 <= style["real_style_accuracy"] <= 1 and style["codec_reconstruction_frechet"] >= 0


def test_harness_several_models_report_mean_and_std(tmp_path):
    spec = importlib.util.spec_from_file_location("audio_moe_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--model", "audio_moe_small_e8k2", "audio_moe_small_e8k2", "--tiny", "--codec", "random:dac",
                     "--items", "1", "--max-frames", "8", "--max-new-tokens", "4", "--generate", "0",
                     "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())["tasks"]
    for task in ("speech", "music"):
        loss = summary[task]["codec_token_loss"]
        assert loss["n"] == 2 and len(loss["values"]) == 2 and loss["std"] >= 0
        assert (tmp_path / f"run_{1}" / "results.json").is_file()
