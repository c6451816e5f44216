"""eval/audio_moe/compare.py: dynamic top-p vs top-2 vs dense (equal nominal active FFN) and joint vs specialists."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "eval" / "audio_moe" / "compare.py"


def _load():
    spec = importlib.util.spec_from_file_location("audio_moe_compare", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variants_have_equal_nominal_active_ffn():
    from moezoo.models.audio_moe.codec import AudioCodec

    mod = _load()
    codec = AudioCodec.bundled()
    cfgs = {v: mod.build_model(v, codec, 0).config for v in mod.VARIANTS}
    active = {v: (c.num_experts_per_tok if c.moe_type == "topk" else 2) * c.moe_intermediate_size
              for v, c in cfgs.items()}
    assert active["top2"] == active["dense"] == active["dynamic_topp"]
    assert cfgs["dense"].num_experts == 1 and cfgs["dynamic_topp"].moe_type == "topp"
    assert all(c.num_shared_experts == cfgs["dense"].num_shared_experts for c in cfgs.values())
    with pytest.raises(ValueError, match="variant"):
        mod.variant_overrides("top3", cfgs["dense"])


def test_compare_smoke(tmp_path):
    mod = _load()
    assert mod.main(["--seeds", "0", "1", "--steps", "1", "--batch-size", "2", "--train-per-task", "2",
                     "--test-per-task", "1", "--max-frames", "8", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "comparison.json").read_text())["summary"]
    for v in mod.VARIANTS:
        assert summary[v]["speech"]["loss"]["n"] == 2 and summary[v]["music"]["loss"]["mean"] > 0
    assert summary["specialists"]["music"]["loss"]["n"] == 2
    assert "| dense (joint) |" in mod.format_table(summary)
