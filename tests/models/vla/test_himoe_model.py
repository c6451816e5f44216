"""HiMoE-VLA on the VLA base: official layer placement, AS-MoE routed by the action-space descriptor with its
mutual-information loss, HB-MoE with shared expert and sequence-level balance loss, padded actions with a masked loss,
per-embodiment statistics, clear errors, and the official-key converter (checked on the shared block parity fixture
through the model's own layers, and on another random config against a plain-torch reading of the official code)."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import moezoo
from moezoo.core.losses import mutual_information_loss, sequence_balance_loss
from moezoo.models.vla import MissingStatisticsError, himoe_layer_types
from moezoo.models.vla.convert_himoe import convert_himoe_state_dict

FIXTURE = Path(os.environ.get("MOEZOO_PARITY_DIR", Path(__file__).resolve().parents[3].parent / "shared" / "parity")) \
    / "himoe_vla_blocks"
NAME = "himoe_vla_tiny_e8k2"


def _himoe(**over):
    torch.manual_seed(0)
    return moezoo.create_model(NAME, tiny=True, **over)


def test_official_placement_and_variants():
    assert himoe_layer_types(18) == ["as_moe"] * 2 + ["hb_moe"] * 4 + ["dense"] * 6 + ["hb_moe"] * 4 + ["as_moe"] * 2
    assert himoe_layer_types(6) == ["as_moe", "as_moe", "hb_moe", "hb_moe", "as_moe", "as_moe"]
    assert himoe_layer_types(18, hb_moe=False).count("hb_moe") == 0
    assert himoe_layer_types(18, as_moe=False)[:2] == ["dense", "dense"]
    cfg = moezoo.get_model_config("himoe_vla_e32k4")  # official sizes and coefficients are the defaults
    assert cfg.mlp_layer_types == himoe_layer_types(18)
    assert (cfg.as_num_experts, cfg.as_num_experts_per_tok, cfg.as_moe_intermediate_size, cfg.as_aux_loss_alpha) == \
        (3, 1, 4096, 0.002)
    assert (cfg.hb_num_experts, cfg.hb_num_experts_per_tok, cfg.hb_moe_intermediate_size, cfg.hb_num_shared_experts,
            cfg.hb_aux_loss_alpha, cfg.hb_seq_aux) == (32, 4, 1024, 1, 0.001, True)
    p = _himoe()
    kinds = [layer.mlp_type for layer in p.action_expert["layers"]]
    assert kinds == himoe_layer_types(6)
    assert p.action_expert["layers"][2].mlp.shared_expert is not None
    assert p.action_expert["layers"][0].mlp.shared_expert is None
    assert tuple(p.action_expert["layers"][0].mlp.gate.weight.shape) == (3, 8)  # routes on the 8-D action mask
    q = _himoe(mlp_layer_types=["dense", "topk_moe", "hb_moe", "dense", "topk_moe", "as_moe"])
    assert [layer.mlp_type for layer in q.action_expert["layers"]][1] == "topk_moe"
    with pytest.raises(ValueError, match="mlp_layer_types"):
        _himoe(mlp_layer_types=["as_moe"] * 5)
    with pytest.raises(ValueError, match="action_moe_layout"):
        _himoe(action_moe_layout="nope")
    with pytest.raises(ValueError, match="hb_num_experts_per_tok"):
        _himoe(hb_num_experts_per_tok=9)


def test_forward_aux_losses_and_per_sample_action_space_routing():
    p = _himoe().train()
    inp = p.example_inputs(batch_size=3, generator=torch.Generator().manual_seed(1))
    inp["action_mask"][2] = inp["action_mask"][0]  # samples 0 and 2 share an action space
    captured = {}

    def keep(i):
        def hook(module, args, output):
            captured.setdefault(i, output[1])
        return hook
    hooks = [layer.mlp.register_forward_hook(keep(i)) for i, layer in enumerate(p.action_expert["layers"])]
    out = p(**inp)
    for h in hooks:
        h.remove()
    B, S = 3, p.config.chunk_size + 1
    for i in (0, 1, 4, 5):  # AS-MoE: every token of a sample has the router's logits of its action mask
        ro = captured[i]
        lg = ro.logits.view(B, S, -1)
        assert torch.equal(lg, lg[:, :1].expand_as(lg))
        torch.testing.assert_close(lg[:, 0], inp["action_mask"].float() @ p.action_expert["layers"][i].mlp.gate.weight.T)
        assert torch.equal(lg[0], lg[2]) and not torch.equal(lg[0], lg[1])
        # top-1 weight is the raw softmax probability (official: no renormalisation at k = 1)
        torch.testing.assert_close(ro.weights[:, 0], ro.probs.max(-1).values)
    want_as = sum(mutual_information_loss(captured[i].probs, inp["action_mask"].float().repeat_interleave(S, 0))
                  for i in (0, 1, 4, 5)) * 0.002
    want_hb = sequence_balance_loss([captured[2], captured[3]], batch_size=B) * 0.001
    torch.testing.assert_close(out.as_loss, want_as)
    torch.testing.assert_close(out.hb_loss, want_hb)
    torch.testing.assert_close(out.aux_loss, want_as + want_hb)
    torch.testing.assert_close(out.loss, out.action_loss + out.aux_loss)
    hb = captured[2]
    assert hb.indices.shape == (B * S, 2)
    torch.testing.assert_close(hb.weights.sum(-1), torch.ones(B * S))  # top-2 renormalised
    out.loss.backward()
    for i in range(6):
        assert p.action_expert["layers"][i].mlp.gate.weight.grad.abs().sum() > 0
    assert set(out.expert_selection) == {"as_moe.0", "as_moe.1", "hb_moe.2", "hb_moe.3", "as_moe.4", "as_moe.5"}
    assert out.expert_selection["hb_moe.2"].sum(-1).tolist() == [S * 2] * B
    # the coefficients are the weights of the two losses; eval mode has no aux loss from the routers
    q = _himoe(as_aux_loss_alpha=0.0, hb_aux_loss_alpha=0.0).train()
    torch.manual_seed(0)
    o2 = q(**inp)
    assert o2.as_loss is None and o2.hb_loss is None and float(o2.aux_loss) == 0.0
    p.eval()
    with torch.no_grad():
        o3 = p(**inp)
    assert o3.as_loss is None and o3.hb_loss is None


def test_padded_actions_masked_loss_and_zero_padding_in_samples():
    p = _himoe().train()
    inp = p.example_inputs(batch_size=2, generator=torch.Generator().manual_seed(2))
    m = inp["action_mask"]
    assert m[1].sum() == 4 and m[0].all()
    noise = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(3))
    time = torch.tensor([0.3, 0.7])
    a = p(**inp, noise=noise, time=time)
    changed = dict(inp, actions=inp["actions"] + 5.0 * (~m)[:, None, :].float())  # only padded dims differ
    b = p(**changed, noise=noise, time=time)
    torch.testing.assert_close(a.action_loss, b.action_loss)
    # the loss is the mean over the kept entries only
    target = inp["actions"] * m[:, None, :] - (1 - p.config.flow_sig_min) * noise
    keep = m[:, None, :].float().expand(-1, 4, -1)
    torch.testing.assert_close(a.action_loss, ((a.prediction - target).pow(2) * keep).sum() / keep.sum())
    c = p(**dict(changed, actions=changed["actions"] + 1.0), noise=noise, time=time)
    assert not torch.allclose(a.action_loss, c.action_loss)
    pad = torch.tensor([[False, False, True, True], [False, False, False, False]])
    d = p(**inp, noise=noise, time=time, action_is_pad=pad)
    keep2 = keep * (~pad)[..., None].float()
    torch.testing.assert_close(d.action_loss, ((d.prediction - target).pow(2) * keep2).sum() / keep2.sum())
    p.eval()
    with torch.no_grad():
        s = p(**{k: v for k, v in inp.items() if k != "actions"}, generator=torch.Generator().manual_seed(0))
    assert (s.prediction[1, :, 4:] == 0).all() and (s.prediction[0] != 0).all()
    # the action mask reaches the state token too (official [state, data_mask] layout)
    assert p.state_proj.in_features == p.config.state_dim + p.config.action_dim


def test_action_mask_errors():
    p = _himoe()
    inp = p.example_inputs(batch_size=2, generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"action_mask \(the action-space descriptor\).*action_dim=8"):
        p(**dict(inp, action_mask=torch.ones(2, 7, dtype=torch.bool)))
    with pytest.raises(ValueError, match="at least one True"):
        p(**dict(inp, action_mask=torch.zeros(2, 8, dtype=torch.bool)))
    with pytest.raises(ValueError, match="0/1"):
        p(**dict(inp, action_mask=torch.full((2, 8), 0.5)))


def _raw_batch(p, embodiments, g):
    B = len(embodiments)
    cfg = p.config
    state = torch.zeros(B, cfg.state_dim)
    actions = torch.zeros(B, cfg.chunk_size, cfg.action_dim)
    for b, e in enumerate(embodiments):
        spec = cfg.embodiments[e]
        state[b, : spec["state_dim"]] = torch.randn(spec["state_dim"], generator=g) * 3 + 1
        actions[b][:, spec["action_indices"]] = torch.randn(cfg.chunk_size, len(spec["action_indices"]), generator=g)
    return {"observation.images.front": torch.rand(B, 3, 32, 32, generator=g), "observation.state": state,
            "task": ["reach the target"] * B, "embodiment": list(embodiments), "action": actions}


def _stats(p):
    out = {}
    for e, spec in p.config.embodiments.items():
        n, d = spec["state_dim"], len(spec["action_indices"])
        out[e] = {"observation.state": {"mean": [1.0] * n, "std": [3.0] * n},
                  "action": {"mean": [0.5] * d, "std": [2.0] * d}}
    return {"embodiments": out}


def test_embodiment_statistics_padding_and_errors(tmp_path):
    p = _himoe()
    g = torch.Generator().manual_seed(5)
    batch = _raw_batch(p, ["reacher", "pusher"], g)
    with pytest.raises(MissingStatisticsError, match=r"embodiment\(s\) \['pusher', 'reacher'\]"):
        p.compute_loss(batch)
    st = _stats(p)
    p.set_normalization_stats({"embodiments": {"reacher": st["embodiments"]["reacher"]}})
    with pytest.raises(MissingStatisticsError, match=r"\['pusher'\].*set_normalization_stats"):
        p.compute_loss(batch)
    p.set_normalization_stats(st)
    inputs = p.prepare_inputs(batch)
    assert inputs.pop("_embodiments") == ["reacher", "pusher"]
    assert inputs["action_mask"].tolist() == [p.config.action_mask_of("reacher"), p.config.action_mask_of("pusher")]
    want = (batch["observation.state"] - 1.0) / 3.0
    want[0, 10:] = 0.0  # padded state dims keep mean 0 / std 1
    want[1, 23:] = 0.0
    torch.testing.assert_close(inputs["state"], want, atol=1e-6, rtol=1e-6)
    out = p.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="unknown embodiment 'aloha'"):
        p.compute_loss(dict(batch, embodiment=["aloha", "pusher"]))
    with pytest.raises(ValueError, match="missing 'embodiment'"):
        p.compute_loss({k: v for k, v in batch.items() if k != "embodiment"})
    with pytest.raises(ValueError, match="unknown embodiment"):
        p.set_normalization_stats({"embodiments": {"aloha": st["embodiments"]["reacher"]}})
    with pytest.raises(ValueError, match="have 3 values"):
        p.set_normalization_stats({"embodiments": {"reacher": {"observation.state": {"mean": [0.0] * 3, "std": [1.0] * 3},
                                                               "action": {"mean": [0.0] * 2, "std": [1.0] * 2}}}})
    # a reacher observation at its own width is padded; the chunk is in its units, zero outside its two dims
    obs = {k: v[:1] for k, v in batch.items() if k not in ("action", "embodiment", "task")}
    obs.update(task="reach", embodiment="reacher")
    obs["observation.state"] = obs["observation.state"][:, :10]
    p.eval()
    chunk = p.predict_action_chunk(obs, generator=torch.Generator().manual_seed(1))
    assert chunk.shape == (1, 4, 8) and (chunk[0, :, 2:] == 0).all()
    assert p.embodiment_actions(chunk, "reacher").shape == (1, 4, 2)
    p.save_pretrained(tmp_path)
    q = type(p).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(q.predict_action_chunk(obs, generator=torch.Generator().manual_seed(1)), chunk)
    assert q.config.embodiments == p.config.embodiments


# ---------------------------------------------------------------------------------------------------- converter
def _official_state(layers: dict[int, dict], prefix="model.paligemma_with_expert.gemma_expert.layers.{i}.mlp."):
    return {prefix.format(i=i) + k: v for i, sub in layers.items() for k, v in sub.items()}


def test_converter_reproduces_the_block_fixture_through_the_model():
    weights = load_file(str(FIXTURE / "model.safetensors"))
    io = load_file(str(FIXTURE / "io.safetensors"))
    cfg = json.loads((FIXTURE / "config.json").read_text())
    as_w = {k[len("as_moe."):]: v for k, v in weights.items() if k.startswith("as_moe.")}
    hb_w = {k[len("hb_moe."):]: v for k, v in weights.items() if k.startswith("hb_moe.")}
    p = _himoe(as_moe_intermediate_size=cfg["as_moe"]["moe_intermediate_size"])
    # every layer of the official placement gets the fixture's block of its kind
    official = _official_state({i: (as_w if t == "as_moe" else hb_w) for i, t in enumerate(p.config.mlp_layer_types)})
    mapped, unmapped = convert_himoe_state_dict(official, p.config)
    assert unmapped == []
    res = p.load_state_dict(mapped, strict=False)
    assert not res.unexpected_keys and not [k for k in res.missing_keys if k.startswith("action_expert") and ".mlp." in k]
    cond = io["in.data_mask"].bool()
    for i, name in ((0, "as_moe"), (2, "hb_moe"), (5, "as_moe")):
        layer = p.action_expert["layers"][i].mlp
        x = io[f"in.{name}.hidden_states"]
        sig = {"condition": cond} if name == "as_moe" else {}
        with torch.no_grad():
            layer.train()
            y, ro = layer(x, **sig)
            layer.eval()
            y_eval, _ = layer(x, **sig)
        tol = dict(atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(y, io[f"out.{name}.output"], **tol)
        torch.testing.assert_close(y_eval, io[f"out.{name}.output_eval"], **tol)
        torch.testing.assert_close(ro.logits, io[f"out.{name}.router_logits"], **tol)
        assert torch.equal(ro.indices.sort(-1).values, io[f"out.{name}.topk_idx"])
        ro.extras["mlp_type"] = name
        if name == "as_moe":
            aux = ro.aux_loss
        else:
            aux = p._hb_balance([ro], x.shape[0]) * p.config.hb_aux_loss_alpha
        torch.testing.assert_close(aux.reshape(1), io[f"out.{name}.aux_loss"], **tol)


def _plain_official(x, sub, cond=None, k=1, shared=False):
    """HiMoE's ASMoE / HBMoE forward read plainly: softmax gate (on the mask for AS), top-k, renormalise when k > 1
    (+1e-20), SwiGLU experts, shared expert added unweighted."""
    h = x.reshape(-1, x.shape[-1])
    gin = cond.float().repeat_interleave(x.shape[1], 0) if cond is not None else h
    probs = (gin @ sub["gate.weight"].T).softmax(-1)
    w, idx = probs.topk(k, -1)
    if k > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)

    def mlp(p, v):
        return (F.silu(v @ sub[p + "gate_proj.weight"].T) * (v @ sub[p + "up_proj.weight"].T)) @ sub[p + "down_proj.weight"].T
    y = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for j in range(k):
            y[t] += w[t, j] * mlp(f"experts.{int(idx[t, j])}.", h[t])
    if shared:
        y = y + mlp("shared_experts.", h)
    return y.view_as(x)


def _random_block(g, E, I, H, gate_in, shared=None):
    sub = {"gate.weight": torch.randn(E, gate_in, generator=g)}
    for e in range(E):
        sub[f"experts.{e}.gate_proj.weight"] = torch.randn(I, H, generator=g) * 0.3
        sub[f"experts.{e}.up_proj.weight"] = torch.randn(I, H, generator=g) * 0.3
        sub[f"experts.{e}.down_proj.weight"] = torch.randn(H, I, generator=g) * 0.3
    if shared:
        sub["shared_experts.gate_proj.weight"] = torch.randn(shared, H, generator=g) * 0.3
        sub["shared_experts.up_proj.weight"] = torch.randn(shared, H, generator=g) * 0.3
        sub["shared_experts.down_proj.weight"] = torch.randn(H, shared, generator=g) * 0.3
    return sub


def test_converter_on_another_random_config_with_dense_layers_and_cli(tmp_path):
    g = torch.Generator().manual_seed(11)
    text = dict(moezoo.get_model_config(NAME, tiny=True).text_config, num_hidden_layers=8)
    over = dict(text_config=text, hidden_size=32, as_num_experts=4, as_num_experts_per_tok=2,
                as_moe_intermediate_size=24, hb_num_experts=6, hb_num_experts_per_tok=3, hb_moe_intermediate_size=12,
                hb_num_shared_experts=2, intermediate_size=40, mlp_layer_types=None)
    p = _himoe(**over)
    assert p.config.mlp_layer_types == himoe_layer_types(8) == ["as_moe"] * 2 + ["hb_moe"] * 4 + ["as_moe"] * 2
    p = _himoe(**dict(over, mlp_layer_types=["as_moe", "as_moe", "hb_moe", "dense", "dense", "hb_moe", "as_moe",
                                             "as_moe"]))
    blocks = {}
    for i, t in enumerate(p.config.mlp_layer_types):
        if t == "as_moe":
            blocks[i] = _random_block(g, 4, 24, 32, 8)
        elif t == "hb_moe":
            blocks[i] = _random_block(g, 6, 12, 32, 32, shared=24)
        else:
            blocks[i] = {f"{n}.weight": torch.randn(*s, generator=g) * 0.3 for n, s in
                         (("gate_proj", (40, 32)), ("up_proj", (40, 32)), ("down_proj", (32, 40)))}
    official = _official_state(blocks)
    official["model.paligemma_with_expert.gemma_expert.layers.0.self_attn.q_proj.weight"] = torch.zeros(2, 2)
    mapped, unmapped = convert_himoe_state_dict(official, p.config)
    assert unmapped == ["model.paligemma_with_expert.gemma_expert.layers.0.self_attn.q_proj.weight"]
    p.load_state_dict(mapped, strict=False)
    x = torch.randn(3, 5, 32, generator=g)
    cond = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0], [1] * 7 + [0], [1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        for i, t in enumerate(p.config.mlp_layer_types):
            mlp = p.action_expert["layers"][i].mlp
            if t == "as_moe":
                got = mlp(x, condition=cond)[0]
                want = _plain_official(x, blocks[i], cond, k=2)
            elif t == "hb_moe":
                got = mlp(x)[0]
                want = _plain_official(x, blocks[i], k=3, shared=True)
            else:
                got = mlp(x)
                want = blocks[i]["down_proj.weight"] @ (F.gelu(blocks[i]["gate_proj.weight"] @ x[..., None],
                                                               approximate="tanh") *
                                                        (blocks[i]["up_proj.weight"] @ x[..., None]))
                want = want[..., 0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # placement / size mismatches are named
    with pytest.raises(ValueError, match=r"official layer 3 is 'hb_moe', config.mlp_layer_types\[3\] is 'dense'"):
        convert_himoe_state_dict(_official_state({**blocks, 3: blocks[2]}), p.config)
    q = _himoe(**dict(over, hb_num_experts=5, mlp_layer_types=p.config.mlp_layer_types))
    with pytest.raises(ValueError, match="hb_num_experts=5"):
        convert_himoe_state_dict(official, q.config)
    with pytest.raises(ValueError, match="not an official HiMoE-VLA"):
        convert_himoe_state_dict({"foo.weight": torch.zeros(1)}, p.config)
    # `moezoo convert himoe SRC DST` writes a loadable folder
    from moezoo.convert import available_converters, convert

    assert available_converters().get("himoe") == "model"
    save_file(official, str(tmp_path / "official.safetensors"))
    dst = convert("himoe", tmp_path / "official.safetensors", tmp_path / "out", model=NAME, tiny=True,
                  config=dict(over, mlp_layer_types=p.config.mlp_layer_types))
    r = type(p).from_pretrained(dst)
    torch.testing.assert_close(r.action_expert["layers"][2].mlp.experts.down_proj,
                               p.action_expert["layers"][2].mlp.experts.down_proj)
    assert json.loads((dst / "unmapped_keys.json").read_text())["mapped"] == len(mapped)
