"""Every generating model follows transformers' cache convention (``past_key_values`` -> ``cache`` rename).

For each generating family: greedy ``generate`` with the KV cache equals ``generate`` without it (token for token; value
for value for Time-MoE), generation continued from a returned cache equals generation from scratch, ``forward`` takes
``cache=`` and the old ``past_key_values=``, refuses both at once and refuses a cache of the wrong type, outputs carry the
cache under the name the installed transformers uses, and none of this raises a deprecation warning from our code.
"""
from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
from moezoo.cache_compat import CACHE_FIELD, cache_kwargs, output_cache  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast  # noqa: E402

# name -> (registry name, make inputs(generator) -> prompt)
GENERATING = {
    "moezoo_lm": ("lm_small_e16k2", lambda g: torch.randint(1, 128, (2, 7), generator=g)),
    "time_moe": ("time_moe_tiny_e4k2", lambda g: torch.randn(2, 12, generator=g).cumsum(1)),
    "vl_moe": ("vl_moe_smol_e4k2", lambda g: torch.randint(1, 128, (2, 7), generator=g)),
    # flat layout: one row per codebook (4), the text prompt repeated on each, ending with the BOS frame (id 64 + 18)
    "audio_moe": ("audio_moe_small_e8k2", lambda g: torch.cat([torch.randint(1, 64, (2, 6), generator=g)
                                                                .repeat_interleave(4, 0), torch.full((8, 1), 82)], 1)),
}


def _model(name):
    torch.manual_seed(0)
    return moezoo.create_model(GENERATING[name][0], tiny=True).eval()


def _prompt(name):
    return GENERATING[name][1](torch.Generator().manual_seed(1))


def _same(name, a, b):
    if name == "time_moe":
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    else:
        assert torch.equal(a, b), f"{a}\n!=\n{b}"


def test_every_generating_family_is_covered():
    """A new family whose model generates must be added to GENERATING (it fails here until it is)."""
    from transformers.generation import GenerationMixin

    generating = {
        fam for fam in moezoo.registry.list_families()
        if any(issubclass(cls, GenerationMixin) for cls in (*moezoo.registry.get_family(fam).task_classes.values(), moezoo.registry.get_family(fam).model_class))
    }
    assert generating == set(GENERATING), f"generating families {sorted(generating)} vs tested {sorted(GENERATING)}"


@pytest.mark.parametrize("name", sorted(GENERATING))
def test_greedy_generate_with_cache_equals_without(name):
    m, x = _model(name), _prompt(name)
    kw = {"pad_token_id": 0} if name == "moezoo_lm" else {}
    with torch.no_grad():
        a = m.generate(x, max_new_tokens=12, do_sample=False, use_cache=True, **kw)
        b = m.generate(x, max_new_tokens=12, do_sample=False, use_cache=False, **kw)
    assert a.shape[1] == x.shape[1] + 12
    _same(name, a, b)


def test_lm_generate_continued_from_returned_cache_equals_from_scratch():
    m, x = _model("moezoo_lm"), _prompt("moezoo_lm")
    with torch.no_grad():
        full = m.generate(x, max_new_tokens=10, do_sample=False, pad_token_id=0)
        first = m.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        cache = output_cache(first)
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == first.sequences.shape[1] - 1
        rest = m.generate(first.sequences, max_new_tokens=6, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    assert torch.equal(rest, full)


def test_time_moe_generate_continued_from_returned_cache_equals_from_scratch():
    m, x = _model("time_moe"), _prompt("time_moe")
    with torch.no_grad():
        full = m.generate(x, max_new_tokens=9)
        prefix = m(input_ids=x[:, :8], use_cache=True)
        cache = output_cache(prefix)
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 8
        cont = m.generate(x, max_new_tokens=9, **cache_kwargs(cache))
    torch.testing.assert_close(cont, full, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="cache already holds"):
        m.generate(x[:, :8], max_new_tokens=2, **cache_kwargs(output_cache(m(input_ids=x[:, :8], use_cache=True))))


@pytest.mark.parametrize("name", sorted(GENERATING))
def test_forward_takes_cache_under_both_names(name):
    m, x = _model(name), _prompt(name)
    with torch.no_grad():
        full = m(x, use_cache=False).logits[:, -1]
        new = m(x[:, :-1], use_cache=True)
        assert isinstance(new, MoeCausalLMOutputWithPast)
        assert CACHE_FIELD in new and isinstance(output_cache(new), DynamicCache)
        step_new = m(x[:, -1:], cache=output_cache(new), use_cache=True).logits[:, -1]
        old = m(x[:, :-1], use_cache=True)
        step_old = m(x[:, -1:], past_key_values=output_cache(old), use_cache=True).logits[:, -1]
    torch.testing.assert_close(step_new, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step_old, step_new, atol=0, rtol=0)
    base = m.model(x, use_cache=True)
    assert isinstance(base, MoeModelOutputWithPast) and isinstance(output_cache(base), DynamicCache)


@pytest.mark.parametrize("name", sorted(GENERATING))
def test_bad_cache_arguments_raise(name):
    m, x = _model(name), _prompt(name)
    c = DynamicCache(config=m.config)
    with pytest.raises(ValueError, match="both `cache` and `past_key_values`"):
        m(x, cache=c, past_key_values=DynamicCache(config=m.config))
    with pytest.raises(TypeError, match="`past_key_values` must be a transformers Cache"):
        m(x, past_key_values=((torch.zeros(1), torch.zeros(1)),), use_cache=True)
    with pytest.raises(TypeError, match="`cache` must be a transformers Cache"):
        m.model(x, cache="not a cache")


@pytest.mark.parametrize("name", sorted(GENERATING))
def test_no_deprecation_warning_from_our_code(name):
    """Warnings that transformers' deprecations attribute to moezoo (stacklevel) fail here, as does transformers'
    logged `past_key_values ... deprecated` notice."""
    from transformers.utils import logging as hf_logging

    m, x = _model(name), _prompt(name)
    hf_logging.warning_once.cache_clear()  # transformers logs each deprecation notice once per process
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", category=DeprecationWarning, module="moezoo")
            warnings.filterwarnings("error", category=FutureWarning, module="moezoo")
            with torch.no_grad():
                m.generate(x, max_new_tokens=3, **({"pad_token_id": 0} if name == "moezoo_lm" else {}))
                out = m(x, use_cache=True)
                m(x[:, -1:], cache=output_cache(out), use_cache=True)
    finally:
        root.removeHandler(handler)
    assert not [msg for msg in messages if "deprecat" in msg.lower()], messages
