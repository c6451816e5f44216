"""Heterogeneous robots for HiMoE-VLA (MuJoCo Reacher 2-D torques, Pusher arm 7-D torques; EGL rendering): scripted
experts succeed, demonstrations in the episode format with per-embodiment statistics, the padded dataset feeds the
policy, the closed-loop harness (success per embodiment, GIF, expert-use heatmap, table), the recipe, and clear errors
for a missing rendering backend / simulator."""
from __future__ import annotations

import builtins
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest
import torch

import moezoo
from moezoo.models.vla import robots
from moezoo.models.vla.recipe import ROBOT_VARIANTS, build_robot_policy, collate, train_robots
from moezoo.models.vla.robot_harness import (evaluate_robots, expert_use_heatmap, robot_table, run_robot_episode)
from moezoo.models.vla.robots import RobotEnv, RobotEpisodeDataset, collect_robot_demonstrations


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("robot_demos")
    return collect_robot_demonstrations(out, ["reacher", "pusher"], [0], image_size=32, log=lambda *a: None)


def test_embodiments_render_and_scripted_experts_succeed():
    for name, dims in (("reacher", (10, 2)), ("pusher", (23, 7))):
        env = RobotEnv(name, image_size=32)
        obs = env.reset(3)
        img = obs["observation.images.front"]
        assert img.shape == (3, 32, 32) and img.dtype == np.uint8 and img.std() > 5  # a real rendering
        assert obs["observation.state"].shape == (dims[0],) and obs["embodiment"] == name
        assert env.expert_action().shape == (dims[1],)
        d0 = env.distance()
        while not env.step(env.expert_action()):
            pass
        assert env.success() and env.distance() < 0.2 * d0
        env.reset(3)
        while not env.step(np.zeros(dims[1])):
            pass
        assert not env.success()  # doing nothing does not count
        env.close()
    with pytest.raises(ValueError, match="unknown embodiment 'aloha'"):
        RobotEnv("aloha")
    from moezoo.models.vla import ROBOT_EMBODIMENTS  # the registry's padding layout matches the simulators
    for name, spec in robots.EMBODIMENTS.items():
        assert ROBOT_EMBODIMENTS[name]["state_dim"] == spec.state_dim
        assert len(ROBOT_EMBODIMENTS[name]["action_indices"]) == spec.action_dim


def test_demonstrations_stats_and_padded_dataset(demo_dir):
    meta = json.loads((demo_dir / "meta.json").read_text())
    assert meta["format"] == "moezoo-vla-episodes/1" and set(meta["embodiments"]) == {"reacher", "pusher"}
    assert [e["embodiment"] for e in meta["episodes"]] == ["reacher", "pusher"]
    assert all(e["metrics"]["success"] == 1.0 for e in meta["episodes"])
    stats = json.loads((demo_dir / "stats.json").read_text())["embodiments"]
    assert len(stats["reacher"]["action"]["mean"]) == 2 and len(stats["pusher"]["action"]["mean"]) == 7
    assert len(stats["pusher"]["observation.state"]["std"]) == 23
    p = moezoo.create_model("himoe_vla_tiny_e8k2", tiny=True)
    ds = RobotEpisodeDataset(demo_dir, p.config)
    assert len(ds) == sum(e["length"] for e in meta["episodes"])
    r, q = ds[0], ds[len(ds) - 1]
    assert r["embodiment"] == "reacher" and r["action_mask"].tolist() == p.config.action_mask_of("reacher")
    assert q["embodiment"] == "pusher" and q["action_is_pad"].tolist() == [False, True, True, True]
    assert (r["action"][:, 2:] == 0).all() and (r["observation.state"][10:] == 0).all()
    assert r["observation.images.front"].shape == (3, 32, 32)
    p.set_normalization_stats(ds.stats)
    batch = collate([ds[0], ds[60], ds[1]])
    assert batch["embodiment"] == ["reacher", "pusher", "reacher"]
    out = p.train().compute_loss(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.as_loss is not None and out.hb_loss is not None
    out.loss.backward()
    cfg = moezoo.get_model_config("himoe_vla_tiny_e8k2", tiny=True)
    with pytest.raises(ValueError, match="only"):
        RobotEpisodeDataset(demo_dir, type(cfg)(**{**cfg.to_dict(), "embodiments": {"reacher": {"action_indices": [0, 1],
                                                                                                 "state_dim": 10}}}))


def test_closed_loop_harness_video_heatmap_and_table(demo_dir, tmp_path, monkeypatch):
    import dataclasses

    short = {k: dataclasses.replace(v, max_steps=12) for k, v in robots.EMBODIMENTS.items()}  # short episodes
    monkeypatch.setattr(robots, "EMBODIMENTS", short)
    torch.manual_seed(0)
    p = moezoo.create_model("himoe_vla_tiny_e8k2", tiny=True, n_action_steps=4, num_inference_steps=1).eval()
    p.set_normalization_stats(json.loads((demo_dir / "stats.json").read_text()))
    res = evaluate_robots(p, ["reacher", "pusher"], [100], record_dir=tmp_path / "videos", printer=lambda *a: None,
                          tag="himoe")
    for emb in ("reacher", "pusher"):
        row = res[emb]
        assert 0.0 <= row["success"] <= 1.0 and row["final_distance"] > 0 and row["latency_ms"] > 0
        assert (tmp_path / "videos" / f"himoe_{emb}.gif").stat().st_size > 1000
        use = row["expert_use"]
        assert set(use) == {"as_moe.0", "as_moe.1", "hb_moe.2", "hb_moe.3", "as_moe.4", "as_moe.5"}
        steps = robots.EMBODIMENTS[emb].max_steps
        chunks = -(-steps // 4)
        assert sum(use["as_moe.0"]) == chunks  # one AS choice per chunk (all tokens of a sample share it)
        assert sum(use["hb_moe.2"]) == chunks * 2 * (p.config.chunk_size + 1)  # top-2 per token
    png = expert_use_heatmap(res, tmp_path / "heat.png")
    assert os.path.getsize(png) > 5000
    expert = run_robot_episode(None, "reacher", 100, mode="expert")
    assert expert["success"] in (0.0, 1.0) and expert["latency"] == []
    md = robot_table({"himoe": [res, res]}, ["reacher", "pusher"])
    assert "| himoe | reacher / reach |" in md and "±" in md


def test_robot_recipe_variants_train_and_save(demo_dir, tmp_path):
    names, actives = {}, {}
    for v in ROBOT_VARIANTS:
        pol = build_robot_policy({"name": "himoe_vla_tiny_e8k2", "tiny": True, "variant": v})
        names[v] = pol.config.mlp_layer_types
        actives[v] = pol.parameter_summary()["active"]
        if v != "dense":
            assert pol.moe_layers()
    assert names["dense"] == ["dense"] * 6 and names["topk"] == ["topk_moe"] * 6
    assert names["as_only"] == ["as_moe", "as_moe", "dense", "dense", "as_moe", "as_moe"]
    assert names["hb_only"] == ["dense", "dense", "hb_moe", "hb_moe", "dense", "dense"]
    base = actives["dense"]
    assert all(abs(a - base) / base < 0.02 for a in actives.values()), actives  # equal active parameters
    with pytest.raises(ValueError, match="unknown robot variant"):
        build_robot_policy({"name": "himoe_vla_tiny_e8k2", "tiny": True, "variant": "nope"})
    r = train_robots({"data": {"dir": str(demo_dir)}, "trainer": {"output_dir": str(tmp_path / "run"), "max_steps": 2,
                                                                  "batch_size": 4, "log_every": 1}},
                     printer=lambda *a: None)
    q = type(r["policy"]).from_pretrained(r["model_dir"])
    assert q.embodiment_state.has_stats("pusher") and q.embodiment_action.has_stats("reacher")


def test_missing_simulator_and_rendering_backend_are_named(monkeypatch):
    import mujoco

    def broken(*a, **k):
        raise mujoco.FatalError("gladLoadGL error")
    monkeypatch.setattr(mujoco, "Renderer", broken)
    with pytest.raises(RuntimeError, match=r"MUJOCO_GL=.*apt-get install -y libegl1 libegl-mesa0|libosmesa6"):
        RobotEnv("reacher")
    monkeypatch.undo()
    real_import = builtins.__import__

    def no_mujoco(name, *a, **k):
        if name == "mujoco" or name.startswith("mujoco."):
            raise ModuleNotFoundError("No module named 'mujoco'", name="mujoco")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_mujoco)
    with pytest.raises(ModuleNotFoundError, match="pip install mujoco"):
        robots.require_mujoco()


def test_eval_script_robot_mode_routes_to_the_robot_benchmark(monkeypatch):
    import importlib.util
    from pathlib import Path

    from moezoo.models.vla import robot_harness

    path = Path(__file__).resolve().parents[3] / "eval" / "vla" / "run.py"
    spec = importlib.util.spec_from_file_location("eval_vla_run", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seen = {}
    monkeypatch.setattr(robot_harness, "run_robot_benchmark", lambda **kw: seen.update(kw) or {"ok": True})
    assert mod.main(["--robots", "--variants", "himoe", "dense", "--steps", "5", "--eval-seeds", "200"]) == {"ok": True}
    assert seen["variants"] == ["himoe", "dense"] and seen["steps"] == 5 and seen["eval_seeds"] == [200]
    assert seen["model"] == "himoe_vla_tiny_e8k2" and seen["embodiments"] == ["reacher", "pusher"]


def test_robot_recipe_yaml_configs_train_script_and_demo_step(demo_dir, tmp_path):
    import importlib.util
    from pathlib import Path

    import yaml

    from moezoo.demo import DemoContext, list_demo_steps
    from moezoo.models.vla.demo import himoe_demo_config

    root = Path(__file__).resolve().parents[3]
    files = sorted((root / "training" / "vla" / "configs").glob("robots_*_tiny.yaml"))
    variants = {yaml.safe_load(f.read_text())["model"]["variant"] for f in files}
    assert variants == set(ROBOT_VARIANTS)
    spec = importlib.util.spec_from_file_location("train_vla", root / "training" / "vla" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--config", str(root / "training/vla/configs/robots_hb_only_tiny.yaml"), f"data.dir={demo_dir}",
                    f"trainer.output_dir={tmp_path / 'run'}", "trainer.max_steps=1", "trainer.batch_size=2"])
    assert res["policy"].config.mlp_layer_types == ["dense", "dense", "hb_moe", "hb_moe", "dense", "dense"]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert "vla_himoe" in {s.name for s in list_demo_steps()}
    cfg = himoe_demo_config(DemoContext(output_dir=tmp_path / "demo", quick=True))
    assert cfg["model"]["name"] == "himoe_vla_tiny_e8k2" and cfg["data"]["embodiments"] == ["reacher", "pusher"]
