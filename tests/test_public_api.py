"""Every name a moezoo module lists in ``__all__`` exists (a stale name breaks ``from module import *``)."""
import importlib
import pkgutil

import moezoo


def _modules():
    for info in pkgutil.walk_packages(moezoo.__path__, prefix="moezoo."):
        if info.name.endswith("__main__"):
            continue
        yield info.name


def test_all_names_exist_in_every_module():
    stale = {}
    for name in _modules():
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # an optional dependency that is not installed
            assert not (exc.name or "").startswith("moezoo"), f"{name}: {exc}"
            continue
        missing = [n for n in getattr(mod, "__all__", ()) if not hasattr(mod, n)]
        if missing:
            stale[name] = missing
    assert not stale, f"__all__ names that do not exist: {stale}"
