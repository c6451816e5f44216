"""Deweather harness: ``eval/deweather/run.py --fast`` end to end (table, JSON, triptych PNGs, MoFME vs MoE sizes and
times), evaluating saved folders with ``--model``, the timing / parameter helpers and their errors."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moezoo.models.deweather import harness  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
WEATHERS = {"rain", "snow", "fog", "raindrop", "overall"}


def _run_script():
    spec = importlib.util.spec_from_file_location("deweather_eval", REPO / "eval" / "deweather" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = _run_script()(["--fast", "--output-dir", str(out), "--cache-dir", str(out / "cache"),
                             "--set", "threads=1", "--seeds", "0", "1"])
    finally:
        torch.set_num_threads(n)
    return out, res


def test_fast_end_to_end(fast_run):
    out, res = fast_run
    md = (out / "results.md").read_text()
    data = json.loads((out / "results.json").read_text())
    assert set(data["quality"]) == {"degraded input", "mofme", "moe"}
    for system in data["quality"].values():
        assert set(system) == WEATHERS
        assert all(0 < v["psnr"] <= 100 and -1 <= v["ssim"] <= 1 for v in system.values())
    assert data["trained"]["mofme"]["step"] == data["trained"]["moe"]["step"] == 2      # equal budget
    # --seeds 0 1: every config trained twice, mean ± std over the seeds
    assert data["trained"]["mofme"]["seeds"] == [0, 1] and len(data["quality_per_seed"]["moe"]) == 2
    ov = data["quality"]["mofme"]["overall"]
    per = [r["overall"]["psnr"] for r in data["quality_per_seed"]["mofme"]]
    assert ov["seeds"] == 2 and abs(ov["psnr"] - sum(per) / 2) < 1e-9 and ov["psnr_std"] > 0   # seeds differ
    assert "±" in md and "over 2 seeds" in md
    # the evaluated pair: parameters + CPU time measured in the same run
    (row,) = data["efficiency_evaluated"]
    assert row["num_experts"] == 4 and row["time_mofme_s"] > 0 and row["time_moe_s"] > 0
    assert row["params_mofme"]["total"] < row["params_moe"]["total"]
    # registered _s_ configs at E = 4 / 8 / 16: parameter savings grow with the expert count
    rows = data["efficiency_registered"]
    assert [r["num_experts"] for r in rows] == [4, 8, 16]
    savings = [r["param_saving_moe_pct"] for r in rows]
    assert 0 < savings[0] < savings[1] < savings[2] < 100
    assert "time_mofme_s" not in rows[0]                                   # --fast: counted, not timed
    assert "| degraded input |" in md and "| mofme |" in md and "deweather_mofme_s_e16k4" in md
    pngs = sorted((out / "triptychs").glob("*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 1000 for p in pngs)
    assert (out / "train" / "mofme" / "seed1" / "routing_heatmap.png").is_file()


def test_evaluate_saved_model_folders(fast_run, tmp_path):
    out, _ = fast_run
    res = _run_script()(["--fast", "--model", f"fme={out / 'train' / 'mofme' / 'seed0' / 'model'}",
                         "--model", str(out / "train" / "moe" / "seed0" / "checkpoint-2"), "--speed-pairs", "none",
                         "--triptychs", "1", "--repeats", "2", "--output-dir", str(tmp_path / "eval"),
                         "--cache-dir", str(out / "cache"), "--max-items", "4"])
    assert set(res["quality"]) == {"degraded input", "fme", "checkpoint-2"}
    assert res["quality"]["degraded input"]["overall"]["count"] == 4
    assert res["efficiency_registered"] == [] and len(res["efficiency_evaluated"]) == 1
    assert len(list((tmp_path / "eval" / "triptychs").glob("*.png"))) == 1
    with pytest.raises(ValueError, match="config.json"):
        harness.load_model(tmp_path)


def test_time_models_and_parameter_counts():
    import moezoo

    a = moezoo.create_model("deweather_mofme_tiny_e4k2", tiny=True)
    b = moezoo.create_model("deweather_moe_tiny_e4k2", tiny=True)
    n = torch.get_num_threads()
    t = harness.time_models({"a": a, "b": b}, torch.rand(1, 3, 32, 32), repeats=3, warmup=1, threads=1)
    assert torch.get_num_threads() == n
    for v in t.values():
        assert len(v["forward_all_s"]) == 3 and v["forward_s"] > v["moe_s"] > 0
    ca = harness.count_parameters(a)
    assert ca["total"] == sum(p.numel() for p in a.parameters()) and 0 < ca["moe_layers"] < ca["total"]
    rows = harness.efficiency_comparison([("deweather_mofme_s_e4k2", "deweather_moe_s_e4k2")], time_it=False)
    full = moezoo.get_model_config("deweather_mofme_s_e4k2")
    assert rows[0]["params_mofme"]["total"] > 5_000_000 and rows[0]["num_experts"] == full.num_experts == 4
    assert rows[0]["param_saving_total_pct"] > 0 and "time_mofme_s" not in rows[0]
    with pytest.raises(ValueError, match="equal expert count"):
        harness.efficiency_comparison([("deweather_mofme_s_e4k2", "deweather_moe_s_e8k2")], time_it=False)
    with pytest.raises(ValueError, match="repeats"):
        harness.time_models({"a": a}, torch.rand(1, 3, 32, 32), repeats=0)
    with pytest.raises(ValueError, match="at least one model"):
        harness.run_benchmark(output_dir="unused")


def test_aggregate_seeds_mean_and_sample_std(tmp_path):
    runs = [{"rain": {"psnr": 20.0, "ssim": 0.5, "count": 4}, "overall": {"psnr": 20.0, "ssim": 0.5, "count": 4}},
            {"rain": {"psnr": 22.0, "ssim": 0.7, "count": 4}, "overall": {"psnr": 22.0, "ssim": 0.7, "count": 4}},
            {"rain": {"psnr": 24.0, "ssim": 0.6, "count": 4}, "overall": {"psnr": 24.0, "ssim": 0.6, "count": 4}}]
    agg = harness.aggregate_seeds(runs)
    assert agg["rain"]["psnr"] == pytest.approx(22.0) and agg["rain"]["psnr_std"] == pytest.approx(2.0)
    assert agg["overall"]["ssim"] == pytest.approx(0.6) and agg["overall"]["ssim_std"] == pytest.approx(0.1)
    assert agg["rain"]["seeds"] == 3 and agg["rain"]["count"] == 4
    assert harness.aggregate_seeds(runs[:1])["rain"]["psnr_std"] == 0.0
    table = harness.seeds_table({"input": runs[0], "m": agg}, {"m": ["1,000"]}, ["params"])
    lines = table.splitlines()
    assert lines[0] == "| system | rain PSNR / SSIM | overall PSNR / SSIM | params |"
    assert lines[2] == "| input | 20.00 / 0.5000 | 20.00 / 0.5000 | - |"
    assert lines[3] == "| m | 22.00 ± 2.00 / 0.6000 ± 0.1000 | 22.00 ± 2.00 / 0.6000 ± 0.1000 | 1,000 |"
    with pytest.raises(ValueError, match="at least one run"):
        harness.aggregate_seeds([])
    with pytest.raises(ValueError, match="seeds"):
        harness.run_benchmark(output_dir=tmp_path, models={"a": "b"}, seeds=[])
