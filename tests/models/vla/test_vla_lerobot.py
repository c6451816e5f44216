"""Reading a LeRobot-format dataset (parquet + mp4) written here with pandas / pyarrow / OpenCV."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from moezoo.models.vla.data import LeRobotDataset
from moezoo.models.vla.recipe import collate


def _write(root, lengths=(5, 3), size=16, fps=10):
    (root / "meta").mkdir(parents=True)
    info = {"fps": fps, "chunks_size": 1000,
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": {"observation.state": {"dtype": "float32", "shape": [3]},
                         "action": {"dtype": "float32", "shape": [2]},
                         "observation.images.top": {"dtype": "video", "shape": [size, size, 3]}}}
    (root / "meta" / "info.json").write_text(json.dumps(info))
    (root / "meta" / "tasks.jsonl").write_text('{"task_index": 0, "task": "push the block"}\n'
                                               '{"task_index": 1, "task": "open the drawer"}\n')
    (root / "meta" / "episodes.jsonl").write_text("".join(json.dumps({"episode_index": e, "length": n}) + "\n"
                                                          for e, n in enumerate(lengths)))
    for e, n in enumerate(lengths):
        df = pd.DataFrame({"observation.state": [np.full(3, 10 * e + t, np.float32) for t in range(n)],
                           "action": [np.array([e, t], np.float32) for t in range(n)],
                           "timestamp": np.arange(n, dtype=np.float32) / fps, "frame_index": np.arange(n),
                           "episode_index": np.full(n, e), "task_index": np.full(n, e)})
        p = root / info["data_path"].format(episode_chunk=0, episode_index=e)
        p.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(p)
        v = root / info["video_path"].format(episode_chunk=0, video_key="observation.images.top", episode_index=e)
        v.parent.mkdir(parents=True, exist_ok=True)
        w = cv2.VideoWriter(str(v), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
        for t in range(n):
            w.write(np.full((size, size, 3), 20 * t + 40, np.uint8))  # brightness encodes the frame index
        w.release()


def test_lerobot_folder_reads_as_policy_samples(tmp_path):
    _write(tmp_path)
    ds = LeRobotDataset(tmp_path, chunk_size=4, image_size=8, camera_map={"observation.images.top": "front"})
    assert len(ds) == 8
    s = ds[3]  # episode 0, step 3
    assert s["task"] == "push the block" and torch.equal(s["observation.state"], torch.full((3,), 3.0))
    assert s["action"][:, 1].tolist() == [3.0, 4.0, 4.0, 4.0] and s["action_is_pad"].tolist() == [False, False, True, True]
    img = s["observation.images.front"]
    assert img.shape == (3, 8, 8) and abs(float(img.mean()) * 255 - 100) < 8  # frame 3 -> value 100
    assert ds[5]["task"] == "open the drawer"
    assert len(ds.stats["action"]["mean"]) == 2
    batch = collate([ds[i] for i in range(3)])
    assert batch["action"].shape == (3, 4, 2) and batch["task"] == ["push the block"] * 3
    with pytest.raises(FileNotFoundError, match="info.json"):
        LeRobotDataset(tmp_path / "meta", chunk_size=4)
