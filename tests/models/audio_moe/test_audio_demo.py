"""The audio_moe demo step (quick mode) and the trivial token-loss baselines it reports against."""
from __future__ import annotations

import json

import pytest
import torch

import moezoo
from moezoo.models.audio_moe.codec import AudioCodec
from moezoo.models.audio_moe.data_audio import AudioTokenDataset, asterisk_speech, sonic_pi_music
from moezoo.models.audio_moe.harness import token_loss_vs_baselines, trivial_baselines


@pytest.fixture(scope="module")
def setup():
    codec = AudioCodec.bundled()
    items = asterisk_speech()[:3] + sonic_pi_music()[:3]
    model = moezoo.create_model("audio_moe_tiny_e4k2", vocab_size=256, num_codebooks=4, codebook_size=128,
                                delay_pattern=[0, 1, 2, 3])
    ds = AudioTokenDataset(items, codec, model.config, max_frames=12, max_text=8)
    return model, ds, [it.task for it in items]


def test_baselines_score_the_models_loss_positions(setup):
    model, ds, tasks = setup
    base = trivial_baselines(ds, tasks)
    rep = token_loss_vs_baselines(model, ds, tasks, base)
    for task in ("speech", "music"):
        r = rep[task]
        assert r["clips"] == 3 and r["tokens"] > 0
        assert r["bigram"] < r["unigram"]  # in-sample, the previous code only helps
        # the model's number is its own loss (sum over codebooks) / K, token-weighted over the task's clips
        idx = [i for i, t in enumerate(tasks) if t == task]
        with torch.no_grad():
            per = [model(**{k: ds[i][k] for k in ("input_ids", "labels")}).codebook_losses.mean() for i in idx]
        assert r["model"] == pytest.approx(float(torch.stack(per).mean()), rel=0.05)
        # an untrained model is near uniform over the codec vocabulary
        assert abs(r["model"] - torch.log(torch.tensor(131.0)).item()) < 0.5


def test_demo_quick(tmp_path):
    from moezoo.demo import run_demo

    lines = []
    res = run_demo(tmp_path, steps=["audio_moe"], quick=True, printer=lines.append)["audio_moe"]
    saved = json.loads((tmp_path / "audio_moe" / "results.json").read_text())
    assert saved["token_loss"] == res["token_loss"]
    for task in ("speech", "music"):
        r = res["token_loss"][task]
        assert r["after"] < r["before"]  # training lowers the held-out loss
        assert ("WORSE" in r["verdict"]) == (r["after"] >= min(r["unigram"], r["bigram"]))
        s = res["samples"][task]
        assert s["frames"] > 0
        assert (tmp_path / "audio_moe" / f"generated_{task}.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / "audio_moe" / f"generated_{task}.wav").stat().st_size > 100
        assert all(0 < k <= 4 for k in res["capacity"][task]["real_experts_per_token"])
    assert any("unigram" in line for line in lines)
    assert (tmp_path / "audio_moe" / "model" / "config.json").is_file()
