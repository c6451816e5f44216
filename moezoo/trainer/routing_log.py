"""Expert-load logging during training: forward hooks on the MoE layers collect one step's routing decisions, which
feed a :class:`moezoo.core.RoutingStats` and the per-layer ``max load x num_experts`` of the jsonl log."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..core.layer import MoELayer
from ..core.routing.output import RouterOutput
from ..core.stats import RoutingStats, expert_load

__all__ = ["RoutingLog"]


def _short_names(names: list[str]) -> list[str]:
    """Strip the common dotted prefix and suffix: ``model.layers.3.mlp`` -> ``3``."""
    if len(names) < 2:
        return [n or "moe" for n in names]
    split = [n.split(".") for n in names]
    pre = 0
    while all(len(s) > pre + 1 for s in split) and len({s[pre] for s in split}) == 1:
        pre += 1
    suf = 0
    while all(len(s) > pre + suf + 1 for s in split) and len({s[-1 - suf] for s in split}) == 1:
        suf += 1
    short = [".".join(s[pre:len(s) - suf]) for s in split]
    return short if len(set(short)) == len(short) else names


class _RoutingCapture:
    """Collects the RouterOutputs of one optimizer step (all micro-batches), detached, per MoE layer."""

    def __init__(self, model: nn.Module):
        from ..core.fme import FMEMoELayer

        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (MoELayer, FMEMoELayer))]
        self.names = _short_names([n for n, _ in layers])
        self.active = False
        self.mask = None
        self.records: dict[str, list] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, (_, m) in zip(self.names, layers)]

    @property
    def has_hooks(self) -> bool:
        return bool(self.handles)

    def _hook(self, name):
        def fn(module, args, output):
            if self.active and isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], RouterOutput):
                self.add(name, output[1])
        return fn

    def set_batch(self, batch) -> None:
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        self.mask = mask.detach().reshape(-1).float() if isinstance(mask, torch.Tensor) else None

    def add(self, name, ro: RouterOutput) -> None:
        R = ro.num_experts
        idx = ro.indices.detach().reshape(-1, ro.indices.shape[-1])
        T = idx.shape[0]
        mask = self.mask if self.mask is not None and self.mask.numel() == T else None
        drop = ro.extras.get("drop_rate") if ro.extras else None
        self.records.setdefault(name, []).append(
            (idx, ro.probs.detach().reshape(T, -1).float(), ro.experts_per_token.detach().reshape(-1), R,
             None if drop is None else float(drop), mask))

    def finish(self) -> dict:
        """``{layer: RouterOutput (+ mask)}`` concatenated over the step's forwards; clears the buffer."""
        out = {}
        for name, recs in self.records.items():
            R = recs[0][3]
            recs = [r for r in recs if r[3] == R]
            idx = torch.cat([r[0] for r in recs])
            probs = torch.cat([r[1] for r in recs])
            ept = torch.cat([r[2] for r in recs])
            masks = [r[5] if r[5] is not None else torch.ones(r[0].shape[0], device=r[0].device) for r in recs]
            mask = torch.cat(masks) if any(r[5] is not None for r in recs) else None
            drops = [r[4] for r in recs if r[4] is not None]
            extras = {"drop_rate": sum(drops) / len(drops)} if drops else {}
            out[name] = (RouterOutput(probs, probs, idx, torch.ones(idx.shape, device=idx.device), ept, R, None,
                                      extras), mask)
        self.records = {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class RoutingLog:
    """The routing record of a training run: a :class:`_RoutingCapture` on the model, a :class:`RoutingStats` and the
    ``max_load`` history (checkpointed with the trainer state)."""

    def __init__(self, model: nn.Module):
        self.capture = _RoutingCapture(model)
        self.stats = RoutingStats(keep_history=False)
        self.history: list[dict] = []
        self.last: dict | None = None  # the latest entry, until it is logged

    def add_model_output(self, out) -> None:
        """Record the ``router_outputs`` / ``router_logits`` RouterOutputs of a model output (models without hooks)."""
        if not self.capture.active or self.capture.has_hooks:
            return
        get = (lambda k: out.get(k)) if isinstance(out, Mapping) else (lambda k: getattr(out, k, None))
        ros = get("router_outputs") or get("router_logits")
        for i, ro in enumerate(ros or ()):
            if isinstance(ro, RouterOutput):
                self.capture.add(str(i), ro)

    def record(self, step: int) -> None:
        ros = self.capture.finish()
        if not ros:
            return
        entry = {}
        for name, (ro, mask) in ros.items():
            self.stats.update(name, ro, mask)
            entry[name] = float(expert_load(ro, mask).max() * ro.num_experts)
        self.history.append({"step": step, "max_load": entry})
        self.last = entry

    def summary(self) -> dict | None:
        return self.stats.summary() if len(self.stats) else None

    def state_dict(self) -> dict:
        return {"stats": self.stats.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state["stats"])
        self.history = list(state["history"])

    def save_plots(self, output_dir: Path, step: int) -> list[str]:
        """Write ``routing_heatmap.png`` and ``routing_load_over_steps.png`` to ``output_dir`` (if any MoE data)."""
        if not len(self.stats):
            return []
        heat = self.stats.save_heatmap(output_dir / "routing_heatmap.png", title=f"load, steps 1-{step}")
        from ..plots import line_plot

        curves = {}
        for name in self.stats.layers:
            pts = [(e["step"], e["max_load"][name]) for e in self.history if name in e["max_load"]]
            if pts:
                curves[f"layer {name}"] = ([p[0] for p in pts], [p[1] for p in pts])
        steps_png = line_plot(output_dir / "routing_load_over_steps.png", curves, reference=1.0,
                              ylabel="max expert load x num_experts",
                              title="load imbalance per MoE layer (1 = balanced)")
        return [heat, steps_png]
