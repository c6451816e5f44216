"""Independent plain-torch re-implementations of the official DiT-MoE and ProMoE forwards, written from the parity
READMEs (shared/parity/{dit_moe,promoe}/README.md) and operating on OFFICIAL state-dict keys - no moezoo code.

``make_folder`` writes a parity folder (config.json with ``_reference``, model.safetensors, io.safetensors, io.json)
for any config, so ``moezoo.parity.run_parity`` can be checked on configs other than the shared fixtures.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------ shared pieces
def pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE/DiT 2-D sin-cos table (grid^2, dim): first half encodes the column index, second half the row index."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    emb = np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)
    return torch.from_numpy(emb).float()


def t_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def mod(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def lin(sd, name, x):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def attention(sd, pre, x, heads, qk_norm=False):
    B, N, _ = x.shape
    qkv = lin(sd, pre + ".qkv", x)
    hd = qkv.shape[-1] // (3 * heads)
    q, k, v = qkv.reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
    if qk_norm:
        q = F.layer_norm(q, (hd,), sd[pre + ".q_norm.weight"], sd[pre + ".q_norm.bias"])
        k = F.layer_norm(k, (hd,), sd[pre + ".k_norm.weight"], sd[pre + ".k_norm.bias"])
    att = (q @ k.transpose(-1, -2) / math.sqrt(hd)).softmax(-1)
    return lin(sd, pre + ".proj", (att @ v).transpose(1, 2).reshape(B, N, heads * hd))


def embed(sd, x, t, y, p):
    w = sd["x_embedder.proj.weight"]
    tok = F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]
    temb = lin(sd, "t_embedder.mlp.2", F.silu(lin(sd, "t_embedder.mlp.0", t_features(t))))
    return tok, temb + sd["y_embedder.embedding_table.weight"][y]


def final(sd, x, c, p, out_ch):
    shift, scale = lin(sd, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    x = lin(sd, "final_layer.linear", mod(layer_norm(x), shift, scale))
    B, T, _ = x.shape
    g = int(math.isqrt(T))
    x = x.reshape(B, g, g, p, p, out_ch)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, out_ch, g * p, g * p)


# ------------------------------------------------------------------------------------------------ DiT-MoE
def dit_moe_forward(sd, cfg, x, t, y):
    """Returns (output, {block: (logits, topk_idx, topk_weight, aux)})."""
    p, H, E, k = cfg["patch_size"], cfg["hidden_size"], cfg["num_experts"], cfg["num_experts_per_tok"]
    out_ch = cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1)
    h, c = embed(sd, x, t, y, p)
    info = {}
    for i in range(cfg["depth"]):
        pre = f"blocks.{i}"
        sm, cm, gm, s2, c2, g2 = lin(sd, pre + ".adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
        h = h + gm[:, None] * attention(sd, pre + ".attn", mod(layer_norm(h), sm, cm), cfg["num_heads"])
        z = mod(layer_norm(h), s2, c2)
        flat = z.reshape(-1, H)
        logits = flat @ sd[pre + ".moe.gate.weight"].T
        scores = logits.softmax(-1)
        w, idx = scores.topk(k, dim=-1)  # sorted descending, no renormalisation
        moe = torch.zeros_like(flat)
        for e in range(E):
            e_pre = f"{pre}.moe.experts.{e}"
            ye = lin(sd, e_pre + ".down_proj", F.silu(lin(sd, e_pre + ".gate_proj", flat)) * lin(sd, e_pre + ".up_proj", flat))
            moe = moe + ye * (w * (idx == e)).sum(-1, keepdim=True)
        s_pre = f"{pre}.moe.shared_experts"
        moe = moe + lin(sd, s_pre + ".down_proj", F.silu(lin(sd, s_pre + ".gate_proj", flat)) * lin(sd, s_pre + ".up_proj", flat))
        counts = torch.stack([(idx == e).sum() for e in range(E)]).float()
        aux = 0.01 * E * (scores.mean(0) * counts / (flat.shape[0] * k)).sum()
        info[i] = (logits, idx, w, aux)
        h = h + g2[:, None] * moe.reshape(z.shape)
    return final(sd, h, c, p, out_ch), info


def dit_moe_cfg(sd, cfg, x, t, y, scale):
    half = x[: len(x) // 2]
    out, _ = dit_moe_forward(sd, cfg, torch.cat([half, half]), t, y)
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = eps.split(len(eps) // 2)
    g = uncond + scale * (cond - uncond)
    return torch.cat([torch.cat([g, g]), rest], dim=1)


def random_dit_moe_state(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, p, C, E = cfg["hidden_size"], cfg["patch_size"], cfg["in_channels"], cfg["num_experts"]
    I, grid = int(cfg["mlp_ratio"] * H), cfg["input_size"] // p
    out_ch = C * (2 if cfg["learn_sigma"] else 1)

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    sd = {"x_embedder.proj.weight": r(H, C, p, p), "x_embedder.proj.bias": r(H),
          "pos_embed": pos_embed_2d(H, grid)[None], "t_embedder.mlp.0.weight": r(H, 256, std=0.05),
          "t_embedder.mlp.0.bias": r(H), "t_embedder.mlp.2.weight": r(H, H), "t_embedder.mlp.2.bias": r(H),
          "y_embedder.embedding_table.weight": r(cfg["num_classes"] + 1, H, std=1.0),
          "final_layer.adaLN_modulation.1.weight": r(2 * H, H), "final_layer.adaLN_modulation.1.bias": r(2 * H),
          "final_layer.linear.weight": r(p * p * out_ch, H), "final_layer.linear.bias": r(p * p * out_ch)}
    for i in range(cfg["depth"]):
        pre = f"blocks.{i}"
        sd.update({f"{pre}.attn.qkv.weight": r(3 * H, H), f"{pre}.attn.qkv.bias": r(3 * H),
                   f"{pre}.attn.proj.weight": r(H, H), f"{pre}.attn.proj.bias": r(H),
                   f"{pre}.adaLN_modulation.1.weight": r(6 * H, H), f"{pre}.adaLN_modulation.1.bias": r(6 * H),
                   f"{pre}.moe.gate.weight": r(E, H, std=0.5)})
        for e in range(E):
            for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                sd[f"{pre}.moe.experts.{e}.{name}.weight"] = r(*shape)
        for name, shape in (("gate_proj", (2 * H, H)), ("up_proj", (2 * H, H)), ("down_proj", (H, 2 * H))):
            sd[f"{pre}.moe.shared_experts.{name}.weight"] = r(*shape)
    return sd


def dit_moe_outputs(sd, cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    C, S, B = cfg["in_channels"], cfg["input_size"], 3
    x = torch.randn(B, C, S, S, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, cfg["num_classes"], (B,), generator=g)
    io = {"in.x": x, "in.t": t, "in.y": y}
    out, info = dit_moe_forward(sd, cfg, x, t, y)
    io["out.eval.output"] = out
    for i, (logits, idx, w, _) in info.items():
        io[f"out.eval.blocks.{i}.moe.gate.logits"] = logits
        io[f"out.eval.blocks.{i}.moe.gate.topk_idx"] = idx
        io[f"out.eval.blocks.{i}.moe.gate.topk_weight"] = w
    leaf = {k: v.clone().requires_grad_(k.endswith("moe.gate.weight")) for k, v in sd.items()}
    out, info = dit_moe_forward(leaf, cfg, x, t, y)
    aux = sum(a for *_, a in info.values())
    (out.sum() + aux).backward()  # AddAuxiliaryLoss: each aux loss gets gradient 1
    io["out.train.output"] = out.detach()
    for i, (*_, a) in info.items():
        io[f"out.train.blocks.{i}.moe.gate.aux_loss"] = a.detach()
        io[f"out.train.grad_of_output_sum.blocks.{i}.moe.gate.weight"] = leaf[f"blocks.{i}.moe.gate.weight"].grad
    io["out.train.aux_loss_total"] = aux.detach()
    xc = torch.randn(2, C, S, S, generator=g)
    io["in.cfg.x"] = torch.cat([xc, xc])
    io["in.cfg.t"] = torch.tensor([10, 700, 10, 700])
    io["in.cfg.y"] = torch.tensor([1, 2, cfg["num_classes"], cfg["num_classes"]])
    io["in.cfg.cfg_scale"] = torch.tensor(2.5)
    io["out.cfg.output"] = dit_moe_cfg(sd, cfg, io["in.cfg.x"], io["in.cfg.t"], io["in.cfg.y"], 2.5)
    return {k: v.detach().contiguous() for k, v in io.items()}


# ------------------------------------------------------------------------------------------------ ProMoE
PROMOE_DEFAULTS = dict(top_k=2, load_balance_loss_coef=0.001, norm_topk_prob=False, use_shared_expert=True,
                       use_uncond_expert=True, router_weight_mode="softmax", routing_contrastive_lam=0,
                       use_top_k_for_routing_contrastive=False, routing_contrastive_temperature=0.1,
                       interleave=False)


def _gelu_mlp(sd, pre, x, up="up_proj", down="down_proj"):
    return lin(sd, f"{pre}.{down}", F.gelu(lin(sd, f"{pre}.{up}", x), approximate="tanh"))


def promoe_moe(sd, pre, z, labels, m):
    """One SparseMoeBlock: (output, rcl + balance loss (or None), cos, weights, indices)."""
    B, T, H = z.shape
    E, k = sd[pre + ".cluster_centers"].shape[0], m["top_k"]
    flat = z.reshape(-1, H)
    tok_labels = labels[:, None].expand(B, T).reshape(-1)
    null = (tok_labels == 1000) if m["use_uncond_expert"] else torch.zeros_like(tok_labels, dtype=torch.bool)
    cond = ~null
    centers = sd[pre + ".cluster_centers"]
    cos = F.normalize(flat, dim=1) @ F.normalize(centers, dim=1).T
    mode = m["router_weight_mode"]
    scores = {"softmax": lambda s: s.softmax(1), "sigmoid": torch.sigmoid, "identity": lambda s: s}[mode](cos)
    top_w, top_i = scores.topk(k, dim=1)
    weights = torch.zeros(B * T, k)
    indices = torch.zeros(B * T, k, dtype=torch.long)
    weights = torch.where(cond[:, None], top_w, weights)
    indices = torch.where(cond[:, None], top_i, indices)
    weights[null, 0] = 1.0
    indices[null] = E
    n_exp = E + int(m["use_uncond_expert"])
    out = torch.zeros_like(flat)
    for e in range(n_exp):
        ye = _gelu_mlp(sd, f"{pre}.experts.{e}", flat)
        out = out + ye * (weights * (indices == e)).sum(1, keepdim=True)
    if m["use_shared_expert"]:
        out = out + _gelu_mlp(sd, f"{pre}.shared_expert", flat)
    loss = None
    if m["load_balance_loss_coef"] > 0 and cond.any():
        s = scores[cond] if mode == "softmax" else scores[cond].softmax(1)
        ids = top_i[cond]
        frac = torch.stack([(ids == e).float().sum() for e in range(E)]) / ids.numel()
        loss = (s.mean(0) * frac * E).sum() * m["load_balance_loss_coef"]
    if m["routing_contrastive_lam"] > 0:
        toks = flat[cond]
        assign = top_i[cond] if m["use_top_k_for_routing_contrastive"] else top_i[cond][:, :1]
        means, valid = [], []
        for c in range(E):
            sel = (assign == c).any(1)
            if sel.sum() > 0:
                means.append(toks[sel].mean(0))
                valid.append(c)
        rcl = torch.zeros(())
        if len(valid) >= 2:
            sim = F.normalize(centers[valid], dim=1) @ F.normalize(torch.stack(means), dim=1).T
            rcl = F.cross_entropy(sim / m["routing_contrastive_temperature"], torch.arange(len(valid)))
        rcl = rcl * m["routing_contrastive_lam"]
        loss = rcl if loss is None else loss + rcl
    else:
        rcl = None
    return out.reshape(B, T, H), loss, rcl, cos, weights, indices


def promoe_forward(sd, cfg, x, t, y):
    m = dict(PROMOE_DEFAULTS, **cfg["MoE_config"])
    p = cfg["patch_size"]
    out_ch = cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1)
    h, c = embed(sd, x, t, y, p)
    info = {}
    for i in range(cfg["depth"]):
        pre = f"blocks.{i}"
        sm, cm, gm, s2, c2, g2 = lin(sd, pre + ".adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
        h = h + gm[:, None] * attention(sd, pre + ".attn", mod(layer_norm(h), sm, cm), cfg["num_heads"],
                                        cfg.get("qk_norm", False))
        z = mod(layer_norm(h), s2, c2)
        if (i % 2 == 1) or not m["interleave"]:
            o, loss, rcl, cos, w, idx = promoe_moe(sd, pre + ".mlp", z, y, m)
            info[i] = (z, cos, w, idx, loss, rcl)
        else:
            o = _gelu_mlp(sd, pre + ".mlp", z, "fc1", "fc2")
        h = h + g2[:, None] * o
    return final(sd, h, c, p, out_ch), info


def random_promoe_state(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = dict(PROMOE_DEFAULTS, **cfg["MoE_config"])
    H, p, C = cfg["hidden_size"], cfg["patch_size"], cfg["in_channels"]
    E, I, SI = m["num_routed_experts"], m["moe_intermediate_size"], m["shared_expert_intermediate_size"]
    grid = cfg["input_size"] // p
    out_ch = C * (2 if cfg["learn_sigma"] else 1)
    D = int(cfg["mlp_ratio"] * H)

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    sd = {"x_embedder.proj.weight": r(H, C, p, p), "x_embedder.proj.bias": r(H),
          "pos_embed": pos_embed_2d(H, grid)[None], "t_embedder.mlp.0.weight": r(H, 256, std=0.05),
          "t_embedder.mlp.0.bias": r(H), "t_embedder.mlp.2.weight": r(H, H), "t_embedder.mlp.2.bias": r(H),
          "y_embedder.embedding_table.weight": r(cfg["num_classes"] + 1, H, std=1.0),
          "final_layer.adaLN_modulation.1.weight": r(2 * H, H), "final_layer.adaLN_modulation.1.bias": r(2 * H),
          "final_layer.linear.weight": r(p * p * out_ch, H), "final_layer.linear.bias": r(p * p * out_ch)}
    for i in range(cfg["depth"]):
        pre = f"blocks.{i}"
        sd.update({f"{pre}.attn.qkv.weight": r(3 * H, H), f"{pre}.attn.qkv.bias": r(3 * H),
                   f"{pre}.attn.proj.weight": r(H, H), f"{pre}.attn.proj.bias": r(H),
                   f"{pre}.adaLN_modulation.1.weight": r(6 * H, H), f"{pre}.adaLN_modulation.1.bias": r(6 * H)})
        if cfg.get("qk_norm"):
            hd = H // cfg["num_heads"]
            sd.update({f"{pre}.attn.q_norm.weight": 1 + r(hd), f"{pre}.attn.q_norm.bias": r(hd),
                       f"{pre}.attn.k_norm.weight": 1 + r(hd), f"{pre}.attn.k_norm.bias": r(hd)})
        if (i % 2 == 1) or not m["interleave"]:
            sd[f"{pre}.mlp.cluster_centers"] = r(E, H, std=1.0)
            for e in range(E + int(m["use_uncond_expert"])):
                sd.update({f"{pre}.mlp.experts.{e}.up_proj.weight": r(I, H), f"{pre}.mlp.experts.{e}.up_proj.bias": r(I),
                           f"{pre}.mlp.experts.{e}.down_proj.weight": r(H, I),
                           f"{pre}.mlp.experts.{e}.down_proj.bias": r(H)})
            if m["use_shared_expert"]:
                sd.update({f"{pre}.mlp.shared_expert.up_proj.weight": r(SI, H),
                           f"{pre}.mlp.shared_expert.up_proj.bias": r(SI),
                           f"{pre}.mlp.shared_expert.down_proj.weight": r(H, SI),
                           f"{pre}.mlp.shared_expert.down_proj.bias": r(H)})
        else:
            sd.update({f"{pre}.mlp.fc1.weight": r(D, H), f"{pre}.mlp.fc1.bias": r(D),
                       f"{pre}.mlp.fc2.weight": r(H, D), f"{pre}.mlp.fc2.bias": r(H)})
    return sd


def promoe_outputs(sd, cfg, labels, seed=1):
    g = torch.Generator().manual_seed(seed)
    C, S, B = cfg["in_channels"], cfg["input_size"], len(labels)
    x = torch.randn(B, C, S, S, generator=g)
    t = torch.rand(B, generator=g) * 1000
    y = torch.tensor(labels)
    io = {"in.x": x, "in.t": t, "in.y": y}
    out, info = promoe_forward(sd, cfg, x, t, y)
    io["out.eval.output"] = out
    for i, (z, cos, w, idx, _, _) in info.items():
        io[f"out.eval.blocks.{i}.mlp.router_input"] = z
        io[f"out.eval.blocks.{i}.mlp.cos_sim"] = cos
        io[f"out.eval.blocks.{i}.mlp.router_weights"] = w.reshape(B, -1, w.shape[-1])
        io[f"out.eval.blocks.{i}.mlp.expert_indices"] = idx.reshape(B, -1, idx.shape[-1])
    leaf = {k: v.clone().requires_grad_(k.endswith("cluster_centers")) for k, v in sd.items()}
    out, info = promoe_forward(leaf, cfg, x, t, y)
    total = out.sum()
    rcl_total = None
    for i, (*_, loss, rcl) in info.items():
        if loss is not None:
            total = total + loss  # AddAuxiliaryLoss: gradient 1
        if rcl is not None:
            io[f"out.train.blocks.{i}.mlp.routing_contrastive_loss"] = rcl.detach()
            rcl_total = rcl if rcl_total is None else rcl_total + rcl
    total.backward()
    io["out.train.output"] = out.detach()
    if rcl_total is not None:
        io["out.train.routing_contrastive_loss_total"] = rcl_total.detach()
    for i in info:
        io[f"out.train.grad_of_output_sum.blocks.{i}.mlp.cluster_centers"] = leaf[f"blocks.{i}.mlp.cluster_centers"].grad
    return {k: v.detach().contiguous() for k, v in io.items()}


# ------------------------------------------------------------------------------------------------ folders
def make_folder(folder: Path, config: dict, state: dict, io: dict, repo: str, cls: str, file: str) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(config, _reference={"repo": repo, "class": cls, "file": file, "commit": "test"})
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    save_file(io, str(folder / "io.safetensors"))
    meta = {"tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in io.items()}}
    (folder / "io.json").write_text(json.dumps(meta))
    (folder / "README.md").write_text("generated by tests/models/dit_moe/dit_moe_reference.py\n")
    return folder
