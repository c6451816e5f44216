"""peft LoRA on every family, as on transformers' own MoE models: attention (``target_modules``), the 3-D experts
and the router (``target_parameters``: ``mlp.experts.gate_up_proj`` / ``up_proj`` / ``down_proj`` / FME's
``film_proj``, ``mlp.gate.weight``). Per family: identical output at init, every LoRA B gets a gradient and nothing
else trains, adapter save -> load on a fresh base gives the same output, and merge_and_unload gives it again."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

peft = pytest.importorskip("peft", reason="peft is an optional extra (pip install moezoo[peft])")

import moezoo  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

# registry name -> attention modules (each family's own names)
CASES = {
    "lm_tiny_e8k2": ["q_proj", "v_proj"],
    "time_moe_tiny_e4k2": ["q_proj", "v_proj"],
    "dit_moe_tiny_e4k2": ["qkv"],
    "promoe_tiny_e4k1": ["qkv"],
    "deweather_moe_tiny_e4k2": ["qkv_proj"],
    "deweather_mofme_tiny_e4k2": ["qkv_proj"],
    "audio_moe_tiny_e4k2": ["q_proj", "v_proj"],
    "himoe_vla_tiny_e8k2": ["k_proj", "v_proj"],
    "drivemoe_tiny_e6k1": ["k_proj", "v_proj"],  # the action loss reads every LM layer's keys and values, not its last queries
    "vl_moe_smol_e4k2": ["q_proj", "v_proj"],
}


def _model(name):
    torch.manual_seed(0)
    return moezoo.create_model(name, tiny=True).eval()


def _loss(model, inputs):
    """The loss with a fixed seed (flow-matching policies draw noise and times in their loss)."""
    torch.manual_seed(0)
    return model(**inputs).loss


def _expert_parameters(model) -> list[str]:
    """``mlp.experts.<3-D parameter>`` names of the model (what ``target_parameters`` takes)."""
    return sorted({"mlp.experts." + n.rsplit(".", 1)[-1] for n, p in model.named_parameters()
                   if ".mlp.experts." in n and p.dim() == 3})


def test_every_family_is_covered():
    families = {moezoo.get_model_entry(n).family for n in CASES}
    assert families == set(moezoo.list_families()), "add the new family to tests/test_peft.py CASES"


@pytest.mark.parametrize("name", sorted(CASES))
def test_lora_on_attention_experts_and_router(name, tmp_path):
    model = _model(name)
    experts = _expert_parameters(model)
    assert experts, f"{name} has no 3-D expert parameters"
    inputs = model.example_inputs(generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _loss(model, inputs)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=CASES[name],
                        target_parameters=experts + ["mlp.gate.weight"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        torch.testing.assert_close(_loss(peft_model, inputs), ref)  # B = 0 at init
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    kinds = {k for k in ("experts", "gate", *CASES[name]) if any(f".{k}." in n for n in trainable)}
    assert kinds == {"experts", "gate", *CASES[name]}, sorted(trainable)[:6]
    peft_model.train()
    _loss(peft_model, inputs).backward()
    lora_b = [n for n in trainable if "lora_B" in n]
    assert all(trainable[n].grad is not None and trainable[n].grad.abs().sum() > 0 for n in lora_b), \
        [n for n in lora_b if trainable[n].grad is None or not trainable[n].grad.abs().sum() > 0]

    peft_model.eval()
    with torch.no_grad():
        for p in trainable.values():
            p.normal_(0.0, 0.05)
        adapted = _loss(peft_model, inputs)
    assert not torch.allclose(adapted, ref)
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_model(name), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_loss(loaded, inputs), adapted, atol=1e-5, rtol=1e-4)
    merged = loaded.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert {n for n, _ in merged.named_parameters()} == {n for n, _ in _model(name).named_parameters()}
    with torch.no_grad():
        torch.testing.assert_close(_loss(merged, inputs), adapted, atol=1e-5, rtol=1e-4)
