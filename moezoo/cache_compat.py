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
from transformers.cache_utils import Cache, DynamicLayer
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


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose storage is allocated once for ``max_cache_len`` positions.

    Same semantics as transformers' ``DynamicLayer`` (``keys`` / ``values`` are exactly the filled positions, so masks,
    lengths and attention cost are unchanged), but ``update`` writes the new states into the buffer in place and
    returns views of its filled prefix: no concatenation (a full copy of the cache) per decoding step. Unlike
    ``StaticLayer`` the attention sees only the filled positions, not all ``max_cache_len``. Writing past the buffer
    reallocates it (twice as large), as does anything that replaced ``keys`` by another tensor (``reorder_cache``,
    ``batch_select_indices`` ...), so every Cache method inherited from ``DynamicLayer`` keeps working.
    """

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        self.max_cache_len = max_cache_len
        self._kbuf = self._vbuf = None

    def _fits(self, key_states: torch.Tensor, value_states: torch.Tensor, n: int, new: int) -> bool:
        kb, vb = self._kbuf, self._vbuf
        if kb is None or new > kb.shape[-2] or kb.shape[:2] != key_states.shape[:2] or kb.dtype != key_states.dtype \
                or kb.device != key_states.device or vb.shape[-1] != value_states.shape[-1] \
                or kb.shape[-1] != key_states.shape[-1]:
            return False
        return n == 0 or (self.keys._base is kb and self.values._base is vb)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.get_seq_length()
        new = n + key_states.shape[-2]
        if not self._fits(key_states, value_states, n, new):
            cap = max(new, self.max_cache_len if self._kbuf is None else 2 * self._kbuf.shape[-2])
            B, H = key_states.shape[:2]
            kb = key_states.new_empty(B, H, cap, key_states.shape[-1])
            vb = value_states.new_empty(B, H, cap, value_states.shape[-1])
            if n:
                kb[:, :, :n].copy_(self.keys)
                vb[:, :, :n].copy_(self.values)
            self._kbuf, self._vbuf = kb, vb
        self._kbuf[:, :, n:new].copy_(key_states)
        self._vbuf[:, :, n:new].copy_(value_states)
        self.keys, self.values = self._kbuf[:, :, :new], self._vbuf[:, :, :new]
        return self.keys, self.values


class PreallocatedCache(Cache):
    """A transformers ``Cache`` of :class:`PreallocatedLayer` (``num_layers`` of them, ``max_cache_len`` positions
    each): decoding with a known final length (Time-MoE's ``generate`` / ``forecast``) writes in place."""

    def __init__(self, num_layers: int, max_cache_len: int):
        super().__init__(layers=[PreallocatedLayer(max_cache_len) for _ in range(num_layers)])


__all__ = ["CACHE_FIELD", "resolve_cache", "causal_mask", "cache_kwargs", "output_cache", "PreallocatedLayer",
           "PreallocatedCache"]
