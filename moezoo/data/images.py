"""Image datasets for the diffusion recipes: Fashion-MNIST (offline, Debian package) and ImageNet-style folders.

>>> from moezoo.data.images import FashionMNIST
>>> ds = FashionMNIST("train", pad_to=32)        # 60,000 x (1, 32, 32) float in [-1, 1], labels 0..9
>>> ds[0]["sample"].shape, ds[0]["class_labels"]

Items are dicts ``{"sample": (C, H, W) float32 in [-1, 1], "class_labels": int64 scalar}`` so they collate straight
into the batch the diffusion objectives take. Fashion-MNIST is read with gzip + numpy (no pickles) from
``/usr/share/datasets/fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``), or a folder given by ``root`` /
``MOEZOO_FASHION_MNIST_DIR`` holding the four ``*-ubyte.gz`` files.

:func:`image_folder_dataset` reads ImageNet-style ``root/<class>/<image>`` folders (center crop, resize, [-1, 1]);
for latent models either encode on the fly with a VAE (:class:`VAEEncodedDataset`) or pre-extract once with
:func:`extract_latents` and train on the saved tensors (:class:`LatentTensorDataset`).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "FashionMNISTMissingError", "fashion_mnist_available",
           "load_fashion_mnist_arrays", "FashionMNIST", "image_folder_dataset", "VAEEncodedDataset",
           "extract_latents", "LatentTensorDataset", "to_uint8_images", "Digits", "build_image_dataset"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_APT = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
_SPLIT_PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}


class FashionMNISTMissingError(FileNotFoundError):
    """The Fashion-MNIST files are not installed (message names the apt command)."""


def _fashion_dir(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get("MOEZOO_FASHION_MNIST_DIR")
    return Path(env) if env else FASHION_MNIST_DIR


def _fashion_files(split: str, root: str | os.PathLike | None) -> tuple[Path, Path]:
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = _fashion_dir(root)
    prefix = _SPLIT_PREFIX[split]
    return d / f"{prefix}-images-idx3-ubyte.gz", d / f"{prefix}-labels-idx1-ubyte.gz"


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    """True when both splits of Fashion-MNIST are readable under ``root`` (default: the Debian package folder)."""
    return all(p.is_file() for s in ("train", "test") for p in _fashion_files(s, root))


def load_fashion_mnist_arrays(split: str = "train", root: str | os.PathLike | None = None
                              ) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) int64)`` of a Fashion-MNIST split, read with gzip + numpy."""
    img_path, lab_path = _fashion_files(split, root)
    missing = [str(p) for p in (img_path, lab_path) if not p.is_file()]
    if missing:
        raise FashionMNISTMissingError(
            f"Fashion-MNIST not found ({', '.join(missing)} missing). Install the Debian package with "
            f"`sudo {FASHION_MNIST_APT}` (files land in {FASHION_MNIST_DIR}), or point root= / "
            "MOEZOO_FASHION_MNIST_DIR at a folder holding the four *-ubyte.gz files.")
    with gzip.open(img_path, "rb") as f:
        raw = f.read()
    if int.from_bytes(raw[:4], "big") != 2051:
        raise ValueError(f"{img_path} is not an IDX image file (magic {int.from_bytes(raw[:4], 'big')}, expected 2051)")
    n, h, w = (int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(3))
    images = np.frombuffer(bytearray(raw), np.uint8, offset=16).reshape(n, h, w)  # writable
    with gzip.open(lab_path, "rb") as f:
        raw = f.read()
    if int.from_bytes(raw[:4], "big") != 2049:
        raise ValueError(f"{lab_path} is not an IDX label file (magic {int.from_bytes(raw[:4], 'big')}, expected 2049)")
    labels = np.frombuffer(raw, np.uint8, offset=8).astype(np.int64)
    if labels.shape[0] != n:
        raise ValueError(f"{img_path} has {n} images but {lab_path} has {labels.shape[0]} labels")
    return images, labels


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, C, H, W) -> uint8 in [0, 255] (rounded, clamped)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FashionMNIST(Dataset):
    """Fashion-MNIST as float tensors in [-1, 1].

    Args:
        split: ``"train"`` (60,000) or ``"test"`` (10,000).
        pad_to: zero-pad (at -1, the background colour) symmetrically to this size, e.g. 32 for patch sizes 2/4/8
            on a power-of-two grid; ``None`` keeps 28x28.
        root: folder with the ``*-ubyte.gz`` files (default: ``MOEZOO_FASHION_MNIST_DIR`` or the Debian folder).
        limit: keep only the first ``limit`` images (quick runs).
        classes: keep only these class ids.
        random_flip: horizontal flip with probability 0.5 (uses torch's global RNG, i.e. the trainer's seeded RNG).
    """

    num_classes = 10
    class_names = FASHION_MNIST_CLASSES

    def __init__(self, split: str = "train", pad_to: int | None = None, root: str | os.PathLike | None = None,
                 limit: int | None = None, classes: list[int] | None = None, random_flip: bool = False):
        images, labels = load_fashion_mnist_arrays(split, root)
        if classes is not None:
            keep = np.isin(labels, np.asarray(classes))
            images, labels = images[keep], labels[keep]
        if limit is not None:
            if limit <= 0:
                raise ValueError(f"limit must be a positive int or None, got {limit!r}")
            images, labels = images[:limit], labels[:limit]
        x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
        if pad_to is not None:
            h = x.shape[-1]
            if pad_to < h:
                raise ValueError(f"pad_to={pad_to} must be >= the image size {h}")
            lo = (pad_to - h) // 2
            x = torch.nn.functional.pad(x, (lo, pad_to - h - lo, lo, pad_to - h - lo), value=-1.0)
        self.images = x.contiguous()
        self.labels = torch.from_numpy(labels)
        self.random_flip = random_flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict:
        x = self.images[i]
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"sample": x, "class_labels": self.labels[i]}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


class Digits(Dataset):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes; ships with scikit-learn, always offline) as
    ``{"sample": (1, 8, 8) in [-1, 1], "class_labels"}``; the first 1,500 are ``"train"``, the rest ``"test"``.
    A tiny real dataset for smoke tests and CI of the diffusion recipes."""

    num_classes = 10
    class_names = tuple(str(i) for i in range(10))

    def __init__(self, split: str = "train", limit: int | None = None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        images, target = _load_digits_arrays()
        x = torch.from_numpy(images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
        y = torch.from_numpy(target.astype(np.int64))
        sl = slice(0, 1500) if split == "train" else slice(1500, None)
        self.images, self.labels = x[sl].contiguous(), y[sl].contiguous()
        if limit is not None:
            self.images, self.labels = self.images[:limit], self.labels[:limit]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"sample": self.images[i], "class_labels": self.labels[i]}


def _load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) values 0..16 and (1797,) labels: scikit-learn's bundled ``digits.csv.gz`` read directly (importing
    scikit-learn costs seconds), or ``sklearn.datasets.load_digits`` when the file is not where expected."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ImportError("the digits dataset ships with scikit-learn (pip install scikit-learn)")
    for loc in spec.submodule_search_locations or []:
        f = Path(loc) / "datasets" / "data" / "digits.csv.gz"
        if f.is_file():
            data = np.loadtxt(f, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def build_image_dataset(spec: dict, split: str = "train", vae=None) -> Dataset:
    """A dataset from a recipe's ``data:`` section.

    ``dataset``: ``"fashion_mnist"`` (keys ``pad_to``, ``root``, ``limit``, ``random_flip``), ``"digits"``
    (``limit``), ``"image_folder"`` (``root`` or ``train_root``/``test_root``, ``image_size``, ``random_flip``;
    encoded on the fly when a ``vae`` is given) or ``"latents"`` (``path`` / ``train_path``/``test_path``: safetensors
    from :func:`extract_latents`).
    """
    spec = dict(spec or {})
    kind = spec.pop("dataset", "fashion_mnist")
    known = {"fashion_mnist": {"pad_to", "root", "limit", "random_flip", "classes"}, "digits": {"limit"},
             "image_folder": {"root", "train_root", "test_root", "image_size", "random_flip", "channels"},
             "latents": {"path", "train_path", "test_path"}}
    if kind not in known:
        raise ValueError(f"data.dataset must be one of {sorted(known)}, got {kind!r}")
    unknown = sorted(set(spec) - known[kind])
    if unknown:
        raise ValueError(f"unknown data key(s) {unknown} for dataset {kind!r}; expected some of {sorted(known[kind])}")
    if kind == "fashion_mnist":
        return FashionMNIST(split, pad_to=spec.get("pad_to"), root=spec.get("root"), limit=spec.get("limit"),
                            classes=spec.get("classes"), random_flip=bool(spec.get("random_flip", False)) and
                            split == "train")
    if kind == "digits":
        return Digits(split, limit=spec.get("limit"))
    if kind == "image_folder":
        root = spec.get(f"{split}_root") or spec.get("root")
        if root is None:
            raise ValueError(f"data.root (or data.{split}_root) is required for dataset 'image_folder'")
        ds = image_folder_dataset(root, image_size=int(spec.get("image_size", 256)),
                                  random_flip=bool(spec.get("random_flip", True)) and split == "train",
                                  channels=int(spec.get("channels", 3)))
        return VAEEncodedDataset(ds, vae) if vae is not None else ds
    path = spec.get(f"{split}_path") or spec.get("path")
    if path is None:
        raise ValueError(f"data.path (or data.{split}_path) is required for dataset 'latents'")
    return LatentTensorDataset(path)


def image_folder_dataset(root: str | os.PathLike, image_size: int = 256, random_flip: bool = True,
                         channels: int = 3) -> Dataset:
    """ImageNet-style ``root/<class_name>/<image>`` folder -> dicts ``{"sample": (C, S, S) in [-1, 1], "class_labels"}``.

    Images are center-cropped to a square (as ADM / DiT do) and resized to ``image_size``; class ids follow the sorted
    folder names (the ImageNet synset order for an ImageNet train folder). Needs ``torchvision``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {str(root)!r} does not exist (expected root/<class>/<image>)")
    try:
        from torchvision import datasets, transforms
    except ImportError as exc:  # pragma: no cover - torchvision ships with the diffusion extra's environment
        raise ImportError("image_folder_dataset needs torchvision (pip install torchvision)") from exc

    tf = [transforms.Lambda(lambda im: _center_crop_square(im, image_size))]
    if random_flip:
        tf.append(transforms.RandomHorizontalFlip())
    if channels == 1:
        tf.append(transforms.Grayscale(1))
    tf += [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]
    folder = datasets.ImageFolder(str(root), transform=transforms.Compose(tf))
    return _DictDataset(folder)


def _center_crop_square(pil_image, image_size: int):
    """ADM's center crop: halve with BOX while large, resize with BICUBIC, crop the center square."""
    from PIL import Image

    pil_image = pil_image.convert("RGB")
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[y: y + image_size, x: x + image_size])


class _DictDataset(Dataset):
    def __init__(self, base):
        self.base = base
        self.classes = getattr(base, "classes", None)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {"sample": x, "class_labels": torch.as_tensor(y, dtype=torch.long)}


class VAEEncodedDataset(Dataset):
    """Wrap an image dataset and encode each item with ``vae`` (a diffusers ``AutoencoderKL``) on the fly.

    ``sample`` becomes ``latent_dist.sample() * scaling_factor`` (a fresh posterior sample each time, as DiT's
    training does). Encoding on the fly costs a VAE forward per image and step; :func:`extract_latents` does it once.
    """

    def __init__(self, base: Dataset, vae, scaling_factor: float | None = None, sample_posterior: bool = True):
        self.base, self.vae = base, vae
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)
        self.sample_posterior = sample_posterior

    def __len__(self):
        return len(self.base)

    @torch.no_grad()
    def __getitem__(self, i):
        item = dict(self.base[i])
        x = item["sample"].unsqueeze(0).to(self.vae.device, self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        z = dist.sample() if self.sample_posterior else dist.mode()
        item["sample"] = (z[0] * self.scaling_factor).float().cpu()
        return item


@torch.no_grad()
def extract_latents(dataset: Dataset, vae, path: str | os.PathLike, batch_size: int = 32,
                    scaling_factor: float | None = None, flip: bool = False) -> Path:
    """Encode every image of ``dataset`` once (posterior mean x scaling factor) and save ``latents``/``labels`` as
    safetensors at ``path`` (plus the horizontally flipped copy when ``flip``), for :class:`LatentTensorDataset`."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    sf = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    lats, labs = [], []
    for batch in tqdm(loader, desc="encoding latents", unit="batch"):
        x = batch["sample"].to(vae.device, vae.dtype)
        views = [x, x.flip(-1)] if flip else [x]
        for v in views:
            lats.append((vae.encode(v).latent_dist.mode() * sf).float().cpu())
            labs.append(batch["class_labels"].long())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": torch.cat(lats).contiguous(), "labels": torch.cat(labs).contiguous()}, str(path))
    return path


class LatentTensorDataset(Dataset):
    """Pre-extracted latents (a safetensors file from :func:`extract_latents`) as ``{"sample", "class_labels"}``."""

    def __init__(self, path: str | os.PathLike):
        from safetensors.torch import load_file

        d = load_file(str(path))
        if "latents" not in d or "labels" not in d:
            raise ValueError(f"{path} must hold 'latents' and 'labels' tensors (see extract_latents), got {sorted(d)}")
        self.latents, self.labels = d["latents"], d["labels"].long()

    def __len__(self):
        return self.latents.shape[0]

    def __getitem__(self, i):
        return {"sample": self.latents[i], "class_labels": self.labels[i]}
