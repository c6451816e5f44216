"""Multi-weather data (built-in set: determinism, split by source photo, labels, crops; All-Weather folder loaders) and
restoration metrics (PSNR / SSIM against numpy / skimage references, per-weather aggregation)."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moezoo.data import weather as W  # noqa: E402
from moezoo.metrics import restoration as R  # noqa: E402

SMALL = dict(photo_size=48, crop_size=16, train_variants=1, test_variants=1, train_crops=3, test_crops=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("weather")
    folder = W.build_weather_set(root, progress=False, **SMALL)
    return root, folder


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_build_is_deterministic_and_cached(built, tmp_path):
    root, folder = built
    again = W.build_weather_set(tmp_path, progress=False, **SMALL)
    assert again.name == folder.name                      # same config -> same hash
    assert _files(again) == _files(folder)                # byte-identical PNGs and index
    a, b = W.WeatherPairs(folder, "train"), W.WeatherPairs(again, "train")
    for i in (0, len(a) // 2, len(a) - 1):
        for k in ("pixel_values", "labels", "weather"):
            assert torch.equal(a[i][k], b[i][k])
    mtime = (folder / "index.json").stat().st_mtime_ns
    assert W.build_weather_set(root, progress=False, **SMALL) == folder    # cached: not rebuilt
    assert (folder / "index.json").stat().st_mtime_ns == mtime
    other = W.build_weather_set(tmp_path, progress=False, **{**SMALL, "seed": 1})
    assert other != again
    assert (other / "train/input").iterdir().__next__().read_bytes() != b""
    diff = [n for n, data in _files(other).items() if n.startswith("train/input") and _files(again).get(n) != data]
    assert diff, "a different seed must give different degradations"


def test_split_by_source_photo(built):
    _, folder = built
    index = json.loads((folder / "index.json").read_text())
    train_src = {e["source"] for e in index["train"]}
    test_src = {e["source"] for e in index["test"]}
    assert not train_src & test_src
    assert test_src == set(W.DEFAULT_TEST_PHOTOS)
    assert train_src | test_src == set(W.BUILTIN_PHOTOS)
    tr, te = W.WeatherPairs(folder, "train"), W.WeatherPairs(folder, "test")
    assert not set(tr.sources) & set(te.sources)
    # user image folders are split by photo too, with a seeded fraction
    train, test = W.split_by_source([f"p{i}" for i in range(10)], test_fraction=0.3, seed=0)
    assert len(test) == 3 and not set(train) & set(test) and len(train) + len(test) == 10
    assert W.split_by_source([f"p{i}" for i in range(10)], test_fraction=0.3, seed=0) == (train, test)
    with pytest.raises(ValueError, match="test photo"):
        W.split_by_source(["a", "b"], test_names=["c"])
    with pytest.raises(ValueError, match="at least 2"):
        W.split_by_source(["a"])


def test_weather_labels_and_crops(built):
    _, folder = built
    for split, per_image in (("train", SMALL["train_crops"]), ("test", SMALL["test_crops"])):
        ds = W.WeatherPairs(folder, split)
        n_src = len(W.DEFAULT_TEST_PHOTOS) if split == "test" else len(W.BUILTIN_PHOTOS) - len(W.DEFAULT_TEST_PHOTOS)
        assert len(ds) == n_src * len(W.WEATHER_TYPES) * per_image
        names = ds.weather_names
        assert {names.count(w) for w in W.WEATHER_TYPES} == {len(ds) // 4}      # balanced over the 4 types
        for i in range(0, len(ds), 7):
            it = ds[i]
            assert it["pixel_values"].shape == it["labels"].shape == (3, 16, 16)
            assert it["pixel_values"].dtype == torch.float32
            assert 0.0 <= it["pixel_values"].min() and it["pixel_values"].max() <= 1.0
            assert int(it["weather"]) == W.WEATHER_TYPES.index(names[i])
            # every crop shows its weather (crops the degradation left untouched are redrawn)
            assert (it["pixel_values"] - it["labels"]).abs().mean() * 255 >= 1.0 - 1e-4
    index = json.loads((folder / "index.json").read_text())
    test_crops = [tuple(map(tuple, e["crops"])) for e in index["test"]]
    train_crops = [tuple(map(tuple, e["crops"])) for e in index["train"]]
    assert len(set(train_crops)) > len(train_crops) // 2          # random positions differ between images
    for e in index["test"]:                                        # test crops lie on a fixed grid
        h = 48
        assert all(0 <= y <= h - 16 for y, _ in e["crops"])
    assert test_crops == [tuple(map(tuple, e["crops"])) for e in index["test"]]
    with pytest.raises(IndexError):
        W.WeatherPairs(folder, "test")[10_000]
    with pytest.raises(ValueError, match="split"):
        W.WeatherPairs(folder, "val")


def test_degrade_and_config_errors(tmp_path):
    img = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    for kind in W.WEATHER_TYPES:
        a, b = W.degrade(img, kind, seed=3), W.degrade(img, kind, seed=3)
        assert np.array_equal(a, b) and a.shape == img.shape and a.dtype == np.uint8
        assert not np.array_equal(a, img)
    assert not np.array_equal(W.degrade(img, "rain", 3), W.degrade(img, "rain", 4))
    with pytest.raises(ValueError, match="weather must be one of"):
        W.degrade(img, "hail", 0)
    with pytest.raises(ValueError, match="uint8"):
        W.degrade(img.astype(np.float32), "rain", 0)
    with pytest.raises(ValueError, match="unknown weather-set option"):
        W.WeatherSetConfig.from_dict({"crop": 3})
    with pytest.raises(ValueError, match="crop_size"):
        W.WeatherSetConfig(photo_size=32, crop_size=64)
    with pytest.raises(ValueError, match="image_dir"):
        W.build_weather_set(tmp_path, image_dir=str(tmp_path / "nope"), progress=False)


def _png(path, arr):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_user_image_folder(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(4):
        _png(tmp_path / "photos" / f"img{i}.png", (rng.random((40, 50, 3)) * 255).astype(np.uint8))
    folder = W.build_weather_set(tmp_path / "cache", image_dir=str(tmp_path / "photos"), photo_size=32,
                                 crop_size=16, train_crops=2, test_crops=1, weather_types=("rain", "fog"),
                                 test_fraction=0.25, progress=False)
    tr, te = W.WeatherPairs(folder, "train"), W.WeatherPairs(folder, "test")
    assert len(set(te.sources)) == 1 and len(set(tr.sources)) == 3 and not set(tr.sources) & set(te.sources)
    assert set(tr.weather_names) == {"rain", "fog"}


def _fake_allweather(root, n=2, size=(24, 32)):
    rng = np.random.default_rng(0)
    for d, inp, gtname in (("train", "input/{i}.png", "gt/{i}.png"), ("test_snow", "input/s{i}.jpg", "gt/s{i}.jpg"),
                           ("test_raindrop", "input/{i}_rain.png", "gt/{i}_clean.png")):
        for i in range(n):
            clean = (rng.random((*size, 3)) * 255).astype(np.uint8)
            _png(root / d / gtname.format(i=i), clean)
            _png(root / d / inp.format(i=i), np.clip(clean.astype(int) + 40, 0, 255).astype(np.uint8))
    for i in range(n):  # Outdoor-Rain test set as TransWeather calls it
        _png(root / "test1" / "input" / f"r{i}.png", np.zeros((*size, 3), np.uint8))
        _png(root / "test1" / "gt" / f"r{i}.png", np.full((*size, 3), 255, np.uint8))


def test_allweather_loaders(tmp_path):
    _fake_allweather(tmp_path)
    tests = W.allweather_test_sets(tmp_path)
    assert set(tests) == {"snow", "rain", "raindrop"}
    drop = tests["raindrop"]
    assert [(a.name, b.name) for a, b in drop.pairs] == [("0_rain.png", "0_clean.png"), ("1_rain.png", "1_clean.png")]
    it = tests["rain"][0]
    assert it["pixel_values"].shape == (3, 24, 32) and int(it["weather"]) == W.WEATHER_TYPES.index("rain")
    assert torch.all(it["labels"] == 1.0) and torch.all(it["pixel_values"] == 0.0)
    # whole images cut to a multiple of the patch size; resize; crops
    assert W.allweather_test_sets(tmp_path, multiple_of=10)["snow"][0]["pixel_values"].shape == (3, 20, 30)
    assert W.allweather_test_sets(tmp_path, resize=(16, 16))["snow"][1]["labels"].shape == (3, 16, 16)
    train = W.allweather_train_set(tmp_path, crop_size=8, crop="random")
    assert len(train) == 2 and int(train[0]["weather"]) == -1
    torch.manual_seed(0)
    a = train[0]
    torch.manual_seed(0)
    b = train[0]
    assert a["pixel_values"].shape == (3, 8, 8) and torch.equal(a["pixel_values"], b["pixel_values"])
    c = W.allweather_train_set(tmp_path, crop_size=8, crop="center")[0]
    full = W.allweather_train_set(tmp_path)[0]
    assert torch.equal(c["labels"], full["labels"][:, 8:16, 12:20])
    # Snow100K layout (synthetic/ + gt/)
    snow = tmp_path / "snow100k"
    _png(snow / "test/Snow100K-L/synthetic/a.jpg", np.zeros((8, 8, 3), np.uint8))
    _png(snow / "test/Snow100K-L/gt/a.jpg", np.zeros((8, 8, 3), np.uint8))
    assert list(W.allweather_test_sets(snow)) == ["snow"]


def test_allweather_errors(tmp_path):
    with pytest.raises(ValueError, match="no All-Weather test set"):
        W.allweather_test_sets(tmp_path)
    with pytest.raises(ValueError, match="no training set"):
        W.allweather_train_set(tmp_path)
    _png(tmp_path / "x/input/a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "x/gt").mkdir()
    with pytest.raises(ValueError, match="no ground truth"):
        W.find_image_pairs(tmp_path / "x/input", tmp_path / "x/gt")
    _png(tmp_path / "x/gt/a.png", np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="pass resize"):
        W.PairedImageFolder(tmp_path / "x/input", tmp_path / "x/gt")[0]
    with pytest.raises(ValueError, match="crop must be"):
        W.PairedImageFolder(tmp_path / "x/input", tmp_path / "x/gt", crop="corner")
    with pytest.raises(ValueError, match="weather must be one of"):
        W.PairedImageFolder(tmp_path / "x/input", tmp_path / "x/gt", weather="hail")


# ------------------------------------------------------------------------------------------------ metrics
def _pair(seed=0, shape=(3, 3, 32, 40), noise=0.1):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g)
    return (t + noise * torch.randn(shape, generator=g)).clamp(0, 1), t


def test_psnr_matches_numpy():
    p, t = _pair()
    ref = [10 * math.log10(1.0 / np.mean((p[i].double().numpy() - t[i].double().numpy()) ** 2)) for i in range(3)]
    assert np.allclose(R.psnr(p, t).numpy(), ref, atol=1e-4)
    assert torch.all(R.psnr(t, t) == 100.0)                              # exact match: capped, not inf
    assert np.allclose(R.psnr(p * 255, t * 255, data_range=255.0).numpy(), ref, atol=1e-3)


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    for seed, noise in ((0, 0.1), (1, 0.3)):
        p, t = _pair(seed, noise=noise)
        ref = [structural_similarity(t[i].permute(1, 2, 0).double().numpy(), p[i].permute(1, 2, 0).double().numpy(),
                                     data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     channel_axis=-1) for i in range(3)]
        assert np.allclose(R.ssim(p, t).numpy(), ref, atol=5e-4), (R.ssim(p, t), ref)
    assert torch.allclose(R.ssim(t, t), torch.ones(3))
    y = R.rgb_to_y(t)
    assert y.shape == (3, 1, 32, 40)
    assert torch.allclose(R.rgb_to_y(torch.ones(1, 3, 2, 2)), torch.full((1, 1, 2, 2), 235 / 255), atol=1e-4)
    with pytest.raises(ValueError, match="at least 11"):
        R.ssim(p[..., :8, :8], t[..., :8, :8])
    with pytest.raises(ValueError, match="same shape"):
        R.psnr(p, t[:2])


def test_restoration_metrics_per_weather():
    p, t = _pair(shape=(4, 3, 16, 16))
    m = R.RestorationMetrics()
    per = m.update(p, t, weather=torch.tensor([0, 0, 2, 3]))
    m.update(t[:1], t[:1], weather=["snow"])
    res = m.compute()
    assert list(res) == ["rain", "snow", "fog", "raindrop", "overall"]
    assert res["rain"]["count"] == 2 and res["overall"]["count"] == 5
    assert math.isclose(res["rain"]["psnr"], per["psnr"][:2].mean().item(), rel_tol=1e-6)
    assert res["snow"]["psnr"] == 100.0 and math.isclose(res["snow"]["ssim"], 1.0, abs_tol=1e-6)
    allp = per["psnr"].tolist() + [100.0]
    assert math.isclose(res["overall"]["psnr"], sum(allp) / 5, rel_tol=1e-6)
    table = R.format_metrics_table({"input": res})
    assert table.splitlines()[0].startswith("| system | rain PSNR / SSIM") and "| input |" in table
    with pytest.raises(ValueError, match="one label per image"):
        m.update(p, t, weather=[0, 1])
    with pytest.raises(ValueError, match="outside"):
        m.update(p, t, weather=torch.tensor([0, 1, 2, 9]))
    m.reset()
    assert m.compute() == {}


# ------------------------------------------------------------------------------------------------ Debian photographs
def test_debian_photos_missing_package_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y .*mate-backgrounds"):
        W.debian_photos(["mate_aqua"], root=tmp_path)
    with pytest.raises(ValueError, match="unknown Debian photo"):
        W.debian_photos(["nope"])
    with pytest.raises(ValueError, match="photos must be one of"):
        W.WeatherSetConfig(photos="flickr")
    with pytest.raises(ValueError, match="val_fraction"):
        W.WeatherSetConfig(val_fraction=1.5)
    assert {pkg for pkg, _ in W.DEBIAN_PHOTOS.values()} == {"mate-backgrounds", "lomiri-wallpapers-16.04",
                                                              "lomiri-wallpapers-20.04"}


def test_all_photos_split_train_val_test_by_source(tmp_path):
    """photos="all" (CI installs the Debian packages): three disjoint splits by source photo, random train crops."""
    pics = W.debian_photos(["mate_storm", "lomiri_kleiber"], max_side=64)
    assert all(min(im.shape[:2]) >= 64 and im.dtype == np.uint8 and im.shape[2] == 3 for im in pics.values())
    folder = W.build_weather_set(tmp_path, photos="all", progress=False, photo_size=32, crop_size=16,
                                 train_variants=1, train_crops=2, test_crops=1, weather_types=("rain",))
    index = json.loads((folder / "index.json").read_text())
    src = {k: {e["source"] for e in index[k]} for k in ("train", "val", "test")}
    val_names, test_names = W.DEFAULT_SPLITS["all"]
    assert src["val"] == set(val_names) and src["test"] == set(test_names)
    assert not (src["train"] & src["val"] or src["train"] & src["test"] or src["val"] & src["test"])
    assert src["train"] | src["val"] | src["test"] == set(W.BUILTIN_PHOTOS) | set(W.DEBIAN_PHOTOS)
    tr = W.WeatherPairs(folder, "train", random_crops=True)
    torch.manual_seed(0)
    a = tr[0]
    torch.manual_seed(0)
    b = tr[0]
    c = tr[0]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
    assert a["pixel_values"].shape == (3, 16, 16)
    assert not torch.equal(b["labels"], c["labels"])           # a fresh crop each time
    assert len(W.WeatherPairs(folder, "val")) == len(val_names)
