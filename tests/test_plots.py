"""moezoo.plots: the one place routing figures are drawn (RoutingStats, the trainer's routing log, RoutingAnalysis and
the harnesses call it)."""
import math

import pytest
import torch
from PIL import Image

from moezoo.plots import heatmap_panels, image_grid_panels, line_plot


def _png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] > 50 and im.size[1] > 50
        return im.size


def test_heatmap_panels_writes_one_png_per_call_with_nan_cells(tmp_path):
    m = torch.rand(3, 5)
    m[2, 4] = math.nan                      # a layer with fewer experts
    p = heatmap_panels(tmp_path / "sub" / "h.png", {"image": m, "text": m.flip(0)}, title="load")
    w2, _ = _png(p)
    w1, _ = _png(heatmap_panels(tmp_path / "one.png", [m]))
    assert w2 > w1                          # two panels side by side


def test_heatmap_panels_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        heatmap_panels(tmp_path / "x.png", [torch.rand(4)])
    with pytest.raises(ValueError, match="at least one"):
        heatmap_panels(tmp_path / "x.png", {})


def test_line_plot_and_grid(tmp_path):
    _png(line_plot(tmp_path / "l.png", {"layer 0": ([1, 2, 3], [1.5, 1.2, 1.1])}, reference=1.0))
    with pytest.raises(ValueError, match="2 y values"):
        line_plot(tmp_path / "bad.png", {"a": ([1, 2, 3], [1, 2])})
    _png(image_grid_panels(tmp_path / "g.png", [[torch.rand(4, 4) for _ in range(3)] for _ in range(2)]))
    with pytest.raises(ValueError, match="non-empty"):
        image_grid_panels(tmp_path / "g.png", [])


def test_heatmap_annotations_and_labels(tmp_path):
    counts = torch.tensor([[3.0, 1.0], [0.0, 4.0]])
    share = counts / counts.sum(1, keepdim=True)
    _png(heatmap_panels(tmp_path / "a.png", [share], annotate=[counts], annotate_fmt="{:.0f}",
                        row_labels=["reacher", "pusher"], x_labels=["e0", "e1"]))
    _png(heatmap_panels(tmp_path / "b.png", {"AS layer 0": share}, annotate=True, vmin=0.0, vmax=1.0))
    with pytest.raises(ValueError, match="one matrix per panel"):
        heatmap_panels(tmp_path / "c.png", [share], annotate=[counts, counts])
