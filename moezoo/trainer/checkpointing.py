"""Checkpoints: ``output_dir/checkpoint-<step>/`` written by :meth:`accelerate.Accelerator.save_state` into a hidden
temporary folder and renamed when complete (a kill never leaves a half checkpoint that looks complete), rotated to the
last ``keep_last``, and loaded without pickle.

Layout of one checkpoint (single process, DDP):

- the model as ``save_pretrained`` (``config.json`` + safetensors) or a safetensors state dict, and ``ema/`` in the
  same format: written by a ``save_state`` pre-hook instead of accelerate's own model file, so that a checkpoint folder
  is also a model folder (``from_pretrained`` works on it);
- ``optimizer.bin``, ``scheduler.bin`` (and ``scaler.pt`` for fp16) and ``random_states_<rank>.pkl`` (Python / NumPy /
  torch / CUDA RNG of every process): accelerate's files, loaded by ``load_state`` with ``weights_only=True``;
- ``trainer_state.pt`` (step, data position, EMA counter, loss / eval / routing history) and ``rank_state_<rank>.pt``
  (the data position of the other processes): ours, ``torch.load(weights_only=True)``;
- ``trainer_config.json``.

Under FSDP accelerate writes its sharded model / optimizer folders instead of the first two items.
accelerate's ``load_state`` swallows any error while restoring the RNG states (it logs "Could not load random states" at
INFO level and goes on); :func:`check_rng_restored` turns that into an error, since a resumed run would silently
diverge from the uninterrupted one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["CHECKPOINT_PREFIX", "TRAINER_STATE_NAME", "TRAINER_CONFIG_NAME", "find_checkpoints", "latest_checkpoint",
           "save_model", "load_model", "remove_leftovers", "publish_checkpoint", "check_rng_restored", "truncate_log"]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.pt"
TRAINER_CONFIG_NAME = "trainer_config.json"
_TMP_RE = re.compile(r"^\.checkpoint-\d+\.(tmp|old)$")
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def find_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, folder)`` in ``output_dir``, oldest first."""
    out = []
    d = Path(output_dir)
    if d.is_dir():
        for p in d.iterdir():
            m = _CKPT_RE.match(p.name)
            if m and p.is_dir() and (p / TRAINER_STATE_NAME).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder in ``output_dir`` (``None`` if there is none)."""
    ckpts = find_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def _is_pretrained(model) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def save_model(model: nn.Module, folder: Path) -> None:
    """``save_pretrained`` for a ``PreTrainedModel``, else ``model.safetensors`` of the state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    if _is_pretrained(model):
        model.save_pretrained(folder)
    else:
        from safetensors.torch import save_model as save_safetensors

        save_safetensors(model, str(folder / "model.safetensors"))


def load_model(model: nn.Module, folder: Path) -> None:
    """Load weights written by :func:`save_model` into ``model`` in place (exact values, strict)."""
    from safetensors.torch import load_file, load_model as load_safetensors

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {str(folder)!r}")
    if not _is_pretrained(model):
        load_safetensors(model, str(folder / "model.safetensors"), strict=True)
        return
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {str(folder)!r} has weights the model does not: {sorted(unexpected)[:10]}")
    if missing:  # tied weights are saved once; accept a missing key only if it shares storage with a loaded one
        own = model.state_dict()
        loaded_ptrs = {own[k].data_ptr() for k in sd if k in own}
        untied = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
        if untied:
            raise ValueError(f"checkpoint {str(folder)!r} lacks weights: {sorted(untied)[:10]}")


def remove_leftovers(output_dir: Path) -> None:
    """Delete the temporary folders of a checkpoint write that was killed."""
    for p in output_dir.iterdir():
        if _TMP_RE.match(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def temp_folder(output_dir: Path, step: int) -> Path:
    return output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"


def publish_checkpoint(output_dir: Path, step: int, keep_last: int | None) -> Path:
    """Rename the complete temporary folder of ``step`` to ``checkpoint-<step>`` (replacing an older one of the same
    step) and keep only the newest ``keep_last`` checkpoints. Main process only."""
    tmp, final = temp_folder(output_dir, step), output_dir / f"{CHECKPOINT_PREFIX}{step}"
    if final.exists():
        old = output_dir / f".{CHECKPOINT_PREFIX}{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if keep_last is not None:
        for _, p in find_checkpoints(output_dir)[:-keep_last]:
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
    return final


def check_rng_restored(path: Path, process_index: int) -> None:
    """Raise unless ``accelerator.load_state(path)`` restored this process's RNG states: the file must load with
    accelerate's ``weights_only=True`` loader (NumPy's state arrays allow-listed, nothing else) and the current torch
    RNG state must be the saved one."""
    from accelerate.utils import RNG_STATE_NAME
    from accelerate.utils.other import load

    f = path / f"{RNG_STATE_NAME}_{process_index}.pkl"
    if not f.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} has no RNG state for process {process_index} ({f.name}); "
                                "it was written by a run with fewer processes")
    try:
        states = load(f, map_location="cpu")
    except Exception as e:  # an unpickling error: refuse rather than resume with other random numbers
        raise RuntimeError(f"cannot load {str(f)!r} with weights_only=True: {e}") from e
    if not torch.equal(torch.get_rng_state(), states["torch_manual_seed"]):
        raise RuntimeError(f"accelerate did not restore the RNG states of {str(f)!r}; the resumed run would not "
                           "repeat the interrupted one")


def truncate_log(log_file: Path, step: int) -> None:
    """Drop log lines a killed run wrote after the checkpoint it is resumed from."""
    keep = []
    for line in log_file.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut by the kill
        keep.append(line)
    tmp = log_file.with_suffix(log_file.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, log_file)


def to_jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Mapping):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return str(v)
