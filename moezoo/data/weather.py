"""Paired multi-weather image data: a real offline set built from bundled photographs, and All-Weather folder loaders.

**Built-in set** (:func:`build_weather_set`, :func:`weather_datasets`). Real photographs -- those that ship with
scikit-image and scikit-learn (``photos="builtin"``), the high-resolution photographs of Debian background packages
(``photos="debian"``: ``apt-get install -y mate-backgrounds lomiri-wallpapers-16.04 lomiri-wallpapers-20.04``, see
:data:`DEBIAN_PHOTOS`), both (``photos="all"``), or any folder of the user's images -- are resized (short side
``photo_size``) and degraded
with albumentations: ``rain`` (``RandomRain``), ``snow`` (``RandomSnow(snow_point_range=(0.2, 0.4),
brightness_coeff=2.0)``), ``fog`` (``RandomFog(fog_coef_range=(0.3, 0.6))``) and ``raindrop``
(``Spatter(mode="rain")``), each realisation seeded by ``(seed, photo, weather, variant)`` through
``A.Compose(..., seed=...)``. Train, validation and test are split **by source photo** (no photo is in two splits;
the validation split is for model selection, the test split is never tuned on). Each degraded image
is stored once as PNG with its clean photo, plus a json index listing the crops: random positions (drawn from the seed)
for train, a fixed evenly spaced grid for test. The same config gives the same bytes; the folder name carries a hash of
the config, so a second call only reads.

    train, test = weather_datasets("~/.cache/moezoo/weather", crop_size=64)
    item = train[0]   # {"pixel_values": (3,64,64) degraded in [0,1], "labels": clean, "weather": 0..3}

**All-Weather benchmark folders** (:class:`PairedImageFolder`, :func:`allweather_test_sets`,
:func:`allweather_train_set`) for users who have them, in the layout the MoFME code reads: ``<root>/train/{input,gt}``
(the mixed All-Weather training set) and ``<root>/test_snow``, ``test_rain`` (Outdoor-Rain / Test1),
``test_raindrop`` (RainDrop test_a), each with ``input/`` and ``gt/``; the single-dataset layouts are accepted too
(Snow100K ``test/Snow100K-L/{synthetic,gt}``, RainDrop ``test_a/{input,gt}`` with ``*_rain.png`` / ``*_clean.png``
names, TransWeather's ``test1/{input,gt}`` for Outdoor-Rain).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "WEATHER_TYPES", "BUILTIN_PHOTOS", "DEFAULT_TEST_PHOTOS", "WeatherSetConfig", "weather_transform", "degrade",
    "builtin_photos", "debian_photos", "photo_set", "DEBIAN_PHOTOS", "DEBIAN_BACKGROUNDS", "PHOTO_SETS",
    "DEFAULT_SPLITS", "load_image_folder", "split_by_source", "build_weather_set", "WeatherPairs", "weather_datasets",
    "PairedImageFolder", "find_image_pairs", "allweather_test_sets", "allweather_train_set", "weather_label",
    "IMAGE_EXTENSIONS",
]

WEATHER_TYPES: tuple[str, ...] = ("rain", "snow", "fog", "raindrop")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_FORMAT_VERSION = 2

# name -> (library, loader). Natural photographs only (no microscopy, documents or synthetic charts); grayscale ones are
# replicated to RGB. skimage's `cat` is `chelsea` again and the stereo pair's right view is nearly the left one:
# both left out.
BUILTIN_PHOTOS: dict[str, str] = {
    "astronaut": "skimage", "camera": "skimage", "coffee": "skimage", "chelsea": "skimage", "rocket": "skimage",
    "motorcycle": "skimage", "coins": "skimage", "moon": "skimage", "grass": "skimage", "gravel": "skimage",
    "brick": "skimage", "clock": "skimage", "china": "sklearn", "flower": "sklearn",
}
DEFAULT_TEST_PHOTOS: tuple[str, ...] = ("coffee", "rocket", "china", "camera")

# Real photographs in Debian background packages (under /usr/share/backgrounds), licences checked in
# /usr/share/doc/<package>/copyright: mate-backgrounds nature/* (GPL-2+), lomiri-wallpapers-16.04 (CC-BY-4.0,
# CC-BY-SA-4.0, CC0-1.0), lomiri-wallpapers-20.04 Kleiber (CC-BY-SA-3.0). Drawings and renders are left out (MATE
# abstract/desktop, lomiri's analogpattern / greentock / Fossa / Infinite-Sea / Painting-Colors; gnome-backgrounds 43
# ships no photographs). name -> (package, path under DEBIAN_BACKGROUNDS).
DEBIAN_BACKGROUNDS = "/usr/share/backgrounds"
DEBIAN_PHOTOS: dict[str, tuple[str, str]] = {
    **{f"mate_{n.lower()}": ("mate-backgrounds", f"mate/nature/{n}.jpg") for n in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm", "TwoWings",
        "Wood", "YellowFlower")},
    **{f"lomiri_{n.split('_by_')[0].lower()}": ("lomiri-wallpapers-16.04", f"{n}.jpg") for n in (
        "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace",
        "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "free_by_Peter_Nerlich",
        "friends_by_Aitzol_Berasategi", "life_by_Aitzol_Berasategi", "picosdeeuropa_by_Aitzol_Berasategi",
        "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi")},
    "lomiri_kleiber": ("lomiri-wallpapers-20.04", "Kleiber_by_Lukas_Baubkus.jpg"),
}
PHOTO_SETS = ("builtin", "debian", "all")
# Held-out photos per photo set: (validation, test). Chosen once by content (every kind of scene in each split), never
# changed after looking at results.
DEFAULT_SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "builtin": ((), DEFAULT_TEST_PHOTOS),
    "debian": (("mate_freshflower", "lomiri_life", "lomiri_sunset"),
               ("mate_garden", "mate_ladybird", "mate_storm", "lomiri_picosdeeuropa", "lomiri_bridge",
                "lomiri_picture_0b")),
    "all": (("astronaut", "mate_freshflower", "lomiri_life", "lomiri_sunset"),
            DEFAULT_TEST_PHOTOS + ("mate_garden", "mate_ladybird", "mate_storm", "lomiri_picosdeeuropa",
                                   "lomiri_bridge", "lomiri_picture_0b")),
}


def weather_label(name: str) -> int:
    """Index of a weather name in :data:`WEATHER_TYPES` (ValueError for an unknown name)."""
    if name not in WEATHER_TYPES:
        raise ValueError(f"weather must be one of {WEATHER_TYPES}, got {name!r}")
    return WEATHER_TYPES.index(name)


# ------------------------------------------------------------------------------------------------ degradations
@dataclass
class WeatherSetConfig:
    """Everything that determines the built set's bytes (hashed into the cache folder name).

    Rain streak length / blur are set for ~200-pixel photos (albumentations' defaults are meant for ~1000 px and blur a
    small photo into mush); the snow and fog ranges are the ones named in DATA.md.
    """

    seed: int = 0
    photo_size: int = 192                  # short side of each photo after resizing (pixels)
    crop_size: int = 64
    weather_types: tuple[str, ...] = WEATHER_TYPES
    train_variants: int = 2                # degraded realisations per (train photo, weather)
    test_variants: int = 1
    train_crops: int = 24                  # random crops per train image
    test_crops: int = 4                    # fixed grid crops per test image (rounded up to a square grid)
    photos: str = "builtin"                # "builtin" (skimage + sklearn), "debian" (background packages), "all"
    test_photos: tuple[str, ...] | None | str = "default"  # held-out test photos; "default": DEFAULT_SPLITS[photos];
                                                           # None -> test_fraction
    val_photos: tuple[str, ...] | None | str = "default"   # validation photos, same rules (None -> val_fraction)
    test_fraction: float = 0.3             # used for a user image folder (or test_photos=None)
    val_fraction: float = 0.0              # used for a user image folder (or val_photos=None); 0 = no validation split
    image_dir: str | None = None           # a folder of the user's photos instead of the built-in ones
    max_photos: int | None = None          # keep only the first N sources of each split (quick runs)
    rain_drop_length: int = 12
    rain_blur: int = 3
    rain_brightness: float = 0.8
    snow_point_range: tuple[float, float] = (0.2, 0.4)
    snow_brightness: float = 2.0
    fog_coef_range: tuple[float, float] = (0.3, 0.6)

    def __post_init__(self):
        self.weather_types = tuple(self.weather_types)
        for w in self.weather_types:
            weather_label(w)
        if not self.weather_types:
            raise ValueError("weather_types must name at least one of " + str(WEATHER_TYPES))
        if self.photos not in PHOTO_SETS:
            raise ValueError(f"photos must be one of {PHOTO_SETS}, got {self.photos!r}")
        for name, k in (("val_photos", 0), ("test_photos", 1)):
            v = getattr(self, name)
            if isinstance(v, str):
                if v != "default":
                    raise ValueError(f"{name} must be a list of photo names, None or 'default', got {v!r}")
                v = None if self.image_dir is not None else DEFAULT_SPLITS[self.photos][k]
            setattr(self, name, None if v is None else tuple(v))
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        self.snow_point_range = tuple(self.snow_point_range)
        self.fog_coef_range = tuple(self.fog_coef_range)
        for name in ("photo_size", "crop_size", "train_variants", "test_variants", "train_crops", "test_crops"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.crop_size > self.photo_size:
            raise ValueError(f"crop_size ({self.crop_size}) must be <= photo_size ({self.photo_size})")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "WeatherSetConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown weather-set option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def digest(self) -> str:
        d = asdict(self)
        if self.image_dir is not None:
            d["image_dir"] = str(Path(self.image_dir).expanduser().resolve())
        d["_format"] = _FORMAT_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def weather_transform(kind: str, seed: int | None = None, config: WeatherSetConfig | None = None):
    """An albumentations ``Compose`` applying weather ``kind`` (always, p=1), reproducible for a given ``seed``."""
    import albumentations as A

    c = config or WeatherSetConfig()
    weather_label(kind)
    if kind == "rain":
        t = A.RandomRain(drop_length=c.rain_drop_length, blur_value=c.rain_blur,
                         brightness_coefficient=c.rain_brightness, p=1.0)
    elif kind == "snow":
        t = A.RandomSnow(snow_point_range=c.snow_point_range, brightness_coeff=c.snow_brightness, p=1.0)
    elif kind == "fog":
        t = A.RandomFog(fog_coef_range=c.fog_coef_range, p=1.0)
    else:  # raindrop: drops on the lens
        t = A.Spatter(mode="rain", p=1.0)
    return A.Compose([t], seed=seed)


def _stable_seed(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


def degrade(image: np.ndarray, kind: str, seed: int, config: WeatherSetConfig | None = None) -> np.ndarray:
    """Apply weather ``kind`` to an (H,W,3) uint8 RGB image; same ``seed`` -> same output."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got {got}")
    return weather_transform(kind, seed, config)(image=image)["image"]


# ------------------------------------------------------------------------------------------------ photographs
def _to_rgb_uint8(im: np.ndarray) -> np.ndarray:
    im = np.asarray(im)
    if im.dtype == bool:
        im = im.astype(np.uint8) * 255
    if im.dtype != np.uint8:
        im = np.clip(im, 0, 255).astype(np.uint8)
    if im.ndim == 2:
        im = np.stack([im] * 3, axis=-1)
    if im.shape[2] == 4:
        im = im[..., :3]
    return np.ascontiguousarray(im)


def builtin_photos(names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The bundled photographs (:data:`BUILTIN_PHOTOS`) as (H,W,3) uint8 RGB arrays, read offline."""
    names = list(BUILTIN_PHOTOS) if names is None else list(names)
    unknown = [n for n in names if n not in BUILTIN_PHOTOS]
    if unknown:
        raise ValueError(f"unknown built-in photo(s) {unknown}; available: {sorted(BUILTIN_PHOTOS)}")
    out = {}
    sk = None
    for n in names:
        if BUILTIN_PHOTOS[n] == "sklearn":
            if sk is None:
                from sklearn.datasets import load_sample_images

                imgs = load_sample_images()
                sk = {Path(f).stem: im for f, im in zip(imgs.filenames, imgs.images)}
            out[n] = _to_rgb_uint8(sk[n])
        else:
            import skimage.data

            if n == "motorcycle":
                out[n] = _to_rgb_uint8(skimage.data.stereo_motorcycle()[0])
            else:
                out[n] = _to_rgb_uint8(getattr(skimage.data, n)())
    return out


def debian_photos(names: Sequence[str] | None = None, max_side: int | None = None,
                  root: str | os.PathLike = DEBIAN_BACKGROUNDS) -> dict[str, np.ndarray]:
    """The photographs of :data:`DEBIAN_PHOTOS` as (H,W,3) uint8 RGB arrays.

    ``max_side``: decode large JPEGs at a reduced scale (the short side stays >= ``max_side``); None = full size.
    A missing file raises FileNotFoundError naming the Debian package(s) to install.
    """
    from PIL import Image

    names = list(DEBIAN_PHOTOS) if names is None else list(names)
    unknown = [n for n in names if n not in DEBIAN_PHOTOS]
    if unknown:
        raise ValueError(f"unknown Debian photo(s) {unknown}; available: {sorted(DEBIAN_PHOTOS)}")
    root = Path(root)
    missing = sorted({DEBIAN_PHOTOS[n][0] for n in names if not (root / DEBIAN_PHOTOS[n][1]).is_file()})
    if missing:
        raise FileNotFoundError(
            f"the photographs of the Debian package(s) {missing} are not installed (looked in {root}); run "
            f"`apt-get install -y {' '.join(missing)}`, or use photos='builtin' (scikit-image / scikit-learn photos)")
    out = {}
    for n in names:
        with Image.open(root / DEBIAN_PHOTOS[n][1]) as im:
            if max_side is not None:
                s = max_side / min(im.size)
                if s < 1:
                    im.draft("RGB", (max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))))
            out[n] = _to_rgb_uint8(np.asarray(im.convert("RGB")))
    return out


def photo_set(photos: str = "builtin", max_side: int | None = None) -> dict[str, np.ndarray]:
    """The photographs of one of :data:`PHOTO_SETS` ("builtin", "debian" or "all") by name."""
    if photos not in PHOTO_SETS:
        raise ValueError(f"photos must be one of {PHOTO_SETS}, got {photos!r}")
    out = builtin_photos() if photos in ("builtin", "all") else {}
    if photos in ("debian", "all"):
        out.update(debian_photos(max_side=max_side))
    return out


def load_image_folder(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every image in ``path`` (non-recursive, sorted by name) as (H,W,3) uint8 RGB, keyed by file stem."""
    from PIL import Image

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"image_dir must be an existing folder of images, got {str(path)!r}")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"image_dir {str(path)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    out = {}
    for f in files:
        with Image.open(f) as im:
            out[f.stem] = _to_rgb_uint8(np.asarray(im.convert("RGB")))
    return out


def split_by_source(names: Sequence[str], test_names: Sequence[str] | None = None, test_fraction: float = 0.3,
                    seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, test) lists of source names: ``test_names`` if given, else a seeded ``test_fraction`` (>= 1 each).

    Call it twice for a validation split (on the train names of the first call)."""
    names = sorted(set(names))
    if len(names) < 2:
        raise ValueError(f"need at least 2 source photos to split train/test by photo, got {len(names)}")
    if test_names is not None:
        missing = [n for n in test_names if n not in names]
        if missing:
            raise ValueError(f"test photo(s) {missing} are not among the sources {names}")
        test = sorted(set(test_names))
    else:
        order = sorted(names, key=lambda n: _stable_seed(seed, "split", n))
        k = min(len(names) - 1, max(1, round(test_fraction * len(names))))
        test = sorted(order[:k])
    train = [n for n in names if n not in test]
    if not train:
        raise ValueError("the test photos cover every source; nothing is left to train on")
    return train, test


def _resize_short_side(im: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    h, w = im.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    return np.asarray(Image.fromarray(im).resize((nw, nh), Image.Resampling.LANCZOS))


def _grid_positions(h: int, w: int, crop: int, n: int) -> list[list[int]]:
    g = int(np.ceil(np.sqrt(n)))
    ys = np.linspace(0, h - crop, g).round().astype(int) if g > 1 else np.array([(h - crop) // 2])
    xs = np.linspace(0, w - crop, g).round().astype(int) if g > 1 else np.array([(w - crop) // 2])
    return [[int(y), int(x)] for y in ys for x in xs]


_MIN_VISIBLE = 1.0  # mean |degraded - clean| (0..255 scale) a crop needs to count as showing the weather


def _pick_crops(clean: np.ndarray, deg: np.ndarray, c: int, split: str, n: int, seed: int) -> list[list[int]]:
    """Crop positions: seeded random (train) or a fixed grid (test), skipping crops the weather left untouched.

    Snow on a dark region or sparse rain can leave a crop identical to the clean photo (PSNR = inf); such crops are
    redrawn (train, up to 20 tries) or replaced by the next position of a 2x denser grid (test).
    """
    h, w = clean.shape[:2]
    diff = np.abs(deg.astype(np.int16) - clean.astype(np.int16)).mean(-1)

    def visible(y, x):
        return diff[y:y + c, x:x + c].mean() >= _MIN_VISIBLE

    if split == "train":  # (val and test: the fixed grid)
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            for _try in range(20):
                y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
                if visible(y, x):
                    break
            out.append([y, x])
        return out
    g = int(np.ceil(np.sqrt(n)))
    cands = _grid_positions(h, w, c, (2 * g) ** 2)
    good = [p for p in cands if visible(*p)]
    if len(good) < n:
        good += [p for p in cands if p not in good]
    # spread the picks over the candidates instead of taking the top rows
    pick = np.linspace(0, len(good) - 1, n).round().astype(int) if len(good) > n else range(len(good))
    return [good[i] for i in pick]


def _save_png(path: Path, im: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(im).save(path, format="PNG", compress_level=6)


def build_weather_set(root: str | os.PathLike, config: WeatherSetConfig | None = None, *, force: bool = False,
                      progress: bool = True, **overrides) -> Path:
    """Build (or find cached) the multi-weather set under ``root``; returns its folder (``index.json`` inside).

    The folder is ``<root>/weather-<config hash>``; it is written into a temporary sibling and renamed, so a killed
    build leaves no half set behind.
    """
    from tqdm.auto import tqdm

    if config is None:
        config = WeatherSetConfig.from_dict(overrides)
    elif overrides:
        config = WeatherSetConfig.from_dict({**asdict(config), **overrides})
    root = Path(root).expanduser()
    final = root / f"weather-{config.digest()}"
    if (final / "index.json").is_file() and not force:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    if config.image_dir is not None:
        photos = load_image_folder(config.image_dir)
    else:
        photos = photo_set(config.photos, max_side=2 * config.photo_size)
    train_names, test_names = split_by_source(list(photos), config.test_photos, config.test_fraction, config.seed)
    val_names: list[str] = []
    if config.val_photos or (config.val_photos is None and config.val_fraction > 0):
        frac = config.val_fraction * len(photos) / len(train_names) if config.val_photos is None else 0.3
        train_names, val_names = split_by_source(train_names, config.val_photos, frac, config.seed + 1)
    if config.max_photos is not None:
        train_names, val_names, test_names = (train_names[: config.max_photos], val_names[: config.max_photos],
                                              test_names[: config.max_photos])
    index: dict = {"format": _FORMAT_VERSION, "config": asdict(config), "weather_types": list(WEATHER_TYPES),
                   "sources": {"train": train_names, "val": val_names, "test": test_names},
                   "train": [], "val": [], "test": []}
    jobs = [(split, n, w, v) for split, names, nv in (("train", train_names, config.train_variants),
                                                        ("val", val_names, config.test_variants),
                                                        ("test", test_names, config.test_variants))
            for n in names for w in config.weather_types for v in range(nv)]
    try:
        for split in ("train", "val", "test"):
            (tmp / split / "input").mkdir(parents=True)
            (tmp / split / "gt").mkdir(parents=True)
        clean_cache: dict[str, np.ndarray] = {}
        for split, name, weather, variant in tqdm(jobs, desc="building multi-weather set", unit="image",
                                                  disable=not progress, mininterval=1.0):
            if name not in clean_cache:
                clean_cache[name] = _resize_short_side(photos[name], config.photo_size)
                _save_png(tmp / split / "gt" / f"{name}.png", clean_cache[name])
            clean = clean_cache[name]
            seed = _stable_seed(config.seed, name, weather, variant)
            deg = degrade(clean, weather, seed, config)
            stem = f"{name}__{weather}__{variant}"
            _save_png(tmp / split / "input" / f"{stem}.png", deg)
            crops = _pick_crops(clean, deg, config.crop_size, split,
                                config.train_crops if split == "train" else config.test_crops,
                                _stable_seed(config.seed, "crops", stem))
            index[split].append({"input": f"{split}/input/{stem}.png", "gt": f"{split}/gt/{name}.png",
                                 "source": name, "weather": weather, "label": weather_label(weather),
                                 "variant": variant, "seed": seed, "crops": crops})
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        if (final / "index.json").is_file() and not force:
            pass  # another process (a second rank of the same launch) finished first: same bytes, keep what it reads
        else:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _to_tensor(im: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


class WeatherPairs(Dataset):
    """One split of a built set: item ``i`` = one crop of one degraded image.

    Returns ``{"pixel_values": (3,c,c) degraded, "labels": (3,c,c) clean, "weather": int64}`` in [0,1]. Images are read
    once into memory (uint8). ``source``, ``weather_names`` and ``entries`` give the metadata of every item.

    ``random_crops=True`` (training): item ``i`` is a crop of the same image at a fresh position drawn from torch's
    global RNG (so a seeded / resumed Trainer replays them), with a random horizontal flip; the set's listed
    positions are used otherwise (validation / test: a fixed grid).
    """

    def __init__(self, folder: str | os.PathLike, split: str = "train", weather_types: Sequence[str] | None = None,
                 random_crops: bool = False):
        folder = Path(folder)
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if not (folder / "index.json").is_file():
            raise ValueError(f"{str(folder)!r} is not a built weather set (no index.json); use build_weather_set")
        index = json.loads((folder / "index.json").read_text())
        if not index.get(split):
            raise ValueError(f"the weather set {str(folder)!r} has no {split!r} split (no {split} photos; set "
                             f"val_photos / val_fraction when building it)")
        self.folder, self.split, self.index = folder, split, index
        self.crop_size = int(index["config"]["crop_size"])
        self.random_crops = bool(random_crops)
        entries = [e for e in index[split] if weather_types is None or e["weather"] in weather_types]
        self.entries = entries
        self._inputs = [_read_rgb(folder / e["input"]) for e in entries]
        gts: dict[str, np.ndarray] = {}
        for e in entries:
            if e["gt"] not in gts:
                gts[e["gt"]] = _read_rgb(folder / e["gt"])
        self._gts = [gts[e["gt"]] for e in entries]
        self._items = [(i, y, x) for i, e in enumerate(entries) for y, x in e["crops"]]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        j, y, x = self._items[i]
        c = self.crop_size
        inp, gt = self._inputs[j], self._gts[j]
        flip = False
        if self.random_crops:
            h, w = inp.shape[:2]
            y, x = int(torch.randint(0, h - c + 1, ()).item()), int(torch.randint(0, w - c + 1, ()).item())
            flip = bool(torch.randint(0, 2, ()).item())
        a, b = _to_tensor(inp[y:y + c, x:x + c]), _to_tensor(gt[y:y + c, x:x + c])
        if flip:
            a, b = a.flip(-1), b.flip(-1)
        return {"pixel_values": a, "labels": b, "weather": torch.tensor(self.entries[j]["label"], dtype=torch.long)}

    @property
    def sources(self) -> list[str]:
        """Source photo of every item."""
        return [self.entries[j]["source"] for j, _, _ in self._items]

    @property
    def weather_names(self) -> list[str]:
        """Weather name of every item."""
        return [self.entries[j]["weather"] for j, _, _ in self._items]

    def full_image(self, j: int) -> dict:
        """Whole degraded image ``j`` (not cropped) with its clean photo, e.g. for triptychs."""
        e = self.entries[j]
        return {"pixel_values": _to_tensor(self._inputs[j]), "labels": _to_tensor(self._gts[j]),
                "weather": e["weather"], "source": e["source"]}


def default_cache_dir() -> Path:
    """``$MOEZOO_CACHE/weather`` or ``~/.cache/moezoo/weather``."""
    base = os.environ.get("MOEZOO_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "moezoo") / "weather"


def weather_datasets(cache_dir: str | os.PathLike | None = None, *, progress: bool = True, random_crops: bool = False,
                     with_val: bool = False, **config) -> tuple[WeatherPairs, ...]:
    """Build or reuse the multi-weather set (options: :class:`WeatherSetConfig` fields); return (train, test), or
    (train, val, test) with ``with_val``. ``random_crops``: the train split draws fresh crops (see
    :class:`WeatherPairs`)."""
    folder = build_weather_set(cache_dir if cache_dir is not None else default_cache_dir(),
                               WeatherSetConfig.from_dict(config), progress=progress)
    train = WeatherPairs(folder, "train", random_crops=random_crops)
    if with_val:
        return train, WeatherPairs(folder, "val"), WeatherPairs(folder, "test")
    return train, WeatherPairs(folder, "test")


# ------------------------------------------------------------------------------------------------ All-Weather folders
def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def find_image_pairs(input_dir: str | os.PathLike, gt_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Match every degraded image in ``input_dir`` with its clean image in ``gt_dir``.

    A ground truth is found by the same file name, the same stem with another extension, or RainDrop's
    ``<n>_rain.<ext>`` -> ``<n>_clean.<ext>``. Inputs without a ground truth raise a ValueError naming them.
    """
    input_dir, gt_dir = Path(input_dir), Path(gt_dir)
    for p, what in ((input_dir, "input_dir"), (gt_dir, "gt_dir")):
        if not p.is_dir():
            raise ValueError(f"{what} must be an existing folder, got {str(p)!r}")
    gts = _images_in(gt_dir)
    by_name = {g.name: g for g in gts}
    by_stem = {g.stem: g for g in gts}
    pairs, missing = [], []
    for f in _images_in(input_dir):
        stem = f.stem
        cands = [by_name.get(f.name), by_stem.get(stem)]
        if stem.endswith("_rain"):
            cands.append(by_stem.get(stem[: -len("_rain")] + "_clean"))
        g = next((c for c in cands if c is not None), None)
        if g is None:
            missing.append(f.name)
        else:
            pairs.append((f, g))
    if missing:
        raise ValueError(f"{len(missing)} input image(s) in {str(input_dir)!r} have no ground truth in "
                         f"{str(gt_dir)!r} (e.g. {missing[:3]})")
    if not pairs:
        raise ValueError(f"no images found in {str(input_dir)!r}")
    return pairs


class PairedImageFolder(Dataset):
    """Degraded/clean pairs from ``input_dir`` / ``gt_dir`` (All-Weather, Snow100K, RainDrop, Outdoor-Rain layouts).

    Args:
        weather: weather name of every pair (one of :data:`WEATHER_TYPES`) or None (label -1, e.g. the mixed train set).
        resize: (H, W) every image is resized to first (MoFME resizes to (480, 720)); None keeps the size.
        crop_size: square crop size, or None for the whole image.
        crop: "random" (train; positions from torch's global RNG, so a resumed Trainer replays them) or "center".
        multiple_of: crop the whole image (when ``crop_size`` is None) down to a multiple of this (the patch size).
    Items are ``{"pixel_values", "labels", "weather"}`` like :class:`WeatherPairs`.
    """

    def __init__(self, input_dir, gt_dir, weather: str | None = None, resize: tuple[int, int] | None = None,
                 crop_size: int | None = None, crop: str = "center", multiple_of: int = 1):
        self.pairs = find_image_pairs(input_dir, gt_dir)
        self.weather = weather
        self.label = -1 if weather is None else weather_label(weather)
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        if resize is not None and (len(resize) != 2 or min(resize) < 1):
            raise ValueError(f"resize must be (height, width) with positive sizes, got {resize!r}")
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"crop_size must be a positive integer or None, got {crop_size!r}")
        if multiple_of < 1:
            raise ValueError(f"multiple_of must be >= 1, got {multiple_of!r}")
        self.resize, self.crop_size, self.crop, self.multiple_of = resize, crop_size, crop, multiple_of

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            if self.resize is not None:
                im = im.resize((self.resize[1], self.resize[0]), Image.Resampling.BICUBIC)
            return np.asarray(im)

    def __getitem__(self, i: int) -> dict:
        f, g = self.pairs[i]
        x, y = self._load(f), self._load(g)
        if x.shape != y.shape:
            raise ValueError(f"input {f.name} is {x.shape[:2]} but its ground truth {g.name} is {y.shape[:2]}; "
                             "pass resize=(H, W)")
        h, w = x.shape[:2]
        if self.crop_size is not None:
            c = self.crop_size
            if c > min(h, w):
                raise ValueError(f"crop_size {c} is larger than image {f.name} ({h}x{w})")
            if self.crop == "random":
                top = int(torch.randint(0, h - c + 1, ()).item())
                left = int(torch.randint(0, w - c + 1, ()).item())
            else:
                top, left = (h - c) // 2, (w - c) // 2
            x, y = x[top:top + c, left:left + c], y[top:top + c, left:left + c]
        elif self.multiple_of > 1:
            m = self.multiple_of
            hh, ww = h // m * m, w // m * m
            x, y = x[:hh, :ww], y[:hh, :ww]
        return {"pixel_values": _to_tensor(x), "labels": _to_tensor(y),
                "weather": torch.tensor(self.label, dtype=torch.long)}


_ALLWEATHER_TESTS = {  # weather -> candidate (input, gt) sub-folders, first found wins
    "snow": [("test_snow/input", "test_snow/gt"), ("test/Snow100K-L/synthetic", "test/Snow100K-L/gt"),
             ("Snow100K-L/synthetic", "Snow100K-L/gt")],
    "rain": [("test_rain/input", "test_rain/gt"), ("test1/input", "test1/gt"), ("Test1/input", "Test1/gt")],
    "raindrop": [("test_raindrop/input", "test_raindrop/gt"), ("test_a/input", "test_a/gt"),
                 ("raindrop/test_a/input", "raindrop/test_a/gt")],
}


def allweather_test_sets(root: str | os.PathLike, **kwargs) -> dict[str, PairedImageFolder]:
    """The All-Weather test sets found under ``root`` as {weather: PairedImageFolder} (kwargs go to each folder).

    Looks for ``test_snow`` / ``test_rain`` / ``test_raindrop`` (MoFME layout), Snow100K's ``test/Snow100K-L``,
    ``test1`` (Outdoor-Rain) and RainDrop's ``test_a``. ValueError if none is there.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"root must be an existing folder, got {str(root)!r}")
    out = {}
    for weather, cands in _ALLWEATHER_TESTS.items():
        for inp, gt in cands:
            if (root / inp).is_dir() and (root / gt).is_dir():
                out[weather] = PairedImageFolder(root / inp, root / gt, weather=weather, **kwargs)
                break
    if not out:
        tried = sorted({c[0] for cs in _ALLWEATHER_TESTS.values() for c in cs})
        raise ValueError(f"no All-Weather test set under {str(root)!r}; expected one of {tried} with a gt/ beside it")
    return out


def allweather_train_set(root: str | os.PathLike, weather: str | None = None, **kwargs) -> PairedImageFolder:
    """The training pairs ``<root>/train/{input,gt}`` (or Snow100K's ``train/{synthetic,gt}``)."""
    root = Path(root).expanduser()
    for inp in ("train/input", "train/synthetic"):
        if (root / inp).is_dir() and (root / "train/gt").is_dir():
            return PairedImageFolder(root / inp, root / "train/gt", weather=weather, **kwargs)
    raise ValueError(f"no training set under {str(root)!r}; expected train/input (or train/synthetic) and train/gt")
