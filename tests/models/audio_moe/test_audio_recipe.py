"""The three-stage recipe end to end on tiny sizes: two dense specialists, upcycling (experts copied from the right
specialist, only routers + shared expert train in stage 2), joint training, resume of a stage."""
from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moezoo.models.audio_moe import MoezooAudioMoeForCausalLM  # noqa: E402
from moezoo.models.audio_moe.recipe import train_from_config  # noqa: E402


def test_three_stages(tmp_path):
    base = dict(model={"name": "audio_moe_small_e8k2", "tiny": True, "overrides": {"delay_pattern": [0, 1, 2]}},
                codec={"random": "dac"}, routing_stats=False, data={"max_items": 2, "max_frames": 8, "max_text": 8})
    tr = dict(max_steps=2, batch_size=2, log_every=2, save_every=None, keep_last=1)
    outs = {}
    for stage in ("specialist_speech", "specialist_music"):
        outs[stage] = train_from_config({**base, "stage": stage, "trainer": {**tr, "output_dir": str(tmp_path / stage)}})
    sp = MoezooAudioMoeForCausalLM.from_pretrained(outs["specialist_speech"]["final"])
    mu = MoezooAudioMoeForCausalLM.from_pretrained(outs["specialist_music"]["final"])
    assert sp.config.num_experts == 1 and sp.config.moe_type == "topk"
    integ = train_from_config({**base, "stage": "integrate", "trainer": {**tr, "output_dir": str(tmp_path / "int")},
                               "specialists": {"speech": outs["specialist_speech"]["final"],
                                               "music": outs["specialist_music"]["final"]}})
    moe = MoezooAudioMoeForCausalLM.from_pretrained(integ["final"])
    E = moe.config.num_experts
    ex = moe.model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(ex[0], sp.model.layers[0].mlp.experts.gate_up_proj[0])  # frozen in stage 2: still the copy
    assert torch.equal(ex[E - 1], mu.model.layers[0].mlp.experts.gate_up_proj[0])
    attn = (sp.model.layers[0].self_attn.q_proj.weight + mu.model.layers[0].self_attn.q_proj.weight) / 2
    assert torch.allclose(moe.model.layers[0].self_attn.q_proj.weight, attn)
    joint_cfg = {**base, "stage": "joint", "model": {"init_from": integ["final"]},
                 "trainer": {**tr, "output_dir": str(tmp_path / "joint")}}
    train_from_config(joint_cfg)
    joint = MoezooAudioMoeForCausalLM.from_pretrained(tmp_path / "joint" / "final")
    assert not torch.equal(joint.model.layers[0].mlp.experts.gate_up_proj, ex)  # experts train in stage 3
    # resume: a longer run continues from checkpoint-2 instead of starting over
    res = train_from_config({**joint_cfg, "trainer": {**joint_cfg["trainer"], "max_steps": 3}})
    assert (tmp_path / "joint" / "checkpoint-3").is_dir()
    assert res["result"] is not None
