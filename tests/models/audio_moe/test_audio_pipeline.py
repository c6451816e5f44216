"""AudioMoEPipeline: text + task -> waveform at the codec's sample rate through generate + the codec; errors."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
from moezoo.models.audio_moe import AudioCodec  # noqa: E402
from moezoo.models.audio_moe.pipeline_audio_moe import AudioMoEPipeline, byte_prompt  # noqa: E402

from conftest_audio import tiny_model  # noqa: E402


def test_pipeline_speech_and_music():
    codec = AudioCodec(tiny_model("dac"))  # 3 codebooks of 32 codes, 8 kHz
    torch.manual_seed(0)
    model = moezoo.create_model("audio_moe_small_e8k2", tiny=True, vocab_size=256, num_codebooks=3, codebook_size=32,
                                delay_pattern=[0, 1, 2])
    pipe = AudioMoEPipeline(model, codec)
    out = pipe("hello", task="speech", max_new_tokens=12, min_new_tokens=6, progress=False)
    assert out["sampling_rate"] == 8000 and out["codes"].shape[1] == 3 and out["codes"].shape[0] >= 6
    hop = codec.sample_rate / codec.frame_rate
    assert out["audio"].dim() == 1 and abs(out["audio"].shape[0] - out["codes"].shape[0] * hop) <= 2 * hop
    music = pipe("drum loop", task="music", max_new_tokens=10, min_new_tokens=4, do_sample=False, progress=False)
    assert music["codes"].shape[0] >= 4 and torch.isfinite(music["audio"]).all()
    with pytest.raises(ValueError, match="task must be one of"):
        pipe("x", task="video")
    assert byte_prompt("hi", "music") == [2, 104, 105]


def test_pipeline_rejects_mismatched_codec():
    codec = AudioCodec(tiny_model("dac"))
    model = moezoo.create_model("audio_moe_small_e8k2", tiny=True, vocab_size=256)  # 4 codebooks of 16
    with pytest.raises(ValueError, match="codebooks"):
        AudioMoEPipeline(model, codec)
