"""The ``moezoo`` command line: list, info, parity, convert (block references and registered converters), push
--dry-run, bench, demo; user errors are one line with exit status 2 and no traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
import moezoo.parity as parity  # noqa: E402
from moezoo import convert as convert_mod  # noqa: E402
from moezoo.cli import main  # noqa: E402
from moezoo.core import MoELayer, build_moe_layer  # noqa: E402

SHARED = Path(os.environ.get("MOEZOO_PARITY_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "parity"))


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def shared_reference():
    """(reference, folder) of the first shared parity folder that has a converter, or skip."""
    for ref in parity.available_references():
        folder = SHARED / ref
        if (folder / "io.safetensors").is_file():
            return ref, folder
    pytest.skip(f"no shared parity folder under {SHARED}")


# ------------------------------------------------------------------------------------------------ list / info
def test_list(capsys):
    rc, out, _ = run(["list"], capsys)
    assert rc == 0
    for name in moezoo.list_models():
        assert name in out
    rc, out, _ = run(["list", "lm_tiny*", "--family", "lm"], capsys)
    assert rc == 0 and "lm_tiny_e8k2" in out and "lm_small_e16k2" not in out
    rc, out, _ = run(["list", "--markdown"], capsys)
    assert rc == 0 and out.startswith("| family |")


def test_list_unknown_family(capsys):
    rc, _, err = run(["list", "--family", "moezoo_lx"], capsys)
    assert rc == 2 and "unknown family" in err and "moezoo_lm" in err and "Traceback" not in err


def test_info_counts(capsys):
    rc, out, _ = run(["info", "lm_small_e16k2"], capsys)
    assert rc == 0
    with torch.device("meta"):
        s = moezoo.create_model("lm_small_e16k2").parameter_summary()
    assert f"{s['total']:,}" in out and f"{s['active']:,}" in out
    assert s["active"] < s["total"]
    assert "MoE layers:       7 of 8" in out and "TopKRouter" in out and "topk" in out


def test_info_folder_and_tiny(capsys, tmp_path):
    m = moezoo.create_model("lm_tiny_e8k2", tiny=True)
    m.save_pretrained(tmp_path)
    rc, out, _ = run(["info", str(tmp_path)], capsys)
    s = m.parameter_summary()
    assert rc == 0 and f"{s['total']:,}" in out and "MoezooLMForCausalLM" in out
    rc, out2, _ = run(["info", "lm_tiny_e8k2", "--tiny"], capsys)
    assert rc == 0 and f"{s['total']:,}" in out2


def test_info_unknown_name_suggests(capsys):
    rc, _, err = run(["info", "lm_tiny_e8"], capsys)
    assert rc == 2 and "did you mean 'lm_tiny_e8k2'" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ parity
def test_parity_shared_folder(capsys):
    ref, folder = shared_reference()
    rc, out, _ = run(["parity", ref.replace("_", "-"), str(folder)], capsys)
    assert rc == 0, out
    assert "outputs match" in out


def test_parity_mismatch_exits_1(capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    ref, folder = shared_reference()
    bad = tmp_path / ref
    shutil.copytree(folder, bad)
    io = load_file(str(bad / "io.safetensors"))
    key = next(k for k in sorted(io) if k.startswith("out.") and io[k].is_floating_point() and io[k].numel())
    io[key] = io[key] + 1.0
    save_file(io, str(bad / "io.safetensors"))
    rc, out, err = run(["parity", ref, str(bad)], capsys)
    assert rc == 1 and "MISMATCH" in out and "parity FAILED" in err


def test_parity_errors_are_one_line(capsys, tmp_path):
    rc, _, err = run(["parity", "no_such_ref", str(tmp_path)], capsys)
    assert rc == 2 and "unknown reference" in err and "Traceback" not in err
    ref = parity.available_references()[0]
    rc, _, err = run(["parity", ref, str(tmp_path / "missing")], capsys)
    assert rc == 2 and "does not exist" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ convert
def test_convert_shared_block_reference_and_reload(capsys, tmp_path):
    from safetensors.torch import load_file

    ref, folder = shared_reference()
    dst = tmp_path / "converted"
    rc, out, _ = run(["convert", ref.replace("_", "-"), str(folder), str(dst)], capsys)
    assert rc == 0, out
    assert {"model.safetensors", "moezoo_module.json", "reference_config.json"} <= {p.name for p in dst.iterdir()}
    module = convert_mod.load_converted(dst)
    mod = parity.get_reference(ref)
    config = json.loads((dst / "reference_config.json").read_text())
    io = load_file(str(folder / "io.safetensors"))
    inputs = {k: v for k, v in io.items() if k.startswith("in.")}
    torch.manual_seed(0)
    with torch.no_grad():
        got = mod.run(module, config, inputs)
    for k, want in io.items():
        if k.startswith("out."):
            c = parity.compare(k, got.get(k), want, k.removeprefix("out.") in getattr(mod, "EXACT", ()))
            assert c.ok, (k, c.max_abs_diff, c.note)


@pytest.fixture()
def fake_reference(monkeypatch):
    """A block reference 'fake_ref' whose convert returns a ModuleDict of two MoELayers (one with a dtype kwarg)."""
    mod = types.ModuleType("moezoo.parity.fake_ref")
    mod.REPO = "someone/fake"
    mod.EXACT = set()

    def convert(config, state_dict, scale=1.0):
        H, E = state_dict["a.gate"].shape[1], state_dict["a.gate"].shape[0]
        layers = torch.nn.ModuleDict({
            "a": build_moe_layer(hidden_size=H, num_experts=E, num_experts_per_tok=config["k"], moe_intermediate_size=6,
                          router_kwargs={"router_dtype": torch.float32}),
            "b": build_moe_layer(hidden_size=H, num_experts=E, num_experts_per_tok=1, moe_intermediate_size=6,
                          num_shared_experts=1),
        })
        with torch.no_grad():
            layers["a"].gate.weight.copy_(state_dict["a.gate"] * scale)
        return layers

    mod.convert = convert
    real_get = parity.get_reference
    monkeypatch.setattr(parity, "available_references", lambda: ["fake_ref"])
    monkeypatch.setattr(parity, "get_reference", lambda n: mod if parity.normalize_reference(n) == "fake_ref"
                        else real_get(n))
    return mod


def test_convert_fake_block_reference(fake_reference, capsys, tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    torch.manual_seed(0)
    gate = torch.randn(4, 8)
    save_file({"a.gate": gate}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"k": 2}))
    dst = tmp_path / "dst"
    rc, out, err = run(["convert", "fake-ref", str(src), str(dst), "--option", "scale=2.0"], capsys)
    assert rc == 0, err
    spec = json.loads((dst / "moezoo_module.json").read_text())
    assert spec["reference"] == "fake_ref" and spec["module"]["type"] == "ModuleDict"
    assert spec["module"]["children"]["a"]["class"] == "moezoo.core.layer:MoELayer"
    module = convert_mod.load_converted(dst)
    assert isinstance(module, torch.nn.ModuleDict) and set(module) == {"a", "b"}
    assert module["a"].gate.router_dtype == torch.float32
    torch.testing.assert_close(module["a"].gate.weight, gate * 2.0)
    # every weight written (random experts included) comes back, and the reloaded layers compute the same outputs
    from safetensors.torch import load_file

    saved = load_file(str(dst / "model.safetensors"))
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    assert module["b"].shared_expert is not None
    # bare weights file + --config
    dst2 = tmp_path / "dst2"
    rc, _, err = run(["convert", "fake_ref", str(src / "model.safetensors"), str(dst2), "--config",
                      str(src / "config.json")], capsys)
    assert rc == 0, err
    torch.testing.assert_close(convert_mod.load_converted(dst2)["a"].gate.weight, gate)


def test_convert_refuses_pickles_without_opt_in(fake_reference, capsys, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"a.gate": torch.randn(4, 8)}, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps({"k": 2}))
    rc, _, err = run(["convert", "fake_ref", str(src), str(tmp_path / "d")], capsys)
    assert rc == 2 and "allow-pickle" in err.replace("allow_pickle", "allow-pickle")
    rc, _, err = run(["convert", "fake_ref", str(src), str(tmp_path / "d"), "--allow-pickle"], capsys)
    assert rc == 0, err


def test_register_converter_dispatch(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(convert_mod, "CONVERTERS", {})
    calls = []

    @convert_mod.register_converter("my-family-ref")
    def my_converter(src, dst, **options):
        calls.append((src, dst, options))
        dst.mkdir(parents=True)
        (dst / "config.json").write_text("{}")
        return dst

    rc, out, err = run(["convert", "my_family_ref", str(tmp_path / "s"), str(tmp_path / "d"), "--option", "x=3"],
                       capsys)
    assert rc == 0, err
    assert calls == [(tmp_path / "s", tmp_path / "d", {"x": 3})]
    assert "my_family_ref" in convert_mod.available_converters()
    with pytest.raises(ValueError, match="already registered"):
        convert_mod.register_converter("my_family_ref")(lambda s, d: None)


def test_convert_unknown_reference(capsys, tmp_path):
    rc, _, err = run(["convert", "nosuchref", str(tmp_path), str(tmp_path / "d")], capsys)
    assert rc == 2 and "no converter for reference" in err and "Traceback" not in err


def test_module_spec_rejects_unrebuildable(tmp_path):
    with pytest.raises(ValueError, match="init_kwargs"):
        convert_mod.save_converted(torch.nn.Linear(2, 2), tmp_path)
    (tmp_path / "moezoo_module.json").write_text(json.dumps(
        {"format": "moezoo.module", "module": {"type": "module", "class": "os:system", "init_kwargs": {}}}))
    with pytest.raises(ValueError, match="only moezoo"):
        convert_mod.load_converted(tmp_path)


# ------------------------------------------------------------------------------------------------ push / bench
def test_push_dry_run(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET_cli_token_123")
    m = moezoo.create_model("lm_tiny_e8k2", tiny=True)
    src = tmp_path / "model"
    m.save_pretrained(src)
    stage = tmp_path / "stage"
    rc, out, err = run(["push", str(src), "me/lm", "--dry-run", "--private", "--staging-dir", str(stage)], capsys)
    assert rc == 0, err
    assert str(stage) in out and "model.safetensors" in out and "README.md" in out and "(private)" in out
    assert "hf_SECRET_cli_token_123" not in out + err
    assert (stage / "README.md").read_text().startswith("---\n")


def test_push_missing_folder(capsys, tmp_path):
    rc, _, err = run(["push", str(tmp_path / "none"), "me/lm", "--dry-run"], capsys)
    assert rc == 2 and "not a folder" in err


def test_bench_unknown(capsys):
    rc, _, err = run(["bench", "no-such-bench"], capsys)
    assert rc == 2 and "not available" in err and "moe-layer" in err


def test_bench_dispatch(capsys, monkeypatch):
    fake = types.ModuleType("moezoo.bench_fake_thing")
    got = []
    fake.main = lambda argv: got.append(argv) or 0
    monkeypatch.setitem(sys.modules, "moezoo.bench_fake_thing", fake)
    rc, _, _ = run(["bench", "fake-thing", "--x", "1"], capsys)
    assert rc == 0 and got == [["--x", "1"]]


# ------------------------------------------------------------------------------------------------ demo / script
def test_demo_quick(capsys, tmp_path):
    from transformers import AutoModelForCausalLM

    rc, out, err = run(["demo", "--quick", "--output-dir", str(tmp_path)], capsys)
    assert rc == 0, err
    results = json.loads((tmp_path / "results.json").read_text())["lm"]
    assert results["val_loss_after"] < results["val_loss_before"]
    assert results["reload_max_abs_diff"] < 1e-4
    assert (tmp_path / "lm" / "routing_heatmap.png").stat().st_size > 1000
    assert (tmp_path / "lm" / "routing_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    model_dir = Path(results["model_dir"])
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in model_dir.iterdir()}
    assert type(AutoModelForCausalLM.from_pretrained(model_dir)).__name__ == "MoezooLMForCausalLM"
    assert "validation loss" in out and "sample:" in out and "max/ideal" in out
    rc, out, _ = run(["demo", "--list"], capsys)
    assert rc == 0 and out.startswith("lm ")
    rc, _, err = run(["demo", "--steps", "nope", "--output-dir", str(tmp_path / "x")], capsys)
    assert rc == 2 and "unknown demo step" in err


def test_console_script():
    script = Path(sys.executable).with_name("moezoo")
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from moezoo.cli import main; "
                                                                      "sys.exit(main())"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run(cmd + ["list", "lm_*"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "lm_tiny_e8k2" in res.stdout and "lm_small_e16k2" in res.stdout


def test_train_and_eval_find_the_family_scripts(capsys, tmp_path):
    rc, out, err = run(["train", "no_such_family", "--config", "x.yaml"], capsys)
    assert rc == 2 and "training/no_such_family/train.py" in err and "time_moe" in err
    rc, out, err = run(["eval", "time_moe", "--help"], capsys)
    assert rc == 0 and "--horizons" in out
    cfg = tmp_path / "missing.yaml"
    rc, out, err = run(["train", "time-moe", "--config", str(cfg)], capsys)
    assert rc != 0
