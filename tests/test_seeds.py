"""moezoo.metrics.seeds: mean ± std over seeded runs, shared by every harness."""
import argparse
import statistics

import pytest

from moezoo.metrics.seeds import add_seeds_argument, format_mean_std, mean_std, summarize_runs


def test_summarize_runs_nested_numeric_leaves():
    runs = [{"psnr": {"rain": 20.0, "fog": 25.0}, "params": 10, "name": "m", "seed": 0, "ok": True},
            {"psnr": {"rain": 22.0, "fog": 26.0}, "params": 10, "name": "m", "seed": 1, "ok": True}]
    s = summarize_runs(runs)
    assert s["psnr"]["rain"]["mean"] == 21.0
    assert s["psnr"]["rain"]["std"] == pytest.approx(statistics.stdev([20.0, 22.0]))
    assert s["params"] == {"mean": 10.0, "std": 0.0, "n": 2, "values": [10.0, 10.0]}
    assert s["name"] == "m" and s["ok"] is True       # bools and strings are kept when equal, not averaged
    assert format_mean_std(s["psnr"]["fog"], 2) == "25.50 ± 0.71"
    assert format_mean_std(summarize_runs(runs[:1])["psnr"]["fog"], 2) == "25.00"
    assert format_mean_std(3.14159, 2) == "3.14" and format_mean_std([1.0, 3.0], 1) == "2.0 ± 1.4"


def test_summarize_runs_drops_disagreeing_or_missing_keys():
    s = summarize_runs([{"a": 1.0, "b": "x", "c": 2.0}, {"a": 2.0, "b": "y"}])
    assert set(s) == {"a"}


def test_bad_input_and_argument():
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])
    with pytest.raises(ValueError, match="at least one run"):
        summarize_runs([])
    with pytest.raises(ValueError, match="one dict per run"):
        summarize_runs([1, 2])
    p = argparse.ArgumentParser()
    add_seeds_argument(p)
    assert p.parse_args([]).seeds == [0] and p.parse_args(["--seeds", "0", "1", "2"]).seeds == [0, 1, 2]


def test_runs_table_rows_cells_and_errors():
    from moezoo.metrics.seeds import runs_table

    runs = [{"a": {"x": 1.0, "y": 2.0}, "b": {"x": 3.0, "y": 4.0}}, {"a": {"x": 3.0, "y": 2.0}, "b": {"x": 5.0, "y": 4.0}}]
    md = runs_table({"m1": runs, "m2": runs[:1]}, ["a", "b"], ["x", "y"], group_header="task",
                    group_label=str.upper, digits=2)
    lines = md.strip().splitlines()
    assert lines[0] == "| method | task | x | y |"
    assert lines[2] == "| m1 | A | 2.00 ± 1.41 | 2.00 ± 0.00 |"  # sample std (ddof=1), as everywhere else
    assert lines[5] == "| m2 | B | 3.00 | 4.00 |"  # one run: no ± part
    assert len(lines) == 2 + 4
    with pytest.raises(ValueError, match="no runs"):
        runs_table({"m": []}, ["a"], ["x"])
    with pytest.raises(ValueError, match="metric"):
        runs_table({"m": runs}, ["a"], [])
