"""Routing statistics: expert load, routing entropy, experts per token, drop rate (figures: :mod:`moezoo.plots`).

``expert_load(router_output)`` gives the fraction of routing slots each expert received in one forward.
:class:`RoutingStats` accumulates these per MoE layer over training or evaluation steps::

    stats = RoutingStats()
    for step, batch in enumerate(loader):
        out = model(**batch, output_router_logits=True)
        for i, ro in enumerate(router_outputs):     # one RouterOutput per MoE layer
            stats.update(i, ro)
    print(stats.table())
    stats.save_heatmap("load.png", steps_path="load_over_steps.png")
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

from .routing.output import RouterOutput, token_mask_weights

__all__ = ["expert_load", "expert_counts", "routing_entropy", "RoutingStats"]


def expert_counts(router_output: RouterOutput, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(R,) float32 number of routing slots each expert received (sentinel slots and masked tokens excluded)."""
    if not isinstance(router_output, RouterOutput):
        raise ValueError(f"router_output must be a RouterOutput, got {type(router_output).__name__}")
    R = router_output.num_experts
    idx = router_output.indices.reshape(-1, router_output.indices.shape[-1]).detach()
    mask = token_mask_weights(attention_mask, idx.shape[0], idx.device)
    w = torch.ones(idx.shape, dtype=torch.float32, device=idx.device)
    if mask is not None:
        w = w * mask[:, None]
    return torch.zeros(R + 1, dtype=torch.float32, device=idx.device).scatter_add_(
        0, idx.reshape(-1).clamp(0, R), w.reshape(-1))[:R]


def expert_load(router_output: RouterOutput, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(R,) fraction of the (non-sentinel) routing slots sent to each expert; sums to 1 unless nothing was routed."""
    counts = expert_counts(router_output, attention_mask)
    return counts / counts.sum().clamp_min(1.0)


def routing_entropy(router_output: RouterOutput, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of the entropy (nats) of the router distribution.

    Sigmoid scores (which need not sum to 1) are normalised per token first, so the value is always in [0, log R].
    """
    p = router_output.probs.reshape(-1, router_output.probs.shape[-1]).detach().float().clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
    mask = token_mask_weights(attention_mask, ent.shape[0], ent.device)
    if mask is None:
        return ent.mean() if ent.numel() else ent.new_zeros(())
    return (ent * mask).sum() / mask.sum().clamp_min(1.0)


def _copy_value(v):
    """A copy of an accumulator field that later in-place updates cannot change."""
    if isinstance(v, torch.Tensor):
        return v.clone()
    return [x.clone() for x in v] if isinstance(v, list) else v


class _LayerAccumulator:
    __slots__ = ("counts", "entropy_sum", "ept_sum", "tokens", "drop_sum", "drop_steps", "steps", "history")

    def __init__(self, num_experts: int):
        self.counts = torch.zeros(num_experts, dtype=torch.float64)
        self.entropy_sum = 0.0
        self.ept_sum = 0.0
        self.tokens = 0.0
        self.drop_sum = 0.0
        self.drop_steps = 0
        self.steps = 0
        self.history: list[torch.Tensor] = []


class RoutingStats:
    """Per-layer routing statistics accumulated over steps.

    For every layer (any hashable key: an index or a module name) it keeps the slot counts per expert, the token-averaged
    routing entropy and experts-per-token, the mean ``extras['drop_rate']`` of the steps that report one (capacity mode),
    and, when ``keep_history`` is on, the per-step load vector (for :meth:`save_load_over_steps`).

    Args:
        keep_history: store each step's load vector per layer (small: R floats per layer and step).
    """

    def __init__(self, keep_history: bool = True):
        self.keep_history = keep_history
        self._layers: dict[Hashable, _LayerAccumulator] = {}

    def __len__(self) -> int:
        return len(self._layers)

    @property
    def layers(self) -> list:
        return list(self._layers)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._layers.clear()

    @torch.no_grad()
    def update(self, layer: Hashable, router_output: RouterOutput, attention_mask: torch.Tensor | None = None) -> None:
        """Add one forward's routing decision of ``layer`` (padding tokens excluded when ``attention_mask`` is given)."""
        if not isinstance(router_output, RouterOutput):
            raise ValueError(f"router_output must be a RouterOutput, got {type(router_output).__name__}")
        R = router_output.num_experts
        acc = self._layers.get(layer)
        if acc is None:
            acc = self._layers[layer] = _LayerAccumulator(R)
        elif acc.counts.numel() != R:
            raise ValueError(f"layer {layer!r} was first seen with {acc.counts.numel()} experts, now with {R}")
        counts = expert_counts(router_output, attention_mask)
        acc.counts += counts.double().cpu()
        T = router_output.indices.reshape(-1, router_output.indices.shape[-1]).shape[0]
        mask = token_mask_weights(attention_mask, T, router_output.indices.device)
        n_tok = float(T if mask is None else mask.sum())
        ept = router_output.experts_per_token.reshape(-1).float()
        ept_sum = float(ept.sum() if mask is None else (ept * mask).sum())
        acc.entropy_sum += float(routing_entropy(router_output, attention_mask)) * n_tok
        acc.ept_sum += ept_sum
        acc.tokens += n_tok
        drop = router_output.extras.get("drop_rate") if router_output.extras else None
        if drop is not None:
            acc.drop_sum += float(drop)
            acc.drop_steps += 1
        acc.steps += 1
        if self.keep_history:
            acc.history.append((counts / counts.sum().clamp_min(1.0)).cpu())

    def state_dict(self) -> dict:
        """Everything accumulated, as tensors / floats / lists (loadable with ``torch.load(weights_only=True)``)."""
        return {"keep_history": self.keep_history,
                "layers": [{"name": name, **{k: _copy_value(getattr(acc, k)) for k in _LayerAccumulator.__slots__}}
                           for name, acc in self._layers.items()]}

    def load_state_dict(self, state: dict) -> None:
        """Replace the accumulated statistics by ``state`` (from :meth:`state_dict`)."""
        if not isinstance(state, dict) or "layers" not in state:
            raise ValueError("state must be a dict from RoutingStats.state_dict()")
        self.keep_history = bool(state.get("keep_history", self.keep_history))
        self._layers = {}
        for entry in state["layers"]:
            acc = _LayerAccumulator(int(entry["counts"].numel()))
            for k in _LayerAccumulator.__slots__:
                setattr(acc, k, _copy_value(entry[k]))
            self._layers[entry["name"]] = acc

    def load(self, layer: Hashable) -> torch.Tensor:
        """(R,) accumulated fraction of slots per expert of ``layer``."""
        acc = self._get(layer)
        return (acc.counts / acc.counts.sum().clamp_min(1.0)).float()

    def _get(self, layer):
        if layer not in self._layers:
            raise ValueError(f"layer {layer!r} has no statistics; known layers: {self.layers}")
        return self._layers[layer]

    def summary(self) -> dict:
        """``{layer: {...}}`` with ``load`` (list, fraction of slots per expert), ``max_load_ratio`` (max load x R, 1 =
        perfectly balanced), ``load_cv`` (coefficient of variation of the load), ``entropy`` (nats),
        ``normalized_entropy`` (entropy / log R), ``experts_per_token``, ``drop_rate`` (None when no step reported
        one), ``tokens``, ``steps``; plus ``"_all"`` averaging the scalar statistics over layers."""
        out = {}
        for name, acc in self._layers.items():
            R = acc.counts.numel()
            load = self.load(name)
            tokens = max(acc.tokens, 1e-30)
            ent = acc.entropy_sum / tokens if acc.tokens else 0.0
            out[name] = {
                "load": load.tolist(),
                "max_load_ratio": float(load.max() * R) if R else 0.0,
                "load_cv": float(load.std(unbiased=False) / load.mean()) if float(load.mean()) > 0 else 0.0,
                "entropy": ent,
                "normalized_entropy": ent / math.log(R) if R > 1 else 0.0,
                "experts_per_token": acc.ept_sum / tokens if acc.tokens else 0.0,
                "drop_rate": acc.drop_sum / acc.drop_steps if acc.drop_steps else None,
                "tokens": acc.tokens,
                "steps": acc.steps,
            }
        if out:
            keys = ("max_load_ratio", "load_cv", "entropy", "normalized_entropy", "experts_per_token")
            agg = {k: sum(v[k] for v in out.values()) / len(out) for k in keys}
            drops = [v["drop_rate"] for v in out.values() if v["drop_rate"] is not None]
            agg["drop_rate"] = sum(drops) / len(drops) if drops else None
            out["_all"] = agg
        return out

    def table(self, max_experts_shown: int = 16) -> str:
        """A printable table: one row per layer, then the loads of (up to ``max_experts_shown``) experts."""
        s = self.summary()
        if not s:
            return "RoutingStats: no data"
        head = f"{'layer':<16}{'steps':>6}{'tokens':>10}{'max/ideal':>10}{'cv':>7}{'H/logR':>8}{'exp/tok':>8}{'drop':>7}"
        lines = [head, "-" * len(head)]
        for name in self._layers:
            v = s[name]
            drop = "-" if v["drop_rate"] is None else f"{v['drop_rate']:.3f}"
            lines.append(f"{str(name):<16.16}{v['steps']:>6d}{v['tokens']:>10.0f}{v['max_load_ratio']:>10.3f}"
                         f"{v['load_cv']:>7.3f}{v['normalized_entropy']:>8.3f}{v['experts_per_token']:>8.3f}{drop:>7}")
        lines.append("")
        lines.append("load per expert (fraction of slots)")
        for name in self._layers:
            load = s[name]["load"]
            shown = " ".join(f"{x:.3f}" for x in load[:max_experts_shown])
            more = f" ... (+{len(load) - max_experts_shown})" if len(load) > max_experts_shown else ""
            lines.append(f"{str(name):<16.16}{shown}{more}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    # ------------------------------------------------------------------------------------------------ plots

    def load_matrix(self) -> torch.Tensor:
        """(layers, max R) accumulated load, NaN where a layer has fewer experts."""
        if not self._layers:
            raise ValueError("RoutingStats has no data to plot; call update() first")
        R = max(acc.counts.numel() for acc in self._layers.values())
        m = torch.full((len(self._layers), R), float("nan"))
        for i, name in enumerate(self._layers):
            load = self.load(name)
            m[i, : load.numel()] = load
        return m

    def save_heatmap(self, path, *, steps_path=None, title: str | None = None) -> str:
        """Write a layers x experts load heatmap PNG to ``path`` (and :meth:`save_load_over_steps` to ``steps_path``);
        drawn by :func:`moezoo.plots.heatmap_panels`."""
        from ..plots import heatmap_panels

        heatmap_panels(path, [self.load_matrix()], title=title or "fraction of routing slots per expert",
                       row_labels=list(self._layers))
        if steps_path is not None:
            self.save_load_over_steps(steps_path)
        return str(path)

    def save_load_over_steps(self, path, layer: Hashable | None = None) -> str:
        """PNG of load over steps: per-expert load lines of ``layer``, or (``layer=None``) every layer's imbalance
        ``max load x R`` (1 = balanced). Needs ``keep_history=True``; drawn by :func:`moezoo.plots.line_plot`."""
        from ..plots import line_plot

        if not self._layers:
            raise ValueError("RoutingStats has no data to plot; call update() first")
        if not self.keep_history:
            raise ValueError("save_load_over_steps needs RoutingStats(keep_history=True)")
        if layer is not None:
            hist = torch.stack(self._get(layer).history)
            curves = {f"e{e}": (range(hist.shape[0]), hist[:, e].tolist()) for e in range(hist.shape[1])}
            return line_plot(path, curves, ylabel="fraction of slots", max_legend=16,
                             title=f"layer {layer}: load per expert over steps")
        curves = {}
        for name, acc in self._layers.items():
            if acc.history:
                hist = torch.stack(acc.history)
                curves[str(name)] = (range(hist.shape[0]), (hist.max(-1).values * hist.shape[-1]).tolist())
        return line_plot(path, curves, ylabel="max load x num_experts", reference=1.0,
                         title="load imbalance over steps (1 = balanced)")
