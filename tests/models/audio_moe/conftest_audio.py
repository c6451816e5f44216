"""Tiny random transformers codecs (Encodec / DAC / Mimi) shared by the audio_moe tests."""
from __future__ import annotations

import torch
from transformers import DacConfig, DacModel, EncodecConfig, EncodecModel, MimiConfig, MimiModel

SR = 8000


def tiny_model(kind: str):
    torch.manual_seed(0)
    if kind == "encodec":
        return EncodecModel(EncodecConfig(
            sampling_rate=SR, audio_channels=1, num_filters=4, num_residual_layers=1, upsampling_ratios=[4, 4],
            hidden_size=16, codebook_size=32, codebook_dim=16, target_bandwidths=[10.0, 20.0], num_lstm_layers=1))
    if kind == "dac":
        return DacModel(DacConfig(
            encoder_hidden_size=4, downsampling_ratios=[2, 4], decoder_hidden_size=8, n_codebooks=3, codebook_size=32,
            codebook_dim=4, hidden_size=16, upsampling_ratios=[4, 2], sampling_rate=SR))
    return MimiModel(MimiConfig(
        sampling_rate=SR, hidden_size=16, num_filters=4, num_residual_layers=1, upsampling_ratios=[4, 4],
        codebook_size=32, codebook_dim=16, num_quantizers=4, num_semantic_quantizers=1,
        vector_quantization_hidden_dimension=16, upsample_groups=16, num_hidden_layers=1, intermediate_size=32,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, sliding_window=32, frame_rate=SR / 16 / 2,
        max_position_embeddings=1024))
