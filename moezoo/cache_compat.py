"""transformers' KV-cache naming, in one place, for every generating moezoo model.

transformers renames the cache argument and output field from ``past_key_values`` to ``cache`` (5.24: outputs and
``create_causal_mask``; 5.24/5.25: ``generate`` passes ``cache=`` to ``forward`` and reads ``outputs["cache"]``; the old
names go away in 5.40 / 6.0). Our models take ``cache=`` (the new name) and still accept ``past_key_values=`` from user
code, and build their outputs and masks with whatever name the installed transformers declares. Every choice here is a
feature check on transformers' own objects, never a version-string comparison.
"""
from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import MoeModelOutputWithPast

#: name of the cache field in transformers' output classes (``"cache"`` from 5.24 on, ``"past_key_values"`` before)
CACHE_FIELD: str = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_CACHE_ARG: str = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def resolve_cache(cache: Cache | None = None, past_key_values: Cache | None = None) -> Cache | None:
    """The one KV cache a ``forward`` was given, under its new name ``cache`` or its old name ``past_key_values``.

    Raises ``ValueError`` when both are given and ``TypeError`` for anything that is not a transformers ``Cache``
    (legacy tuple-of-tuples caches included), instead of silently decoding without the prefix.
    """
    if cache is not None and past_key_values is not None:
        raise ValueError("got both `cache` and `past_key_values`: pass the KV cache once, as `cache=` "
                         "(`past_key_values` is its old name)")
    found, name = (cache, "cache") if cache is not None else (past_key_values, "past_key_values")
    if found is not None and not isinstance(found, Cache):
        raise TypeError(f"`{name}` must be a transformers Cache (e.g. transformers.DynamicCache), got "
                        f"{type(found).__name__}; legacy tuple caches are not supported")
    return found


def causal_mask(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None,
                position_ids: torch.Tensor | None):
    """``transformers.masking_utils.create_causal_mask`` with the cache passed under the installed name."""
    return create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              position_ids=position_ids, **{_MASK_CACHE_ARG: cache})


def cache_kwargs(cache: Cache | None) -> dict:
    """``{CACHE_FIELD: cache}``: build a transformers output with the cache under the installed field name."""
    return {CACHE_FIELD: cache}


def output_cache(output) -> Cache | None:
    """The cache held by a model output, read under the installed field name (no deprecation warning)."""
    return getattr(output, CACHE_FIELD, None)


__all__ = ["CACHE_FIELD", "resolve_cache", "causal_mask", "cache_kwargs", "output_cache"]
