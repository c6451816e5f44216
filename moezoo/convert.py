"""``moezoo convert REFERENCE SRC DST``: official checkpoints -> moezoo folders.

Two kinds of converters:

- full-model converters, registered by families with ``@register_converter("<reference>")`` (in
  ``moezoo/models/<family>/convert_<ref>.py``, discovered automatically); they are called ``fn(src, dst, **options)``
  and write a ``save_pretrained`` folder to ``dst``;
- block references (``moezoo.parity.available_references()``): ``SRC`` is a folder with ``config.json`` and the
  official weights (``model.safetensors``, or pickles with ``allow_pickle=True``), converted with the reference
  module's ``convert(config, state_dict)``. ``DST`` gets ``model.safetensors`` (the converted module's weights),
  ``moezoo_module.json`` (how to rebuild it: class + ``init_kwargs``, containers as nested specs) and
  ``reference_config.json`` (the official config, so ``reference.run(module, config, inputs)`` still works).
  :func:`load_converted` rebuilds the module.

``-`` and ``_`` are interchangeable in reference names.
"""
from __future__ import annotations

import difflib
import importlib
import json
import pkgutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

MODULE_JSON = "moezoo_module.json"
WEIGHTS = "model.safetensors"
REFERENCE_CONFIG = "reference_config.json"
FORMAT = "moezoo.module"
_ALLOWED_CLASS_PREFIXES = ("moezoo.", "torch.nn.")

CONVERTERS: dict[str, Callable] = {}


def normalize_reference(name: str) -> str:
    return name.strip().replace("-", "_").lower()


def register_converter(reference: str):
    """Decorator registering a full-model converter ``fn(src, dst, **options) -> dst`` for ``reference``."""
    key = normalize_reference(reference)
    if not key:
        raise ValueError("register_converter needs a non-empty reference name")

    def deco(fn: Callable) -> Callable:
        old = CONVERTERS.get(key)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"a converter for {key!r} is already registered by {old.__module__}.{old.__qualname__}")
        CONVERTERS[key] = fn
        return fn

    return deco


def _discover_converters() -> None:
    """Import every ``moezoo.models.<family>.convert_*`` module so that its ``@register_converter`` runs."""
    import moezoo.models as models

    for fam in pkgutil.iter_modules(models.__path__):
        if not fam.ispkg or fam.name in getattr(models, "SKIPPED", {}):
            continue
        pkg = importlib.import_module(f"moezoo.models.{fam.name}")
        for mod in pkgutil.iter_modules(pkg.__path__):
            if mod.name.startswith("convert"):
                try:
                    importlib.import_module(f"moezoo.models.{fam.name}.{mod.name}")
                except ModuleNotFoundError as exc:  # a converter needing a missing optional package is skipped
                    if (exc.name or "moezoo").split(".")[0] == "moezoo":
                        raise


def available_converters() -> dict[str, str]:
    """``{reference: "model" | "block"}`` for every reference ``moezoo convert`` accepts."""
    from moezoo.parity import available_references

    _discover_converters()
    out = {r: "block" for r in available_references()}
    out.update({r: "model" for r in CONVERTERS})
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------------ module specs (JSON)
def _to_json(value, where: str):
    if isinstance(value, torch.dtype):
        return {"__torch_dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError(f"{where}: dict keys must be str to be written as JSON")
        return {k: _to_json(v, f"{where}.{k}") for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"{where}: a {type(value).__name__} cannot be written to {MODULE_JSON}; converters must build "
                     "modules from plain keyword arguments (numbers, strings, lists, dicts, torch dtypes)")


def _from_json(value):
    if isinstance(value, dict):
        if set(value) == {"__torch_dtype__"}:
            dt = getattr(torch, value["__torch_dtype__"], None)
            if not isinstance(dt, torch.dtype):
                raise ValueError(f"unknown torch dtype {value['__torch_dtype__']!r} in {MODULE_JSON}")
            return dt
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def module_spec(module: nn.Module, where: str = "module") -> dict:
    """A JSON-able description of how to rebuild ``module`` (weights excluded)."""
    if isinstance(module, nn.ModuleDict):
        return {"type": "ModuleDict", "children": {k: module_spec(v, f"{where}.{k}") for k, v in module.items()}}
    if isinstance(module, (nn.ModuleList, nn.Sequential)):
        kind = "ModuleList" if isinstance(module, nn.ModuleList) else "Sequential"
        return {"type": kind, "children": [module_spec(v, f"{where}[{i}]") for i, v in enumerate(module)]}
    init_kwargs = getattr(module, "init_kwargs", None)
    if not isinstance(init_kwargs, dict):
        raise ValueError(f"{where}: {type(module).__name__} has no init_kwargs dict, so it cannot be rebuilt from "
                         f"{MODULE_JSON} (converters should return MoELayer-like modules or ModuleDict/ModuleList of them)")
    cls = type(module)
    return {"type": "module", "class": f"{cls.__module__}:{cls.__qualname__}",
            "init_kwargs": _to_json(init_kwargs, f"{where}.init_kwargs")}


def build_from_spec(spec: dict) -> nn.Module:
    """Rebuild a module (fresh weights) from :func:`module_spec` output. Only moezoo / torch.nn classes are allowed."""
    kind = spec.get("type")
    if kind == "ModuleDict":
        return nn.ModuleDict({k: build_from_spec(v) for k, v in spec["children"].items()})
    if kind in ("ModuleList", "Sequential"):
        children = [build_from_spec(v) for v in spec["children"]]
        return nn.ModuleList(children) if kind == "ModuleList" else nn.Sequential(*children)
    if kind != "module":
        raise ValueError(f"unknown module spec type {kind!r} in {MODULE_JSON}")
    path = spec["class"]
    mod_name, _, qual = path.partition(":")
    if not mod_name.startswith(_ALLOWED_CLASS_PREFIXES):
        raise ValueError(f"{MODULE_JSON} names class {path!r}; only moezoo.* and torch.nn.* classes are rebuilt")
    obj = importlib.import_module(mod_name)
    for part in qual.split("."):
        obj = getattr(obj, part)
    build = getattr(obj, "from_init_kwargs", obj)  # layers built by a factory (MoELayer: build_moe_layer)
    return build(**_from_json(spec["init_kwargs"]))


def save_converted(module: nn.Module, dst: str | Path, *, reference: str | None = None,
                   reference_config: dict | None = None, source: str | None = None) -> Path:
    """Write ``module`` to the folder ``dst`` (safetensors weights + rebuild JSON [+ the official config])."""
    from safetensors.torch import save_model

    spec = module_spec(module)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_model(module, str(dst / WEIGHTS))
    meta = {"format": FORMAT, "version": 1, "reference": reference, "source": source, "module": spec}
    (dst / MODULE_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    if reference_config is not None:
        (dst / REFERENCE_CONFIG).write_text(json.dumps(reference_config, indent=2) + "\n")
    return dst


def load_converted(folder: str | Path) -> nn.Module:
    """Rebuild the module written by :func:`save_converted` and load its weights (strict)."""
    from safetensors.torch import load_model

    folder = Path(folder)
    meta_path = folder / MODULE_JSON
    if not meta_path.is_file():
        raise ValueError(f"{str(folder)!r} has no {MODULE_JSON}: not a folder written by `moezoo convert` for a block "
                         "reference")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    module = build_from_spec(meta["module"])
    missing, unexpected = load_model(module, str(folder / WEIGHTS), strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the rebuilt module (missing {sorted(missing)}, unexpected "
                         f"{sorted(unexpected)})")
    return module.eval()


# ------------------------------------------------------------------------------------------------ reading sources
def convert_block(reference: str, src: str | Path, dst: str | Path, *, config: str | Path | dict | None = None,
                  allow_pickle: bool = False, **options) -> Path:
    """Convert an official block checkpoint with the parity reference's ``convert`` and write ``dst``."""
    from moezoo.parity import get_reference

    from .checkpoints import load_official_checkpoint

    mod = get_reference(reference)
    src = Path(src)
    if config is None and src.exists() and not ((src if src.is_dir() else src.parent) / "config.json").is_file():
        raise ValueError(f"no config.json next to {str(src)!r}; pass config= (CLI: --config PATH)")
    config, state = load_official_checkpoint(src, allow_pickle=allow_pickle, config=config)
    module = mod.convert(config, state, **options)
    return save_converted(module, dst, reference=normalize_reference(reference), reference_config=config,
                          source=str(src))


def convert(reference: str, src: str | Path, dst: str | Path, **options) -> Path:
    """Dispatch ``moezoo convert``: a registered full-model converter, else a parity block reference."""
    from moezoo.parity import available_references

    key = normalize_reference(reference)
    _discover_converters()
    if key in CONVERTERS:
        out = CONVERTERS[key](Path(src), Path(dst), **options)
        return Path(out) if out is not None else Path(dst)
    if key in available_references():
        return convert_block(key, src, dst, **options)
    known = sorted(set(CONVERTERS) | set(available_references()))
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"no converter for reference {reference!r}{hint} (available: {', '.join(known) or 'none'})")
