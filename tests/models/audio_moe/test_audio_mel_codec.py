"""The offline log-mel residual-VQ codec: k-means fitting (deterministic), AudioCodec interface, save/load round trip,
the bundled codec's held-out quality on real speech and music, bad-input errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from moezoo.models.audio_moe.codec import PRETRAINED_DIR, AudioCodec
from moezoo.models.audio_moe.codec_training import mel_distance
from moezoo.models.audio_moe.data_audio import asterisk_speech, load_audio, sonic_pi_music, split_items
from moezoo.models.audio_moe.mel_codec import MelRVQCodecModel, MelRVQConfig, fit_mel_rvq

SR = 8000


def _tones(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(SR) / SR
    return [0.3 * torch.sin(2 * math.pi * f * t) * (1 + 0.5 * torch.sin(2 * math.pi * 3 * t))
            + 0.01 * torch.randn(SR, generator=g) for f in (200, 400, 800, 1600)]


@pytest.fixture(scope="module")
def small():
    model, rep = fit_mel_rvq(_tones(), MelRVQConfig(num_codebooks=3, codebook_size=8, griffin_lim_iters=8))
    return model, rep


def test_fit_is_deterministic_and_residual_stages_help(small):
    model, rep = small
    again, _ = fit_mel_rvq(_tones(), MelRVQConfig(num_codebooks=3, codebook_size=8, griffin_lim_iters=8))
    assert torch.equal(model.codebooks, again.codebooks) and torch.equal(model.mean, again.mean)
    assert rep["residual_mse"][0] > rep["residual_mse"][1] > rep["residual_mse"][2]
    other, _ = fit_mel_rvq(_tones(), MelRVQConfig(num_codebooks=3, codebook_size=8), seed=5)
    assert not torch.equal(model.codebooks, other.codebooks)


def test_interface_and_round_trip(small, tmp_path):
    codec = AudioCodec(small[0])
    assert (codec.sample_rate, codec.frame_rate, codec.num_codebooks, codec.codebook_size) == (SR, 62.5, 3, 8)
    wav = torch.stack(_tones(1)[:2])
    codes = codec.encode(wav, SR)
    assert codes.shape == (2, 3, SR // 128) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 8
    out = codec.decode(codes)
    assert out.shape == (2, SR // 128 * 128) and torch.isfinite(out).all()
    # more codebooks reconstruct the spectrogram better
    fewer = AudioCodec(small[0], num_codebooks=1)
    assert mel_distance(codec.decode(codes[:1]), wav[:1]) < mel_distance(fewer.decode(codes[:1, :1]), wav[:1])
    codec.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    back = AudioCodec.from_pretrained(tmp_path)
    assert back.kind == "moezoo_mel_rvq" and torch.equal(back.encode(wav, SR), codes)
    assert torch.equal(back.decode(codes), out)  # zero-phase Griffin-Lim: deterministic


def test_bad_inputs(small, tmp_path):
    codec = AudioCodec(small[0])
    with pytest.raises(ValueError, match="expects 8000 Hz"):
        codec.encode(torch.randn(SR) * 0.1, 16000)
    with pytest.raises(ValueError, match="empty"):
        codec.encode(torch.zeros(0), SR)
    with pytest.raises(ValueError, match="silent"):
        codec.encode(torch.zeros(SR), SR)
    with pytest.raises(ValueError, match="fewer than one frame"):
        codec.encode(torch.randn(100) * 0.1, SR)
    assert codec.encode(torch.randn(200) * 0.1, SR).shape == (1, 3, 1)  # shorter than n_fft: padded with silence
    with pytest.raises(ValueError, match="codebook_size=8"):
        codec.decode(torch.full((1, 3, 4), 8))
    with pytest.raises(ValueError, match="num_codebooks=3"):
        codec.decode(torch.zeros(1, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="not fitted"):
        AudioCodec(MelRVQCodecModel(MelRVQConfig())).encode(torch.randn(SR) * 0.1, SR)
    with pytest.raises(ValueError, match="no usable"):
        fit_mel_rvq([torch.zeros(SR)], MelRVQConfig(codebook_size=4))
    with pytest.raises(ValueError, match="hop_length"):
        MelRVQConfig(n_fft=64, hop_length=128)
    with pytest.raises(ValueError, match="no bundled codec"):
        AudioCodec.bundled("nope")
    with pytest.raises(ValueError, match="no config.json"):
        AudioCodec.from_pretrained(tmp_path)


def test_bundled_codec_reconstructs_held_out_speech_and_music():
    folder = PRETRAINED_DIR / "mel_rvq_8k_k4c128"
    assert (folder / "model.safetensors").stat().st_size < 300_000
    codec = AudioCodec.bundled()
    assert (codec.sample_rate, codec.frame_rate, codec.num_codebooks, codec.codebook_size) == (SR, 62.5, 4, 128)
    from moezoo.models.audio_moe.recipe import load_codec

    assert load_codec({"bundled": True}).kind == load_codec({"bundled": "mel_rvq_8k_k4c128"}).kind == "moezoo_mel_rvq"
    comparison = json.loads((folder / "codec_comparison.json").read_text())
    assert comparison["winner"] == "mel_rvq"
    _, te_s = split_items(asterisk_speech(), 0.1)
    _, te_m = split_items(sonic_pi_music(), 0.15)
    for item in (te_s[0], te_m[1]):  # held out from the fit
        ref = load_audio(item.path, SR)[0][: 2 * SR]
        rec = codec.decode(codec.encode(ref, SR))[0]
        d = mel_distance(rec, ref)
        assert d < 1.3, (item.path, d)  # the tiny neural codecs score ~4-5 here
        assert d < mel_distance(torch.randn_like(ref) * ref.std(), ref) / 3


def test_fit_mel_codec_reports_per_task(tmp_path):
    from moezoo.models.audio_moe.codec_training import compare_and_save

    tr, te = split_items(asterisk_speech(), 0.05)
    _, te_m = split_items(sonic_pi_music(), 0.15)
    s = compare_and_save(tr[:6], {"speech": te[:1], "music": te_m[:1]}, tmp_path, minutes=0, kinds=["mel_rvq"],
                         log=lambda m: None)
    r = s["mel_rvq"]
    assert s["winner"] == "mel_rvq" and set(r["after"]["by_task"]) == {"speech", "music"}
    assert r["vocoder_only_mel_distance"] < r["after"]["mel_distance"]  # quantising costs something
    assert AudioCodec.from_pretrained(tmp_path).kind == "moezoo_mel_rvq"
