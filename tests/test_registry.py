"""Every registered model (tiny config): forward, backward, router outputs, save -> from_pretrained, Auto round trip;
the registry API (names, suggestions, overrides, decorator) and the README table in sync with the registry."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
from moezoo import registry  # noqa: E402
from moezoo.core import MoELayer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAMES = moezoo.list_models()


def _forward(model, inputs, seed=0):
    torch.manual_seed(seed)
    return model(**inputs)


def _main_tensor(out):
    for key in ("logits", "prediction", "predictions", "sample", "last_hidden_state"):
        v = getattr(out, key, None) if hasattr(out, key) else (out.get(key) if isinstance(out, dict) else None)
        if isinstance(v, torch.Tensor):
            return v
    return next(v for v in out.values() if isinstance(v, torch.Tensor))


def test_registry_is_not_empty_and_has_the_first_model():
    assert "lm_tiny_e8k2" in NAMES and "lm_small_e16k2" in NAMES
    assert "moezoo_lm" in moezoo.list_families()


@pytest.mark.parametrize("name", NAMES)
def test_tiny_config_keeps_moe(name):
    entry = moezoo.get_model_entry(name)
    config = moezoo.get_model_config(name, tiny=True)
    assert config.num_experts > config.num_experts_per_tok, "tiny config must keep num_experts > top_k"
    model = moezoo.create_model(name, tiny=True)
    assert len(model.moe_layers()) >= 2, "tiny config must keep at least two MoE layers"
    ek = entry.experts_and_k  # what `moezoo list` shows as E/k: from e<E>k<K> in the name, else the config
    full = moezoo.get_model_config(name)
    assert ek == (full.num_experts, full.num_experts_per_tok), f"{name}: E/k {ek} vs its config"
    assert registry.NAME_RE.match(name)


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_roundtrip(name, tmp_path):
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    model = moezoo.create_model(name, tiny=True)
    assert model.config._experts_implementation == "moezoo"
    n_moe = len(model.moe_layers())
    inputs = model.example_inputs(generator=torch.Generator().manual_seed(1))

    model.train()
    out = _forward(model, inputs)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    assert out.router_logits is not None and len(out.router_logits) == n_moe
    for logits in out.router_logits:
        assert logits.dim() == 2 and torch.isfinite(logits).all()
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "experts" in n)
    router_grads = [g for n, g in grads.items() if n.endswith("mlp.gate.weight") or ".gate.weight" in n]
    assert router_grads and all(g is not None for g in router_grads), "routers must get gradients"

    model.eval()
    with torch.no_grad():
        ref = _main_tensor(_forward(model, inputs))
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)

    fam = registry.get_family(moezoo.get_model_entry(name).family)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = _main_tensor(_forward(reloaded, inputs))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert reloaded.config._experts_implementation == "moezoo"

    cfg = AutoConfig.from_pretrained(tmp_path)
    assert type(cfg) is fam.config_class and cfg.to_dict()["num_experts"] == model.config.num_experts
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is fam.model_class
    for auto_name, cls in fam.task_classes.items():
        import transformers

        task_model = getattr(transformers, auto_name).from_pretrained(tmp_path).eval()
        assert type(task_model) is cls
        if cls is type(model):
            with torch.no_grad():
                torch.testing.assert_close(_main_tensor(_forward(task_model, inputs)), ref, atol=1e-5, rtol=1e-5)


def test_unknown_name_suggests_close_names():
    with pytest.raises(moezoo.UnknownModelError, match="did you mean 'lm_tiny_e8k2'"):
        moezoo.create_model("lm_tiny_e8k")
    with pytest.raises(ValueError, match="lm_small_e16k2"):
        moezoo.create_model("lm_smal_e16k2")
    with pytest.raises(ValueError, match="unknown model name"):
        moezoo.create_model("completely_different")


def test_dash_and_underscore_and_case_interchangeable():
    assert moezoo.get_model_entry("LM-TINY-E8K2").name == "lm_tiny_e8k2"


def test_unknown_override_rejected_with_suggestion():
    with pytest.raises(ValueError, match=r"num_expert'.*did you mean num_experts"):
        moezoo.create_model("lm_tiny_e8k2", tiny=True, num_expert=4)


def test_overrides_apply():
    m = moezoo.create_model("lm_tiny_e8k2", tiny=True, num_experts=6, num_experts_per_tok=3)
    layer = m.moe_layers()[0][1]
    assert isinstance(layer, MoELayer) and layer.num_experts == 6 and layer.num_experts_per_tok == 3
    assert m.config.moezoo_model_name == "lm_tiny_e8k2.tiny"


def test_invalid_config_values_raise():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        moezoo.create_model("lm_tiny_e8k2", tiny=True, num_experts_per_tok=9)
    with pytest.raises(ValueError, match="router_type"):
        moezoo.create_model("lm_tiny_e8k2", tiny=True, router_type="nope")


def test_list_models_pattern_and_family():
    assert moezoo.list_models("lm_tiny*") == ["lm_tiny_e8k2"]
    tiny = moezoo.list_models("tiny")  # bare words match substrings (other families have tiny names too)
    assert "lm_tiny_e8k2" in tiny and all("tiny" in n for n in tiny) and tiny == sorted(tiny)
    assert set(moezoo.list_models(family="moezoo_lm")) >= {"lm_tiny_e8k2", "lm_small_e16k2"}
    assert moezoo.list_models(family="lm") == moezoo.list_models(family="moezoo-lm")
    assert moezoo.list_models(family="no_such_family") == []
    assert moezoo.list_models("zzz*") == []


def test_list_pretrained_is_a_list():
    pre = moezoo.list_pretrained()
    assert isinstance(pre, list)
    with pytest.raises(ValueError, match="no pretrained weights"):
        moezoo.create_model("lm_tiny_e8k2", pretrained=True)


def test_register_model_decorator(monkeypatch):
    from moezoo.models.moezoo_lm import MoezooLMForCausalLM

    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    @moezoo.register_model(family="lm", config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                      vocab_size=50, num_experts=3, num_experts_per_tok=1,
                                                      moe_intermediate_size=8),
                           tiny=dict(hidden_size=8))
    def lm_test_e3k1(config):
        """A test entry."""
        return MoezooLMForCausalLM(config)

    assert "lm_test_e3k1" in moezoo.list_models()
    entry = moezoo.get_model_entry("lm_test_e3k1")
    assert entry.family == "moezoo_lm" and entry.description == "A test entry." and entry.experts_and_k == (3, 1)
    assert moezoo.create_model("lm_test_e3k1", tiny=True).config.hidden_size == 8
    assert moezoo.create_model("lm_test_e3k1").config.hidden_size == 16

    with pytest.raises(ValueError, match="lowercase"):
        moezoo.register_model("Bad-Name", family="moezoo_lm")(lambda c: None)
    with pytest.raises(ValueError, match="not registered"):
        moezoo.register_model("x_e2k1", family="nofamily")(lambda c: None)
    with pytest.raises(ValueError, match="already registered"):
        moezoo.register_model("lm_tiny_e8k2", family="moezoo_lm")(lambda c: None)


def test_every_family_registers_with_auto_classes():
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for fam_name in moezoo.list_families():
        fam = registry.get_family(fam_name)
        assert fam.model_type in CONFIG_MAPPING
        assert type(AutoConfig.for_model(fam.model_type)) is fam.config_class
        assert issubclass(fam.model_class, moezoo.MoezooPreTrainedModel)
        assert issubclass(fam.config_class, moezoo.MoezooConfig)


def test_readme_model_table_in_sync():
    readme = ROOT / "README.md"
    text = readme.read_text()
    assert registry.update_readme(str(readme), check=True), (
        "README.md's registered-models table is out of date: run `moezoo list --update-readme README.md`")
    for name in NAMES:
        assert f"`{name}`" in text


def test_readme_has_the_two_commands_and_speed_section():
    text = (ROOT / "README.md").read_text()
    assert "bash scripts/run.sh demo" in text and "bash scripts/test.sh" in text
    assert re.search(r"^## Speed$", text, re.MULTILINE)

