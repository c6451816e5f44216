"""Training recipe of the deweather family (``training/deweather/train.py`` is a thin wrapper around :func:`train`).

A recipe config is a nested dict (YAML) with these sections (plus ``threads``: torch threads while training)::

    model:   {name: deweather_mofme_tiny_e4k2, tiny: false, config: {router_type: uncertainty}, init_from: null}
    data:    {source: builtin | folder | allweather, photos: all, root: null, cache_dir: null, crop_size: 64, ...}
    loss:    {perceptual_weight: 0.04, pixel: l1}      # pixel: l1 (the model's own loss) | mse | charbonnier | psnr
    eval:    {batch_size: 32, max_items: null, triptychs: 4}
    trainer: {output_dir: runs/x, max_steps: 300, batch_size: 16, learning_rate: 2e-3, ...}   # moezoo.trainer

Loss: the model's L1 + router aux loss, plus ``perceptual_weight`` x VGG16 feature L1 (relu1_2, relu2_2, relu3_3; MoFME
uses 0.04) **only when torchvision's VGG16 ImageNet weights are already in the torch hub cache** -- nothing is
downloaded; otherwise a log line says the perceptual term is skipped. Training runs through
:class:`moezoo.trainer.Trainer` (accelerate, AdamW + warm-up/cosine, atomic checkpoints, exact resume, tqdm, expert-load
logging and plots). The final model is written to ``<output_dir>/model`` (``from_pretrained``-loadable) with
``metrics.json`` (PSNR / SSIM per weather type, degraded input vs restored) and triptych PNGs.
"""
from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_RECIPE", "resolve_recipe", "build_model", "build_datasets", "restoration_collate", "vgg16_weights_path",
    "VGGPerceptualLoss", "psnr_loss", "make_loss_fn", "evaluate_restoration", "save_triptych", "save_triptychs", "train",
]

DEFAULT_RECIPE: dict = {
    "model": {"name": "deweather_mofme_tiny_e4k2", "tiny": False, "config": {}, "init_from": None},
    "data": {"source": "builtin", "photos": "all", "root": None, "cache_dir": None, "seed": 0, "photo_size": 192,
             "crop_size": 64, "train_variants": 2, "test_variants": 1, "train_crops": 24, "test_crops": 4,
             "max_photos": None, "random_crops": True, "resize": None},
    "loss": {"perceptual_weight": 0.04, "pixel": "l1"},
    "eval": {"batch_size": 32, "max_items": None, "triptychs": 4},
    "threads": None,  # torch intra-op threads while training (None: torch's default); tiny models run best on 1
    "trainer": {"output_dir": "runs/deweather", "max_steps": 300, "batch_size": 16, "learning_rate": 2e-3,
                "weight_decay": 0.01, "warmup_steps": 20, "lr_schedule": "cosine", "min_lr_ratio": 0.1,
                "grad_clip": 1.0, "save_every": 100, "log_every": 10, "eval_every": None, "seed": 0},
}
_WEATHER_SET_KEYS = ("seed", "photo_size", "crop_size", "train_variants", "test_variants", "train_crops", "test_crops",
                     "max_photos", "weather_types", "test_photos", "test_fraction", "photos", "val_photos",
                     "val_fraction", "rain_drop_length", "rain_blur", "rain_brightness", "snow_point_range",
                     "snow_brightness", "fog_coef_range")


def _merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_recipe(config: Mapping) -> dict:
    """``config`` merged over :data:`DEFAULT_RECIPE`; unknown sections / model / loss / eval keys raise ValueError."""
    if not isinstance(config, Mapping):
        raise ValueError(f"recipe config must be a mapping, got {type(config).__name__}")
    unknown = sorted(set(config) - set(DEFAULT_RECIPE))
    if unknown:
        raise ValueError(f"unknown recipe section(s) {unknown}; expected {sorted(DEFAULT_RECIPE)}")
    if config.get("threads") is not None and (not isinstance(config["threads"], int) or config["threads"] < 1):
        raise ValueError(f"threads must be a positive int or null, got {config['threads']!r}")
    for sec in ("model", "loss", "eval"):
        bad = sorted(set(config.get(sec) or {}) - set(DEFAULT_RECIPE[sec]))
        if bad:
            raise ValueError(f"unknown {sec}.* key(s) {bad}; expected {sorted(DEFAULT_RECIPE[sec])}")
    bad = sorted(set(config.get("data") or {}) - set(DEFAULT_RECIPE["data"]) - set(_WEATHER_SET_KEYS))
    if bad:
        known = sorted(set(DEFAULT_RECIPE["data"]) | set(_WEATHER_SET_KEYS))
        raise ValueError(f"unknown data.* key(s) {bad}; expected {known}")
    cfg = _merge(DEFAULT_RECIPE, config)
    if cfg["data"]["source"] not in ("builtin", "folder", "allweather"):
        raise ValueError(f"data.source must be 'builtin', 'folder' or 'allweather', got {cfg['data']['source']!r}")
    if cfg["data"]["source"] != "builtin" and not cfg["data"]["root"]:
        raise ValueError(f"data.source={cfg['data']['source']!r} needs data.root (a folder)")
    return cfg


# ------------------------------------------------------------------------------------------------ model and data
def build_model(model_cfg: Mapping):
    """A registered deweather model (``name``, ``tiny``, ``config`` overrides) or one loaded from ``init_from``."""
    import moezoo

    if model_cfg.get("init_from"):
        from transformers import AutoModelForImageToImage

        return AutoModelForImageToImage.from_pretrained(str(model_cfg["init_from"]), **(model_cfg.get("config") or {}))
    return moezoo.create_model(model_cfg["name"], tiny=bool(model_cfg.get("tiny")), **(model_cfg.get("config") or {}))


def build_datasets(data_cfg: Mapping, patch_size: int = 8, progress: bool = True, with_val: bool = False):
    """(train, test) datasets of the recipe's ``data`` section; items ``{"pixel_values", "labels", "weather"}``.

    ``with_val``: (train, val, test); val is None when the data has no validation split (All-Weather folders, a user
    folder without ``val_fraction``, ``photos: builtin``). Built sets are split by source photo; the train split draws
    fresh random crops at ``crop_size`` (``random_crops``, default on), val / test use a fixed grid of crops.
    """
    from moezoo.data import weather as W

    src = data_cfg.get("source", "builtin")
    crop = data_cfg.get("crop_size") or 64
    if crop % patch_size:
        raise ValueError(f"data.crop_size={crop} must be divisible by the model's patch_size={patch_size}")
    if src == "allweather":
        from torch.utils.data import ConcatDataset

        resize = tuple(data_cfg["resize"]) if data_cfg.get("resize") else None
        train = W.allweather_train_set(data_cfg["root"], crop_size=crop, crop="random", resize=resize)
        tests = W.allweather_test_sets(data_cfg["root"], resize=resize, multiple_of=patch_size)
        test = ConcatDataset(list(tests.values()))
        return (train, None, test) if with_val else (train, test)
    opts = {k: data_cfg[k] for k in _WEATHER_SET_KEYS if k in data_cfg and (data_cfg[k] is not None or k.endswith("_photos"))}
    if src == "folder":
        opts["image_dir"] = str(data_cfg["root"])
        opts.pop("photos", None)
    folder = W.build_weather_set(data_cfg.get("cache_dir") or W.default_cache_dir(),
                                 W.WeatherSetConfig.from_dict(opts), progress=progress)
    train = W.WeatherPairs(folder, "train", random_crops=bool(data_cfg.get("random_crops", True)))
    test = W.WeatherPairs(folder, "test")
    if not with_val:
        return train, test
    val = W.WeatherPairs(folder, "val") if json.loads((folder / "index.json").read_text()).get("val") else None
    return train, val, test


def restoration_collate(items: list[dict]) -> dict:
    """Stack ``pixel_values`` / ``labels`` (the model's inputs) and drop the weather label."""
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "labels": torch.stack([it["labels"] for it in items])}


# ------------------------------------------------------------------------------------------------ perceptual loss
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1


def vgg16_weights_path() -> Path | None:
    """torchvision's VGG16 ImageNet weights in the torch hub cache, or None (never downloads)."""
    p = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    return p if p.is_file() else None


class VGGPerceptualLoss(nn.Module):
    """Mean L1 distance of VGG16 features (relu1_2, relu2_2, relu3_3) of two [0,1] images; frozen, eval mode.

    Build it with :meth:`from_file` (torchvision's VGG16 weights, read with ``weights_only=True``) or pass any
    ``features`` stack whose outputs at ``layers`` are compared.
    """

    LAYERS = (3, 8, 15)

    def __init__(self, features: nn.Sequential, layers: tuple[int, ...] = LAYERS):
        super().__init__()
        if not layers or max(layers) >= len(features):
            raise ValueError(f"layers {layers} must index into the {len(features)} feature modules")
        self.layers = tuple(layers)
        self.features = features[: max(self.layers) + 1].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_file(cls, weights_path: str | os.PathLike) -> "VGGPerceptualLoss":
        """VGG16 features with torchvision's ImageNet weights from ``weights_path``."""
        from torchvision.models import vgg16

        net = vgg16()
        net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        return cls(net.features)

    def train(self, mode: bool = True):  # the feature extractor stays in eval mode
        return super().train(False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = (pred - self.mean) / self.std
        y = (target - self.mean) / self.std
        loss = pred.new_zeros(())
        for i, layer in enumerate(self.features):
            x, y = layer(x), layer(y)
            if i in self.layers:
                loss = loss + F.l1_loss(x, y.detach())
        return loss / len(self.layers)


PIXEL_LOSSES = ("l1", "mse", "charbonnier", "psnr")


def psnr_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Minus the mean per-image PSNR (dB, data range 1): ``10 log10(MSE_i + eps)`` averaged over the batch (NAFNet's
    PSNRLoss). It optimises the benchmark metric itself -- the mean of per-image PSNRs -- in which a nearly clean image
    counts as much as a badly degraded one; L1 / MSE averaged over pixels let the large errors dominate instead."""
    mse = (pred - target).pow(2).flatten(1).mean(1)
    return 10.0 / math.log(10.0) * torch.log(mse + eps).mean()


def _pixel_loss(kind: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "psnr":
        return psnr_loss(pred, target)
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "charbonnier":
        return torch.sqrt((pred - target) ** 2 + 1e-6).mean()
    return F.l1_loss(pred, target)


def make_loss_fn(perceptual_weight: float = 0.0, printer: Callable = print, pixel: str = "l1") -> Callable | None:
    """The Trainer ``loss_fn``: None (the model's own L1 + aux loss) unless another pixel loss (``"mse"``,
    ``"charbonnier"``, ``"psnr"`` = :func:`psnr_loss`) or a perceptual term is on and possible."""
    if pixel not in PIXEL_LOSSES:
        raise ValueError(f"loss.pixel must be one of {PIXEL_LOSSES}, got {pixel!r}")
    perc = None
    if perceptual_weight:
        path = vgg16_weights_path()
        if path is None:
            where = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
            printer(f"perceptual loss skipped: no VGG16 weights in {where} (nothing is downloaded); "
                    f"training with {pixel} + router aux loss")
        else:
            perc = VGGPerceptualLoss.from_file(path)
            printer(f"perceptual loss: {perceptual_weight} x VGG16 feature L1 (weights {path})")
    if perc is None and pixel == "l1":
        return None

    def loss_fn(model, batch):
        if pixel == "l1":
            out = model(**batch)
            loss = out.loss
            logs = {"l1_plus_aux": out.loss.detach()}
        else:
            out = model(pixel_values=batch["pixel_values"], output_router_logits=True)
            pix = _pixel_loss(pixel, out.reconstruction, batch["labels"].to(out.reconstruction.dtype))
            loss = pix + (out.aux_loss if out.aux_loss is not None else 0.0)
            logs = {pixel: pix.detach()}
        if out.aux_loss is not None:
            logs["aux_loss"] = out.aux_loss.detach()
        if perc is not None:
            p = perc.to(out.reconstruction.device)(out.reconstruction, batch["labels"])
            logs["perceptual"] = p.detach()
            loss = loss + perceptual_weight * p
        return loss, logs

    return loss_fn


# ------------------------------------------------------------------------------------------------ evaluation
def _eval_indices(dataset, max_items: int | None) -> list[int]:
    """Indices to evaluate: the first ``max_items`` of each test set of a ConcatDataset (one per weather type for
    All-Weather folders), else of the dataset."""
    from torch.utils.data import ConcatDataset

    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    out, start = [], 0
    for d in parts:
        n = len(d) if max_items is None else min(len(d), max_items)
        out.extend(range(start, start + n))
        start += len(d)
    return out


def _batches(dataset, batch_size: int, max_items: int | None):
    """Consecutive items grouped into batches of equal image size."""
    buf: list[dict] = []
    for i in _eval_indices(dataset, max_items):
        it = dataset[i]
        if buf and (len(buf) == batch_size or it["pixel_values"].shape != buf[0]["pixel_values"].shape):
            yield buf
            buf = []
        buf.append(it)
    if buf:
        yield buf


@torch.no_grad()
def evaluate_restoration(model, dataset, batch_size: int = 32, max_items: int | None = None,
                         include_input: bool = True, progress: bool = False) -> dict:
    """PSNR / SSIM per weather type and overall of ``model`` on ``dataset`` (and of the degraded input itself).

    ``max_items`` caps the samples evaluated (per test set when ``dataset`` is a ConcatDataset of All-Weather sets).

    Returns ``{"restored": {weather: {psnr, ssim, count}, "overall": ...}, "degraded input": {...}}``.
    """
    from tqdm.auto import tqdm

    from moezoo.metrics.restoration import RestorationMetrics

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    m_out, m_in = RestorationMetrics(), RestorationMetrics()
    bar = tqdm(total=len(_eval_indices(dataset, max_items)), desc="evaluating", unit="image", disable=not progress, mininterval=1.0)
    for items in _batches(dataset, batch_size, max_items):
        x = torch.stack([it["pixel_values"] for it in items]).to(device)
        y = torch.stack([it["labels"] for it in items]).to(device)
        w = torch.stack([it["weather"] for it in items])
        rec = model(pixel_values=x).reconstruction.float().clamp(0, 1)
        m_out.update(rec.cpu(), y.cpu(), w)
        if include_input:
            m_in.update(x.cpu(), y.cpu(), w)
        bar.update(len(items))
    bar.close()
    model.train(was_training)
    res = {"restored": m_out.compute()}
    if include_input:
        res["degraded input"] = m_in.compute()
    return res


def _to_uint8(img: torch.Tensor):
    return (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")


def save_triptych(path: str | os.PathLike, degraded: torch.Tensor, restored: torch.Tensor | list,
                  clean: torch.Tensor, title: str = "", restored_titles: list[str] | None = None) -> str:
    """PNG of degraded / restored (one or several models) / clean, each (3,H,W) in [0,1], with PSNR/SSIM captions."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from moezoo.metrics.restoration import psnr, ssim

    restored = list(restored) if isinstance(restored, (list, tuple)) else [restored]
    restored_titles = restored_titles or (["restored"] if len(restored) == 1 else
                                          [f"restored {i}" for i in range(len(restored))])
    panels = [("degraded", degraded)] + list(zip(restored_titles, restored)) + [("clean", clean)]
    H, W = clean.shape[-2:]
    fig = Figure(figsize=(2.6 * len(panels) * W / max(H, W) + 0.4, 2.9 * H / max(H, W) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    for ax, (name, img) in zip(axes, panels):
        ax.imshow(_to_uint8(img))
        ax.set_axis_off()
        if name != "clean":
            p = psnr(img[None], clean[None]).item()
            s = ssim(img[None], clean[None]).item() if min(H, W) >= 11 else float("nan")
            name = f"{name}\n{p:.2f} dB / {s:.3f}"
        ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)


@torch.no_grad()
def save_triptychs(models: Mapping[str, nn.Module], dataset, out_dir: str | os.PathLike, count: int = 4,
                   patch_size: int = 8) -> list[str]:
    """One triptych per weather type (up to ``count``) on whole test images when the dataset has them."""
    out_dir = Path(out_dir)
    paths: list[str] = []
    samples = []
    if hasattr(dataset, "full_image"):  # a built weather set: whole degraded photos, one per weather type
        sources = sorted({e["source"] for e in dataset.entries})
        weathers = list(dict.fromkeys(e["weather"] for e in dataset.entries))
        for k, w in enumerate(weathers):  # a different source photo for each weather type where possible
            want = sources[k % len(sources)]
            js = [j for j, e in enumerate(dataset.entries) if e["weather"] == w]
            j = next((j for j in js if dataset.entries[j]["source"] == want), js[0])
            samples.append(dataset.full_image(j))
    else:
        for i in range(min(len(dataset), count)):
            it = dataset[i]
            samples.append({**it, "weather": int(it["weather"]), "source": str(i)})
    for s in samples[:count]:
        x, y = s["pixel_values"], s["labels"]
        h, w = x.shape[-2] // patch_size * patch_size, x.shape[-1] // patch_size * patch_size
        x, y = x[:, :h, :w], y[:, :h, :w]
        outs = []
        for m in models.values():
            was = m.training
            m.eval()
            dev = next(m.parameters()).device
            outs.append(m(pixel_values=x[None].to(dev)).reconstruction[0].float().clamp(0, 1).cpu())
            m.train(was)
        name = f"triptych_{s['weather']}_{s['source']}.png"
        paths.append(save_triptych(out_dir / name, x, outs, y, title=f"{s['weather']} ({s['source']})",
                                   restored_titles=list(models)))
    return paths


def _flat_metrics(res: dict) -> dict:
    out = {}
    for w, d in res["restored"].items():
        key = "" if w == "overall" else f"/{w}"
        out[f"psnr{key}"] = round(d["psnr"], 4)
        out[f"ssim{key}"] = round(d["ssim"], 5)
    return out


# ------------------------------------------------------------------------------------------------ training
def train(config: Mapping, printer: Callable = print, progress: bool = True, callbacks: list | None = None) -> dict:
    """Run the recipe: build data + model, train with :class:`moezoo.trainer.Trainer`, evaluate, save.

    ``callbacks`` go to the Trainer (:class:`moezoo.trainer.TrainerCallback`). Returns the Trainer result plus
    ``model_dir``, ``metrics`` (before / after training), ``triptychs`` and
    ``parameters``.
    """
    cfg = resolve_recipe(config)
    old_threads = torch.get_num_threads()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    try:
        return _train(cfg, printer, progress, callbacks)
    finally:
        torch.set_num_threads(old_threads)


def _train(cfg: dict, printer: Callable, progress: bool, callbacks: list | None) -> dict:
    from moezoo.trainer import Trainer, TrainerConfig

    tcfg = TrainerConfig.from_dict(cfg["trainer"])
    out_dir = Path(tcfg.output_dir)
    torch.manual_seed(tcfg.seed)
    model = build_model(cfg["model"])
    patch = int(model.config.patch_size)
    train_ds, val_ds, test_ds = build_datasets(cfg["data"], patch_size=patch, progress=progress, with_val=True)
    printer(f"data ({cfg['data']['source']}): {len(train_ds)} train / {len(val_ds) if val_ds is not None else 0} val / "
            f"{len(test_ds)} test samples (split by source photo)")
    s = model.parameter_summary()
    printer(f"model {cfg['model']['init_from'] or cfg['model']['name']}: {s['total']:,} parameters, "
            f"{len(s['moe_layers'])} MoE layers x {model.config.num_experts} {model.config.expert_type} experts "
            f"(top-{model.config.num_experts_per_tok}, router {model.config.router_type})")
    ev = cfg["eval"]
    before = evaluate_restoration(model, test_ds, ev["batch_size"], ev["max_items"])

    monitor_ds = val_ds if val_ds is not None else test_ds  # evaluation during training: the val split when there is one

    def eval_fn(m, step):
        return _flat_metrics(evaluate_restoration(m, monitor_ds, ev["batch_size"], ev["max_items"], include_input=False))

    trainer = Trainer(model, tcfg, train_data=train_ds, collate_fn=restoration_collate,
                      loss_fn=make_loss_fn(cfg["loss"]["perceptual_weight"], printer, cfg["loss"]["pixel"]),
                      eval_fn=eval_fn if tcfg.eval_every else None, callbacks=callbacks)
    if trainer.step:
        printer(f"resumed from step {trainer.step}")
    result = trainer.train()
    model = trainer.unwrapped_model
    after = evaluate_restoration(model, test_ds, ev["batch_size"], ev["max_items"])
    val = evaluate_restoration(model, val_ds, ev["batch_size"], ev["max_items"]) if val_ds is not None else None
    model_dir = out_dir / "model"
    if trainer.is_main:
        model.save_pretrained(str(model_dir))
    trip = save_triptychs({"restored": model}, test_ds, out_dir / "triptychs", ev["triptychs"], patch) \
        if ev["triptychs"] and trainer.is_main else []
    metrics = {"before": before["restored"], "after": after["restored"], "degraded input": after["degraded input"]}
    if val is not None:
        metrics["val"] = {"after": val["restored"], "degraded input": val["degraded input"]}
    if trainer.is_main:
        (out_dir / "metrics.json").write_text(json.dumps(
            {"model": cfg["model"], "steps": result["step"], "metrics": metrics}, indent=2) + "\n")
    o_in, o_b, o_a = (metrics[k]["overall"] for k in ("degraded input", "before", "after"))
    printer(f"test PSNR / SSIM: degraded input {o_in['psnr']:.2f} / {o_in['ssim']:.4f}; model before training "
            f"{o_b['psnr']:.2f} / {o_b['ssim']:.4f}; after {result['step']} steps "
            f"{o_a['psnr']:.2f} / {o_a['ssim']:.4f}")
    return {**result, "model_dir": str(model_dir), "metrics": metrics, "triptychs": trip,
            "parameters": s["total"], "config": cfg}
