"""`moezoo convert drivemoe SRC DST`: an official-style DriveMoE checkpoint (built from a tiny policy's own tensors,
under the official names) converts into a loadable folder holding exactly those tensors."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import save_file

import moezoo
from moezoo import cli
from moezoo.convert import available_converters


def _official_from(policy) -> dict:
    sd = policy.state_dict()
    out = {}
    moe = [i for i, t in enumerate(policy.config.mlp_layer_types) if t == "skill_moe"]
    for i in moe:
        pre, off = f"action_expert.layers.{i}.mlp.", f"joint_model.mixtures.action.layers.{i}.mlp."
        gu, down = sd[pre + "experts.gate_up_proj"], sd[pre + "experts.down_proj"]
        inter = down.shape[-1]
        for e in range(gu.shape[0]):
            out[f"{off}skill_experts.{e}.gate_proj.weight"] = gu[e, :inter].clone()
            out[f"{off}skill_experts.{e}.up_proj.weight"] = gu[e, inter:].clone()
            out[f"{off}skill_experts.{e}.down_proj.weight"] = down[e].clone()
        for n in ("gate_proj", "up_proj", "down_proj"):
            out[f"{off}shared_experts.0.{n}.weight"] = sd[f"{pre}shared_expert.{n}.weight"].clone()
    out["joint_model.action_router.router_linear.weight"] = sd[f"action_expert.layers.{moe[0]}.mlp.gate.weight"].clone()
    out["joint_model.action_router.temperature"] = sd[f"action_expert.layers.{moe[0]}.mlp.gate.temperature"].clone()
    for k, v in sd.items():
        if k.startswith("camera_router."):
            out[k] = v.clone()
    out["joint_model.mixtures.vlm.layers.0.mlp.gate_proj.weight"] = torch.zeros(2, 2)
    return out


def test_convert_drivemoe_cli_round_trip(tmp_path, capsys):
    assert available_converters().get("drivemoe") == "model"
    torch.manual_seed(3)
    src_policy = moezoo.create_model("drivemoe_tiny_e6k1", tiny=True)
    official = _official_from(src_policy)
    save_file(official, str(tmp_path / "official.safetensors"))
    rc = cli.main(["convert", "drivemoe", str(tmp_path / "official.safetensors"), str(tmp_path / "out"),
                   "--option", "model=drivemoe_tiny_e6k1", "--option", "tiny=true"])
    assert rc == 0 and "converted drivemoe" in capsys.readouterr().out
    got = type(src_policy).from_pretrained(tmp_path / "out").state_dict()
    want = src_policy.state_dict()
    moe_keys = [k for k in want if k.startswith(("camera_router.", "action_expert.layers.1.mlp.",
                                                 "action_expert.layers.2.mlp.experts", "action_expert.layers.2.mlp.shared"))]
    assert len(moe_keys) > 10
    for k in moe_keys:
        torch.testing.assert_close(got[k], want[k])
    info = json.loads((tmp_path / "out" / "unmapped_keys.json").read_text())
    assert info["unmapped"] == ["joint_model.mixtures.vlm.layers.0.mlp.gate_proj.weight"]
