"""The one reader of official checkpoints every converter uses, and checks on official state dicts.

A low-level module (it imports only :mod:`moezoo.safety`): ``convert``, the family converters and ``parity`` import it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .safety import PICKLE_SUFFIXES, PickleCheckpointError, pickle_refusal_message

# files in a checkpoint folder that are not weights (parity reference folders keep their inputs/outputs beside)
NOT_WEIGHTS = ("io.safetensors",)
# keys under which training checkpoints nest their state dict, in order of preference (DiT keeps ``ema``)
STATE_DICT_KEYS = ("ema", "state_dict", "model", "module")


def _read_file(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if not path.name.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"unsupported weights file {str(path)!r} (expected .safetensors, or .bin/.pt/.pth with "
                         "allow_pickle=True)")
    if not allow_pickle:
        raise PickleCheckpointError(pickle_refusal_message(repr(str(path))))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - explain the weights_only refusal
        raise ValueError(f"{path} cannot be read with torch.load(weights_only=True) ({exc}); save its state_dict "
                         "(e.g. checkpoint['ema']) on its own first") from exc
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return obj


def load_state_dict(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Weights of an official checkpoint: a ``.safetensors`` file, a folder (a sharded ``*.index.json`` if present,
    else every ``*.safetensors`` but ``io.safetensors``, else the pickles), or, with ``allow_pickle=True``, a pickled
    file (a nested ``ema`` / ``state_dict`` / ``model`` / ``module`` dict is unwrapped)."""
    path = Path(path)
    if path.is_dir():
        for index_name, pickled in (("model.safetensors.index.json", False), ("pytorch_model.bin.index.json", True)):
            index = path / index_name
            if index.is_file():
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                state = {}
                for name in files:
                    state.update(_read_file(path / name, allow_pickle if pickled else False))
                return state
        files = [f for f in sorted(path.glob("*.safetensors")) if f.name not in NOT_WEIGHTS]
        if not files:
            files = sorted(p for p in path.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
        if not files:
            raise ValueError(f"{str(path)!r} holds no weights (*.safetensors, or pickles with allow_pickle=True)")
        state = {}
        for f in files:
            state.update(_read_file(f, allow_pickle))
        return state
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    return _read_file(path, allow_pickle)


def load_official_checkpoint(src: str | Path, *, allow_pickle: bool = False, config: dict | str | Path | None = None,
                             require_config: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(official config dict, official state dict) of a folder (``config.json`` + weights) or a weights file.

    ``config``: a dict or a JSON path overriding the ``config.json`` found next to the weights (``{}`` if none, or a
    ``ValueError`` with ``require_config=True``: converters that build the model from the official config need one).
    """
    src = Path(src)
    if not src.exists():
        raise ValueError(f"SRC {str(src)!r} does not exist (expected a folder with config.json + weights, or a file)")
    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    folder = src if src.is_dir() else src.parent
    if config is None and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
    if config is None and require_config:
        raise ValueError(f"no config.json next to {str(src)!r}; pass config= (CLI: --config PATH)")
    return dict(config or {}), load_state_dict(src, allow_pickle=allow_pickle)


def float_dtype(name: str | torch.dtype) -> torch.dtype:
    """The floating torch dtype named ``name`` (``"float32"``, ``"torch.bfloat16"``, ...), for converters' ``dtype``."""
    dtype = name if isinstance(name, torch.dtype) else getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype name (float32, bfloat16, float16), got {name!r}")
    return dtype


def count_experts(state_dict: dict, prefix: str, leaf: str, *, what: str = "experts",
                  config_value: int | None = None, config_key: str = "num_experts", allow_empty: bool = False) -> int:
    """Number E of per-expert modules ``{prefix}<e>.{leaf}`` in an official state_dict, checked to be ids 0..E-1
    and, when the config states a count (``config_value``), equal to it."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\." + re.escape(leaf) + "$")
    ids = sorted({int(m.group(1)) for k in state_dict if (m := pat.match(k))})
    n = len(ids)
    if (n == 0 and not allow_empty) or ids != list(range(n)):
        raise ValueError(f"expected {what} 0..E-1 ('{prefix}<e>.{leaf}') in the state dict, found {ids}")
    if config_value is not None and int(config_value) != n:
        raise ValueError(f"config {config_key}={config_value} but the weights hold {n} {what}")
    return n


__all__ = ["load_state_dict", "load_official_checkpoint", "float_dtype", "count_experts", "NOT_WEIGHTS", "STATE_DICT_KEYS"]
