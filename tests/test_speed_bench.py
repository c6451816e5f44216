"""eval/speed/official.py runs end to end (moezoo alone, tiny config) and prints the table and roofline lines."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "speed" / "official.py"


def _load():
    spec = importlib.util.spec_from_file_location("speed_official", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_time_moe_table_without_official(capsys, tmp_path):
    mod = _load()
    rc = mod.main(["--family", "time_moe", "--tiny", "--reps", "1", "--batch", "2", "--context", "16", "--horizon",
                   "5", "--threads", "1", "--no-bf16", "--json", str(tmp_path / "t.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "roofline: fp32 GEMM" in out
    for row in ("| forward |", "| generate |", "| train |", "| forecast |"):
        assert row in out
    assert (tmp_path / "t.json").exists()


def test_unknown_official_adapter_is_a_clear_error(capsys):
    mod = _load()
    with pytest.raises(SystemExit):
        mod.main(["--family", "mofme", "--official-src", "/nonexistent"])
    assert "no official adapter for mofme" in capsys.readouterr().err
