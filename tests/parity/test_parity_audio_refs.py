"""Parity of the four audio/language block references (Dynamic-MoE top-p, AdaMoE, MoE++, UniMoE-Audio).

1. ``run_parity`` on the shared fixtures in ``../shared/parity`` (or ``$MOEZOO_PARITY_DIR``).
2. For each reference a DIFFERENT config: random weights in the official key layout, expected outputs from a small
   independent plain-torch re-implementation written from the fixtures' README quirks (per-token loops, no moezoo
   code), written to a temporary folder in the fixture format and checked with ``run_parity``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moezoo.parity import get_reference, load_folder, run_parity  # noqa: E402

SHARED = Path(os.environ.get("MOEZOO_PARITY_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "parity"))
REFS = ["dynamic_moe_topp", "adamoe", "moe_plus_plus", "unimoe_audio_block"]


@pytest.mark.parametrize("ref", REFS)
def test_shared_fixture(ref):
    folder = SHARED / ref
    if not folder.is_dir():
        pytest.skip(f"{folder} not available")
    lines = []
    results = run_parity(ref, folder, printer=lines.append)
    assert results and all(c.ok for c in results), "\n".join(lines)
    _, _, io, _ = load_folder(folder)
    assert {c.name for c in results} == {k for k in io if k.startswith("out.")}


def write_folder(path: Path, config: dict, model: dict, io: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.items()}, str(path / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in io.items()}, str(path / "io.safetensors"))
    meta = {"tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in io.items()}}
    (path / "io.json").write_text(json.dumps(meta))
    return path


def check_folder(ref: str, folder: Path):
    lines = []
    results = run_parity(ref, folder, printer=lines.append)
    assert results and all(c.ok for c in results), "\n".join(lines)
    return results


def mat(g, rows, cols):
    return torch.randn(rows, cols, generator=g) / cols ** 0.5


def swiglu(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


# ---------------------------------------------------------------------------------------------------------------------
# Dynamic-MoE top-p
# ---------------------------------------------------------------------------------------------------------------------


def dynamic_moe_reference(sd, top_p, x):
    E = sd["router.weight"].shape[0]
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ sd["router.weight"].T
    probs = logits.softmax(-1)
    out = torch.zeros_like(flat)
    sw = torch.zeros(flat.shape[0], E)
    si = torch.full((flat.shape[0], E), -1, dtype=torch.long)
    mask = torch.zeros(flat.shape[0], E, dtype=torch.long)
    for t in range(flat.shape[0]):
        pairs = sorted(((probs[t, e].item(), e) for e in range(E)), reverse=True)
        total, chosen = 0.0, []
        for p, e in pairs:
            chosen.append(e)
            total += p
            if total > top_p:
                break
        for j, e in enumerate(chosen):
            sw[t, j], si[t, j], mask[t, e] = probs[t, e], e, 1
            y = swiglu(flat[t:t + 1], sd[f"experts.{e}.gate_proj.weight"], sd[f"experts.{e}.up_proj.weight"],
                       sd[f"experts.{e}.down_proj.weight"])
            out[t] += probs[t, e] * y[0]
    lead = x.shape[:-1]
    return {
        "out.output": out.reshape(x.shape), "out.router_logits": logits.reshape(*lead, E),
        "out.router_probs": probs.reshape(*lead, E), "out.topp_sorted_weights": sw.reshape(*lead, E),
        "out.topp_sorted_indices": si.reshape(*lead, E), "out.expert_mask": mask.reshape(*lead, E),
        "out.combine_weights": (probs * mask).reshape(*lead, E), "out.num_experts_per_token": mask.sum(-1).reshape(lead),
    }


def test_dynamic_moe_other_config(tmp_path):
    g = torch.Generator().manual_seed(11)
    H, I, E, top_p = 24, 40, 7, 0.55
    sd = {"router.weight": mat(g, E, H) * 2}
    for e in range(E):
        sd[f"experts.{e}.gate_proj.weight"] = mat(g, I, H)
        sd[f"experts.{e}.up_proj.weight"] = mat(g, I, H)
        sd[f"experts.{e}.down_proj.weight"] = mat(g, H, I)
    x = torch.randn(3, 4, H, generator=g)
    io = {"in.hidden_states": x, **dynamic_moe_reference(sd, top_p, x)}
    assert len(set(io["out.num_experts_per_token"].flatten().tolist())) >= 2  # dynamic k exercised
    cfg = {"hidden_size": H, "intermediate_size": I, "num_experts": E, "top_p_threshold": top_p, "hidden_act": "silu",
           "_reference": {"repo": "ZhenweiAn/Dynamic_MoE", "class": "SwitchMLP"}}
    # a full-checkpoint prefix is accepted too
    full = {f"model.layers.0.mlp.{k}": v for k, v in sd.items()}
    check_folder("dynamic_moe_topp", write_folder(tmp_path / "dyn", cfg, full, io))


# ---------------------------------------------------------------------------------------------------------------------
# AdaMoE
# ---------------------------------------------------------------------------------------------------------------------


def adamoe_reference(sd, E, n_null, top_k, x, mask, true_bound):
    flat = x.reshape(-1, x.shape[-1])
    T, R = flat.shape[0], E + n_null
    logits = torch.cat([flat @ sd["gate.weight"].T, flat @ sd["gate2.weight"].T], 1)
    probs = logits.softmax(-1)
    top = probs.topk(top_k, -1).indices
    out = torch.zeros_like(flat)
    emask = torch.zeros(T, R, dtype=torch.long)
    cw = torch.zeros(T, E)
    for t in range(T):
        sel = top[t].tolist()
        denom = sum(probs[t, e].item() for e in sel if e < true_bound) or 1.0
        for e in sel:
            emask[t, e] = 1
            if e < E:
                w = probs[t, e] / denom if e < true_bound else probs[t, e]
                cw[t, e] = w
                out[t] += w * swiglu(flat[t:t + 1], sd[f"experts.{e}.w1.weight"], sd[f"experts.{e}.w3.weight"],
                                     sd[f"experts.{e}.w2.weight"])[0]

    def mixtral_loss(m):
        onehot = F.one_hot(top, R).float()  # (T, k, R)
        if m is None:
            tpe, rpe = onehot.mean(0), probs.mean(0)
        else:
            m = m.reshape(-1).float()
            tpe = (onehot * m[:, None, None]).sum(0) / m.sum()
            rpe = (probs * m[:, None]).sum(0) / m.sum()
        return (tpe * rpe[None]).sum() * R

    return {"out.output": out.reshape(x.shape), "out.router_logits": logits, "out.expert_mask": emask,
            "out.combine_weights_true": cw, "out.num_true_experts_per_token": (top < E).sum(-1),
            "out.balance_loss": mixtral_loss(None), "out.balance_loss_masked": mixtral_loss(mask)}


def adamoe_weights(g, H, I, E, n_null):
    sd = {"gate.weight": mat(g, E, H) * 2, "gate2.weight": mat(g, n_null, H) * 2}
    for e in range(E):
        sd[f"experts.{e}.w1.weight"] = mat(g, I, H)
        sd[f"experts.{e}.w3.weight"] = mat(g, I, H)
        sd[f"experts.{e}.w2.weight"] = mat(g, H, I)
    return sd


def test_adamoe_other_config(tmp_path):
    """6 true experts (the official code hard-codes 8): moezoo treats ids < num_local_experts as true."""
    g = torch.Generator().manual_seed(5)
    H, I, E, n_null, k = 16, 24, 6, 4, 3
    sd = adamoe_weights(g, H, I, E, n_null)
    x = torch.randn(2, 9, H, generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, -4:] = 0
    io = {"in.hidden_states": x, "in.attention_mask": mask, **adamoe_reference(sd, E, n_null, k, x, mask, E)}
    counts = io["out.num_true_experts_per_token"]
    assert counts.min() < k and counts.max() > 0
    cfg = {"hidden_size": H, "intermediate_size": I, "num_local_experts": E, "num_experts_per_tok": k,
           "hidden_act": "silu", "router_jitter_noise": 0.0, "num_null_experts": n_null,
           "_reference": {"repo": "CengZihao/AdaMoE", "class": "CustomMixtralSparseMoeBlock"}}
    check_folder("adamoe", write_folder(tmp_path / "ada", cfg, sd, io))


def test_adamoe_official_true_bound_and_all_null():
    """``official_true_bound=True`` reproduces the hard-coded ``id <= 7`` test; all-null tokens give exactly 0."""
    g = torch.Generator().manual_seed(8)
    H, I, E, n_null, k = 16, 24, 4, 8, 3
    sd = adamoe_weights(g, H, I, E, n_null)
    sd["gate2.weight"] *= 2  # many tokens pick only null experts
    x = torch.randn(2, 10, H, generator=g)
    mod = get_reference("adamoe")
    cfg = {"num_local_experts": E, "num_null_experts": n_null, "num_experts_per_tok": k}
    for bound, official in ((E, False), (8, True)):
        want = adamoe_reference(sd, E, n_null, k, x, None, bound)
        layer = mod.convert(cfg, sd, official_true_bound=official).eval()
        with torch.no_grad():
            out, ro = layer(x)
        torch.testing.assert_close(out, want["out.output"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ro.combine_weights()[:, :E], want["out.combine_weights_true"], atol=1e-6, rtol=1e-5)
    none = (want["out.num_true_experts_per_token"] == 0).nonzero().flatten()
    assert none.numel() > 0
    assert torch.equal(out.reshape(-1, H)[none], torch.zeros(none.numel(), H))


# ---------------------------------------------------------------------------------------------------------------------
# MoE++
# ---------------------------------------------------------------------------------------------------------------------


def moepp_reference(sd, E, two_layer, mul_topk, x, residual):
    flat = x.reshape(-1, x.shape[-1])
    if two_layer:
        logits = torch.tanh(flat @ sd["moe.gate.wg.0.weight"].T) @ sd["moe.gate.wg.2.weight"].T
    else:
        logits = flat @ sd["moe.gate.wg.weight"].T
    if residual is not None:
        logits = logits + residual @ sd["moe.gate.gate_map.weight"].T
    probs = logits.softmax(-1)
    x2 = flat * 2 if mul_topk else flat
    out = torch.zeros_like(flat)
    emask = torch.zeros(flat.shape[0], E, dtype=torch.long)
    cw = torch.zeros(flat.shape[0], E)
    for t in range(flat.shape[0]):
        vals, ids = probs[t].topk(2)
        gates = [0.0 if e == E - 1 else v.item() for v, e in zip(vals, ids.tolist())]
        s = sum(gates)
        for gv, e in zip(gates, ids.tolist()):
            gv = gv / s
            emask[t, e], cw[t, e] = 1, gv
            xi = x2[t]
            if e < E - 4:
                w = sd[f"moe.experts.experts.{e}.up_proj.weight"]
                h = w @ xi
                a, b = h[: h.shape[0] // 2], h[h.shape[0] // 2:]
                y = sd[f"moe.experts.experts.{e}.down_proj.weight"] @ (F.silu(a) * b)
            elif e < E - 2:
                mix = (sd[f"moe.experts.experts.{e}.wg.weight"] @ xi).softmax(-1)
                y = mix[0] * xi + mix[1] * sd[f"moe.experts.experts.{e}.constant"]
            elif e == E - 2:
                y = xi
            else:
                y = torch.zeros_like(xi)
            out[t] += gv * y
    return out.reshape(x.shape), logits, emask, cw


@pytest.mark.parametrize("E,two_layer,mul_topk", [(6, True, True), (9, False, False)])
def test_moe_plus_plus_other_config(tmp_path, E, two_layer, mul_topk):
    g = torch.Generator().manual_seed(E)
    H, I = 20, 36
    sd = {"moe.gate.gate_map.weight": mat(g, E, E)}
    if two_layer:
        sd["moe.gate.wg.0.weight"] = mat(g, 8 * E, H) * 2
        sd["moe.gate.wg.2.weight"] = mat(g, E, 8 * E) * 3
    else:
        sd["moe.gate.wg.weight"] = mat(g, E, H) * 2
    for e in range(E - 4):
        sd[f"moe.experts.experts.{e}.up_proj.weight"] = mat(g, 2 * I, H)
        sd[f"moe.experts.experts.{e}.down_proj.weight"] = mat(g, H, I)
    for e in (E - 4, E - 3):
        sd[f"moe.experts.experts.{e}.constant"] = torch.randn(H, generator=g)
        sd[f"moe.experts.experts.{e}.wg.weight"] = mat(g, 2, H)
    x = torch.randn(3, 8, H, generator=g)
    res = torch.randn(24, E, generator=g)
    io = {"in.hidden_states": x, "in.gate_residual": res}
    for tag, r in (("nores", None), ("res", res)):
        out, logits, emask, cw = moepp_reference(sd, E, two_layer, mul_topk, x, r)
        io.update({f"out.output_{tag}": out, f"out.gate_logits_{tag}": logits, f"out.expert_mask_{tag}": emask,
                   f"out.combine_weights_{tag}": cw})
    assert io["out.expert_mask_res"][:, E - 4:].sum(0).min() > 0  # every special expert picked
    cfg = {"moe_use_mixtral_gating": False, "moe_2layer_gate": two_layer, "moe_use_logits_norm": False,
           "moe_gate_norm_std": 1.0, "moe_feature_no_mul_topk": not mul_topk, "hidden_act": "silu",
           "hidden_size": H, "intermediate_size": I, "num_experts": [E],
           "_reference": {"repo": "SkyworkAI/MoE-plus-plus", "class": "MOE"}}
    check_folder("moe_plus_plus", write_folder(tmp_path / "mpp", cfg, sd, io))


# ---------------------------------------------------------------------------------------------------------------------
# UniMoE-Audio
# ---------------------------------------------------------------------------------------------------------------------


def unimoe_reference(sd, D, N, Fx, top_p, eps, x, pad_mask, balance_weight):
    flat = x.reshape(-1, x.shape[-1])
    T, R = flat.shape[0], D + N + Fx
    logits = flat @ sd["gate.weight"].T
    dyn = list(range(D + N))
    fixed = list(range(D + N, R))
    pm = pad_mask.reshape(-1)
    ks = torch.zeros(T, dtype=torch.long)
    emask = torch.zeros(T, R, dtype=torch.long)
    cw = torch.zeros(T, R)
    out = torch.zeros_like(flat)
    for t in range(T):
        dl = logits[t, : D + N]
        dp = dl.softmax(-1)
        sp, order = dp.sort(descending=True)
        cs = sp.cumsum(0)
        k = 1 + int((cs < top_p).sum())
        ks[t] = k
        # SparseMixer eval: k greedy picks
        scores = dl.clone()
        picks, mults = [], []
        for _ in range(k):
            m, j = scores.max(0)
            factor = torch.maximum(scores.abs(), m.abs())
            masked = torch.where((m - scores) / factor > 2 * eps, torch.tensor(float("-inf")), scores)
            mults.append(masked.softmax(0)[j].item())
            picks.append(int(j))
            scores = scores.clone()
            scores[j] = float("-inf")
        mults = [v / (sum(mults) + 1e-6) for v in mults]
        sel = set(picks) if pm[t] else set()
        allowed = sorted(sel) + fixed
        sm = torch.zeros(R)
        sm[allowed] = logits[t, allowed].softmax(0)
        mass = sum(sm[e].item() for e in sel)
        for e, mu in zip(picks, mults):
            if e in sel:
                emask[t, e] = 1
                cw[t, e] = mu * mass
        for e in fixed:
            emask[t, e] = 1
            cw[t, e] = sm[e]
        for e in range(R):
            if emask[t, e] and (e < D or e >= D + N):
                pre = f"dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts.{e}" if e < D else f"fixed_real_moe.{e - D - N}"
                out[t] += cw[t, e] * swiglu(flat[t:t + 1], sd[f"{pre}.gate_proj.weight"], sd[f"{pre}.up_proj.weight"],
                                            sd[f"{pre}.down_proj.weight"])[0]

    def aux(w):
        m = emask[:, dyn].float()
        p = torch.stack([torch.softmax(torch.where(m[t] > 0, logits[t, dyn], torch.tensor(torch.finfo(torch.float32).min)), 0)
                         for t in range(T)])
        w = torch.ones(T) if w is None else w.reshape(-1).float()
        f = (m * w[:, None]).sum(0) / w.sum()
        P = (p * w[:, None]).sum(0) / w.sum()
        return ((f * P).sum() * len(dyn)).reshape(1)

    return {"out.hidden_states": out.reshape(x.shape), "out.router_logits": logits, "out.dynamic_top_k": ks,
            "out.expert_mask": emask, "out.combine_weights": cw, "out.aux_loss": aux(balance_weight),
            "out.aux_loss_no_balance_weight": aux(None)}


def test_unimoe_audio_other_config(tmp_path):
    g = torch.Generator().manual_seed(3)
    H, D, N, Fx, dyn_i, fix_i, top_p, eps = 16, 6, 2, 1, 20, 28, 0.5, 0.02
    gate = torch.randn(D + N + Fx, H, generator=g) * 0.4
    gate[1] = gate[0] * 1.01  # near-ties between experts 0 and 1 exercise the SparseMixer window
    sd = {"gate.weight": gate}
    for e in range(D):
        pre = f"dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts.{e}"
        sd[f"{pre}.gate_proj.weight"], sd[f"{pre}.up_proj.weight"] = mat(g, dyn_i, H), mat(g, dyn_i, H)
        sd[f"{pre}.down_proj.weight"] = mat(g, H, dyn_i)
    for f in range(Fx):
        sd[f"fixed_real_moe.{f}.gate_proj.weight"], sd[f"fixed_real_moe.{f}.up_proj.weight"] = mat(g, fix_i, H), mat(g, fix_i, H)
        sd[f"fixed_real_moe.{f}.down_proj.weight"] = mat(g, H, fix_i)
    x = torch.randn(2, 7, H, generator=g)
    pad = torch.ones(2, 7, dtype=torch.long)
    pad[0, -2:] = 0
    pad[1, -1:] = 0
    bw = (torch.rand(2, 7, generator=g) > 0.3).long() * pad
    io = {"in.hidden_states": x, "in.attention_mask": pad, "in.aux_balance_weight": bw,
          **unimoe_reference(sd, D, N, Fx, top_p, eps, x, pad, bw)}
    assert len(set(io["out.dynamic_top_k"].tolist())) >= 2
    cw = io["out.combine_weights"]
    assert ((cw[:, :D] > 0) & (cw[:, :D] < cw[:, :D].max(-1, keepdim=True).values - 1e-3)).any()  # unequal picks (tie)
    cfg = {"mlp_dynamic_top_k": 0, "ignore_differentiable_router": True, "router_jitter_noise": eps, "hidden_act": "silu",
           "hidden_size": H, "mlp_dynamic_expert_num": D, "mlp_dynamic_null_expert_num": N, "mlp_fixed_expert_num": Fx,
           "dynamic_intermediate_size": dyn_i, "shared_intermediate_size": fix_i, "mlp_dynamic_top_p": top_p,
           "_reference": {"repo": "HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs", "class": "UniMoEAudioSparseMoeBlock"}}
    check_folder("unimoe_audio_block", write_folder(tmp_path / "uni", cfg, sd, io))


def test_wrong_reference_folder_rejected():
    folder = SHARED / "adamoe"
    if not folder.is_dir():
        pytest.skip("fixture not available")
    from moezoo.parity import ParityError
    with pytest.raises(ParityError, match="AdaMoE"):
        run_parity("unimoe_audio_block", folder, verbose=False)
