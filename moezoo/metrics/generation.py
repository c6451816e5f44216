"""Image-generation metrics: FID / IS / precision-recall, offline classifier-space FID, conditional accuracy, sample
grids and the DiT-MoE routing analysis (expert usage vs denoising timestep and vs patch position).

Offline (no hub, e.g. CI): Inception weights cannot be downloaded, so :func:`inception_available` says whether
torchmetrics' Inception FID / IS can run (``torch-fidelity`` installed and its FID weights already in the torch hub
cache); if not they are skipped with a reason. What always works: a small CNN classifier trained on the real training
set (:func:`load_or_train_classifier`, cached as safetensors) gives

* **classifier FID** -- torchmetrics' ``FrechetInceptionDistance(feature=<module>)`` with the classifier's penultimate
  features (:class:`ClassifierFeatures`; same Frechet distance, different feature space: numbers are comparable only
  with each other, e.g. to the real-vs-real reference line);
* **classifier IS** -- torchmetrics' ``InceptionScore(feature=<logits module>)`` on the classifier's logits;
* **conditional accuracy** -- fraction of samples the classifier assigns to the class they were generated for;
* **precision / recall** (Kynkaenniemi et al. 2019, k-NN manifolds) in that feature space (torchmetrics has none).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["SmallImageClassifier", "ClassifierFeatures", "ClassifierLogits", "train_classifier", "load_or_train_classifier",
           "classifier_predict", "conditional_accuracy", "classifier_fid", "classifier_inception_score",
           "precision_recall", "inception_available", "inception_metrics", "save_image_grid", "RoutingAnalysis",
           "evaluate_generation", "results_markdown"]


# ---------------------------------------------------------------------------------------------- classifier
class SmallImageClassifier(nn.Module):
    """A 3-block CNN (conv-BN-GELU, max-pool) for small images (8-64 px) in [-1, 1]; ``features`` is the
    penultimate embedding (the FID feature space).

    Args:
        in_channels: image channels; num_classes: classes; width: channels of the first block (x2, x4 after);
        feature_dim: size of the penultimate feature.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, feature_dim: int = 64):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, feature_dim=feature_dim)

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.GELU())

        self.body = nn.Sequential(block(in_channels, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
                                  block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj = nn.Sequential(nn.Linear(4 * width, feature_dim), nn.GELU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _as_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] images -> float [-1, 1]."""
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    return x.float()


class ClassifierFeatures(nn.Module):
    """Penultimate features of a :class:`SmallImageClassifier`, as torchmetrics' FID ``feature`` module.

    Takes float images in [-1, 1] or uint8 in [0, 255]; ``num_features`` tells torchmetrics the size.
    """

    def __init__(self, classifier: SmallImageClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = int(classifier.config["feature_dim"])

    @torch.no_grad()
    def forward(self, x):
        return self.classifier.features(_as_float_images(x))


class ClassifierLogits(nn.Module):
    """Logits of the classifier, as torchmetrics' InceptionScore ``feature`` module."""

    def __init__(self, classifier: SmallImageClassifier):
        super().__init__()
        self.classifier = classifier.eval()

    @torch.no_grad()
    def forward(self, x):
        return self.classifier(_as_float_images(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None, epochs: int = 2,
                     batch_size: int = 128, lr: float = 3e-3, seed: int = 0, width: int = 16, feature_dim: int = 64,
                     progress: bool = True) -> SmallImageClassifier:
    """Train a :class:`SmallImageClassifier` on ``images`` (N, C, H, W) in [-1, 1] and ``labels`` (N,) (AdamW,
    one-cycle LR, random horizontal flips)."""
    from tqdm.auto import tqdm

    if images.dim() != 4 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"images must be (N, C, H, W) and labels (N,), got {tuple(images.shape)} / {tuple(labels.shape)}")
    num_classes = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SmallImageClassifier(images.shape[1], num_classes, width=width, feature_dim=feature_dim)
    steps = epochs * math.ceil(images.shape[0] / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    bar = tqdm(total=steps, desc="training the evaluation classifier", unit="step", disable=not progress,
               mininterval=1.0)
    for _ in range(epochs):
        perm = torch.randperm(images.shape[0], generator=g)
        for s in range(0, images.shape[0], batch_size):
            idx = perm[s: s + batch_size]
            x, y = _as_float_images(images[idx]), labels[idx].long()
            flip = torch.rand(x.shape[0], generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()


@torch.no_grad()
def classifier_predict(classifier: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N,) predicted classes."""
    classifier.eval()
    return torch.cat([classifier(_as_float_images(images[i: i + batch_size])).argmax(-1)
                      for i in range(0, images.shape[0], batch_size)])


def _fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode())
    h.update(images[:: max(1, images.shape[0] // 256)].contiguous().float().numpy().tobytes())
    h.update(labels.contiguous().numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:16]


def load_or_train_classifier(cache_dir: str | os.PathLike, train_images: torch.Tensor, train_labels: torch.Tensor,
                             test_images: torch.Tensor | None = None, test_labels: torch.Tensor | None = None,
                             epochs: int = 2, seed: int = 0, num_classes: int | None = None,
                             progress: bool = True, max_train: int | None = None) -> tuple[SmallImageClassifier, dict]:
    """The evaluation classifier cached in ``cache_dir`` (``eval_classifier.safetensors`` + ``.json``), trained on
    the given real training set when the cache is missing or was made from different data / settings.

    Returns ``(classifier, info)``; ``info`` holds the held-out accuracy when test data is given.
    """
    from safetensors.torch import load_file, save_file

    if max_train is not None:
        train_images, train_labels = train_images[:max_train], train_labels[:max_train]
    cache_dir = Path(cache_dir)
    w_path, j_path = cache_dir / "eval_classifier.safetensors", cache_dir / "eval_classifier.json"
    key = dict(fingerprint=_fingerprint(train_images, train_labels), epochs=epochs, seed=seed,
               in_channels=int(train_images.shape[1]), num_classes=int(num_classes or int(train_labels.max()) + 1))
    if w_path.is_file() and j_path.is_file():
        info = json.loads(j_path.read_text())
        if info.get("key") == key:
            model = SmallImageClassifier(**info["config"])
            model.load_state_dict(load_file(str(w_path)))
            return model.eval(), dict(info, cached=True)
    model = train_classifier(train_images, train_labels, num_classes=key["num_classes"], epochs=epochs, seed=seed,
                             progress=progress)
    info = {"key": key, "config": model.config, "train_size": int(train_images.shape[0])}
    if test_images is not None and test_labels is not None:
        pred = classifier_predict(model, test_images)
        info["test_accuracy"] = float((pred == test_labels).float().mean())
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = w_path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, w_path)
    j_path.write_text(json.dumps(info, indent=2) + "\n")
    return model, dict(info, cached=False)


def conditional_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` the classifier assigns to ``labels`` (the classes they were generated for)."""
    return float((classifier_predict(classifier, images) == labels.reshape(-1).to(torch.long)).float().mean())


# ---------------------------------------------------------------------------------------------- FID / IS / P-R
def _batched(module, images, batch_size=512):
    return torch.cat([module(images[i: i + batch_size]) for i in range(0, images.shape[0], batch_size)])


def classifier_fid(classifier: SmallImageClassifier, real: torch.Tensor, fake: torch.Tensor,
                   batch_size: int = 512) -> float:
    """FID in the classifier's penultimate feature space (torchmetrics' ``FrechetInceptionDistance`` with a custom
    feature module); images float [-1, 1] or uint8. Needs >= 2 images per set."""
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 real and 2 generated images, got {real.shape[0]} / {fake.shape[0]}")
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=ClassifierFeatures(classifier), normalize=False)
    for i in range(0, real.shape[0], batch_size):
        fid.update(real[i: i + batch_size], real=True)
    for i in range(0, fake.shape[0], batch_size):
        fid.update(fake[i: i + batch_size], real=False)
    return float(fid.compute())


def classifier_inception_score(classifier: SmallImageClassifier, images: torch.Tensor, splits: int = 1) -> float:
    """Inception Score computed on the classifier's logits (torchmetrics' ``InceptionScore(feature=module)``);
    between 1 and ``num_classes``."""
    from torchmetrics.image.inception import InceptionScore

    import warnings

    with warnings.catch_warnings():  # "features saved in buffer" / std over one split
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=ClassifierLogits(classifier), splits=splits, normalize=False)
        metric.update(images)
        return float(metric.compute()[0])


def precision_recall(real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = 3) -> dict:
    """Improved precision / recall (Kynkaenniemi et al. 2019): a generated feature is "precise" when it lies inside
    some real sample's k-NN ball; recall swaps the roles."""
    def inside(ref, query):
        d_ref = torch.cdist(ref, ref)
        radii = d_ref.kthvalue(min(k + 1, ref.shape[0]), dim=1).values  # k-th neighbour (index 0 is itself)
        return (torch.cdist(query, ref) <= radii[None]).any(dim=1).float().mean()

    real_feats, fake_feats = real_feats.double(), fake_feats.double()
    return {"precision": float(inside(real_feats, fake_feats)), "recall": float(inside(fake_feats, real_feats))}


def inception_available() -> tuple[bool, str]:
    """``(True, "")`` when torchmetrics' Inception FID/IS can run offline, else ``(False, reason)``."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return False, "torch-fidelity is not installed (pip install torch-fidelity) and Inception weights come from the hub"
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(hub.glob("*inception*")):
        return False, f"no Inception weights in {hub} (offline: they cannot be downloaded)"
    return True, ""


def inception_metrics(real: torch.Tensor, fake: torch.Tensor) -> dict:
    """Inception FID and IS (torchmetrics) on uint8 (N, C, H, W) images (gray is repeated to RGB)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    def rgb(x):
        x = x if x.dtype == torch.uint8 else ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x

    fid, isc = FrechetInceptionDistance(feature=2048), InceptionScore()
    fid.update(rgb(real), real=True)
    fid.update(rgb(fake), real=False)
    isc.update(rgb(fake))
    return {"inception_fid": float(fid.compute()), "inception_score": float(isc.compute()[0])}


# ---------------------------------------------------------------------------------------------- grids
def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int, row_labels: Sequence[str] | None = None,
                    title: str | None = None, scale: float = 0.6) -> str:
    """Save (N, C, H, W) images in [-1, 1] (or [0, 1] floats with ``min >= 0``... pass [-1, 1]) as a PNG grid with
    ``nrow`` images per row (one row per class in the harness), optional row labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    imgs = ((images.detach().float().clamp(-1, 1) + 1) / 2).cpu()
    n, c, h, w = imgs.shape
    rows = math.ceil(n / nrow)
    canvas = torch.ones(c, rows * (h + 2), nrow * (w + 2))
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[:, r * (h + 2) + 1: r * (h + 2) + 1 + h, col * (w + 2) + 1: col * (w + 2) + 1 + w] = imgs[i]
    arr = canvas.permute(1, 2, 0).numpy()
    fig = Figure(figsize=(max(4.0, nrow * w / 28 * scale) + (1.2 if row_labels else 0), max(1.5, rows * h / 28 * scale)),
                 dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    ax.imshow(arr[..., 0] if c == 1 else arr, cmap="gray" if c == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    if row_labels:
        ax.set_yticks([r * (h + 2) + 1 + h / 2 for r in range(min(rows, len(row_labels)))])
        ax.set_yticklabels(list(row_labels)[:rows], fontsize=8)
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------- routing analysis
class RoutingAnalysis:
    """Expert usage per MoE layer vs denoising timestep and vs patch position, collected while sampling.

    Pass :meth:`callback` as the pipeline's ``transformer_output_callback``: for every step it reads each MoE layer's
    routing (``router_outputs`` -> ``RouterOutput.indices`` when the model returns them, else top-k of
    ``router_logits``), keeps the conditional half of a guided batch, and adds the slot counts to a
    (layer, timestep bin, expert) and a (layer, patch, expert) table. ``t`` is the scheduler timestep normalised to
    [0, 1] (1 = noise) by ``num_train_timesteps``.

    Args:
        grid: patches per side (``sample_size // patch_size``).
        num_train_timesteps: the scheduler's training horizon (1000).
        num_bins: timestep bins.
        top_k: used only when the model returns raw ``router_logits`` without ``router_outputs``.
    """

    def __init__(self, grid: int, num_train_timesteps: int = 1000, num_bins: int = 10, top_k: int = 2):
        self.grid, self.T, self.num_bins, self.top_k = int(grid), float(num_train_timesteps), int(num_bins), int(top_k)
        self.by_time: list[torch.Tensor] = []   # per layer (num_bins, R)
        self.by_pos: list[torch.Tensor] = []    # per layer (grid*grid, R)

    def _layer_indices(self, out):
        ros = getattr(out, "router_outputs", None)
        if ros:
            return [(ro.indices, int(ro.num_experts)) for ro in ros if ro is not None]
        logits = getattr(out, "router_logits", None) or ()
        return [(lg.topk(min(self.top_k, lg.shape[-1]), dim=-1).indices, int(lg.shape[-1])) for lg in logits]

    def callback(self, step_index: int, timestep, out, num_cond: int) -> None:
        t = float(timestep) / self.T
        b = min(self.num_bins - 1, max(0, int(t * self.num_bins)))
        P = self.grid * self.grid
        for li, (idx, R) in enumerate(self._layer_indices(out)):
            idx = idx.detach().reshape(-1, idx.shape[-1]).cpu()
            n_tok = idx.shape[0]
            if n_tok % P:
                raise ValueError(f"layer {li}: {n_tok} routed tokens is not a multiple of the {P} patches")
            idx = idx.reshape(n_tok // P, P, -1)[:num_cond]                     # conditional half only
            if len(self.by_time) <= li:
                self.by_time.append(torch.zeros(self.num_bins, R, dtype=torch.float64))
                self.by_pos.append(torch.zeros(P, R, dtype=torch.float64))
            valid = idx < R                                                      # drop sentinel slots
            onehot = torch.zeros(*idx.shape, R + 1, dtype=torch.float64)
            onehot.scatter_(-1, idx.clamp(0, R).unsqueeze(-1), 1.0)
            onehot = onehot[..., :R] * valid.unsqueeze(-1)
            per_pos = onehot.sum(dim=(0, 2))                                     # (P, R)
            self.by_pos[li] += per_pos
            self.by_time[li][b] += per_pos.sum(0)

    @staticmethod
    def _norm(x):
        return x / x.sum(-1, keepdim=True).clamp_min(1e-12)

    def summary(self) -> dict:
        """Per layer: expert shares per timestep bin, and the spread of usage across bins / positions."""
        out = {}
        for li, (bt, bp) in enumerate(zip(self.by_time, self.by_pos)):
            st, sp = self._norm(bt), self._norm(bp)
            out[f"layer_{li}"] = {
                "share_by_timestep_bin": [[round(v, 4) for v in row] for row in st.tolist()],
                "max_abs_share_change_over_t": float((st - self._norm(bt.sum(0))).abs().max()),
                "max_abs_share_change_over_position": float((sp - self._norm(bp.sum(0))).abs().max()),
            }
        return out

    def save_heatmaps(self, out_dir: str | os.PathLike, prefix: str = "routing") -> list[str]:
        """``<prefix>_vs_timestep.png`` (layers x [timestep bin x expert]) and ``<prefix>_vs_position.png``
        (layers x experts, each a patch-grid map of the share of that position's slots sent to the expert)."""
        from ..plots import heatmap_panels, image_grid_panels

        out_dir = Path(out_dir)
        L = len(self.by_time)
        if L == 0:
            return []
        shares = {f"MoE layer {li}": self._norm(bt) for li, bt in enumerate(self.by_time)}
        paths = [heatmap_panels(out_dir / f"{prefix}_vs_timestep.png", shares, shared_scale=False, y_extent=(0, 1),
                                ylabel="t (0 = data, 1 = noise)",
                                title="expert share of routing slots vs denoising timestep")]
        maps = [[sp[:, e].reshape(self.grid, self.grid) for e in range(sp.shape[1])]
                for sp in (self._norm(bp) for bp in self.by_pos)]
        paths.append(image_grid_panels(out_dir / f"{prefix}_vs_position.png", maps,
                                       title="share of each patch position's routing slots per expert (bright = more)"))
        return paths


# ---------------------------------------------------------------------------------------------- end to end
def generate_per_class(pipe, num_classes: int, per_class: int, num_inference_steps: int, guidance_scale: float,
                       seed: int = 0, batch_size: int = 100, cfg_channels: int | None = None, callback=None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` samples of every class from a :class:`DiTMoEPipeline` -> (images (N, C, H, W) in [-1, 1],
    labels (N,)), class-major order."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    chunks = []
    for i in range(0, labels.numel(), batch_size):
        out = pipe(class_labels=labels[i: i + batch_size].tolist(), num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, generator=gen, output_type="pt", cfg_channels=cfg_channels,
                   transformer_output_callback=callback)
        chunks.append(out.images.float().cpu() * 2 - 1)
    return torch.cat(chunks), labels


def evaluate_generation(pipe, real_train: tuple[torch.Tensor, torch.Tensor], real_test: tuple[torch.Tensor, torch.Tensor],
                        output_dir: str | os.PathLike, per_class: int = 50, num_inference_steps: int = 50,
                        guidance_scale: float = 2.0, class_names: Sequence[str] | None = None, seed: int = 0,
                        classifier_epochs: int = 2, grid_per_class: int = 8, routing: bool = True,
                        cfg_channels: int | None = None, classifier_cache: str | os.PathLike | None = None,
                        reference_size: int | None = None, progress: bool = True,
                        classifier_max_train: int | None = None) -> dict:
    """Sample ``per_class`` images of every class from ``pipe`` and score them against real data.

    ``real_train`` (images, labels) trains / keys the cached classifier; ``real_test`` is the FID reference set.
    Writes ``samples_grid.png`` (one row per class), routing heatmaps, ``metrics.json`` and ``metrics.md`` under
    ``output_dir``; returns the metrics dict. ``classifier_max_train`` caps the classifier's training images. The real-vs-real line compares a same-size slice of the training set
    with the test set (the floor a perfect generator would reach at that sample size).
    """
    import time

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (tr_x, tr_y), (te_x, te_y) = real_train, real_test
    num_classes = int(pipe.transformer.config.num_classes)
    classifier, cinfo = load_or_train_classifier(classifier_cache or output_dir, tr_x, tr_y, te_x, te_y,
                                                 epochs=classifier_epochs, seed=seed, num_classes=num_classes,
                                                 progress=progress, max_train=classifier_max_train)
    cfg = pipe.transformer.config
    analysis = None
    if routing:
        analysis = RoutingAnalysis(grid=int(cfg.sample_size) // int(cfg.patch_size),
                                   num_train_timesteps=int(pipe.scheduler.config.num_train_timesteps),
                                   top_k=int(getattr(cfg, "num_experts_per_tok", 2)))
    pipe.set_progress_bar_config(disable=not progress)
    t0 = time.time()
    fake, fake_y = generate_per_class(pipe, num_classes, per_class, num_inference_steps, guidance_scale, seed=seed,
                                      cfg_channels=cfg_channels, callback=analysis.callback if analysis else None)
    sample_seconds = time.time() - t0
    n = fake.shape[0]
    ref_n = int(reference_size or n)
    ref = te_x[:ref_n]
    res = {
        "num_samples": n, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
        "scheduler": type(pipe.scheduler).__name__, "sampling_seconds": round(sample_seconds, 2),
        "images_per_second": round(n / max(sample_seconds, 1e-9), 2),
        "classifier_test_accuracy": cinfo.get("test_accuracy"),
        "classifier_fid": classifier_fid(classifier, ref, fake),
        "classifier_fid_real_vs_real": classifier_fid(classifier, ref, tr_x[:n]),
        "conditional_accuracy": conditional_accuracy(classifier, fake, fake_y),
        "classifier_inception_score": classifier_inception_score(classifier, fake),
        "classifier_inception_score_real": classifier_inception_score(classifier, ref),
    }
    feats = ClassifierFeatures(classifier)
    res.update({f"{k}": v for k, v in precision_recall(_batched(feats, ref), _batched(feats, fake)).items()})
    ok, why = inception_available()
    if ok:
        res.update(inception_metrics(ref, fake))
    else:
        res["inception_skipped"] = why
    g = min(grid_per_class, per_class)
    grid_idx = torch.cat([torch.arange(c * per_class, c * per_class + g) for c in range(num_classes)])
    res["grid_png"] = save_image_grid(fake[grid_idx], output_dir / "samples_grid.png", nrow=g,
                                      row_labels=list(class_names) if class_names else None,
                                      title=f"{type(pipe.scheduler).__name__}, {num_inference_steps} steps, "
                                            f"guidance {guidance_scale}")
    if analysis is not None:
        res["routing_pngs"] = analysis.save_heatmaps(output_dir)
        res["routing"] = analysis.summary()
    (output_dir / "metrics.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (output_dir / "metrics.md").write_text(results_markdown(res) + "\n")
    return res


def results_markdown(res: dict) -> str:
    """A markdown table of the headline numbers of :func:`evaluate_generation`, of one run or of
    :func:`moezoo.metrics.seeds.summarize_runs` over seeds (cells ``mean ± std``)."""
    from .seeds import format_mean_std

    def f(key, digits=4):
        return format_mean_std(res.get(key, float("nan")), digits)

    rows = [("samples", res.get("num_samples")), ("scheduler / steps / guidance",
            f"{res.get('scheduler')} / {res.get('num_inference_steps')} / {res.get('guidance_scale')}"),
            ("classifier FID (generated vs test)", f("classifier_fid")),
            ("classifier FID real-vs-real (train vs test, reference)", f("classifier_fid_real_vs_real")),
            ("conditional accuracy", f("conditional_accuracy")),
            ("classifier IS (generated / real)",
             f"{f('classifier_inception_score', 3)} / {f('classifier_inception_score_real', 3)}"),
            ("precision / recall (classifier features, k=3)", f"{f('precision', 3)} / {f('recall', 3)}"),
            ("evaluation classifier test accuracy", f("classifier_test_accuracy")),
            ("Inception FID / IS", f"{f('inception_fid', 2)} / {f('inception_score', 2)}" if "inception_fid" in res
             else f"skipped: {res.get('inception_skipped')}"),
            ("sampling throughput (images/s)", f("images_per_second", 2))]
    if res.get("seeds"):
        rows.insert(0, ("seeds (mean ± std)", ", ".join(str(s) for s in res["seeds"])))
    lines = ["| metric | value |", "|---|---|"]
    for k, v in rows:
        if isinstance(v, dict):
            v = format_mean_std(v)
        lines.append(f"| {k} | {v} |")
    return "\n".join(lines)
