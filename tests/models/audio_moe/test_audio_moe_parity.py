"""Whole-model UniMoE-Audio parity: the shared fixture, and a DIFFERENT random config (other sizes, expert counts,
top-p, codebooks, delays, a fixed expert wider than the dynamic ones) checked against an independent plain-torch
re-implementation written here from the fixture README's equations (per-token MoE loops, no moezoo code, generation
without a KV cache by full recomputation)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moezoo.parity import load_folder, run_parity  # noqa: E402

SHARED = Path(os.environ.get("MOEZOO_PARITY_DIR", Path(__file__).resolve().parents[3].parent / "shared" / "parity"))


def test_shared_fixture():
    folder = SHARED / "unimoe_audio_lm"
    lines = []
    results = run_parity("unimoe_audio_lm", folder, printer=lines.append)
    assert results and all(c.ok for c in results), "\n".join(lines)
    _, _, io, _ = load_folder(folder)
    assert {c.name for c in results} == {k for k in io if k.startswith("out.")}


# ------------------------------------------------------------------------------------------ independent reference
class Ref:
    def __init__(self, cfg: dict, sd: dict):
        self.c, self.t, self.sd = cfg, cfg["text_config"], sd
        t = self.t
        self.D, self.N, self.Fx = t["mlp_dynamic_expert_num"], t["mlp_dynamic_null_expert_num"], t["mlp_fixed_expert_num"]
        self.hd = t["hidden_size"] // t["num_attention_heads"]

    def rms(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.t["rms_norm_eps"]))

    def embed(self, ids, codec):
        x = self.sd["language_model.embed_tokens.weight"][ids].clone()
        rows = (ids == self.c["codec_placeholder_value"]).nonzero().tolist()
        for n, (b, s) in enumerate(rows):
            x[b, s] = sum(self.sd[f"codec_embed_tokens.{c}.weight"][codec[n, c]] for c in range(codec.shape[1]))
        return x

    def attention(self, x, p, pos, mask):
        t, hd = self.t, self.hd
        B, T, _ = x.shape
        nh, nkv = t["num_attention_heads"], t["num_key_value_heads"]
        q = (x @ self.sd[p + "q_proj.weight"].T + self.sd[p + "q_proj.bias"]).view(B, T, nh, hd)
        k = (x @ self.sd[p + "k_proj.weight"].T + self.sd[p + "k_proj.bias"]).view(B, T, nkv, hd)
        v = (x @ self.sd[p + "v_proj.weight"].T + self.sd[p + "v_proj.bias"]).view(B, T, nkv, hd)
        inv = t["rope_theta"] ** (-torch.arange(0, hd, 2).float() / hd)
        ang = pos.float()[..., None] * inv
        cos, sin = torch.cat([ang, ang], -1).cos()[:, :, None], torch.cat([ang, ang], -1).sin()[:, :, None]

        def rot(z):
            return torch.cat([-z[..., hd // 2:], z[..., : hd // 2]], -1)

        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        rep = nh // nkv
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) * hd ** -0.5
        allowed = torch.ones(T, T).tril().bool()[None] & mask.bool()[:, None, :]  # (B, i, j)
        scores = scores.masked_fill(~allowed[:, None], -math.inf)
        live = allowed.any(-1) & mask.bool()  # a padded query row (or one with no key) -> output 0, as sdpa
        probs = torch.where(live[:, None, :, None], scores.softmax(-1).nan_to_num(0.0), torch.zeros(()))
        out = torch.einsum("bhij,bjhd->bihd", probs, v)
        return out.reshape(B, T, -1) @ self.sd[p + "o_proj.weight"].T

    def expert(self, x, name):
        return (F.silu(x @ self.sd[name + "gate_proj.weight"].T) * (x @ self.sd[name + "up_proj.weight"].T)) \
            @ self.sd[name + "down_proj.weight"].T

    def moe(self, x, p, keep):
        D, N, Fx = self.D, self.N, self.Fx
        eps, top_p = self.t["router_jitter_noise"], self.t["mlp_dynamic_top_p"]
        flat = x.reshape(-1, x.shape[-1])
        T = flat.shape[0]
        logits = flat @ self.sd[p + "mlp.gate.weight"].T
        outs, cws = [], []
        em = torch.zeros(T, D + N + Fx, dtype=torch.long)
        ks = torch.zeros(T, dtype=torch.long)
        for n in range(T):
            lg = logits[n]
            dl = lg[: D + N]
            order = sorted(range(D + N), key=lambda e: -dl[e].item())
            probs = dl.softmax(0)
            k, acc = 1, 0.0
            for e in order[:-1]:
                acc += probs[e].item()
                if acc < top_p:
                    k += 1
                else:
                    break
            ks[n] = k
            picks = order[:k] if keep[n] else []
            mult = []
            for j, e in enumerate(picks):
                top = dl[e]
                win = [i for i in order[j:]
                       if (top - dl[i]).item() <= 2 * eps * max(abs(dl[i].item()), abs(top.item()))]
                mult.append(1.0 / torch.stack([torch.exp(dl[i] - top) for i in win]).sum())
            tot = sum(mult) if mult else 0.0
            mult = [m / (tot + 1e-6) for m in mult]
            sel = picks + list(range(D + N, D + N + Fx))
            P = torch.stack([lg[e] for e in sel]).softmax(0)
            mass = P[: len(picks)].sum() if picks else 0.0
            w = [torch.zeros(()) for _ in range(D + N + Fx)]
            o = torch.zeros(flat.shape[1])
            for j, e in enumerate(picks):
                w[e] = mult[j] * mass
                em[n, e] = 1
                if e < D:
                    o = o + w[e] * self.expert(flat[n], p + f"mlp.dynamic_real_moe.deepspeed_moe.experts."
                                                           f"deepspeed_experts.{e}.")
            for f in range(Fx):
                w[D + N + f] = P[len(picks) + f]
                em[n, D + N + f] = 1
                o = o + w[D + N + f] * self.expert(flat[n], p + f"mlp.fixed_real_moe.{f}.")
            outs.append(o)
            cws.append(torch.stack(w))
        out, cw = torch.stack(outs), torch.stack(cws)
        return out.view_as(x), dict(logits=logits, cw=cw, em=em, k=ks)

    def aux(self, r, w):
        D, N = self.D, self.N
        m = r["em"][:, : D + N].float()
        lg = r["logits"][:, : D + N].masked_fill(m == 0, torch.finfo(torch.float32).min)
        P = lg.softmax(-1)
        if w is None:
            f, p = m.mean(0), P.mean(0)
        else:
            w = w.reshape(-1).float()
            f, p = (m * w[:, None]).sum(0) / w.sum(), (P * w[:, None]).sum(0) / w.sum()
        return (f * p).sum() * (D + N)

    def forward(self, ids, codec, mask, moe_mask=True):
        x = self.embed(ids, codec)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        hidden, routs = [x], []
        keep = mask.reshape(-1).bool() if moe_mask else torch.ones(mask.numel(), dtype=torch.bool)
        for i in range(self.t["num_hidden_layers"]):
            p = f"language_model.layers.{i}."
            x = x + self.attention(self.rms(x, self.sd[p + "input_layernorm.weight"]), p + "self_attn.", pos, mask)
            h, r = self.moe(self.rms(x, self.sd[p + "post_attention_layernorm.weight"]), p, keep)
            x = x + h
            hidden.append(x)
            routs.append(r)
        h = self.rms(x, self.sd["language_model.norm.weight"])
        hidden[-1] = h
        B, T = ids.shape
        K, Vc = self.c["codec_channels"], self.c["codec_vocab_size"]
        return dict(hidden=hidden, pos=pos, routs=routs, logits=h @ self.sd["lm_head.weight"].T,
                    codec=(h @ self.sd["codec_head.weight"].T).view(B, T, K, Vc))

    def loss(self, fw, codec_labels, w, step):
        t = self.t
        ce = 0.0
        for c in range(codec_labels.shape[-1]):
            lab = codec_labels[:, 1:, c]
            if (lab != -100).any():
                ce = ce + F.cross_entropy(fw["codec"][:, :-1, c].reshape(-1, fw["codec"].shape[-1]), lab.reshape(-1))
        coef = t["l_aux_weight"] - (t["l_aux_weight"] - t["min_l_aux_weight"]) * min(step, t["l_aux_weight_decay_steps"]) \
            / t["l_aux_weight_decay_steps"]
        aux = torch.stack([self.aux(r, w) for r in fw["routs"]])
        return ce + coef * aux.mean(), aux

    def generate(self, ids, mask, codec, max_tokens, min_tokens, cfg_scale, eos_factor):
        c = self.c
        K, D = c["codec_channels"], max(c["codec_delay_pattern"])
        EOS, PAD, BOS, PH = c["codec_eos_value"], c["codec_pad_value"], c["codec_bos_value"], c["codec_placeholder_value"]
        delay = c["codec_delay_pattern"]
        S = ids.shape[0] // 2
        tokens = torch.full((S, D + 1, K), -1, dtype=torch.long)
        for ch in range(K):
            tokens[:, : delay[ch] + 1, ch] = BOS
        prefill = tokens.clone()
        step_logits, step_pos, frames = [], [], []
        countdown, detected, finished = [-1] * S, [False] * S, [-1] * S
        cur_mask = torch.cat([mask, mask.new_ones(2 * S, 1)], 1)
        dec = 0
        while dec < max_tokens and not all(cd == 0 for cd in countdown):
            cur = dec + 1
            frames.append(tokens[:, dec].repeat_interleave(2, 0))
            full_ids = torch.cat([ids, torch.full((2 * S, len(frames)), PH)], 1)
            full_codec = []
            for r in range(2 * S):  # row-major placeholder order: prompt codec rows, then this row's frames
                full_codec += [codec[n] for n in range(int((ids[:r] == PH).sum()), int((ids[: r + 1] == PH).sum()))]
                full_codec += [f[r] for f in frames]
            fw = self.forward(full_ids, torch.stack(full_codec), cur_mask, moe_mask=False)
            lg = fw["codec"][:, -1].clone()
            step_logits.append(lg.clone())
            step_pos.append(fw["pos"][:, -1:])
            cur_mask = torch.cat([cur_mask, cur_mask.new_ones(2 * S, 1)], 1)
            pair = lg.view(S, 2, K, -1)
            l = pair[:, 1] + cfg_scale * (pair[:, 1] - pair[:, 0])
            if dec >= min_tokens:
                l[:, :, EOS + 1:] = -math.inf
                l[:, 1:, EOS:] = -math.inf
            else:
                l[:, :, EOS:] = -math.inf
            l[:, 0, EOS] *= eos_factor
            pred = l.argmax(-1)
            for s in range(S):
                if countdown[s] != 0:
                    if (not detected[s] and pred[s, 0] == EOS) or cur >= max_tokens - D:
                        detected[s] = True
                        if countdown[s] < 0:
                            countdown[s], finished[s] = D, cur
                if countdown[s] > 0:
                    after = D - countdown[s]
                    for ch in range(K):
                        if after == delay[ch]:
                            pred[s, ch] = EOS
                        elif after > delay[ch]:
                            pred[s, ch] = PAD
                    countdown[s] -= 1
            if cur < tokens.shape[1]:
                tokens[:, cur] = torch.where(tokens[:, cur] == -1, pred, tokens[:, cur])
            else:
                tokens = torch.cat([tokens, pred[:, None]], 1)
            dec += 1
        final = dec + 1
        finished = [f if f != -1 else final - D for f in finished]
        lengths = torch.tensor([max(f - 1, 0) for f in finished])
        L = int(lengths.max()) + D
        codes = torch.full((S, L, K), PAD, dtype=torch.long)
        for s in range(S):
            n = int(lengths[s]) + D
            codes[s, :n] = tokens[s, 1: 1 + n]
        emb = self.embed(ids, codec)
        return {"out.gen.generated_codes": codes, "out.gen.lengths": lengths, "out.gen.decoder_tokens": tokens,
                "out.gen.prefill_tokens": prefill, "out.gen.step_codec_logits": torch.stack(step_logits),
                "out.gen.step_position_ids": torch.stack(step_pos), "out.gen.prefill_inputs_embeds": emb,
                "out.gen.prefill_position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)}


def other_config():
    text = dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3, vocab_size=40,
                intermediate_size=64, mlp_dynamic_expert_num=5, mlp_dynamic_null_expert_num=2, mlp_fixed_expert_num=1,
                dynamic_intermediate_size=20, shared_intermediate_size=28, mlp_dynamic_top_p=0.55,
                mlp_dynamic_top_k=0.0, router_jitter_noise=0.02, l_aux_weight=0.05, min_l_aux_weight=0.002,
                l_aux_weight_decay_steps=100, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=64, rope_scaling={"type": "default", "mrope_section": [1, 0, 1]})
    return dict(text_config=text, codec_vocab_size=11, codec_delay_pattern=[0, 1, 3], codec_channels=3,
                codec_eos_value=8, codec_pad_value=9, codec_bos_value=10, codec_placeholder_value=39,
                _reference={"repo": "HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs",
                            "class": "UniAudioRVQQwen2_5VLMoEForConditionalGeneration"})


def random_state(cfg, g):
    t = cfg["text_config"]
    H, V, L = t["hidden_size"], t["vocab_size"], t["num_hidden_layers"]
    hd = H // t["num_attention_heads"]
    D, N, Fx = t["mlp_dynamic_expert_num"], t["mlp_dynamic_null_expert_num"], t["mlp_fixed_expert_num"]

    def mat(r, c):
        return torch.randn(r, c, generator=g) / c ** 0.5

    sd = {"language_model.embed_tokens.weight": torch.randn(V, H, generator=g),
          "language_model.norm.weight": 1 + 0.1 * torch.randn(H, generator=g), "lm_head.weight": mat(V, H),
          "codec_head.weight": mat(cfg["codec_channels"] * cfg["codec_vocab_size"], H)}
    for c in range(cfg["codec_channels"]):
        sd[f"codec_embed_tokens.{c}.weight"] = torch.randn(cfg["codec_vocab_size"], H, generator=g)
    for i in range(L):
        p = f"language_model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        for n, rows in (("q", t["num_attention_heads"] * hd), ("k", t["num_key_value_heads"] * hd),
                        ("v", t["num_key_value_heads"] * hd)):
            sd[p + f"self_attn.{n}_proj.weight"] = mat(rows, H)
            sd[p + f"self_attn.{n}_proj.bias"] = 0.1 * torch.randn(rows, generator=g)
        sd[p + "self_attn.o_proj.weight"] = mat(H, t["num_attention_heads"] * hd)
        sd[p + "mlp.gate.weight"] = 0.5 * torch.randn(D + N + Fx, H, generator=g)
        for e in range(D):
            q = p + f"mlp.dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts.{e}."
            I = t["dynamic_intermediate_size"]
            sd[q + "gate_proj.weight"], sd[q + "up_proj.weight"], sd[q + "down_proj.weight"] = mat(I, H), mat(I, H), mat(H, I)
        for f in range(Fx):
            q = p + f"mlp.fixed_real_moe.{f}."
            I = t["shared_intermediate_size"]
            sd[q + "gate_proj.weight"], sd[q + "up_proj.weight"], sd[q + "down_proj.weight"] = mat(I, H), mat(I, H), mat(H, I)
    return sd


def test_other_config_against_independent_reference(tmp_path):
    g = torch.Generator().manual_seed(5)
    cfg = other_config()
    sd = random_state(cfg, g)
    ref = Ref(cfg, sd)
    K, PH, EOS, BOS = cfg["codec_channels"], cfg["codec_placeholder_value"], cfg["codec_eos_value"], cfg["codec_bos_value"]
    B, T = 2, 9
    ids = torch.randint(1, 30, (B, T), generator=g)
    ids[0, :3] = 0
    ids[:, 4:] = PH
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0
    n_ph = int((ids == PH).sum())
    codec = torch.randint(0, 8, (n_ph, K), generator=g)
    codec[0] = BOS
    codec[-1, 0] = EOS
    lab = codec.clone()  # the official teacher-forced label rule: ids > EOS ignored; channels >= 1: ids >= EOS ignored
    lab[lab > EOS] = -100
    lab[:, 1:][lab[:, 1:] >= EOS] = -100
    labels_c = torch.full((B, T, K), -100, dtype=torch.long)
    labels_c[ids == PH] = lab
    abw = torch.randint(1, 4, (B, T), generator=g)
    io = {"in.input_ids": ids, "in.attention_mask": mask, "in.codec_input_ids": codec, "in.codec_labels": labels_c,
          "in.labels": torch.full((B, T), -100), "in.aux_balance_weight": abw}
    gw = {k: v.clone().requires_grad_(k.endswith("mlp.gate.weight")) for k, v in sd.items()}
    ref.sd = gw
    fw = ref.forward(ids, codec, mask)
    loss, aux = ref.loss(fw, labels_c, abw * mask, 0)
    loss.backward()
    ref.sd = sd
    with torch.no_grad():
        io["out.grad.gate_weight.0"] = gw["language_model.layers.0.mlp.gate.weight"].grad
        io["out.grad.gate_weight.2"] = gw["language_model.layers.2.mlp.gate.weight"].grad
        fw = ref.forward(ids, codec, mask)
        loss, aux = ref.loss(fw, labels_c, abw * mask, 0)
        io["out.loss"] = loss.reshape(1)
        io["out.loss_training_steps_4000"] = ref.loss(fw, labels_c, abw * mask, 4000)[0].reshape(1)  # past decay
        io["out.loss_no_balance_weight"], aux_nw = (x for x in ref.loss(fw, labels_c, None, 0))
        io["out.loss_no_balance_weight"] = io["out.loss_no_balance_weight"].reshape(1)
        io["out.aux_balance_loss"] = aux.mean().reshape(1)
        io["out.aux_balance_loss_no_balance_weight"] = aux_nw.mean().reshape(1)
        io["out.logits"], io["out.codec_logits"] = fw["logits"], fw["codec"]
        io["out.inputs_embeds"] = fw["hidden"][0]
        io["out.position_ids"] = fw["pos"].unsqueeze(0).expand(3, -1, -1)
        for i, h in enumerate(fw["hidden"]):
            io[f"out.hidden_states.{i}"] = h
        for i, r in enumerate(fw["routs"]):
            io[f"out.router_logits.{i}"], io[f"out.combine_weights.{i}"] = r["logits"], r["cw"]
            io[f"out.expert_mask.{i}"], io[f"out.dynamic_top_k.{i}"] = r["em"], r["k"]
            io[f"out.aux_loss.{i}"], io[f"out.aux_loss_no_balance_weight.{i}"] = aux[i].reshape(1), aux_nw[i].reshape(1)
        ks = torch.cat([r["k"][mask.reshape(-1).bool()] for r in fw["routs"]])
        assert len(ks.unique()) >= 2  # dynamic k exercised
        assert any((r["em"][:, 5:7].sum(-1) > 0).any() for r in fw["routs"])  # a null expert picked
        # generation: 2 samples = 4 CFG rows with a voice-prompt segment each
        S, Tg = 2, 10
        gids = torch.randint(1, 30, (2 * S, Tg), generator=g)
        gids[:, 3:7] = PH
        gids[0, :2] = 0
        gmask = torch.ones(2 * S, Tg, dtype=torch.long)
        gmask[0, :2] = 0
        gcodec = torch.randint(0, 8, (int((gids == PH).sum()), K), generator=g)
        settings = (9, 2, 2.0, 0.7)
        io.update({"in.gen.input_ids": gids, "in.gen.attention_mask": gmask, "in.gen.codec_input_ids": gcodec,
                   "in.gen.settings": torch.tensor(settings, dtype=torch.float64)})
        io.update(ref.generate(gids, gmask, gcodec, *settings))
    folder = tmp_path / "ref"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    save_file({k: v.detach().clone().contiguous() for k, v in io.items()}, str(folder / "io.safetensors"))
    (folder / "io.json").write_text(json.dumps({"tensors": {k: list(v.shape) for k, v in io.items()}}))
    lines = []
    results = run_parity("unimoe_audio_lm", folder, printer=lines.append)
    assert results and all(c.ok for c in results), "\n".join(lines)
    assert {c.name for c in results} >= {"out.gen.generated_codes", "out.grad.gate_weight.2", "out.combine_weights.2"}
