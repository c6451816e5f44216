"""Parity harness: reproduce what the official implementations computed (``shared/parity/<ref>`` folders).

A reference folder holds ``config.json`` (official kwargs + ``_reference``), ``model.safetensors`` (official key
names), ``io.safetensors`` (``in.*`` inputs, ``out.*`` expected outputs), ``io.json`` and ``README.md``.
Each reference has a module ``moezoo.parity.<ref>`` defining:

- ``REPO``: the official repository (checked against ``config.json["_reference"]["repo"]``),
- ``EXACT``: names of outputs that must match exactly (everything else: atol 1e-5, rtol 1e-4),
- ``convert(config, state_dict) -> nn.Module``: official weights -> moezoo modules (MoELayer etc.),
- ``run(module, config, inputs) -> dict``: the ``out.*`` tensors computed by moezoo on the ``in.*`` tensors (a ``run``
  with an ``expected`` parameter also gets the sorted ``out.*`` names the folder holds).
"""
from __future__ import annotations

import importlib
import json
import pkgutil
from dataclasses import dataclass
from pathlib import Path

import torch

ATOL, RTOL = 1e-5, 1e-4


class ParityError(Exception):
    """A reference folder that cannot be used (missing files, wrong reference, missing outputs)."""


def normalize_reference(name: str) -> str:
    return name.strip().replace("-", "_").lower()


def available_references() -> list[str]:
    import moezoo.parity as pkg
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def get_reference(name: str):
    ref = normalize_reference(name)
    if ref not in available_references():
        import difflib
        close = difflib.get_close_matches(ref, available_references(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ParityError(f"unknown reference {name!r}; expected one of {available_references()}{hint}")
    return importlib.import_module(f"moezoo.parity.{ref}")


def load_folder(folder: str | Path, ref_module=None) -> tuple[dict, dict, dict, dict]:
    """Read (config, state_dict, io tensors, io.json) and check the folder belongs to ``ref_module``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise ParityError(f"parity folder {str(folder)!r} does not exist or is not a directory")
    need = ["config.json", "model.safetensors", "io.safetensors", "io.json"]
    missing = [n for n in need if not (folder / n).is_file()]
    if missing:
        raise ParityError(f"parity folder {str(folder)!r} lacks {', '.join(missing)} (expected {', '.join(need)})")
    try:
        config = json.loads((folder / "config.json").read_text())
        io_meta = json.loads((folder / "io.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
        io = load_file(str(folder / "io.safetensors"))
    except Exception as exc:  # noqa: BLE001 - report any unreadable file clearly
        raise ParityError(f"cannot read parity folder {str(folder)!r}: {exc}") from exc
    if ref_module is not None:
        repo = (config.get("_reference") or {}).get("repo")
        expected = ref_module.REPO
        ok = repo == expected if isinstance(expected, str) else repo in expected
        extra_check = getattr(ref_module, "matches", None)
        if not ok or (extra_check is not None and not extra_check(config)):
            cls = (config.get("_reference") or {}).get("class")
            raise ParityError(
                f"folder {str(folder)!r} holds a reference of {repo!r} (class {cls!r}), not of "
                f"{ref_module.__name__.rsplit('.', 1)[-1]!r} (expected repo {expected!r})")
    return config, state, io, io_meta


def strip_prefix(state_dict: dict, anchor: str, what: str) -> dict:
    """Keys relative to the one module whose parameter ends with ``anchor`` (a block saved alone or inside a model).

    Full-model checkpoints prefix block keys (``model.layers.<i>.mlp.``); exactly one match is required.
    """
    keys = [k for k in state_dict if k == anchor or k.endswith("." + anchor)]
    if len(keys) != 1:
        raise ValueError(f"expected exactly one '*{anchor}' ({what}) in the state_dict, found {keys}")
    prefix = keys[0][: -len(anchor)]
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


@dataclass
class Comparison:
    name: str
    max_abs_diff: float
    exact: bool
    ok: bool
    note: str = ""


def compare(name: str, got: torch.Tensor | None, want: torch.Tensor, exact: bool) -> Comparison:
    if got is None:
        return Comparison(name, float("nan"), exact, False, "not produced")
    got = torch.as_tensor(got).detach().cpu()
    if got.shape != want.shape:
        if got.numel() == want.numel():
            got = got.reshape(want.shape)
        else:
            return Comparison(name, float("nan"), exact, False, f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    if exact:
        ok = torch.equal(got.to(want.dtype), want)
        diff = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    else:
        diff = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
        ok = torch.allclose(got.double(), want.double(), atol=ATOL, rtol=RTOL)
    return Comparison(name, diff, exact, ok)


def run_parity(reference: str, folder: str | Path, *, verbose: bool = True, printer=print) -> list[Comparison]:
    """Convert the official weights in ``folder``, run moezoo, compare every ``out.*``; returns the comparisons."""
    mod = get_reference(reference)
    config, state, io, _ = load_folder(folder, mod)
    inputs = {k: v for k, v in io.items() if k.startswith("in.")}
    expected = {k: v for k, v in io.items() if k.startswith("out.")}
    if not expected:
        raise ParityError(f"{folder}: io.safetensors has no out.* tensors")
    module = mod.convert(config, state)
    module.eval()
    with torch.no_grad():
        # references whose outputs are parametrised by their names (e.g. ``generate_pred<N>``) take ``expected=``
        import inspect
        wants_names = "expected" in inspect.signature(mod.run).parameters
        got = mod.run(module, config, inputs, expected=sorted(expected)) if wants_names else mod.run(module, config, inputs)
    exact = set(getattr(mod, "EXACT", ()))
    results = [compare(k, got.get(k), v, k in exact or k.removeprefix("out.") in exact) for k, v in sorted(expected.items())]
    if verbose:
        ref = normalize_reference(reference)
        for c in results:
            status = "ok" if c.ok else "MISMATCH"
            kind = "exact" if c.exact else f"atol={ATOL:g} rtol={RTOL:g}"
            printer(f"{c.name:<40} max_abs_diff={c.max_abs_diff:.3e}  ({kind})  {status}{(' ' + c.note) if c.note else ''}")
        printer(f"{ref}: {sum(c.ok for c in results)}/{len(results)} outputs match")
    return results
