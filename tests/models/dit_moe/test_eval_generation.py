"""Generation metrics (classifier FID / IS / precision-recall / conditional accuracy), routing analysis and the
eval/dit_moe/run.py harness end to end on scikit-learn's digits with a tiny pipeline."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
from moezoo.data.images import Digits  # noqa: E402
from moezoo.metrics.generation import (ClassifierFeatures, RoutingAnalysis, classifier_fid,  # noqa: E402
                                       classifier_inception_score, conditional_accuracy,
                                       inception_available, load_or_train_classifier, precision_recall,
                                       save_image_grid)

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    tr, te = Digits("train"), Digits("test")
    cache = tmp_path_factory.mktemp("clf")
    clf, info = load_or_train_classifier(cache, tr.images, tr.labels, te.images, te.labels, epochs=3, progress=False)
    return clf, info, cache, tr, te


def test_classifier_is_cached_and_accurate(digits_classifier):
    clf, info, cache, tr, te = digits_classifier
    assert info["cached"] is False and info["test_accuracy"] > 0.6
    assert (cache / "eval_classifier.safetensors").is_file()
    again, info2 = load_or_train_classifier(cache, tr.images, tr.labels, epochs=3, progress=False)
    assert info2["cached"] is True
    torch.testing.assert_close(again(te.images[:8]), clf(te.images[:8]))
    assert conditional_accuracy(clf, te.images, te.labels) == pytest.approx(info["test_accuracy"])


def _scipy_frechet_distance(feats1: torch.Tensor, feats2: torch.Tensor) -> float:
    """Independent reference: Frechet distance of Gaussians fitted to two feature sets, with scipy's ``sqrtm``."""
    import numpy as np
    from scipy import linalg

    a, b = feats1.double().numpy(), feats2.double().numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.asarray(linalg.sqrtm(s1 @ s2)).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_identical_zero_shifted_positive_and_matches_scipy(digits_classifier):
    clf, _, _, tr, te = digits_classifier
    real = te.images
    assert abs(classifier_fid(clf, real, real.clone())) < 1e-3
    shifted = (real + 0.6).clamp(-1, 1)
    fid_shift = classifier_fid(clf, real, shifted)
    fid_rr = classifier_fid(clf, real, tr.images[:297])
    assert fid_shift > 10 * max(fid_rr, 1e-3) and fid_rr > 0
    feats = ClassifierFeatures(clf)
    with torch.no_grad():
        assert _scipy_frechet_distance(feats(real), feats(shifted)) == pytest.approx(fid_shift, rel=1e-3)
    pr_same = precision_recall(feats(real), feats(real))
    assert pr_same == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(feats(real), feats(shifted))["precision"] < 0.9
    assert 1.0 <= classifier_inception_score(clf, real) <= 10.0
    # uint8 inputs are accepted too
    u8 = ((real + 1) * 127.5).round().to(torch.uint8)
    assert abs(classifier_fid(clf, u8, real)) < 0.05
    with pytest.raises(ValueError, match="at least 2"):
        classifier_fid(clf, real[:1], real)


def test_inception_metrics_are_detected_and_skipped_cleanly_offline():
    ok, why = inception_available()
    assert isinstance(ok, bool)
    if not ok:
        assert why


def test_routing_analysis_counts_conditional_tokens_per_step(tmp_path):
    from diffusers import DDIMScheduler

    from moezoo.models.dit_moe.pipeline_dit_moe import DiTMoEPipeline

    torch.manual_seed(0)
    m = moezoo.create_model("dit_moe_tiny_e4k2", tiny=True, in_channels=1).eval()
    pipe = DiTMoEPipeline(transformer=m, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    grid = m.config.sample_size // m.config.patch_size
    ra = RoutingAnalysis(grid=grid, num_bins=4)
    pipe([1, 2, 3], num_inference_steps=3, guidance_scale=2.0, transformer_output_callback=ra.callback,
         output_type="pt")
    k = m.config.num_experts_per_tok
    assert len(ra.by_time) == m.config.num_moe_layers
    for bt, bp in zip(ra.by_time, ra.by_pos):
        assert float(bt.sum()) == 3 * grid * grid * k * 3  # cond samples x patches x k x steps
        assert (bt.sum(1) > 0).sum() >= 2  # several timestep bins seen
        assert float(bp.sum(1)[0]) == 3 * k * 3
    paths = ra.save_heatmaps(tmp_path)
    assert [Path(p).name for p in paths] == ["routing_vs_timestep.png", "routing_vs_position.png"]
    assert all(Path(p).stat().st_size > 1000 for p in paths)
    summ = ra.summary()
    assert set(summ) == {f"layer_{i}" for i in range(m.config.num_moe_layers)}
    png = save_image_grid(torch.rand(6, 1, 8, 8) * 2 - 1, tmp_path / "g.png", nrow=3, row_labels=["a", "b"])
    assert Path(png).is_file()


def _eval_script():
    spec = importlib.util.spec_from_file_location("dit_moe_eval_run", ROOT / "eval" / "dit_moe" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return run


def test_eval_harness_end_to_end_tiny(tmp_path):
    from diffusers import DDPMScheduler

    from moezoo.models.dit_moe.pipeline_dit_moe import DiTMoEPipeline

    torch.manual_seed(0)
    m = moezoo.create_model("dit_moe_tiny_e4k2", tiny=True, in_channels=1).eval()
    DiTMoEPipeline(transformer=m, scheduler=DDPMScheduler(variance_type="learned_range")).save_pretrained(
        tmp_path / "pipe")
    run = _eval_script()
    out = tmp_path / "eval"
    res = run.main(["--pipeline", str(tmp_path / "pipe"), "--output-dir", str(out), "--dataset", "digits",
                    "--per-class", "2", "--steps", "2", "--classifier-epochs", "1", "--scheduler", "ddim",
                    "--no-progress"])
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("classifier_fid", "classifier_fid_real_vs_real", "conditional_accuracy", "precision", "recall",
                "classifier_inception_score", "images_per_second"):
        assert key in saved and saved[key] == pytest.approx(res[key])
    assert saved["num_samples"] == 20 and saved["scheduler"] == "DDIMScheduler"
    assert 0.0 <= saved["conditional_accuracy"] <= 1.0 and saved["classifier_fid"] > saved["classifier_fid_real_vs_real"]
    assert ("inception_fid" in saved) != ("inception_skipped" in saved)
    for name in ("samples_grid.png", "routing_vs_timestep.png", "routing_vs_position.png", "metrics.md",
                 "eval_classifier.safetensors"):
        assert (out / name).is_file(), name
    assert "| conditional accuracy |" in (out / "metrics.md").read_text()


def test_eval_harness_seeds_report_mean_and_std(tmp_path):
    from diffusers import DDIMScheduler

    from moezoo.models.dit_moe.pipeline_dit_moe import DiTMoEPipeline

    torch.manual_seed(0)
    m = moezoo.create_model("dit_moe_tiny_e4k2", tiny=True, in_channels=1).eval()
    DiTMoEPipeline(transformer=m, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    run = _eval_script()
    out = tmp_path / "eval"
    res = run.main(["--pipeline", str(tmp_path / "pipe"), "--output-dir", str(out), "--dataset", "digits",
                    "--per-class", "2", "--steps", "2", "--classifier-epochs", "1", "--no-progress", "--no-routing",
                    "--seeds", "0", "1"])
    saved = json.loads((out / "metrics.json").read_text())
    fid = saved["classifier_fid"]
    assert saved["seeds"] == [0, 1] and fid["n"] == 2 and len(saved["runs"]) == 2
    assert fid["values"] == pytest.approx([r["classifier_fid"] for r in res["runs"]])
    assert fid["values"][0] != fid["values"][1]          # different sampling seeds draw different images
    assert fid["mean"] == pytest.approx(sum(fid["values"]) / 2) and fid["std"] > 0
    assert "±" in (out / "metrics.md").read_text()
