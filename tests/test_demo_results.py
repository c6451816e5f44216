"""`moezoo demo --steps ...` merges its results into results.json instead of overwriting the other steps'."""
from __future__ import annotations

import json

import pytest

from moezoo import demo


@pytest.fixture()
def two_steps(monkeypatch):
    monkeypatch.setattr(demo, "_STEPS", {})
    monkeypatch.setattr(demo, "_discover_steps", lambda: None)
    calls = []
    demo.register_demo_step("a", order=1)(lambda ctx: calls.append("a") or {"metric": 1.0})
    demo.register_demo_step("b", order=2)(lambda ctx: calls.append("b") or {"metric": 2.0})
    return calls


def test_steps_run_merges_into_results_json(tmp_path, two_steps):
    demo.run_demo(tmp_path, printer=lambda *a: None)
    first = json.loads((tmp_path / "results.json").read_text())
    assert first["a"]["metric"] == 1.0 and first["b"]["metric"] == 2.0
    demo._STEPS["a"].fn = lambda ctx: {"metric": 10.0}
    merged = demo.run_demo(tmp_path, steps=["a"], printer=lambda *a: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == merged
    assert saved["a"]["metric"] == 10.0 and saved["b"] == first["b"]  # b kept from the earlier run
    assert saved["total_seconds"] == pytest.approx(saved["a"]["seconds"] + saved["b"]["seconds"], abs=0.11)
    assert not (tmp_path / "results.json.tmp").exists()


def test_unreadable_old_results_are_replaced(tmp_path, two_steps):
    (tmp_path / "results.json").write_text("{not json")
    demo.run_demo(tmp_path, steps=["b"], printer=lambda *a: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == {"b", "total_seconds"}
