"""Parity of the conditional-routing block references: HiMoE-VLA (AS-MoE / HB-MoE), DriveMoE (action MoE + routers),
MoIIE (modality-split MoE block).

1. The shared fixtures in ``../shared/parity`` (or ``$MOEZOO_PARITY_DIR``) reproduce exactly (every out.* ok).
2. For each reference, a DIFFERENT config (other sizes, expert counts, top-k, condition size, labels, shared-expert
   counts) with random weights in the official key layout; the expected out.* are computed by small plain-torch
   re-implementations written here from the folders' README quirks (no moezoo code), written to a temporary folder in
   the fixture format, and ``run_parity`` must pass on it.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from moezoo.parity import ParityError, run_parity

SHARED = Path(os.environ.get("MOEZOO_PARITY_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "parity"))
REFS = ["himoe_vla_blocks", "drivemoe_action_moe", "moiie_block"]


@pytest.mark.parametrize("ref", REFS)
def test_shared_fixture(ref):
    folder = SHARED / ref
    if not folder.is_dir():
        pytest.skip(f"{folder} not available")
    lines = []
    results = run_parity(ref, folder, printer=lines.append)
    assert results, "no outputs compared"
    bad = [c for c in results if not c.ok]
    assert not bad, "\n".join(lines)
    assert lines[-1].endswith(f"{len(results)}/{len(results)} outputs match")


def test_wrong_folder_rejected():
    if not (SHARED / "moiie_block").is_dir():
        pytest.skip("shared fixtures not available")
    with pytest.raises(ParityError):
        run_parity("himoe_vla_blocks", SHARED / "moiie_block", verbose=False)


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _write_folder(path: Path, config: dict, state: dict, io: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    save_file({k: v.clone().contiguous() for k, v in io.items()}, str(path / "io.safetensors"))
    meta = {"tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in io.items()}}
    (path / "io.json").write_text(json.dumps(meta))
    return path


def _check(ref: str, folder: Path):
    lines = []
    results = run_parity(ref, folder, printer=lines.append)
    expected = {k for k in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(folder / "io.safetensors")) if k.startswith("out.")}
    assert {c.name for c in results} == expected
    assert all(c.ok for c in results), "\n".join(lines)
    return results


def _swiglu(x, g, u, d, act=F.silu):
    return (act(x @ g.T) * (x @ u.T)) @ d.T


def _rand(g, *shape, std=1.0):
    return torch.randn(*shape, generator=g) * std


def _uniform(g, *shape, bound):
    return (torch.rand(*shape, generator=g) * 2 - 1) * bound


# ----------------------------------------------------------------------------------------------------------------------
# HiMoE-VLA: AS-MoE (router on the per-sample data_mask, InfoNCE aux) + HB-MoE (top-k, shared, seq aux)
# ----------------------------------------------------------------------------------------------------------------------


def _himoe_reference(x, data_mask, state, pre, cfg, is_as):
    """README quirks, plain torch."""
    B, S, H = x.shape
    xf = x.reshape(-1, H)
    E, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    if is_as:
        router_in = data_mask.bool()[:, None, :].expand(B, S, -1).reshape(B * S, -1).float()
    else:
        router_in = xf
    logits = router_in @ state[pre + "gate.weight"].T
    scores = logits.softmax(-1)
    w, idx = torch.topk(scores, k, dim=-1)
    if k > 1 and cfg["norm_topk_prob"]:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    y = torch.zeros_like(xf)
    for t in range(xf.shape[0]):
        for j in range(k):
            e = int(idx[t, j])
            y[t] += w[t, j] * _swiglu(xf[t], state[f"{pre}experts.{e}.gate_proj.weight"],
                                      state[f"{pre}experts.{e}.up_proj.weight"], state[f"{pre}experts.{e}.down_proj.weight"])
    if pre + "shared_experts.gate_proj.weight" in state:
        y = y + _swiglu(xf, state[pre + "shared_experts.gate_proj.weight"], state[pre + "shared_experts.up_proj.weight"],
                        state[pre + "shared_experts.down_proj.weight"])
    alpha = cfg["aux_loss_alpha"]
    if is_as:  # InfoNCE, temperature 0.1, positives: other tokens with cosine(condition) > 0.99
        f = scores / scores.norm(dim=-1, keepdim=True)
        sim = torch.exp(f @ f.T / 0.1)
        c = router_in / router_in.norm(dim=-1, keepdim=True)
        pos = ((c @ c.T) > 0.99).float() * (1 - torch.eye(B * S))
        num = (sim * pos).sum(1)
        den = sim.sum(1)
        aux = (-torch.log(num / (den + 1e-8) + 1e-8)).mean() * alpha
    else:  # DeepSeek seq_aux
        sc = scores.view(B, S, E)
        aux = 0.0
        for b in range(B):
            cnt = torch.bincount(idx.view(B, -1)[b], minlength=E).float()
            ce = cnt * E / (S * k)
            aux = aux + (ce * sc[b].mean(0)).sum()
        aux = aux / B * alpha
    sidx, order = idx.sort(-1)
    return {"output": y.view(B, S, H), "output_eval": y.view(B, S, H), "aux_loss": torch.as_tensor(aux).reshape(1),
            "router_logits": logits, "topk_idx": sidx, "topk_weight": w.gather(1, order)}


def test_himoe_other_config(tmp_path):
    g = torch.Generator().manual_seed(1)
    H, C = 24, 6
    cfg = {
        "as_moe": {"num_experts_per_tok": 2, "n_shared_experts": None, "moe_intermediate_size": 20, "n_routed_experts": 5,
                   "hidden_size": H, "condition_dim": C, "hidden_act": "silu", "scoring_func": "softmax",
                   "aux_loss_alpha": 0.01, "seq_aux": True, "norm_topk_prob": True},
        "hb_moe": {"num_experts_per_tok": 3, "n_shared_experts": 2, "moe_intermediate_size": 12, "n_routed_experts": 6,
                   "hidden_size": H, "hidden_act": "silu", "scoring_func": "softmax", "aux_loss_alpha": 0.005,
                   "seq_aux": True, "norm_topk_prob": True},
        "_reference": {"repo": "ZhiyingDu/HiMoE-VLA", "class": {"as_moe": "ASMoE", "hb_moe": "HBMoE"}},
    }
    state = {}
    for name, c in (("as_moe", cfg["as_moe"]), ("hb_moe", cfg["hb_moe"])):
        I, E = c["moe_intermediate_size"], c["n_routed_experts"]
        state[f"{name}.gate.weight"] = _rand(g, E, C if name == "as_moe" else H, std=1.0)
        for e in range(E):
            state[f"{name}.experts.{e}.gate_proj.weight"] = _uniform(g, I, H, bound=H ** -0.5)
            state[f"{name}.experts.{e}.up_proj.weight"] = _uniform(g, I, H, bound=H ** -0.5)
            state[f"{name}.experts.{e}.down_proj.weight"] = _uniform(g, H, I, bound=I ** -0.5)
        if c["n_shared_experts"]:
            Is = I * c["n_shared_experts"]
            state[f"{name}.shared_experts.gate_proj.weight"] = _uniform(g, Is, H, bound=H ** -0.5)
            state[f"{name}.shared_experts.up_proj.weight"] = _uniform(g, Is, H, bound=H ** -0.5)
            state[f"{name}.shared_experts.down_proj.weight"] = _uniform(g, H, Is, bound=Is ** -0.5)
    data_mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1], [1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    io = {"in.data_mask": data_mask, "in.as_moe.hidden_states": _rand(g, 4, 3, H),
          "in.hb_moe.hidden_states": _rand(g, 3, 7, H)}
    for name in ("as_moe", "hb_moe"):
        ref = _himoe_reference(io[f"in.{name}.hidden_states"], data_mask, state, name + ".", cfg[name], name == "as_moe")
        io.update({f"out.{name}.{k}": v for k, v in ref.items()})
    assert io["out.as_moe.aux_loss"].item() > 0 and io["out.hb_moe.aux_loss"].item() > 0
    results = _check("himoe_vla_blocks", _write_folder(tmp_path / "himoe", cfg, state, io))
    assert len(results) == 12


def test_himoe_top1_sample_shares_expert():
    """AS-MoE with the fixture's top-1: every token of a sample has one expert and the raw (p < 1) weight."""
    folder = SHARED / "himoe_vla_blocks"
    if not folder.is_dir():
        pytest.skip("shared fixture not available")
    from moezoo.parity import load_folder
    from moezoo.parity import himoe_vla_blocks as mod
    config, state, io, _ = load_folder(folder, mod)
    module = mod.convert(config, state).eval()
    with torch.no_grad():
        _, ro = module["as_moe"](io["in.as_moe.hidden_states"], condition=io["in.data_mask"].bool())
    idx = ro.indices.view(3, 5)
    assert (idx == idx[:, :1]).all()
    assert (ro.weights < 1).all()


# ----------------------------------------------------------------------------------------------------------------------
# DriveMoE: per-sample pooled routing with |temperature|, GemmaMLP experts, shared experts summed, camera router
# ----------------------------------------------------------------------------------------------------------------------


def _mha_plain(q, kv, w_in, b_in, w_out, b_out, heads):
    D = q.shape[-1]
    wq, wk, wv = w_in.chunk(3, 0)
    bq, bk, bv = b_in.chunk(3, 0)
    Q, K, V = q @ wq.T + bq, kv @ wk.T + bk, kv @ wv.T + bv
    B, Lq, _ = Q.shape
    d = D // heads

    def split(t):
        return t.view(B, -1, heads, d).transpose(1, 2)
    att = (split(Q) @ split(K).transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    o = (att @ split(V)).transpose(1, 2).reshape(B, Lq, D)
    return o @ w_out.T + b_out


def _drivemoe_reference(io, state, cfg):
    gelu = lambda t: F.gelu(t, approximate="tanh")  # noqa: E731
    E, k = cfg["moe_mlp"]["num_skill_experts"], cfg["moe_mlp"]["num_experts_per_tok"]
    rh = io["in.router_hidden_states"]
    logits = (rh @ state["action_router.router_linear.weight"].T).mean(1) / state["action_router.temperature"].abs()
    probs = logits.softmax(-1, dtype=torch.float32)
    w, idx = probs.topk(k, -1)
    w = w / w.sum(-1, keepdim=True)
    x = io["in.hidden_states"]
    B, S, H = x.shape
    y = torch.zeros_like(x)
    for b in range(B):
        for j in range(k):
            e = int(idx[b, j])
            p = f"moe_mlp.skill_experts.{e}."
            y[b] += w[b, j] * _swiglu(x[b], state[p + "gate_proj.weight"], state[p + "up_proj.weight"],
                                      state[p + "down_proj.weight"], gelu)
        for s in range(cfg["moe_mlp"]["num_shared_experts"]):
            p = f"moe_mlp.shared_experts.{s}."
            y[b] += _swiglu(x[b], state[p + "gate_proj.weight"], state[p + "up_proj.weight"],
                            state[p + "down_proj.weight"], gelu)
    c = "camera_router."
    ft, wp = io["in.front_tokens"], io["in.waypoint"]
    wproj = F.relu(wp @ state[c + "waypoint_projector.0.weight"].T + state[c + "waypoint_projector.0.bias"])
    wproj = wproj @ state[c + "waypoint_projector.2.weight"].T + state[c + "waypoint_projector.2.bias"]
    kv = torch.cat([wproj[:, None], ft], 1)
    q = state[c + "router_query"].expand(B, -1, -1)
    a = _mha_plain(q, kv, state[c + "cross_attn.in_proj_weight"], state[c + "cross_attn.in_proj_bias"],
                   state[c + "cross_attn.out_proj.weight"], state[c + "cross_attn.out_proj.bias"],
                   cfg["camera_router"]["num_heads"])
    mu, var = a.mean(-1, keepdim=True), a.var(-1, unbiased=False, keepdim=True)
    h = (a - mu) / torch.sqrt(var + 1e-5) * state[c + "ln.weight"] + state[c + "ln.bias"]
    h = F.relu(h @ state[c + "mlp.0.weight"].T + state[c + "mlp.0.bias"])
    cam = (h @ state[c + "mlp.3.weight"].T + state[c + "mlp.3.bias"]).squeeze(1)
    return {"out.moe_output": y, "out.action_router_logits": logits, "out.routing_probs": probs, "out.topk_idx": idx,
            "out.topk_weight": w, "out.camera_logits": cam, "out.camera_selected": cam.argmax(-1)}


def test_drivemoe_other_config(tmp_path):
    g = torch.Generator().manual_seed(2)
    H, I, E, k, n_shared, Hr = 16, 24, 5, 2, 2, 20
    D, labels, heads, wp_hidden = 24, 3, 4, 128
    cfg = {"moe_mlp": {"hidden_size": H, "intermediate_size": I, "num_shared_experts": n_shared,
                       "num_skill_experts": E, "num_experts_per_tok": k, "num_moe_layers": 2},
           "action_router": {"hidden_size": Hr, "num_experts": E, "use_noisy_top_k": False},
           "camera_router": {"token_dim": D, "num_labels": labels, "num_heads": heads},
           "_reference": {"repo": "mr-d-self-driving/DriveMoE",
                          "class": {"moe_mlp": "MoEGemmaMLP", "action_router": "MLPRouter", "camera_router": "Router"}}}
    state = {"action_router.router_linear.weight": _rand(g, E, Hr, std=0.5),
             "action_router.temperature": torch.tensor([-1.3])}
    for kind, n in (("skill_experts", E), ("shared_experts", n_shared)):
        for e in range(n):
            p = f"moe_mlp.{kind}.{e}."  # large enough that gelu vs gelu_tanh experts differ beyond tolerance
            state[p + "gate_proj.weight"] = _rand(g, I, H, std=0.6)
            state[p + "up_proj.weight"] = _rand(g, I, H, std=0.6)
            state[p + "down_proj.weight"] = _rand(g, H, I, std=0.3)
    c = "camera_router."
    state.update({c + "router_query": _rand(g, 1, 1, D), c + "waypoint_projector.0.weight": _rand(g, wp_hidden, 2, std=0.5),
                  c + "waypoint_projector.0.bias": _rand(g, wp_hidden, std=0.1),
                  c + "waypoint_projector.2.weight": _rand(g, D, wp_hidden, std=0.1),
                  c + "waypoint_projector.2.bias": _rand(g, D, std=0.1),
                  c + "cross_attn.in_proj_weight": _rand(g, 3 * D, D, std=0.2),
                  c + "cross_attn.in_proj_bias": _rand(g, 3 * D, std=0.1),
                  c + "cross_attn.out_proj.weight": _rand(g, D, D, std=0.2),
                  c + "cross_attn.out_proj.bias": _rand(g, D, std=0.1),
                  c + "ln.weight": 1 + _rand(g, D, std=0.1), c + "ln.bias": _rand(g, D, std=0.1),
                  c + "mlp.0.weight": _rand(g, D // 2, D, std=0.3), c + "mlp.0.bias": _rand(g, D // 2, std=0.1),
                  c + "mlp.3.weight": _rand(g, labels, D // 2, std=0.5), c + "mlp.3.bias": _rand(g, labels, std=0.1)})
    io = {"in.hidden_states": _rand(g, 3, 4, H), "in.router_hidden_states": _rand(g, 3, 6, Hr),
          "in.front_tokens": _rand(g, 3, 7, D), "in.waypoint": _rand(g, 3, 2)}
    io.update(_drivemoe_reference(io, state, cfg))
    results = _check("drivemoe_action_moe", _write_folder(tmp_path / "drivemoe", cfg, state, io))
    assert len(results) == 7


# ----------------------------------------------------------------------------------------------------------------------
# MoIIE: vision mask (type==1 & next==1), vision -> experts [0, w), language -> [1, 1 + w), per-modality Switch loss
# ----------------------------------------------------------------------------------------------------------------------


def _moiie_reference(io, state, cfg):
    x, tt, am = io["in.hidden_states"], io["in.token_type_ids"], io["in.attention_mask"]
    B, S, H = x.shape
    k = cfg["num_experts_per_tok"]
    nxt = torch.cat([tt[:, 1:], torch.zeros_like(tt[:, :1])], 1)
    vis = (tt == 1) & (nxt == 1)
    vis[:, -1] = False
    y = torch.zeros_like(x)
    out = {"out.vision_token_mask": vis.long()}
    for name, mask, gate, shift in (("vis", vis, "gate_vis.weight", 0), ("lan", ~vis, "gate.weight", 1)):
        xs = x[mask]
        logits = xs @ state[gate].T
        p = logits.softmax(-1, dtype=torch.float32)
        w, li = p.topk(k, -1)
        w = w / w.sum(-1, keepdim=True)
        ys = torch.zeros_like(xs)
        for t in range(xs.shape[0]):
            for j in range(k):
                e = int(li[t, j]) + shift
                gu = xs[t] @ state[f"experts.{e}.gate_up_proj.weight"].T
                gt, up = gu.chunk(2, -1)
                ys[t] += w[t, j] * ((up * F.silu(gt)) @ state[f"experts.{e}.down_proj.weight"].T)
        y[mask] = ys
        width = logits.shape[-1]
        m = am[mask].reshape(B, -1).reshape(-1).float()
        onehot = F.one_hot(li, width).float()  # (n, k, w)
        tpe = (onehot * m[:, None, None]).sum(0) / m.sum()
        rp = (p * m[:, None]).sum(0) / m.sum()
        out[f"out.{name}_router_logits"] = logits
        out[f"out.aux_loss_{name}"] = ((tpe * rp[None]).sum() * width).reshape(1)
    out["out.hidden_states"] = y
    return out


def test_moiie_other_config(tmp_path):
    g = torch.Generator().manual_seed(3)
    E, H, I, k = 8, 16, 20, 3
    w = int(E / 2 + E / 4)
    cfg = {"num_experts": E, "router_jitter_noise": 0.0, "hidden_act": "silu", "hidden_size": H, "intermediate_size": I,
           "num_experts_per_tok": k, "_reference": {"repo": "AlenjandroWang/MoIIE", "class": "MoESparseMoeBlock"}}
    state = {"gate.weight": _rand(g, w, H, std=1.0), "gate_vis.weight": _rand(g, w, H, std=1.0)}
    for e in range(E):
        state[f"experts.{e}.gate_up_proj.weight"] = _uniform(g, 2 * I, H, bound=H ** -0.5)
        state[f"experts.{e}.down_proj.weight"] = _uniform(g, H, I, bound=I ** -0.5)
    tt = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    am = torch.tensor([[1] * 10 + [0] * 2, [0] * 2 + [1] * 10])
    io = {"in.hidden_states": _rand(g, 2, 12, H), "in.token_type_ids": tt, "in.attention_mask": am}
    io.update(_moiie_reference(io, state, cfg))
    assert io["out.vision_token_mask"].sum() == 6
    results = _check("moiie_block", _write_folder(tmp_path / "moiie", cfg, state, io))
    assert len(results) == 6
    # expert 7 is in no pool (E=8: width 6, shift 1); experts 0 vision-only, 7 never used
    from moezoo.parity import load_folder, moiie_block
    config, st, iot, _ = load_folder(tmp_path / "moiie", moiie_block)
    layer = moiie_block.convert(config, st).eval()
    with torch.no_grad():
        _, ro = layer(iot["in.hidden_states"], modality_ids=iot["in.token_type_ids"])
    assert not (ro.indices == 7).any()
    lang = ro.extras["modality_ids"] == 0
    assert not (ro.indices[lang] == 0).any()


def test_bad_modality_input_reported():
    folder = SHARED / "moiie_block"
    if not folder.is_dir():
        pytest.skip("shared fixture not available")
    from moezoo.parity import load_folder, moiie_block
    config, st, io, _ = load_folder(folder, moiie_block)
    layer = moiie_block.convert(config, st)
    with pytest.raises(ValueError, match="modality_ids"):
        layer(io["in.hidden_states"])
    with pytest.raises(ValueError, match="modality_ids"):
        layer(io["in.hidden_states"], modality_ids=io["in.token_type_ids"][:, :5])


@pytest.mark.parametrize("ref", REFS)
def test_converted_module_round_trip(ref, tmp_path):
    """The converted modules rebuild from their init_kwargs (``moezoo convert`` folders) and still match."""
    folder = SHARED / ref
    if not folder.is_dir():
        pytest.skip(f"{folder} not available")
    from moezoo.convert import load_converted, save_converted
    from moezoo.parity import compare, get_reference, load_folder
    mod = get_reference(ref)
    config, state, io, _ = load_folder(folder, mod)
    dst = save_converted(mod.convert(config, state), tmp_path / "conv", reference=ref, reference_config=config)
    module = load_converted(dst)
    with torch.no_grad():
        got = mod.run(module, config, {k: v for k, v in io.items() if k.startswith("in.")})
    for k, want in io.items():
        if k.startswith("out."):
            c = compare(k, got.get(k), want, k.removeprefix("out.") in mod.EXACT)
            assert c.ok, (k, c)
