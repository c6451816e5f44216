"""Hugging Face Hub glue: model cards rendered from ``model_cards/<family>.md`` and ``push_to_hub``.

A card template is Markdown with a YAML header (``library_name``, ``tags``, ``license``, ``pipeline_tag``,
``datasets``, ``metrics``, ``base_model``); the whole file is a Jinja2 template whose variables describe the model
(``model_name``, ``repo_id``, ``family``, ``model_type``, ``registry_name``, ``total_params``, ``active_params``,
``num_moe_layers``, ``num_layers``, ``num_experts``, ``top_k``, ``router_type``, ``num_shared_experts``,
``hidden_size``, ``num_heads``, ``vocab_size``, ``moezoo_version`` and any ``card_kwargs``).

:func:`push_to_hub` stages the exact folder to upload (weights in safetensors, config, tokenizer, ``README.md``) and
uploads it with :class:`huggingface_hub.HfApi` (``create_repo`` + ``upload_folder``); ``dry_run=True`` stops after
staging and returns the folder. The token comes from the ``token`` argument, ``HF_TOKEN`` or the saved Hugging Face
login; it is never printed (and is redacted from error messages).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

CARD_MARKER = "<!-- moezoo:generated-card -->"
CARD_FIELDS = ("library_name", "license", "pipeline_tag", "tags", "datasets", "metrics", "base_model")
_GENERIC_TEMPLATE = """---
library_name: moezoo
license: apache-2.0
tags:
  - moezoo
  - mixture-of-experts
  - moe
---

# {{ model_name }}

A Mixture-of-Experts model from moezoo (family `{{ family }}`, `model_type = "{{ model_type }}"`):
{{ total_params }} parameters, {{ active_params }} active per token, {{ num_moe_layers }} MoE layers with
{{ num_experts }} experts (top-{{ top_k }}).

```python
import moezoo
from transformers import AutoModel

model = AutoModel.from_pretrained("{{ repo_id }}")
```
"""
_SKIP_NAMES = {".git", ".cache", "__pycache__", ".DS_Store"}


def model_cards_dir() -> Path:
    """The packaged card templates (``moezoo/model_cards``; the repository's ``model_cards/`` links to it)."""
    return Path(str(resources.files("moezoo") / "model_cards"))


def card_template_path(family: str) -> Path | None:
    """``model_cards/<card>.md`` of a family (its registered ``card`` name), or None."""
    from .registry import get_family

    names = [family]
    try:
        entry = get_family(family)
    except ValueError:  # not a registered family: look for a card of that name
        entry = None
    if entry is not None:
        names.insert(0, entry.card or entry.name)
    for n in names:
        p = model_cards_dir() / f"{n}.md"
        if p.is_file():
            return p
    return None


def _resolve_token(token: str | None) -> str | None:
    if token:
        return token
    env = os.environ.get("HF_TOKEN")
    if env:
        return env
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no saved login
        return None


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _fmt(n: float) -> str:
    from .safety import format_count

    return format_count(n)


def _model_facts(config, model=None) -> dict:
    """Template variables describing a model (built on the meta device when only the config is known)."""
    import torch

    import moezoo

    from .registry import family_of_model_type

    fam = family_of_model_type(config.model_type)
    facts = {
        "family": fam.name if fam else config.model_type,
        "model_type": config.model_type,
        "registry_name": getattr(config, "moezoo_model_name", None),
        "architectures": ", ".join(getattr(config, "architectures", None) or []),
        "moezoo_version": moezoo.__version__,
        "num_experts": getattr(config, "num_experts", None),
        "top_k": getattr(config, "num_experts_per_tok", None),
        "router_type": getattr(config, "router_type", None),
        "num_shared_experts": getattr(config, "num_shared_experts", 0),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_heads": getattr(config, "num_attention_heads", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
    }
    if model is None and fam is not None:
        cls = fam.default_class
        archs = getattr(config, "architectures", None) or []
        for c in [fam.model_class, *fam.task_classes.values()]:
            if c.__name__ in archs:
                cls = c
        with torch.device("meta"):
            model = cls(config)
    if model is not None and hasattr(model, "parameter_summary"):
        s = model.parameter_summary()
        facts.update(total_params=_fmt(s["total"]), active_params=_fmt(s["active"]),
                     num_moe_layers=len(s["moe_layers"]))
    return facts


def render_model_card(config, *, repo_id: str | None = None, model=None, template: str | Path | None = None,
                      **card_kwargs):
    """Render the family's card template for ``config`` into a :class:`huggingface_hub.ModelCard`.

    ``card_kwargs`` fill template variables; the YAML fields listed in :data:`CARD_FIELDS` given there (e.g.
    ``base_model="org/x"``, ``datasets=["..."]``, ``license=...``) override the template's header, ``tags`` are added.
    """
    import jinja2
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    facts = _model_facts(config, model)
    if template is None:
        path = card_template_path(facts["family"])
        text = path.read_text() if path is not None else _GENERIC_TEMPLATE
    else:
        text = Path(template).read_text()
    variables = {**facts, "repo_id": repo_id or "<repo_id>",
                 "model_name": card_kwargs.pop("model_name", None) or (repo_id.split("/")[-1] if repo_id
                                                                        else facts["registry_name"] or facts["model_type"])}
    overrides = {k: card_kwargs.pop(k) for k in CARD_FIELDS if k in card_kwargs}
    variables.update(card_kwargs)
    rendered = jinja2.Environment(undefined=jinja2.ChainableUndefined, keep_trailing_newline=True).from_string(text)
    rendered = rendered.render(**variables)
    if not rendered.startswith("---"):
        raise ValueError("a card template must start with a YAML header between '---' lines")
    _, header, body = rendered.split("---", 2)
    meta = yaml.safe_load(header) or {}
    extra_tags = overrides.pop("tags", None) or []
    meta.update(overrides)
    tags = list(meta.get("tags") or [])
    for t in [facts["family"], facts["model_type"], *extra_tags]:
        if t and t not in tags:
            tags.append(t)
    meta["tags"] = tags
    meta = {k: v for k, v in meta.items() if v not in (None, [], "", {})}
    data = ModelCardData(**meta)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{CARD_MARKER}\n{body.lstrip()}")


def _load_config(folder: Path):
    import moezoo  # noqa: F401  (registers the families)
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(folder)!r} has no config.json: expected a folder written by save_pretrained")
    return AutoConfig.from_pretrained(str(folder))


def stage_upload_folder(src, dest: str | Path, *, repo_id: str, tokenizer=None, allow_pickle: bool = False,
                        card_kwargs: dict | None = None) -> Path:
    """Write the exact folder that :func:`push_to_hub` uploads into ``dest`` (created; must be empty) and return it.

    ``src`` is a model (saved with ``save_pretrained``, safetensors) or a folder (its files are copied; pickled
    weights are refused unless ``allow_pickle``). ``README.md`` is the rendered card, unless the folder brings its
    own README that moezoo did not generate.
    """
    from .safety import PICKLE_SUFFIXES, PickleCheckpointError, pickle_refusal_message

    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"staging folder {str(dest)!r} is not empty; give a new or empty folder")
    model = None
    if isinstance(src, (str, os.PathLike)):
        src = Path(src)
        if not src.is_dir():
            raise ValueError(f"{str(src)!r} is not a folder: expected a folder written by save_pretrained")
        files = [p for p in sorted(src.rglob("*")) if p.is_file()
                 and not any(part in _SKIP_NAMES for part in p.relative_to(src).parts)]
        pickled = [p.name for p in files if p.name.lower().endswith(PICKLE_SUFFIXES)]
        if pickled and not allow_pickle:
            raise PickleCheckpointError(pickle_refusal_message(f"folder {str(src)!r} ({', '.join(pickled)})"))
        config = _load_config(src)
        dest.mkdir(parents=True, exist_ok=True)
        for p in files:
            target = dest / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, target)
    else:
        model = src
        dest.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(dest))
        config = model.config
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dest))
    readme = dest / "README.md"
    if not readme.exists() or CARD_MARKER in readme.read_text(errors="ignore"):
        card = render_model_card(config, repo_id=repo_id, model=model, **dict(card_kwargs or {}))
        card.save(str(readme))
    return dest


def push_to_hub(src, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, dry_run: bool = False, staging_dir: str | Path | None = None,
                tokenizer=None, card_kwargs: dict | None = None, allow_pickle: bool = False, printer=print):
    """Upload a model (or a ``save_pretrained`` folder) to ``repo_id`` with a rendered model card.

    Returns the staged folder (``dry_run=True``) or the commit URL. With ``dry_run`` nothing touches the network: the
    folder that would be uploaded is written to ``staging_dir`` (default: a new temporary folder) and its path and
    files are printed.
    """
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"repo_id must look like 'user/name' or 'name', got {repo_id!r}")
    cleanup = staging_dir is None and not dry_run
    stage = Path(staging_dir) if staging_dir is not None else \
        Path(tempfile.mkdtemp(prefix=f"moezoo-push-{repo_id.replace('/', '--')}-"))
    stage = stage_upload_folder(src, stage, repo_id=repo_id, tokenizer=tokenizer, allow_pickle=allow_pickle,
                                card_kwargs=card_kwargs)
    files = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
    if dry_run:
        printer(f"dry run: would upload {len(files)} files to https://huggingface.co/{repo_id}"
                f"{' (private)' if private else ''} from {stage}")
        for f in files:
            printer(f"  {f}  ({(stage / f).stat().st_size} bytes)")
        return stage
    token = _resolve_token(token)
    if not token:
        raise ValueError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (the token is never "
                         "printed)")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(stage), repo_type="model",
                                 commit_message=commit_message or "Upload moezoo model")
    except Exception as exc:  # noqa: BLE001 - re-raise without ever echoing the token
        raise RuntimeError(f"upload to {repo_id!r} failed: {_redact(str(exc), token)}") from None
    finally:
        if cleanup:
            shutil.rmtree(stage, ignore_errors=True)
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    printer(f"uploaded {len(files)} files to https://huggingface.co/{repo_id}")
    return url

