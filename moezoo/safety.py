"""Small helpers shared by loading, conversion and the hub: refusing pickled checkpoints, formatting counts.

A leaf module (no moezoo imports), so ``hub``, ``modeling_utils``, ``convert`` and the converters can all use it.
"""
from __future__ import annotations

import os
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SAFE_SUFFIXES = (".safetensors",)


class PickleCheckpointError(ValueError):
    """A checkpoint that can only be read by unpickling (arbitrary code execution) and the caller did not opt in."""


def pickle_refusal_message(what: str) -> str:
    return (f"{what} is a pickled checkpoint (pytorch_model.bin / .pt / .pth); moezoo loads safetensors only because "
            "unpickling can run arbitrary code. If you trust its source, pass allow_pickle=True (CLI: --allow-pickle), "
            "or convert it once with safetensors.torch.save_file and load the .safetensors file.")


def check_no_pickle(path: str | os.PathLike, subfolder: str = "") -> None:
    """Raise :class:`PickleCheckpointError` if the local ``path`` holds only pickled weights (no safetensors).

    Hub ids (non-local paths) are left to ``use_safetensors=True`` in :meth:`MoezooPreTrainedModel.from_pretrained`.
    """
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise PickleCheckpointError(pickle_refusal_message(f"{str(p)!r}"))
        return
    folder = p / subfolder if subfolder else p
    if not folder.is_dir():
        return
    names = [q.name for q in folder.iterdir() if q.is_file()]
    has_safe = any(n.endswith(SAFE_SUFFIXES) or n.endswith(".safetensors.index.json") for n in names)
    pickled = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES) or n.endswith(".bin.index.json"))
    if pickled and not has_safe:
        raise PickleCheckpointError(pickle_refusal_message(f"folder {str(folder)!r} ({', '.join(pickled)})"))


def format_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


__all__ = ["PICKLE_SUFFIXES", "SAFE_SUFFIXES", "PickleCheckpointError", "pickle_refusal_message", "check_no_pickle",
           "format_count"]
