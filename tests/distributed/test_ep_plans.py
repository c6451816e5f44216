"""Every family's ``base_model_ep_plan`` is the plan :mod:`moezoo.core.parallel` derives from the built model
(ProMoE: ``up_proj`` with biases; DiT-MoE: ``gate_up_proj``), so transformers' EP shards every per-expert tensor."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import moezoo
from moezoo.core.parallel import EP_PARAM_STYLE, ep_plan

MOE_MODELS = ["lm_tiny_e8k2", "time_moe_tiny_e4k2", "dit_moe_tiny_e4k2", "promoe_tiny_e4k1", "deweather_moe_tiny_e4k2"]


@pytest.mark.parametrize("name", MOE_MODELS)
def test_config_ep_plan_is_derived_from_the_model(name):
    torch.manual_seed(0)
    model = moezoo.create_model(name, tiny=True)
    plan = model.config.base_model_ep_plan
    assert plan == ep_plan(model.base_model)
    # every stacked per-expert tensor of the model is in the plan (a bias left out would stay whole under EP)
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard as wc

    stacked = set()
    for mname, mod in model.base_model.named_modules():
        if mname.endswith("mlp.experts"):  # ProMoE's experts hold num_experts + 1 (the unconditional expert)
            stacked |= {wc(f"{mname}.{n}") for n, p in mod.named_parameters() if p.shape[0] == mod.num_experts}
    assert stacked and stacked == {k for k, v in plan.items() if v == EP_PARAM_STYLE}


def test_promoe_plan_differs_from_dit_moe():
    promoe = moezoo.create_model("promoe_tiny_e4k1", tiny=True).config.base_model_ep_plan
    dit = moezoo.create_model("dit_moe_tiny_e4k2", tiny=True).config.base_model_ep_plan
    assert "blocks.*.mlp.experts.up_proj_bias" in promoe and "blocks.*.mlp.experts.gate_up_proj" not in promoe
    assert "blocks.*.mlp.experts.gate_up_proj" in dit and not any(k.endswith("_bias") for k in dit)


def test_mofme_has_no_ep_plan():
    # FiLM experts share one basenet: nothing stacked per expert to shard
    assert moezoo.create_model("deweather_mofme_tiny_e4k2", tiny=True).config.base_model_ep_plan is None
