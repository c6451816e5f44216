"""Time-MoE parity: the shared reference folder (official outputs) and a *different* config (6 experts top-3, GQA 4/2,
horizons [1, 3, 5], 3 layers) whose expected outputs come from an independent plain-torch re-implementation of the
official forward written from the folder's README (official key names, no moezoo code), run through ``run_parity``."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moezoo.parity import run_parity  # noqa: E402

PARITY = Path(os.environ.get("MOEZOO_PARITY_DIR", Path(__file__).resolve().parents[3].parent / "shared" / "parity"))
REF = PARITY / "time_moe"


# ---------------------------------------------------------------------------------------------- independent reference
def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _swiglu(sd, p, x):
    return F.linear(F.silu(F.linear(x, sd[p + "gate_proj.weight"])) * F.linear(x, sd[p + "up_proj.weight"]),
                    sd[p + "down_proj.weight"])


def _rot(x):
    d = x.shape[-1] // 2
    return torch.cat([-x[..., d:], x[..., :d]], -1)


def ref_forward(sd, cfg, x, past=None):
    """Official TimeMoeForPrediction trunk on (B, T) values. ``past``: list of (k, v) per layer (grown in place).
    Returns (normed hidden (B,T,H), hidden list (L+1), router logits list)."""
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, E, K, eps = H // nh, cfg["num_experts"], cfg["num_experts_per_tok"], cfg["rms_norm_eps"]
    B, T = x.shape
    x = x.unsqueeze(-1)
    h = F.silu(F.linear(x, sd["model.embed_layer.gate_layer.weight"])) * F.linear(x, sd["model.embed_layer.emb_layer.weight"])
    offset = 0 if past is None or past[0] is None else past[0][0].shape[2]
    pos = torch.arange(offset, offset + T).float()
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(pos, inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    hiddens, routers = [h], []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = _rms(h, sd[p + "input_layernorm.weight"], eps)
        q = F.linear(a, sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.q_proj.bias"]).view(B, T, nh, hd).transpose(1, 2)
        k = F.linear(a, sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.k_proj.bias"]).view(B, T, nkv, hd).transpose(1, 2)
        v = F.linear(a, sd[p + "self_attn.v_proj.weight"], sd[p + "self_attn.v_proj.bias"]).view(B, T, nkv, hd).transpose(1, 2)
        q, k = q * cos + _rot(q) * sin, k * cos + _rot(k) * sin
        if past is not None:
            if past[i] is not None:
                k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
            past[i] = (k, v)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        S = k.shape[2]
        s = q @ k.transpose(2, 3) / math.sqrt(hd)
        allowed = torch.arange(S)[None, :] <= (torch.arange(T)[:, None] + S - T)
        s = s.masked_fill(~allowed, float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H)
        h = h + F.linear(o, sd[p + "self_attn.o_proj.weight"])
        f = _rms(h, sd[p + "post_attention_layernorm.weight"], eps).reshape(B * T, H)
        if cfg.get("use_dense"):  # official use_dense: one SwiGLU MLP of width intermediate_size
            h = h + _swiglu(sd, p + "ffn_layer.", f).view(B, T, H)
            hiddens.append(h)
            continue
        logits = F.linear(f, sd[p + "ffn_layer.gate.weight"])
        routers.append(logits)
        probs = logits.softmax(-1)
        w, sel = probs.topk(K, -1)  # not renormalised
        moe = torch.zeros_like(f)
        for t in range(B * T):
            for j in range(K):
                moe[t] += w[t, j] * _swiglu(sd, p + f"ffn_layer.experts.{int(sel[t, j])}.", f[t])
        shared = torch.sigmoid(F.linear(f, sd[p + "ffn_layer.shared_expert_gate.weight"])) * _swiglu(sd, p + "ffn_layer.shared_expert.", f)
        h = h + (moe + shared).view(B, T, H)
        hiddens.append(h)
    normed = _rms(h, sd["model.norm.weight"], eps)
    hiddens[-1] = normed
    return normed, hiddens, routers


def ref_ar_loss(pred, labels, h, masks=None):
    B, T = labels.shape
    pred = pred.view(B, T, h)
    tgt = torch.stack([F.pad(labels, (0, h - 1))[:, j:j + T] for j in range(h)], -1)
    loss = F.huber_loss(pred, tgt, reduction="none", delta=2.0)
    if masks is None:
        return loss.mean()
    m = torch.stack([F.pad(masks, (0, h - 1))[:, j:j + T] for j in range(h)], -1)
    return (loss * m).sum() / m.sum()


def ref_balance(routers, K, E, mask=None):
    logits = torch.cat(routers, 0)
    probs = logits.softmax(-1)
    onehot = F.one_hot(probs.topk(K, -1).indices, E).float()  # (N, K, E)
    if mask is None:
        return (onehot.mean(0) * probs.mean(0)).sum() * E
    # the official masked variant (hard-codes 2 slots)
    L = len(routers)
    m = mask[None, :, :, None, None].expand(L, *mask.shape, 2, E).reshape(-1, 2, E).float()
    f = (onehot * m).sum(0) / m.sum(0)
    mp = mask[None, :, :, None].expand(L, *mask.shape, E).reshape(-1, E).float()
    P = (probs * mp).sum(0) / mp.sum(0)
    return (f * P).sum() * E


def ref_head(h_list, horizons, max_h=None):
    idx = 0
    if max_h is not None:
        for i, h in enumerate(horizons[1:], 1):
            if h > max_h:
                break
            idx = i
    return idx


def ref_generate(sd, cfg, x, n):
    seq, past, step = x, [None] * cfg["num_hidden_layers"], x
    while seq.shape[1] < x.shape[1] + n:
        remaining = x.shape[1] + n - seq.shape[1]
        normed, _, _ = ref_forward(sd, cfg, step, past)
        idx = ref_head(None, cfg["horizon_lengths"], remaining)
        out = F.linear(normed[:, -1], sd[f"lm_heads.{idx}.out_layer.weight"])[:, :remaining]
        seq, step = torch.cat([seq, out], 1), out
    return seq


def make_reference_folder(folder: Path, cfg: dict, seed: int = 0) -> None:
    """Official-layout weights (README init scheme) + outputs of the reference implementation."""
    g = torch.Generator().manual_seed(seed + 1000)
    H, I, E, K = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_experts"], cfg["num_experts_per_tok"]
    kvd = cfg["num_key_value_heads"] * (H // cfg["num_attention_heads"])
    shapes = {"model.embed_layer.emb_layer.weight": (H, 1), "model.embed_layer.gate_layer.weight": (H, 1)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.q_proj.bias": (H,),
                       p + "self_attn.k_proj.weight": (kvd, H), p + "self_attn.k_proj.bias": (kvd,),
                       p + "self_attn.v_proj.weight": (kvd, H), p + "self_attn.v_proj.bias": (kvd,),
                       p + "self_attn.o_proj.weight": (H, H),
                       p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)})
        if cfg.get("use_dense"):
            shapes.update({p + "ffn_layer.gate_proj.weight": (I, H), p + "ffn_layer.up_proj.weight": (I, H),
                           p + "ffn_layer.down_proj.weight": (H, I)})
            continue
        shapes[p + "ffn_layer.gate.weight"] = (E, H)
        for e in range(E):
            q = p + f"ffn_layer.experts.{e}."
            shapes.update({q + "gate_proj.weight": (I // K, H), q + "up_proj.weight": (I // K, H),
                           q + "down_proj.weight": (H, I // K)})
        q = p + "ffn_layer.shared_expert."
        shapes.update({q + "gate_proj.weight": (I, H), q + "up_proj.weight": (I, H), q + "down_proj.weight": (H, I),
                       p + "ffn_layer.shared_expert_gate.weight": (1, H)})
    shapes["model.norm.weight"] = (H,)
    for j, h in enumerate(cfg["horizon_lengths"]):
        shapes[f"lm_heads.{j}.out_layer.weight"] = (h, H)
    sd = {}
    for k, s in shapes.items():
        if len(s) == 2:
            sd[k] = torch.randn(s, generator=g) / math.sqrt(s[1])
        elif k.endswith("bias"):
            sd[k] = 0.1 * torch.randn(s, generator=g)
        else:
            sd[k] = 1 + 0.1 * torch.randn(s, generator=g)
    gi = torch.Generator().manual_seed(seed)
    B, T = 2, 12
    seq = torch.randn(B, T + 1, generator=gi).cumsum(1)
    seq = (seq - seq.mean(1, keepdim=True)) / seq.std(1, keepdim=True)
    x, labels = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    masks = torch.ones(B, T)
    masks[1, -3:] = 0
    io = {"in.input_ids": x, "in.labels": labels, "in.loss_masks": masks}
    with torch.no_grad():
        normed, hiddens, routers = ref_forward(sd, cfg, x)
        io["out.hidden_states"] = torch.stack(hiddens)
        if routers:
            io["out.router_logits"] = torch.stack(routers)
        heads = [F.linear(normed, sd[f"lm_heads.{j}.out_layer.weight"]) for j in range(len(cfg["horizon_lengths"]))]
        io["out.logits_default"] = heads[0]
        io["out.logits_maxh4"] = heads[ref_head(None, cfg["horizon_lengths"], 4)]
        ar, arm = [], []
        for j, h in enumerate(cfg["horizon_lengths"]):
            io[f"out.logits_h{h}"] = heads[j]
            ar.append(ref_ar_loss(heads[j], labels, h))
            arm.append(ref_ar_loss(heads[j], labels, h, masks))
            io[f"out.ar_loss_h{h}"] = ar[-1]
        aux = ref_balance(routers, K, E) if routers else torch.zeros(())
        if routers:
            io["out.aux_loss"] = aux
        io["out.loss"] = sum(ar) / len(ar) + cfg["router_aux_loss_factor"] * aux
        io["out.loss_masked"] = sum(arm) / len(arm) + cfg["router_aux_loss_factor"] * aux
        for n in (4, 7):
            io[f"out.generate_pred{n}"] = ref_generate(sd, cfg, x, n)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    save_file({k: v.clone().contiguous() for k, v in io.items()}, str(folder / "io.safetensors"))
    conf = dict(cfg, _reference={"repo": "Time-MoE/Time-MoE", "class": "TimeMoeForPrediction"})
    (folder / "config.json").write_text(json.dumps(conf))
    (folder / "io.json").write_text(json.dumps({"tensors": {k: {"shape": list(v.shape)} for k, v in io.items()}}))


OTHER = dict(input_size=1, hidden_size=48, intermediate_size=96, horizon_lengths=[1, 3, 5], num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", num_experts=6, num_experts_per_tok=3,
             max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000, use_dense=False, apply_aux_loss=True,
             router_aux_loss_factor=0.02, attention_dropout=0.0)


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.skipif(not REF.is_dir(), reason="shared parity folder absent")
def test_shared_reference_folder_matches_every_output():
    results = run_parity("time_moe", REF, verbose=False)
    names = {c.name for c in results}
    io = load_file(str(REF / "io.safetensors"))
    assert names == {k for k in io if k.startswith("out.")} and len(names) == 15
    bad = [(c.name, c.max_abs_diff, c.note) for c in results if not c.ok]
    assert not bad, bad


@pytest.fixture(scope="module")
def other_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("time_moe_other")
    make_reference_folder(folder, OTHER)
    return folder


def test_other_config_matches_independent_reference(other_folder):
    results = run_parity("time_moe", other_folder, verbose=False)
    assert len(results) == 15
    bad = [(c.name, c.max_abs_diff) for c in results if not c.ok]
    assert not bad, bad
    from moezoo.parity.time_moe import convert

    cfg = json.loads((other_folder / "config.json").read_text())
    model = convert(cfg, load_file(str(other_folder / "model.safetensors")))
    c = model.config
    assert (c.num_experts, c.num_experts_per_tok, c.num_key_value_heads, c.moe_intermediate_size) == (6, 3, 2, 32)
    assert c.horizon_lengths == [1, 3, 5] and c.num_hidden_layers == 3


def test_dense_official_checkpoint(tmp_path):
    """Official ``use_dense=True`` (``apply_aux_loss=False``) checkpoints convert to the dense FFN and match too."""
    cfg = dict(OTHER, use_dense=True, apply_aux_loss=False, num_hidden_layers=2)
    make_reference_folder(tmp_path, cfg, seed=1)
    results = run_parity("time_moe", tmp_path, verbose=False)
    assert len(results) == 13 and all(c.ok for c in results), [(c.name, c.max_abs_diff) for c in results if not c.ok]
    from moezoo.parity.time_moe import convert

    model = convert(cfg, load_file(str(tmp_path / "model.safetensors")))
    assert model.config.use_dense and model.config.dense_intermediate_size == 96 and model.moe_layers() == []


def test_swapped_experts_are_detected(other_folder, tmp_path):
    """A wrong conversion (two experts swapped) must fail: the check is not vacuous."""
    import shutil

    for f in other_folder.iterdir():
        shutil.copy(f, tmp_path / f.name)
    sd = load_file(str(tmp_path / "model.safetensors"))
    for n in ("gate_proj", "up_proj", "down_proj"):
        a, b = f"model.layers.1.ffn_layer.experts.0.{n}.weight", f"model.layers.1.ffn_layer.experts.1.{n}.weight"
        sd[a], sd[b] = sd[b], sd[a]
    save_file(sd, str(tmp_path / "model.safetensors"))
    results = {c.name: c.ok for c in run_parity("time_moe", tmp_path, verbose=False)}
    assert not results["out.logits_h1"] and not results["out.generate_pred7"]
    assert results["out.router_logits"] is False  # layer 2's routing sees the changed layer-1 output


def test_masked_balance_loss_equals_official_top2_formula():
    """The official masked aux loss only runs for top-2; moezoo's masked switch loss equals it there."""
    import moezoo

    torch.manual_seed(0)
    model = moezoo.create_model("time_moe_tiny_e4k2", tiny=True).eval()
    x = torch.randn(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=mask, output_router_logits=True)
        got = model.balance_loss(out.router_outputs, attention_mask=mask)
        want = ref_balance(list(out.router_logits), 2, model.config.num_experts, mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, ref_balance(list(out.router_logits), 2, model.config.num_experts))
