"""moezoo.data.images: Fashion-MNIST (skipped without the Debian package), digits, dataset specs, latent files."""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moezoo.data.images import (FashionMNIST, FashionMNISTMissingError, LatentTensorDataset,  # noqa: E402
                                build_image_dataset, extract_latents, fashion_mnist_available,
                                load_fashion_mnist_arrays)

needs_fmnist = pytest.mark.skipif(not fashion_mnist_available(),
                                  reason="Fashion-MNIST missing (apt-get install -y dataset-fashion-mnist)")


@needs_fmnist
def test_fashion_mnist_shapes_labels_range_and_padding():
    x, y = load_fashion_mnist_arrays("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8 and y.shape == (10000,)
    assert set(np.unique(y).tolist()) == set(range(10)) and np.bincount(y).tolist() == [1000] * 10
    ds = FashionMNIST("test", limit=16)
    item = ds[3]
    assert item["sample"].shape == (1, 28, 28) and item["sample"].dtype == torch.float32
    assert int(item["class_labels"]) == int(y[3])
    torch.testing.assert_close(item["sample"][0], torch.from_numpy(x[3]).float() / 127.5 - 1)
    padded = FashionMNIST("test", limit=16, pad_to=32)
    assert padded.image_shape == (1, 32, 32)
    torch.testing.assert_close(padded[3]["sample"][:, 2:30, 2:30], item["sample"])
    assert (padded.images[:, :, :2] == -1).all() and (padded.images[:, :, :, 30:] == -1).all()
    only = FashionMNIST("test", classes=[7, 9], limit=50)
    assert set(only.labels.tolist()) <= {7, 9}
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    assert batch["sample"].shape == (4, 1, 28, 28) and batch["class_labels"].dtype == torch.long


def test_missing_fashion_mnist_names_the_apt_command(tmp_path):
    with pytest.raises(FashionMNISTMissingError, match="apt-get install -y dataset-fashion-mnist"):
        FashionMNIST("train", root=tmp_path)
    assert not fashion_mnist_available(tmp_path)


def test_idx_reader_on_a_written_file(tmp_path):
    imgs = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    for prefix in ("train", "t10k"):
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write((2051).to_bytes(4, "big") + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + imgs.tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write((2049).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes([4, 7]))
    x, y = load_fashion_mnist_arrays("train", tmp_path)
    np.testing.assert_array_equal(x, imgs)
    assert y.tolist() == [4, 7] and fashion_mnist_available(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist_arrays("val", tmp_path)


def test_digits_and_dataset_specs(tmp_path):
    tr = build_image_dataset({"dataset": "digits"}, "train")
    te = build_image_dataset({"dataset": "digits", "limit": 10}, "test")
    assert len(tr) == 1500 and len(te) == 10
    it = tr[0]
    assert it["sample"].shape == (1, 8, 8) and -1 <= it["sample"].min() and it["sample"].max() <= 1
    with pytest.raises(ValueError, match="unknown data key"):
        build_image_dataset({"dataset": "digits", "pad": 2})
    with pytest.raises(ValueError, match="data.dataset"):
        build_image_dataset({"dataset": "cifar10"})
    with pytest.raises(ValueError, match="root"):
        build_image_dataset({"dataset": "image_folder"})


def test_latent_extraction_round_trip(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 4), layers_per_block=1,
                        latent_channels=2, norm_num_groups=2, sample_size=8, scaling_factor=0.5).eval()
    ds = build_image_dataset({"dataset": "digits", "limit": 6}, "train")
    path = extract_latents(ds, vae, tmp_path / "lat.safetensors", batch_size=4, flip=True)
    lat = LatentTensorDataset(path)
    assert len(lat) == 12 and lat[0]["sample"].shape == (2, 4, 4)
    with torch.no_grad():
        expect = vae.encode(ds[1]["sample"][None]).latent_dist.mode()[0] * 0.5
    torch.testing.assert_close(lat[1]["sample"], expect, rtol=1e-5, atol=1e-5)
    assert int(lat[1]["class_labels"]) == int(ds[1]["class_labels"])
    again = build_image_dataset({"dataset": "latents", "path": str(path)}, "train")
    assert len(again) == 12
