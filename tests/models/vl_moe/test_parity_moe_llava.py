"""MoE-LLaVA MoE layer parity (DeepSpeed 0.9.5 top-2 gate with capacity, recorded Gumbel noise) and MoIIE block parity.

1. ``moezoo parity moe_llava_block`` / ``moiie_block`` reproduce the shared fixtures (every out.*).
2. Other configs of the MoE-LLaVA layer (expert counts, sizes, capacity factors, min_capacity, sequence shapes, keys
   inside a full checkpoint): the expected out.* come from a dense one-hot / cumsum / einsum re-implementation of
   DeepSpeed's ``top2gating`` + ``MOELayer`` written here from the fixture README (no moezoo code), and
   ``run_parity`` must pass on them; a case whose capacity drops first choices and whole tokens is included.
3. The MoIIE block is checked on other configs by tests/parity/test_parity_conditional_refs.py.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from moezoo.parity import run_parity

SHARED = Path(os.environ.get("MOEZOO_PARITY_DIR", Path(__file__).resolve().parents[3].parent / "shared" / "parity"))


@pytest.mark.parametrize("ref", ["moe_llava_block", "moiie_block"])
def test_shared_fixture(ref):
    folder = SHARED / ref
    if not folder.is_dir():
        pytest.skip(f"{folder} not available")
    lines = []
    results = run_parity(ref, folder, printer=lines.append)
    bad = [c for c in results if not c.ok]
    assert not bad, "\n".join(lines)
    assert len(results) == (35 if ref == "moe_llava_block" else 6)


# ---------------------------------------------------------------------------------------------------------- reference
def _ds_gate(logits, noise, cap):
    """DeepSpeed 0.9.5 ``top2gating`` (dense masks, as the README describes)."""
    S, E = logits.shape
    gates = logits.softmax(dim=1)
    i1 = gates.argmax(1)
    m1 = F.one_hot(i1, E)
    i2 = (logits + noise).masked_fill(m1.bool(), -math.inf).argmax(1)
    m2 = F.one_hot(i2, E)
    loc1 = torch.cumsum(m1, 0) - 1
    loc2 = torch.cumsum(m2, 0) - 1 + m1.sum(0, keepdim=True)
    exp_counts = m1.sum(0)
    l_aux = torch.mean(gates.mean(0) * m1.float().mean(0)) * E * E
    m1 = m1 * (loc1 < cap)
    m2 = m2 * (loc2 < cap)
    l1 = (loc1 * m1).sum(1)
    l2 = (loc2 * m2).sum(1)
    g1 = (gates * m1.float()).sum(1)
    g2 = (gates * m2.float()).sum(1)
    den = (g1 + g2).clamp(min=torch.finfo(torch.float32).eps)
    g1, g2 = g1 / den, g2 / den
    comb = (g1[:, None] * m1.float())[:, :, None] * F.one_hot(l1, cap)[:, None, :].float() + \
           (g2[:, None] * m2.float())[:, :, None] * F.one_hot(l2, cap)[:, None, :].float()
    slot = torch.where(m1.bool(), loc1, torch.where(m2.bool(), loc2, torch.full_like(loc1, -1)))
    kept = torch.stack([m1.sum(1), m2.sum(1)], 1)
    return comb, l_aux, exp_counts, i1, i2, kept, slot


def _ds_layer(x, state, noise, cap):
    """``MOELayer``: dispatch einsum -> per-expert StableLM MLP on [E, C, H] buffers -> combine einsum."""
    shape = x.shape
    xs = x.reshape(-1, shape[-1])
    wg = state["deepspeed_moe.gate.wg.weight"]
    logits = xs @ wg.T
    comb, l_aux, counts, i1, i2, kept, slot = _ds_gate(logits, noise, cap)
    disp = comb.bool().to(xs.dtype)
    buf = torch.einsum("sec,sm->ecm", disp, xs)
    outs = []
    for e in range(buf.shape[0]):
        p = f"deepspeed_moe.experts.deepspeed_experts.{e}."
        h = buf[e]
        outs.append(F.silu(h @ state[p + "gate_proj.weight"].T) * (h @ state[p + "up_proj.weight"].T)
                    @ state[p + "down_proj.weight"].T)
    y = torch.einsum("sec,ecm->sm", comb.to(xs.dtype), torch.stack(outs)).reshape(shape)
    return y, logits, l_aux, counts, i1, i2, kept, slot, comb.sum(-1)


def _capacity(S, E, cf, min_cap):
    return max(int(torch.ceil((S / E) * torch.tensor(cf * 2))), min_cap)


def _expected(io, state, cfg):
    out = {}
    E = cfg["num_experts"]
    calls = [("eval", "in.hidden_states", cfg["eval_capacity_factor"], False),
             ("train", "in.hidden_states", cfg["capacity_factor"], True),
             ("skewed_train", "in.hidden_states_skewed", cfg["capacity_factor"], True)]
    for name, key, cf, train in calls:
        x = io[key].clone().requires_grad_(train)
        wg = state["deepspeed_moe.gate.wg.weight"].clone().requires_grad_(train)
        st = dict(state, **{"deepspeed_moe.gate.wg.weight": wg})
        S = x.shape[0] * x.shape[1]
        cap = _capacity(S, E, cf, cfg["min_capacity"])
        y, logits, l_aux, counts, i1, i2, kept, slot, cw = _ds_layer(x, st, io[f"in.gumbel_noise_{name}"], cap)
        p = f"out.{name}."
        out.update({p + "hidden_states": y.detach(), p + "l_aux": l_aux.detach(), p + "exp_counts": counts,
                    p + "capacity": torch.tensor(cap), p + "expert_top1": i1, p + "expert_top2": i2,
                    p + "kept": kept.long(), p + "combine_weights": cw.detach(), p + "capacity_slot": slot})
        if train:
            gw, gx = torch.autograd.grad(y.sum(), [wg, x], retain_graph=True)
            (gl,) = torch.autograd.grad(l_aux, [wg])
            out.update({p + "grad_gate_weight": gw, p + "grad_gate_weight_l_aux": gl, p + "grad_hidden_states": gx})
        if name == "eval":
            out["out.router_logits"] = logits.detach()
        if name == "skewed_train":
            out["out.skewed_router_logits"] = logits.detach()
    return out


def _write_folder(path: Path, config: dict, state: dict, io: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in io.items()}, str(path / "io.safetensors"))
    (path / "io.json").write_text(json.dumps({"tensors": sorted(io)}))
    return path


def _case(E, H, I, shape, cf, ecf, min_cap, seed, prefix=""):
    g = torch.Generator().manual_seed(seed)
    state = {prefix + "deepspeed_moe.gate.wg.weight": torch.randn(E, H, generator=g) / math.sqrt(H)}
    for e in range(E):
        p = f"{prefix}deepspeed_moe.experts.deepspeed_experts.{e}."
        state[p + "gate_proj.weight"] = torch.randn(I, H, generator=g) / math.sqrt(H)
        state[p + "up_proj.weight"] = torch.randn(I, H, generator=g) / math.sqrt(H)
        state[p + "down_proj.weight"] = torch.randn(H, I, generator=g) / math.sqrt(I)
    if prefix:  # a full checkpoint: other keys around the MoE layer
        state["model.embed_tokens.weight"] = torch.randn(10, H, generator=g)
    x = torch.randn(*shape, H, generator=g)
    wg = state[prefix + "deepspeed_moe.gate.wg.weight"]
    t = torch.zeros(E)
    t[0], t[1] = 8.0, 5.0
    skewed = x + (torch.linalg.pinv(wg) @ t)
    S = shape[0] * shape[1]
    io = {"in.hidden_states": x, "in.hidden_states_skewed": skewed}
    for name in ("eval", "train", "skewed_train"):
        io[f"in.gumbel_noise_{name}"] = -torch.log(-torch.log(torch.rand(S, E, generator=g).clamp(1e-9, 1 - 1e-7)))
    cfg = {"hidden_size": H, "intermediate_size": I, "hidden_act": "silu", "num_experts": E, "top_k_experts": 2,
           "ep_size": 1, "capacity_factor": cf, "eval_capacity_factor": ecf, "min_capacity": min_cap,
           "use_residual": False, "drop_tokens": True,
           "_reference": {"repo": "PKU-YuanGroup/MoE-LLaVA", "class": "deepspeed.moe.layer.MoE"}}
    # the expected values are computed in float64 (the exact answer for these fp32 inputs), then stored as fp32
    plain = {k[len(prefix):]: v.double() for k, v in state.items() if k.startswith(prefix)}
    exp = _expected({k: v.double() for k, v in io.items()}, plain, cfg)
    io.update({k: v.float() if v.is_floating_point() else v for k, v in exp.items()})
    return cfg, state, io


@pytest.mark.parametrize("E,H,I,shape,cf,ecf,min_cap,seed,prefix", [
    (8, 16, 24, (3, 5), 1.0, 1.25, 0, 1, ""),
    (6, 24, 16, (1, 11), 0.5, 1.0, 4, 2, "model.layers.2.mlp."),
    (3, 8, 12, (4, 3), 0.75, 2.0, 0, 3, ""),
])
def test_other_configs(tmp_path, E, H, I, shape, cf, ecf, min_cap, seed, prefix):
    cfg, state, io = _case(E, H, I, shape, cf, ecf, min_cap, seed, prefix)
    # the skewed call must exercise first-choice drops
    assert (io["out.skewed_train.kept"][:, 0] == 0).any()
    lines = []
    results = run_parity("moe_llava_block", _write_folder(tmp_path / "ref", cfg, state, io), printer=lines.append)
    assert len(results) == 35 and all(c.ok for c in results), "\n".join(lines)


def test_wrong_expert_count_is_reported(tmp_path):
    cfg, state, io = _case(4, 8, 12, (2, 3), 1.0, 2.0, 0, 5)
    cfg["num_experts"] = 5
    with pytest.raises(ValueError, match="num_experts=5 but the weights hold 4"):
        run_parity("moe_llava_block", _write_folder(tmp_path / "ref", cfg, state, io), verbose=False)


# ---------------------------------------------------------------------------------------------------------- converter
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=32, patch_size=8)


def _official_checkpoint(tmp_path, E=4):
    """A tiny MoE-LLaVA-Llama checkpoint in the official layout (config.json with a ``moe`` block, DeepSpeed keys)."""
    g = torch.Generator().manual_seed(11)
    V, H, I, L = 64, 32, 48, 4
    cfg = {"model_type": "moe_llava_llama", "architectures": ["MoELLaVALlamaForCausalLM"], "vocab_size": V,
           "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "hidden_act": "silu",
           "tie_word_embeddings": False, "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32,
           "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
           "mm_image_tower": "openai/clip-vit-large-patch14-336",
           "moe": {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": [0, 2], "num_experts": [E, E],
                   "top_k_experts": 2, "capacity_factor": 1.5, "eval_capacity_factor": 2.0, "min_capacity": 0,
                   "use_residual": False, "router_aux_loss_coef": 0.01, "ep_size": 1}}
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(3)
    clip = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in CLIP.items() if k != "model_type"}))
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    st = {"model.embed_tokens.weight": r(V, H), "model.norm.weight": 1 + r(H), "lm_head.weight": r(V, H),
          "model.mm_projector.0.weight": r(H, 32), "model.mm_projector.0.bias": r(H),
          "model.mm_projector.2.weight": r(H, H), "model.mm_projector.2.bias": r(H)}
    for k, v in clip.state_dict().items():  # transformers 4.x key names (as in the released checkpoints)
        st["model.image_tower.image_tower." + ("" if k.startswith("vision_model.") else "vision_model.") + k] = v.clone()
    for i in range(L):
        p = f"model.layers.{i}."
        for n, shape in (("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (16, H)), ("self_attn.v_proj", (16, H)),
                         ("self_attn.o_proj", (H, H))):
            st[p + n + ".weight"] = r(*shape)
        st[p + "input_layernorm.weight"] = 1 + r(H)
        st[p + "post_attention_layernorm.weight"] = 1 + r(H)
        if i in (0, 2):
            st[p + "mlp.deepspeed_moe.gate.wg.weight"] = r(E, H) * 10
            for e in range(E):
                q = p + f"mlp.deepspeed_moe.experts.deepspeed_experts.{e}."
                st[q + "gate_proj.weight"], st[q + "up_proj.weight"], st[q + "down_proj.weight"] = r(I, H), r(I, H), r(H, I)
        else:
            st[p + "mlp.gate_proj.weight"], st[p + "mlp.up_proj.weight"], st[p + "mlp.down_proj.weight"] = r(I, H), r(I, H), r(H, I)
    src = tmp_path / "official"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in st.items()}, str(src / "model.safetensors"))
    return src, cfg, st


def test_convert_moe_llava_checkpoint(tmp_path):
    from moezoo.convert import convert
    from transformers import AutoModelForImageTextToText

    src, cfg, st = _official_checkpoint(tmp_path)
    dst = convert("moe-llava", src, tmp_path / "ours", vision_config=CLIP)
    model = AutoModelForImageTextToText.from_pretrained(dst).eval()
    c = model.config
    assert c.moe_layers() == [0, 2] and c.router_type == "top2_capacity" and c.image_seq_length == 16
    assert c.router_kwargs["second_expert_sampling"] is False
    # each converted MoE layer equals DeepSpeed's computation on the official weights (no noise: deterministic 2nd)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    for i in (0, 2):
        prefix = f"model.layers.{i}.mlp."
        sub = {k[len(prefix):]: v for k, v in st.items() if k.startswith(prefix)}
        with torch.no_grad():
            want = _ds_layer(x, sub, torch.zeros(10, 4), _capacity(10, 4, 2.0, 0))[0]
            got, _ = model.model.language_model.layers[i].mlp.forward_with_router(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # the dense parts are the official tensors
    torch.testing.assert_close(model.model.language_model.layers[1].mlp.down_proj.weight, st["model.layers.1.mlp.down_proj.weight"])
    torch.testing.assert_close(model.model.multi_modal_projector[2].bias, st["model.mm_projector.2.bias"])
    tower = model.model.vision_tower.model
    torch.testing.assert_close(getattr(tower, "vision_model", tower).embeddings.patch_embedding.weight,
                               st["model.image_tower.image_tower.vision_model.embeddings.patch_embedding.weight"])
    inputs = model.example_inputs(labels=False, generator=torch.Generator().manual_seed(0))
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    # official Gumbel sampling is an option
    dst2 = convert("moe-llava", src, tmp_path / "ours2", vision_config=CLIP, official_sampling=True)
    assert AutoModelForImageTextToText.from_pretrained(dst2).model.language_model.layers[0].mlp.gate.second_expert_sampling


def test_convert_moe_llava_errors(tmp_path):
    from moezoo.convert import convert

    src, cfg, st = _official_checkpoint(tmp_path)
    bad = dict(cfg, moe=dict(cfg["moe"], moe_layers_idx=[0, 1]))
    (src / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="do not match moe_layers_idx"):
        convert("moe-llava", src, tmp_path / "x", vision_config=CLIP)
    (src / "config.json").write_text(json.dumps(dict(cfg, model_type="moe_llava_qwen")))
    with pytest.raises(ValueError, match="unsupported MoE-LLaVA model_type 'moe_llava_qwen'"):
        convert("moe-llava", src, tmp_path / "y", vision_config=CLIP)
