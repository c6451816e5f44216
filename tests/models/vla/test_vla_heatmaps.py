"""The DriveMoE harness figures (camera selection by scenario, action expert by skill) are drawn by moezoo.plots."""
from PIL import Image

from moezoo.models.vla.harness import heatmaps


def test_drivemoe_heatmaps_written(tmp_path):
    scenarios = ["highway", "merge"]
    run = {sc: {"camera_selection": [0, 1, 1], "expert_selection": [0, 1, 2], "skill_labels": [0, 1, 0]}
           for sc in scenarios}
    files = heatmaps({"drivemoe": [run, run]}, scenarios, tmp_path, 3, ["front", "left", "right"])
    assert [p.rsplit("/", 1)[-1] for p in files] == ["camera_selection_heatmap.png", "expert_by_skill_heatmap.png"]
    for p in files:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[1] > 50
