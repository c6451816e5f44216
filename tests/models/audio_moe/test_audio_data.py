"""Audio data: the offline Debian corpora (asterisk speech + transcripts, sonic-pi music + style labels), JSONL / CSV
manifests, LibriTTS folders, the token dataset (task id + text bytes + delayed codes) feeding the model; errors."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
from moezoo.models.audio_moe import AudioCodec  # noqa: E402
from moezoo.models.audio_moe.data_audio import (AudioTokenDataset, asterisk_speech, libritts_folder,  # noqa: E402
                                                load_audio, read_manifest, sonic_pi_music, split_items)

from conftest_audio import tiny_model  # noqa: E402


def test_debian_corpora_and_split():
    speech, music = asterisk_speech(), sonic_pi_music()
    assert len(speech) > 300 and all(it.text and it.task == "speech" for it in speech)
    assert any(it.text.startswith("Activated") for it in speech)
    labels = {it.label for it in music}
    assert {"ambi", "bass", "drum", "loop", "tabla"} <= labels and all(it.task == "music" for it in music)
    wav, sr = load_audio(music[0].path, 8000)
    assert sr == 8000 and wav.dim() == 1 and wav.abs().max() > 0
    train, test = split_items(music, held_out=0.2)
    assert len(train) + len(test) == len(music) and {it.label for it in test} <= labels and len(test) >= 10
    assert not {it.path for it in train} & {it.path for it in test}


def test_manifests_and_libritts(tmp_path):
    speech = asterisk_speech()[:3]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"audio_path": it.path, "text": it.text}) for it in speech))
    shutil.copy(speech[0].path, tmp_path / "rel.wav")
    (tmp_path / "b.csv").write_text("audio_path,text,task\nrel.wav,hello there,speech\n" +
                                    f"{speech[1].path},drum loop,music\n")
    a, b = read_manifest(tmp_path / "a.jsonl"), read_manifest(tmp_path / "b.csv")
    assert [it.text for it in a] == [it.text for it in speech]
    assert b[0].path == str(tmp_path / "rel.wav") and b[1].task == "music"
    lib = tmp_path / "LibriTTS" / "19" / "198"
    lib.mkdir(parents=True)
    shutil.copy(speech[0].path, lib / "19_198_000000_000000.wav")
    (lib / "19_198_000000_000000.normalized.txt").write_text("Hello  world.\n")
    items = libritts_folder(tmp_path / "LibriTTS")
    assert len(items) == 1 and items[0].text == "Hello world." and items[0].label == "19"
    (tmp_path / "bad.jsonl").write_text('{"path": "x.wav"}\n')
    with pytest.raises(ValueError, match="audio_path"):
        read_manifest(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="jsonl or .csv"):
        read_manifest(tmp_path / "rel.wav")
    with pytest.raises(ValueError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")


def test_token_dataset_trains_the_model():
    codec = AudioCodec(tiny_model("dac"))
    torch.manual_seed(0)
    model = moezoo.create_model("audio_moe_small_e8k2", tiny=True, vocab_size=256, num_codebooks=3, codebook_size=32,
                                delay_pattern=[0, 1, 2]).train()
    items = asterisk_speech()[:2] + sonic_pi_music()[:2]
    ds = AudioTokenDataset(items, codec, model.config, max_frames=20, max_text=16)
    ex = ds[0]
    K = 3
    assert ex["input_ids"].shape[0] == K and ex["input_ids"][0, 0] == 1  # speech task id first
    assert ds[2]["input_ids"][0, 0] == 2  # music
    batch = AudioTokenDataset.collate([ds[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 * K and batch["attention_mask"].shape == (4, batch["input_ids"].shape[1])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.codec_head.weight.grad.abs().sum() > 0
