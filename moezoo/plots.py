"""Every routing figure of moezoo, drawn in one place.

Data stays where it is collected (:class:`moezoo.core.stats.RoutingStats`, the trainer's routing log,
:class:`moezoo.metrics.generation.RoutingAnalysis`, the family harnesses); they hand matrices and curves to the three
drawing functions here:

- :func:`heatmap_panels`: one or more (rows x experts) heatmaps side by side with a shared colour scale, e.g.
  layers x experts load, load of image vs text tokens, expert share per timestep bin;
- :func:`line_plot`: curves over steps, e.g. per-layer load imbalance during training, with an optional reference line;
- :func:`image_grid_panels`: a grid of small maps, e.g. per layer and expert the share of each patch position.

Figures are drawn on matplotlib's Agg canvas without pyplot, so no global backend changes and nothing is left open.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["heatmap_panels", "line_plot", "image_grid_panels"]


def _figure(figsize, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), bbox_inches="tight")
    return str(path)


def _array(m):
    import numpy as np

    if hasattr(m, "detach"):
        m = m.detach().float().cpu().numpy()
    m = np.asarray(m, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"a heatmap needs a 2-D (rows, experts) matrix, got shape {m.shape}")
    return m


def heatmap_panels(path: str | os.PathLike, panels: Mapping[str, object] | Sequence, *, title: str | None = None,
                   xlabel: str = "expert", ylabel: str = "layer", row_labels: Sequence | None = None,
                   x_labels: Sequence | None = None,
                   cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
                   shared_scale: bool = True, colorbar_label: str | None = None,
                   y_extent: tuple[float, float] | None = None, annotate: bool | Sequence = False,
                   annotate_fmt: str = "{:.2f}") -> str:
    """Write one PNG with the (rows, experts) matrices of ``panels`` side by side.

    ``panels``: ``{panel title: matrix}`` (a tensor or array; NaN cells are left blank) or a plain sequence of
    matrices. ``shared_scale`` puts every panel on one colour scale (``vmin``/``vmax`` override it). ``y_extent``
    ``(low, high)`` maps the rows onto a continuous axis (e.g. timestep bins onto [0, 1]) instead of row labels.
    ``annotate``: ``True`` writes each cell's value in it (``annotate_fmt``), or one matrix per panel of the values to
    write (e.g. raw counts over a normalised colour).
    """
    import numpy as np

    items = list(panels.items()) if isinstance(panels, Mapping) else [(None, m) for m in panels]
    if not items:
        raise ValueError("heatmap_panels needs at least one matrix")
    mats = [(name, _array(m)) for name, m in items]
    notes = None
    if annotate is True:
        notes = [m for _, m in mats]
    elif annotate is not False:
        notes = [_array(a) for a in annotate]
        if len(notes) != len(mats) or any(a.shape != m.shape for a, (_, m) in zip(notes, mats)):
            raise ValueError("annotate must hold one matrix per panel, each of its panel's shape")
    if shared_scale:
        finite = np.concatenate([m[np.isfinite(m)] for _, m in mats]) if mats else np.zeros(1)
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 1.0
        vmin = lo if vmin is None else vmin
        vmax = (hi if hi > vmin else vmin + 1e-6) if vmax is None else vmax
    n = len(mats)
    R = max(m.shape[1] for _, m in mats)
    L = max(m.shape[0] for _, m in mats)
    fig = _figure((min(2.2 + 0.4 * R, 12) * n, min(1.6 + 0.35 * L, 16)))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for i, (ax, (name, m)) in enumerate(zip(axes, mats)):
        kw = dict(origin="lower", extent=(-0.5, m.shape[1] - 0.5, *y_extent)) if y_extent else {}
        im = ax.imshow(m, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", **kw)
        ax.set_xlabel(xlabel)
        if m.shape[1] <= 32 and x_labels is None:
            ax.set_xticks(range(m.shape[1]))
        elif x_labels is not None:
            ax.set_xticks(range(m.shape[1]), [str(x) for x in x_labels], rotation=30 if len(x_labels) > 8 or
                          max(len(str(x)) for x in x_labels) > 3 else 0)
        if i == 0:
            ax.set_ylabel(ylabel)
        if y_extent is None:
            ax.set_yticks(range(m.shape[0]))
            labels = row_labels if row_labels is not None else range(m.shape[0])
            ax.set_yticklabels([str(r) for r in labels] if i == 0 else [""] * m.shape[0])
        if notes is not None:
            for r in range(m.shape[0]):
                for c in range(m.shape[1]):
                    if np.isfinite(notes[i][r, c]):
                        ax.text(c, r, annotate_fmt.format(notes[i][r, c]), ha="center", va="center", color="w",
                                fontsize=6)
        if name:
            ax.set_title(str(name), fontsize=9)
        if not shared_scale:
            fig.colorbar(im, ax=ax, fraction=0.046)
    if shared_scale:
        cb = fig.colorbar(im, ax=list(axes), fraction=0.046 if n == 1 else 0.02)
        if colorbar_label:
            cb.set_label(colorbar_label)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def line_plot(path: str | os.PathLike, curves: Mapping[str, tuple[Sequence, Sequence]], *, title: str | None = None,
              xlabel: str = "step", ylabel: str = "", reference: float | None = None, integer_x: bool = True,
              max_legend: int = 24) -> str:
    """Write one PNG of ``curves`` ``{label: (x values, y values)}``; ``reference`` draws a dashed horizontal line
    (1.0 = perfectly balanced load); legends are left out beyond ``max_legend`` curves."""
    fig = _figure((8, 4.5))
    ax = fig.subplots()
    for label, (x, y) in curves.items():
        x, y = list(x), list(y)
        if len(x) != len(y):
            raise ValueError(f"curve {label!r}: {len(x)} x values but {len(y)} y values")
        ax.plot(x, y, marker="." if len(x) < 50 else None, label=str(label))
    if reference is not None:
        ax.axhline(reference, color="gray", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if 0 < len(curves) <= max_legend:
        ax.legend(fontsize=6, ncol=2)
    if integer_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _save(fig, path)


def image_grid_panels(path: str | os.PathLike, maps: Sequence[Sequence[object]], *, row_label: str = "layer",
                      col_label: str = "expert", title: str | None = None, cmap: str = "magma", vmin: float = 0.0,
                      vmax: float = 1.0) -> str:
    """Write one PNG with a grid of small 2-D maps: ``maps[row][col]`` (e.g. per MoE layer and expert the patch-grid
    map of the share of each position's routing slots)."""
    rows = len(maps)
    cols = max((len(r) for r in maps), default=0)
    if rows == 0 or cols == 0:
        raise ValueError("image_grid_panels needs a non-empty grid of maps")
    fig = _figure((1.6 * cols + 1, 1.6 * rows + 0.6))
    for r, row in enumerate(maps):
        for c, m in enumerate(row):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            ax.imshow(_array(m), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{col_label} {c}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{row_label} {r}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
