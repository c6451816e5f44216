"""timm-style model registry: registered names -> (family, config class, default config, tiny overrides, builder).

Families register once with :func:`register_family` (which also registers their config and model classes with
transformers' ``AutoConfig`` / ``AutoModel`` / task Auto classes), and each size with the :func:`register_model`
decorator::

    @register_model(family="moezoo_lm", config=dict(hidden_size=256, num_experts=8, num_experts_per_tok=2, ...),
                    tiny=dict(hidden_size=32, num_hidden_layers=2))
    def lm_tiny_e8k2(config):
        return MoezooLMForCausalLM(config)

Names follow ``<family>_<size>_e<E>k<K>[.<tag>]``; every entry has a tiny variant (``create_model(name, tiny=True)``)
that keeps at least two MoE layers and ``num_experts > num_experts_per_tok``.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Callable

# keyword arguments every PretrainedConfig accepts besides its dataclass fields
_CONFIG_KWARGS = {"attn_implementation", "experts_implementation", "torch_dtype", "output_attentions", "name_or_path",
                  "num_labels", "rope_theta", "rope_scaling"}

NAME_RE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*(?:\.[a-z0-9][a-z0-9_]*)?$")
EK_RE = re.compile(r"_e(\d+)k(\d+)(?:$|[._])")


@dataclass
class FamilyEntry:
    """A model family: its config class, base model class and task classes (``{auto class name: model class}``)."""

    name: str
    config_class: type
    model_class: type
    task_classes: dict = field(default_factory=dict)
    card: str | None = None
    description: str = ""
    default_class: type | None = None

    @property
    def model_type(self) -> str:
        return self.config_class.model_type


@dataclass
class ModelEntry:
    """One registered model name."""

    name: str
    family: str
    builder: Callable
    config_class: type
    default_config: dict
    tiny_overrides: dict
    pretrained: tuple = ()
    description: str = ""

    def config_kwargs(self, tiny: bool = False, **overrides) -> dict:
        kwargs = dict(self.default_config)
        if tiny:
            kwargs.update(self.tiny_overrides)
        kwargs.update(overrides)
        return kwargs

    def make_config(self, tiny: bool = False, **overrides):
        _check_overrides(self, overrides)
        config = self.config_class(**self.config_kwargs(tiny, **overrides))
        config.moezoo_model_name = self.name + (".tiny" if tiny else "")
        return config

    @property
    def experts_and_k(self) -> tuple[int, int] | None:
        """(E, K): written in the name (``..._e8k2``), else the config's ``num_experts`` / ``num_experts_per_tok``
        (e.g. ``time_moe_50m``); None for a model without routed experts."""
        m = EK_RE.search(self.name)
        if m:
            return int(m.group(1)), int(m.group(2))
        config = self.make_config()
        e, k = getattr(config, "num_experts", None), getattr(config, "num_experts_per_tok", None)
        return (e, k) if isinstance(e, int) and isinstance(k, int) and e > 0 else None


_FAMILIES: dict[str, FamilyEntry] = {}
_MODELS: dict[str, ModelEntry] = {}


class UnknownModelError(ValueError):
    """A name that is not in the registry (the message suggests close names)."""


def normalize_family(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _family_key(name: str) -> str | None:
    n = normalize_family(name)
    if n in _FAMILIES:
        return n
    if "moezoo_" + n in _FAMILIES:
        return "moezoo_" + n
    for key, fam in _FAMILIES.items():
        if fam.model_type == n:
            return key
    return None


def register_family(name: str, *, config_class: type, model_class: type, task_classes: dict | None = None,
                    card: str | None = None, description: str = "", default_class: type | None = None) -> FamilyEntry:
    """Register a family and its classes with transformers' Auto classes (no ``trust_remote_code`` needed).

    Args:
        name: family name (the folder under ``moezoo/models``), e.g. ``"moezoo_lm"``.
        config_class: a :class:`moezoo.MoezooConfig` subclass with a unique ``model_type``.
        model_class: the base model (registered with ``AutoModel``).
        task_classes: ``{auto class or its name: model class}``, e.g. ``{"AutoModelForCausalLM": MoezooLMForCausalLM}``.
        card: model card template name in ``model_cards/`` (default: ``<name>.md``).
        default_class: the class registry builders return by default (default: the first task class, else the model).
    """
    import transformers
    from transformers import AutoConfig, AutoModel

    name = normalize_family(name)
    if not getattr(config_class, "model_type", ""):
        raise ValueError(f"config_class {config_class.__name__} has no model_type")
    existing = _FAMILIES.get(name)
    if existing is not None and existing.config_class.__qualname__ != config_class.__qualname__:
        raise ValueError(f"family {name!r} is already registered with {existing.config_class.__name__}")
    tasks = {}
    for auto, cls in (task_classes or {}).items():
        auto_cls = getattr(transformers, auto) if isinstance(auto, str) else auto
        tasks[auto_cls.__name__] = cls
        auto_cls.register(config_class, cls, exist_ok=True)
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    entry = FamilyEntry(name, config_class, model_class, tasks, card or name, description,
                        default_class or (next(iter(tasks.values())) if tasks else model_class))
    _FAMILIES[name] = entry
    return entry


def register_model(name: str | None = None, *, family: str, config: dict | None = None, tiny: dict | None = None,
                   config_class: type | None = None, pretrained: tuple | list = (), description: str | None = None):
    """Decorator registering ``fn(config) -> model`` under ``name`` (default: the function name).

    Args:
        family: a family registered with :func:`register_family` (its config class is used by default).
        config: the default config kwargs of this size.
        tiny: overrides for the tiny variant (>= 2 MoE layers, num_experts > num_experts_per_tok).
        pretrained: hub repo ids holding weights of this name (see :func:`list_pretrained`).
        description: one line for ``moezoo list`` (default: the first line of the docstring).
    """
    def deco(fn: Callable) -> Callable:
        reg_name = name or fn.__name__
        if not NAME_RE.match(reg_name):
            raise ValueError(f"model name {reg_name!r} must be lowercase <family>_<size>_e<E>k<K>[.<tag>] "
                             "(letters, digits, '_' and one optional '.tag')")
        fam_key = _family_key(family)
        if fam_key is None:
            raise ValueError(f"family {family!r} is not registered; call register_family first "
                             f"(registered: {sorted(_FAMILIES)})")
        fam = _FAMILIES[fam_key]
        old = _MODELS.get(reg_name)
        if old is not None and (old.builder.__module__, old.builder.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"model name {reg_name!r} is already registered by {old.builder.__module__}")
        desc = description if description is not None else ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        _MODELS[reg_name] = ModelEntry(reg_name, fam_key, fn, config_class or fam.config_class, dict(config or {}),
                                       dict(tiny or {}), tuple(pretrained), desc)
        return fn

    return deco


def _suggest(name: str, candidates) -> list[str]:
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    stem = name.split(".")[0]
    for c in candidates:
        if (stem and (c.startswith(stem) or stem in c)) and c not in close:
            close.append(c)
    return close[:5]


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name`` (``-`` and ``_`` interchangeable); unknown names raise with suggestions."""
    if not isinstance(name, str) or not name:
        raise UnknownModelError(f"model name must be a non-empty str, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    if key in _MODELS:
        return _MODELS[key]
    close = _suggest(key, _MODELS)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownModelError(f"unknown model name {name!r}{hint} (see moezoo.list_models(); "
                            f"{len(_MODELS)} models registered)")


def _check_overrides(entry: ModelEntry, overrides: dict) -> None:
    fields = {f.name for f in dataclasses.fields(entry.config_class)}
    bad = [k for k in overrides if k not in fields and k not in _CONFIG_KWARGS]
    if bad:
        msgs = []
        for k in bad:
            close = difflib.get_close_matches(k, sorted(fields), n=3)
            msgs.append(f"{k!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(f"unknown config override(s) for {entry.name} ({entry.config_class.__name__}): "
                         f"{', '.join(msgs)}")


def get_model_config(name: str, tiny: bool = False, **overrides):
    """The config of a registered model (``tiny=True`` for the tiny variant), with ``overrides`` applied."""
    return get_model_entry(name).make_config(tiny, **overrides)


def create_model(name: str, tiny: bool = False, pretrained: bool | str = False, **overrides):
    """Build a registered model with fresh weights (or its hub weights with ``pretrained=True`` / a repo id).

    Args:
        name: a registered name (``moezoo.list_models()``); unknown names raise with close suggestions.
        tiny: build the tiny variant (for tests and CPU demos).
        pretrained: load the first (or the given) repo of ``list_pretrained(name)``.
        overrides: config fields to change (unknown field names raise ``ValueError``).
    """
    entry = get_model_entry(name)
    if pretrained:
        repos = list(entry.pretrained)
        repo = pretrained if isinstance(pretrained, str) else (repos[0] if repos else None)
        if repo is None:
            raise ValueError(f"{entry.name} has no pretrained weights registered (moezoo.list_pretrained() lists them)")
        fam = _FAMILIES[entry.family]
        return fam.default_class.from_pretrained(repo, **overrides)
    config = entry.make_config(tiny, **overrides)
    model = entry.builder(config)
    if model is None:
        model = _FAMILIES[entry.family].default_class(config)
    return model


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Sorted registered names matching the glob ``pattern`` (and ``family``, e.g. ``"moezoo_lm"`` or ``"lm"``)."""
    fam_key = None
    if family is not None:
        fam_key = _family_key(family)
        if fam_key is None:
            return []
    pat = pattern.lower().replace("-", "_") if pattern else "*"
    if not any(ch in pat for ch in "*?["):
        pat = f"*{pat}*"
    return sorted(n for n, e in _MODELS.items() if fnmatch.fnmatchcase(n, pat) and (fam_key is None or e.family == fam_key))


def list_pretrained(pattern: str = "*") -> list[str]:
    """``name`` / repo-id pairs with hub weights, as ``"<name>:<repo_id>"`` (empty while nothing is published)."""
    out = []
    for n in list_models(pattern):
        out.extend(f"{n}:{repo}" for repo in _MODELS[n].pretrained)
    return out


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def get_family(name: str) -> FamilyEntry:
    key = _family_key(name)
    if key is None:
        close = difflib.get_close_matches(normalize_family(name), list(_FAMILIES), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown family {name!r}{hint} (registered: {sorted(_FAMILIES)})")
    return _FAMILIES[key]


def family_of_model_type(model_type: str) -> FamilyEntry | None:
    for fam in _FAMILIES.values():
        if fam.model_type == model_type:
            return fam
    return None


# ---------------------------------------------------------------------------------------------- README model table
README_START = "<!-- registry:start (generated by `moezoo list --update-readme README.md`; a test keeps it in sync) -->"
README_END = "<!-- registry:end -->"


def models_markdown() -> str:
    """The README table of registered families and models."""
    lines = ["| family | model_type | registered models |", "|---|---|---|"]
    for fam in list_families():
        entry = _FAMILIES[fam]
        names = ", ".join(f"`{n}`" for n in list_models(family=fam)) or "-"
        lines.append(f"| `{fam}` | `{entry.model_type}` | {names} |")
    return "\n".join(lines)


def update_readme(path: str = "README.md", check: bool = False) -> bool:
    """Rewrite the generated block of ``path``; with ``check=True`` only report whether it is in sync."""
    from pathlib import Path

    p = Path(path)
    text = p.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path} lacks the markers {README_START!r} ... {README_END!r}")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_START}\n{models_markdown()}\n{README_END}{tail}"
    if check:
        return new == text
    if new != text:
        p.write_text(new)
    return True


if __name__ == "__main__":  # moezoo list --update-readme README.md
    import sys

    import moezoo  # noqa: F401  (registers every family, in the importable moezoo.registry, not this __main__)
    from moezoo.registry import update_readme as _update

    _update(sys.argv[1] if len(sys.argv) > 1 else "README.md")
