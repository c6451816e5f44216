"""eval/speed/official.py runs end to end (moezoo alone, tiny config) and prints the table and roofline lines."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
        mod.main(["--family", "promoe", "--official-src", "/nonexistent"])
    assert "no official adapter for promoe" in capsys.readouterr().err


MOWE_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "parity" / "mofme" / "mowe_full"


def test_mofme_adapter_config_and_inputs_match_the_official_model():
    """The MoFME adapter's tiny config is the official fixture's, so its weights load through the adapter and give the
    official outputs; both sides draw the same pixels as the model's own example_inputs."""
    mod = _load()
    fixture = {k: v for k, v in json.loads((MOWE_FIXTURE / "config.json").read_text()).items() if k != "_reference"}
    official = {**fixture, "img_size": [fixture["img_size"]] * 2}
    assert {k: official.get(k) for k in mod.MOWE_TINY} == {k: v for k, v in mod.MOWE_TINY.items()}
    model = mod.mofme_moezoo_model(mod.MOWE_TINY, load_file(str(MOWE_FIXTURE / "model.safetensors")))
    io = load_file(str(MOWE_FIXTURE / "io.safetensors"))
    with torch.no_grad():
        got = model(pixel_values=io["in.img"]).reconstruction
    torch.testing.assert_close(got, io["out.img_hq"], atol=1e-5, rtol=1e-4)
    ex = model.example_inputs(batch_size=3, generator=torch.Generator().manual_seed(4))
    ours = mod.deweather_inputs(3, 3, 3, 32, 32, seed=4)
    assert torch.equal(ex["pixel_values"], ours["pixel_values"]) and torch.equal(ex["labels"], ours["labels"])
