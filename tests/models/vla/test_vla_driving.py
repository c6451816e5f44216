"""highway-env driving data and closed loop: scenarios, multi-view cameras, IDM expert labels, the episode format and
dataset, one training step from it and a short closed-loop smoke run."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

import moezoo
from moezoo.models.vla import driving
from moezoo.models.vla.data import EpisodeDataset, collect_demonstrations
from moezoo.models.vla.harness import evaluate, run_episode
from moezoo.models.vla.recipe import build_policy, collate


@pytest.fixture
def short(monkeypatch):
    monkeypatch.setattr(driving.SCENARIOS["highway"], "max_steps", 4)
    monkeypatch.setattr(driving.SCENARIOS["intersection"], "max_steps", 3)


def test_unknown_scenario_is_named():
    with pytest.raises(ValueError, match=r"unknown scenario 'parking'; expected one of \['highway', 'intersection'"):
        driving.DrivingEnv("parking")
    with pytest.raises(ValueError, match="unknown cameras"):
        driving.DrivingEnv("highway", cameras=["ego", "roof"])


def test_views_state_and_expert(short, recwarn):
    env = driving.DrivingEnv("intersection", image_size=32)
    assert not [w for w in recwarn if "out of date" in str(w.message)]  # v0 is the intended env, not a stale one
    obs = env.reset(3)
    assert obs["task"] in ("go straight through the intersection", "turn left at the intersection",
                           "turn right at the intersection")
    imgs = [obs[f"observation.images.{c}"] for c in driving.CAMERAS]
    assert all(i.shape == (3, 32, 32) and i.dtype == np.uint8 for i in imgs)
    assert all(np.abs(imgs[0].astype(int) - i).sum() > 0 for i in imgs[1:])  # shifted views differ
    assert obs["observation.state"].shape == (6,) and obs["observation.waypoint"].shape == (2,)
    a, skill, cam = env.expert_action()
    assert a.shape == (2,) and np.all(np.abs(a) <= 1) and 0 <= skill < len(driving.SKILLS) and 0 <= cam < 4
    steps = 0
    while not env.step(a):
        steps += 1
        a, _, _ = env.expert_action()
    m = env.metrics()
    assert m["steps"] == 3 and set(m) >= {"success", "route_completion", "collision", "mean_speed", "driving_score"}
    env.close()


def test_collect_load_train_and_closed_loop(tmp_path, short):
    folder = collect_demonstrations(tmp_path / "data", ["highway"], [0], image_size=32, log=lambda *a: None)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format"] == "moezoo-vla-episodes/1" and meta["episodes"][0]["length"] == 4
    ds = EpisodeDataset(folder, chunk_size=4)
    assert len(ds) == 4
    last = ds[3]
    assert last["action"].shape == (4, 2) and last["action_is_pad"].tolist() == [False, True, True, True]
    assert last["observation.images.ego"].shape == (3, 32, 32) and 0 <= float(last["observation.images.ego"].max()) <= 1
    with pytest.raises(FileNotFoundError, match="meta.json"):
        EpisodeDataset(tmp_path, chunk_size=4)
    torch.manual_seed(0)
    p = moezoo.create_model("drivemoe_tiny_e6k1", tiny=True)
    p.set_normalization_stats(ds.stats)
    out = p.compute_loss(collate([ds[i] for i in range(4)]))
    assert torch.isfinite(out.loss) and out.camera_loss is not None and out.skill_loss is not None
    out.loss.backward()
    p.eval()
    m = run_episode(p, "highway", 7)
    assert m["steps"] == 4 and len(m["latency"]) == 2 and len(m["camera_selection"]) == 2  # n_action_steps=2
    res = evaluate(None, ["highway"], [7], mode="expert", printer=lambda *a: None)
    assert res["highway"]["collision"] == 0.0 and res["highway"]["route_completion"] == 1.0


def test_evaluate_runs_reloads_saved_policies_on_new_seeds(tmp_path, short):
    from moezoo.models.vla.harness import evaluate_runs

    folder = collect_demonstrations(tmp_path / "data", ["highway"], [0], image_size=32, log=lambda *a: None)
    stats = EpisodeDataset(folder, chunk_size=4).stats
    with pytest.raises(FileNotFoundError, match="no trained policies"):
        evaluate_runs(tmp_path, eval_seeds=[7], scenarios=["highway"])
    for variant in ("drive_pi0", "drivemoe"):
        p = build_policy({"name": "drivemoe_tiny_e6k1", "tiny": True, "variant": variant})
        p.set_normalization_stats(stats)
        run = tmp_path / "runs" / f"{variant}_seed0"
        p.save_pretrained(str(run / "model"))
        (run / "recipe.json").write_text(json.dumps({"data": {"seeds": [0]}}))
    with pytest.raises(ValueError, match=r"eval seeds \[0\] are also demonstration seeds"):
        evaluate_runs(tmp_path, eval_seeds=[0], scenarios=["highway"])
    summary = evaluate_runs(tmp_path, eval_seeds=[7, 8], scenarios=["highway"], printer=lambda *a: None)
    out = tmp_path / "eval_2seeds"
    assert (out / "results.md").read_text() == summary["table"]
    assert set(summary["results"]) == {"drive_pi0", "drivemoe", "expert (baseline)", "idle (baseline)"}
    assert summary["train_seeds"] == [0] and summary["eval_seeds"] == [7, 8]
    assert (out / "camera_selection_heatmap.png").is_file()
    assert summary["results"]["expert (baseline)"][0]["highway"]["route_completion"] == 1.0
