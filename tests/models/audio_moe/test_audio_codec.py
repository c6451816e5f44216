"""AudioCodec: transformers' EncodecModel, DacModel and MimiModel (tiny random configs saved to a temporary folder and
loaded back with from_pretrained) behind one encode / decode interface; bad-input errors."""
from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moezoo.models.audio_moe.codec import AudioCodec  # noqa: E402

from conftest_audio import tiny_model  # noqa: E402

SR = 8000


@pytest.fixture(scope="module", params=["encodec", "dac", "mimi"])
def codec(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    tiny_model(request.param).save_pretrained(path)
    return AudioCodec.from_pretrained(path)


def test_encode_decode_shapes_and_metadata(codec):
    t = torch.arange(SR // 2) / SR
    wav = torch.stack([0.5 * torch.sin(2 * math.pi * 440 * t), 0.3 * torch.sin(2 * math.pi * 220 * t)])
    codes = codec.encode(wav, SR)
    assert codes.dtype == torch.int64 and codes.dim() == 3 and codes.shape[:2] == (2, codec.num_codebooks)
    assert abs(codes.shape[-1] - len(t) / SR * codec.frame_rate) <= 2
    assert int(codes.min()) >= 0 and int(codes.max()) < codec.codebook_size
    out = codec.decode(codes)
    assert out.shape[0] == 2 and abs(out.shape[-1] - len(t)) <= codec.sample_rate / codec.frame_rate * 2
    assert torch.isfinite(out).all()
    assert torch.equal(codec.encode(wav[0], SR)[0], codes[0])  # (T,) input = one item
    assert codec.sample_rate == SR and codec.num_codebooks >= 1 and codec.codebook_size == 32


def test_bad_inputs(codec):
    wav = 0.1 * torch.randn(1, SR // 4)
    with pytest.raises(ValueError, match="expects 8000 Hz"):
        codec.encode(wav, 16000)
    assert codec.encode(torch.randn(1, SR // 2) * 0.1, 16000, resample=True).shape[0] == 1
    with pytest.raises(ValueError, match="empty"):
        codec.encode(torch.zeros(1, 0), SR)
    with pytest.raises(ValueError, match="silent"):
        codec.encode(torch.zeros(2, 400), SR)
    with pytest.raises(ValueError, match="float"):
        codec.encode(torch.ones(1, 400, dtype=torch.long), SR)
    codes = codec.encode(wav, SR)
    with pytest.raises(ValueError, match="codebook_size=32"):
        codec.decode(codes + 32)
    with pytest.raises(ValueError, match="num_codebooks"):
        codec.decode(codes[:, :0])


def test_wrong_model_and_options(tmp_path):
    with pytest.raises(ValueError, match="EncodecModel, DacModel or MimiModel"):
        AudioCodec(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="target_bandwidths"):
        AudioCodec(tiny_model("encodec"), bandwidth=3.0)
    assert AudioCodec(tiny_model("encodec"), bandwidth=10.0).num_codebooks < AudioCodec(tiny_model("encodec")).num_codebooks
    assert AudioCodec(tiny_model("dac"), num_codebooks=2).num_codebooks == 2
