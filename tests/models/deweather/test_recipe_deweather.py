"""Deweather training recipe: the YAML configs, 3 steps through ``training/deweather/train.py`` + exact resume, the
perceptual-loss switch (skipped without VGG weights, used with a feature net), config errors, and the demo step."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moezoo.models.deweather import recipe  # noqa: E402
from moezoo.trainer import TrainerCallback, load_yaml_config  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "training" / "deweather" / "configs"
TINY_DATA = ["data.photo_size=40", "data.crop_size=32", "data.train_variants=1", "data.train_crops=2",
             "data.test_crops=1", "data.max_photos=1", "model.tiny=true", "threads=1", "eval.triptychs=1",
             "trainer.batch_size=2", "trainer.warmup_steps=1", "trainer.log_every=1", "trainer.eval_every=null",
             "trainer.progress_bar=false"]


def _script():
    spec = importlib.util.spec_from_file_location("deweather_train", REPO / "training" / "deweather" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["tiny_mofme.yaml", "tiny_moe.yaml", "allweather_mofme_s.yaml"])
def test_configs_resolve(name, tmp_path):
    overrides = [] if name.startswith("tiny") else ["data.root=/data/allweather"]   # the one required setting
    cfg = recipe.resolve_recipe(load_yaml_config(CONFIGS / name, overrides))
    assert cfg["model"]["name"].startswith("deweather_")
    if name.startswith("tiny"):
        assert cfg["trainer"]["learning_rate"] == 2e-3 and cfg["data"]["source"] == "builtin"
        assert cfg["data"]["photos"] == "all" and cfg["data"]["random_crops"]
        assert cfg["loss"]["pixel"] == "psnr" and cfg["model"]["config"]["tail_skip"]
    else:
        assert cfg["data"]["source"] == "allweather"
    mofme, moe = (load_yaml_config(CONFIGS / n) for n in ("tiny_mofme.yaml", "tiny_moe.yaml"))
    assert {k: v for k, v in mofme["trainer"].items() if k != "output_dir"} == \
        {k: v for k, v in moe["trainer"].items() if k != "output_dir"}          # equal training budget
    assert mofme["data"] == moe["data"] and mofme["loss"] == moe["loss"]
    assert mofme["model"]["config"] == moe["model"]["config"]
    # the demo step trains exactly the recipe of tiny_mofme.yaml (same model, data, loss and budget)
    from moezoo.demo import DemoContext
    from moezoo.models.deweather.demo import demo_config

    demo = demo_config(DemoContext(output_dir=tmp_path, quick=False, seed=0))
    assert demo["model"] == {k: mofme["model"][k] for k in ("name", "tiny", "config")}
    assert demo["loss"] == mofme["loss"]
    assert all(demo["data"][k] == mofme["data"][k] for k in demo["data"])
    assert all(demo["trainer"][k] == mofme["trainer"][k] for k in ("max_steps", "batch_size", "learning_rate",
                                                                   "warmup_steps", "weight_decay", "min_lr_ratio"))


def test_train_three_steps_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEZOO_CACHE", str(tmp_path / "cache"))
    train = _script().main
    base = ["--config", str(CONFIGS / "tiny_mofme.yaml"), *TINY_DATA]
    straight = train([*base, f"trainer.output_dir={tmp_path / 'a'}", "trainer.max_steps=3", "trainer.save_every=1"])
    assert straight["step"] == 3 and len(straight["losses"]) == 3
    out = tmp_path / "a"
    assert (out / "model" / "model.safetensors").is_file() and (out / "checkpoint-3").is_dir()
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"before", "after", "degraded input", "val"}     # val: the held-out validation photos
    assert set(metrics["val"]) == {"after", "degraded input"}
    assert set(metrics["after"]) == {"rain", "snow", "fog", "raindrop", "overall"}
    assert len(list((out / "triptychs").glob("*.png"))) == 1
    assert (out / "routing_heatmap.png").is_file()                   # expert load logged for the FME layers
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("routing/max_load" in e for e in log)

    # the same run killed right after its step-2 checkpoint, then the same command continues from checkpoint-2
    cmd = [*base, f"trainer.output_dir={tmp_path / 'b'}", "trainer.max_steps=3", "trainer.save_every=1"]

    class Killed(Exception):
        pass

    class KillAfterSave(TrainerCallback):
        def on_save(self, trainer, step, path):
            if step == 2:
                raise Killed

    with pytest.raises(Killed):
        recipe.train(recipe.resolve_recipe(load_yaml_config(cmd[1], cmd[2:])), printer=lambda *a: None,
                     callbacks=[KillAfterSave()])
    assert not (tmp_path / "b" / "checkpoint-3").exists() and (tmp_path / "b" / "checkpoint-2").is_dir()
    resumed = train(cmd)
    assert resumed["start_step"] == 2 and resumed["step"] == 3
    assert resumed["losses"] == straight["losses"]
    from safetensors.torch import load_file

    a, b = load_file(out / "model" / "model.safetensors"), load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_perceptual_loss_switch(tmp_path, monkeypatch):
    import moezoo

    msgs = []
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert recipe.vgg16_weights_path() is None
    assert recipe.make_loss_fn(0.04, printer=msgs.append) is None
    assert "perceptual loss skipped" in msgs[0] and "vgg16-397923af.pth" in msgs[0]
    assert recipe.make_loss_fn(0.0, printer=msgs.append) is None and len(msgs) == 1

    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / recipe.VGG16_FILE).write_bytes(b"")
    assert recipe.vgg16_weights_path() is not None
    torch.manual_seed(0)
    feats = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    monkeypatch.setattr(recipe.VGGPerceptualLoss, "from_file",
                        classmethod(lambda cls, path: cls(feats, layers=(1, 3))))
    loss_fn = recipe.make_loss_fn(0.5, printer=msgs.append)
    assert "perceptual loss: 0.5" in msgs[-1]
    model = moezoo.create_model("deweather_mofme_tiny_e4k2", tiny=True)
    x = torch.rand(2, 3, 32, 32)
    y = torch.rand(2, 3, 32, 32)
    loss, logs = loss_fn(model, {"pixel_values": x, "labels": y})
    assert set(logs) == {"l1_plus_aux", "perceptual", "aux_loss"} and logs["perceptual"] > 0
    assert torch.allclose(loss, logs["l1_plus_aux"] + 0.5 * logs["perceptual"])
    loss.backward()
    assert all(p.grad is None for p in feats.parameters())             # the feature net stays frozen
    perc = recipe.VGGPerceptualLoss(feats, layers=(1, 3))
    perc.train()
    assert not perc.features.training
    assert perc(y, y).item() == 0.0
    with pytest.raises(ValueError, match="layers"):
        recipe.VGGPerceptualLoss(feats, layers=(7,))


def test_psnr_loss_is_minus_the_mean_image_psnr():
    """loss.pixel=psnr optimises the benchmark metric: minus the mean of per-image PSNRs (not the PSNR of the mean
    error), so an almost clean image weighs as much as a badly degraded one."""
    import moezoo
    from moezoo.metrics.restoration import psnr

    torch.manual_seed(0)
    y = torch.rand(3, 3, 16, 16)
    x = (y + torch.randn_like(y) * torch.tensor([0.01, 0.1, 0.3]).view(3, 1, 1, 1)).clamp(0, 1)
    assert torch.allclose(recipe.psnr_loss(x, y), -psnr(x, y).mean(), atol=1e-4)
    pooled = 10 * torch.log10(((x - y) ** 2).mean())
    assert recipe.psnr_loss(x, y) < pooled - 3  # per-image mean != PSNR of the pooled error (here by > 3 dB)
    loss_fn = recipe.make_loss_fn(0.0, pixel="psnr")
    model = moezoo.create_model("deweather_mofme_tiny_e4k2", tiny=True)
    loss, logs = loss_fn(model, {"pixel_values": x, "labels": y})
    assert set(logs) == {"psnr", "aux_loss"} and torch.allclose(loss, logs["psnr"] + logs["aux_loss"])
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "tail" in n)
    with pytest.raises(ValueError, match="loss.pixel"):
        recipe.make_loss_fn(0.0, pixel="ssim")


def test_recipe_errors():
    with pytest.raises(ValueError, match="unknown recipe section"):
        recipe.resolve_recipe({"optim": {}})
    with pytest.raises(ValueError, match=r"unknown model\.\* key"):
        recipe.resolve_recipe({"model": {"nam": "x"}})
    with pytest.raises(ValueError, match=r"unknown data\.\* key"):
        recipe.resolve_recipe({"data": {"crop": 3}})
    with pytest.raises(ValueError, match="needs data.root"):
        recipe.resolve_recipe({"data": {"source": "allweather"}})
    with pytest.raises(ValueError, match="data.source"):
        recipe.resolve_recipe({"data": {"source": "hub"}})
    with pytest.raises(ValueError, match="threads"):
        recipe.resolve_recipe({"threads": 0})
    with pytest.raises(ValueError, match="divisible"):
        recipe.build_datasets({"source": "builtin", "crop_size": 36}, patch_size=8)


def test_demo_quick(tmp_path, monkeypatch):
    from moezoo.demo import list_demo_steps, run_demo

    monkeypatch.setenv("MOEZOO_CACHE", str(tmp_path / "cache"))
    assert "deweather" in {s.name for s in list_demo_steps()}
    res = run_demo(tmp_path / "demo", steps=["deweather"], quick=True, printer=lambda *a: None)["deweather"]
    assert res["steps"] == 30
    # residual output: the untrained model is (almost) the identity, so it starts at the degraded input's PSNR, and a
    # 30-step run stays near it (the longer runs of eval/deweather are where the numbers are measured)
    assert abs(res["psnr_before"] - res["psnr_input"]) < 0.1
    assert res["psnr_input"] - 2.0 < res["psnr_after"] < 60 and 0 < res["ssim_after"] <= 1
    assert set(res["metrics"]["after"]) == {"rain", "snow", "fog", "raindrop", "overall"}
    assert len(res["triptychs"]) == 1 and Path(res["triptychs"][0]).is_file()
    assert Path(res["model_dir"], "model.safetensors").is_file()


def test_allweather_folders_recipe(tmp_path):
    """source=allweather: random train crops from train/{input,gt}, whole test images per weather, max_items per set."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for d, n in (("train", 3), ("test_snow", 3), ("test_rain", 2), ("test_raindrop", 2)):
        for i in range(n):
            clean = (rng.random((20, 36, 3)) * 255).astype(np.uint8)
            for sub, arr in (("gt", clean), ("input", np.clip(clean.astype(int) + 30, 0, 255).astype(np.uint8))):
                (tmp_path / "aw" / d / sub).mkdir(parents=True, exist_ok=True)
                name = f"{i}_rain.png" if (d == "test_raindrop" and sub == "input") else \
                    (f"{i}_clean.png" if d == "test_raindrop" else f"{i}.png")
                Image.fromarray(arr).save(tmp_path / "aw" / d / sub / name)
    cfg = {"threads": 1, "model": {"name": "deweather_mofme_tiny_e4k2", "tiny": True},
           "data": {"source": "allweather", "root": str(tmp_path / "aw"), "crop_size": 16},
           "eval": {"batch_size": 4, "max_items": 2, "triptychs": 1},
           "trainer": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2, "save_every": None,
                       "progress_bar": False}}
    train_ds, test_ds = recipe.build_datasets(recipe.resolve_recipe(cfg)["data"], patch_size=4)
    assert train_ds[0]["pixel_values"].shape == (3, 16, 16)
    assert {tuple(test_ds[i]["pixel_values"].shape) for i in range(len(test_ds))} == {(3, 20, 36)}
    res = recipe.train(cfg, printer=lambda *a: None)
    after = res["metrics"]["after"]
    assert {w: after[w]["count"] for w in after} == {"rain": 2, "snow": 2, "raindrop": 2, "overall": 6}
    assert len(res["triptychs"]) == 1
