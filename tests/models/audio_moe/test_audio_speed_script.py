"""eval/speed/audio_moe_capacity.py runs on tiny sizes: every top-p threshold and top-k row, real-expert counts that grow
with top-p, null experts selected but not counted as real experts, a ratio for every top-p row."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "eval" / "speed" / "audio_moe_capacity.py"


def test_capacity_benchmark_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("audio_moe_capacity", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    assert mod.main(["--tokens", "64", "--hidden", "16", "--inter", "16", "--experts", "8", "--reps", "1",
                     "--rounds", "1", "--warmup", "0", "--json", str(out)]) == 0
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows][:3] == ["top-k k=1", "top-k k=2", "top-k k=4"]
    assert [r["mean_real_experts"] for r in rows[:3]] == [1.0, 2.0, 4.0]
    topp = [r for r in rows if r["kind"] == "topp"]
    assert len(topp) == 7 and all(r["ratio_vs_topk"] > 0 for r in topp)
    ks = [r["mean_real_experts"] for r in topp]
    assert ks == sorted(ks) and ks[-1] > ks[0]  # more experts as the threshold grows
    assert any(r["null_share"] > 0 for r in topp)
    table = mod.format_table(json.loads(out.read_text()))
    assert "ratio vs top-k" in table and "top-p p=0.9" in table
