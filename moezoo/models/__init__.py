"""Model families. Every sub-package is imported on ``import moezoo`` so that it registers itself with the registry
and with transformers' Auto classes; a family only has to live in ``moezoo/models/<family>/``.

A family whose optional third-party dependency is missing is skipped (recorded in :data:`SKIPPED`, with the reason);
errors inside moezoo code are raised.
"""
from __future__ import annotations

import importlib
import pkgutil

SKIPPED: dict[str, str] = {}


def _import_families() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.ispkg or info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{__name__}.{info.name}")
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing.split(".")[0] in ("moezoo", "") :
                raise
            SKIPPED[info.name] = f"needs the optional package {missing!r} (pip install {missing.split('.')[0]})"


_import_families()
