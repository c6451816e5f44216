"""training/dit_moe recipe: a few steps with each objective, exact resume, pipeline + grid at the end, the shipped
YAML configs, and the demo step end to end (with a reduced budget)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
from moezoo.models.dit_moe.recipe import build_scheduler, train  # noqa: E402
from moezoo.trainer import TrainerConfig, load_yaml_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = sorted((ROOT / "training" / "dit_moe" / "configs").glob("*.yaml"))


def _config(out, objective="ddpm", steps=3, per_class=0, **trainer):
    return {
        "model": {"name": "dit_moe_tiny_e4k2", "tiny": True,
                  "overrides": {"in_channels": 1, "learn_sigma": objective == "ddpm"}},
        "objective": {"type": objective},
        "data": {"dataset": "digits", "limit": 64},
        "sampling": {"scheduler": "ddpm" if objective == "ddpm" else "flow_match_euler", "num_inference_steps": 2,
                     "guidance_scale": 2.0, "per_class": per_class},
        "trainer": {"output_dir": str(out), "max_steps": steps, "batch_size": 8, "learning_rate": 1e-3,
                    "ema_decay": 0.9, "log_every": 1, "seed": 3, "progress_bar": False, **trainer},
    }


def _weights(ckpt):
    return load_file(str(Path(ckpt) / "model.safetensors"))


class _Killed(Exception):
    pass


class _KillAfterSave:
    """Stops training right after the checkpoint of ``step`` is written (like a kill between steps)."""

    def __init__(self, step):
        self.step = step

    def on_save(self, trainer, step, path):
        if step == self.step:
            raise _Killed(path)


def test_recipe_ddpm_interrupted_then_exact_resume(tmp_path):
    straight = train(_config(tmp_path / "a", steps=4), progress=False)
    with pytest.raises(_Killed):
        train(_config(tmp_path / "b", steps=4, save_every=2), progress=False, callbacks=[_KillAfterSave(2)])
    assert (tmp_path / "b" / "checkpoint-2").is_dir() and not (tmp_path / "b" / "pipeline").exists()
    first = resumed = train(_config(tmp_path / "b", steps=4, per_class=1), progress=False)
    assert resumed["start_step"] == 2 and resumed["step"] == 4
    wa, wb = _weights(straight["checkpoint"]), _weights(resumed["checkpoint"])
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    assert straight["losses"][2:] == pytest.approx(resumed["losses"][-2:], rel=0, abs=0)
    # the end of a run: the whole pipeline (EMA weights) + a grid
    assert first["weights"] == "ema" and Path(first["grid_png"]).is_file()
    from moezoo.models.dit_moe.pipeline_dit_moe import DiTMoEPipeline

    pipe = DiTMoEPipeline.from_pretrained(first["pipeline_dir"])
    ema = load_file(str(Path(first["checkpoint"]) / "ema" / "model.safetensors"))
    for k, v in pipe.transformer.state_dict().items():
        if k in ema:
            torch.testing.assert_close(v, ema[k], msg=k)
    assert (tmp_path / "b" / "routing_heatmap.png").is_file()


def test_recipe_rectified_flow_runs_and_saves_a_flow_pipeline(tmp_path):
    res = train(_config(tmp_path, objective="rectified_flow", steps=2), progress=False)
    assert res["step"] == 2 and all(l == l for l in res["losses"])  # finite
    from diffusers import FlowMatchEulerDiscreteScheduler

    from moezoo.models.dit_moe.pipeline_dit_moe import DiTMoEPipeline

    pipe = DiTMoEPipeline.from_pretrained(res["pipeline_dir"])
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.transformer.config.out_channels == 1


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    cfg = load_yaml_config(path)
    assert set(cfg) <= {"model", "objective", "data", "vae", "sampling", "trainer"}
    TrainerConfig.from_dict(cfg["trainer"])
    entry = moezoo.get_model_entry(cfg["model"]["name"])
    mc = moezoo.get_model_config(entry.name, **cfg["model"].get("overrides", {}))
    sched = build_scheduler(cfg["sampling"]["scheduler"], cfg["objective"], learn_sigma=mc.learn_sigma)
    is_flow = cfg["objective"]["type"] == "rectified_flow"
    assert type(sched).__name__.startswith("FlowMatch") == is_flow
    if cfg["data"]["dataset"] == "fashion_mnist":
        assert mc.in_channels == 1 and mc.sample_size == (cfg["data"].get("pad_to") or 28) and mc.num_classes == 10
    else:
        assert cfg["vae"]["path"] and mc.in_channels == 4 and mc.sample_size == 32


def test_bad_recipe_configs():
    with pytest.raises(ValueError, match="unknown config section"):
        train({"model": {"name": "dit_moe_tiny_e4k2"}, "trainer": {}, "optimiser": {}})
    with pytest.raises(ValueError, match="sampling.scheduler"):
        build_scheduler("euler_a", {"type": "ddpm"})
    with pytest.raises(ValueError, match="flow_match_euler"):
        build_scheduler("ddim", {"type": "rectified_flow"})


def test_demo_step_end_to_end_reduced(tmp_path, monkeypatch):
    from moezoo.data.images import fashion_mnist_available
    from moezoo.demo import DemoContext
    from moezoo.models.dit_moe import demo

    lines = []
    ctx = DemoContext(output_dir=tmp_path, quick=True, print=lines.append)
    if not fashion_mnist_available():
        assert "skipped" in demo.dit_moe_demo(ctx)
        return
    assert demo.demo_settings(True)["steps"] < demo.demo_settings(False)["steps"]
    monkeypatch.setattr(demo, "demo_settings", lambda quick: dict(
        steps=2, batch_size=8, per_class=1, inference_steps=2, classifier_train=256, ema_decay=None,
        learning_rate=1e-3, warmup=1))
    res = demo.dit_moe_demo(ctx)
    for k in ("classifier_fid", "conditional_accuracy", "classifier_fid_real_vs_real", "grid_png"):
        assert k in res
    assert Path(res["grid_png"]).is_file() and len(res["routing_pngs"]) == 2
    text = "\n".join(lines)
    assert "conditional accuracy" in text and "classifier FID" in text
