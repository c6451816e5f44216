"""π0-style VLA base: flow matching, block-causal joint attention, policy API, statistics, save/load, input errors."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import moezoo
from moezoo.models.vla import MissingStatisticsError, MoezooVlaConfig, MoezooVlaPolicy

CAMS = ["front", "wrist"]


def _policy(**over):
    kw = dict(camera_names=CAMS, image_size=32, state_dim=3, action_dim=2, chunk_size=4, n_action_steps=2,
              num_inference_steps=3, num_moe_layers=0)
    kw.update(over)
    torch.manual_seed(0)
    return MoezooVlaPolicy(MoezooVlaConfig(**kw)).eval()


def _obs(policy, B=2, seed=0, task="pick up the cube"):
    g = torch.Generator().manual_seed(seed)
    cfg = policy.config
    obs = {f"observation.images.{c}": torch.rand(B, 3, *cfg.image_size, generator=g) for c in cfg.camera_names}
    obs["observation.state"] = torch.randn(B, cfg.state_dim, generator=g) * 3 + 1
    obs["task"] = [task] * B
    if cfg.use_camera_router:
        obs["observation.waypoint"] = torch.randn(B, cfg.waypoint_dim, generator=g)
    return obs


def _stats(policy):
    cfg = policy.config
    return {"observation.state": {"mean": torch.ones(cfg.state_dim), "std": 3 * torch.ones(cfg.state_dim)},
            "action": {"mean": torch.arange(cfg.action_dim).float(), "std": 2 * torch.ones(cfg.action_dim)}}


def test_flow_matching_loss_is_the_velocity_regression():
    p = _policy()
    inp = p.example_inputs(generator=torch.Generator().manual_seed(1))
    B = inp["state"].shape[0]
    noise = torch.randn_like(inp["actions"])
    t = torch.tensor([0.2, 0.9])
    out = p(**inp, noise=noise, time=t)
    target = inp["actions"] - (1 - p.config.flow_sig_min) * noise
    assert out.prediction.shape == (B, 4, 2)
    torch.testing.assert_close(out.action_loss, (out.prediction - target).pow(2).mean())
    assert torch.equal(out.loss, out.action_loss + out.aux_loss)
    # padded actions are left out of the loss
    pad = torch.zeros(B, 4, dtype=torch.bool)
    pad[:, 2:] = True
    out2 = p(**inp, noise=noise, time=t, action_is_pad=pad)
    torch.testing.assert_close(out2.action_loss, (out.prediction - target)[:, :2].pow(2).mean())


def test_block_causal_attention_and_text_padding():
    """Padding the instruction (mask 0) changes nothing; the state token does not see the actions; every action token
    sees every other action token (bidirectional action block)."""
    p = _policy()
    inp = p.example_inputs(generator=torch.Generator().manual_seed(2), labels=False)
    with torch.no_grad():
        embeds, mask, _, _ = p.embed_prefix(inp["pixel_values"], inp["input_ids"], inp["attention_mask"])
        kv, plen = p.run_prefix(embeds, mask)
        x = torch.randn(2, 4, 2)
        t = torch.tensor([0.3, 0.6])
        v, _, _ = p.run_expert(kv, mask, plen, inp["state"], x, t)
        ids = torch.cat([inp["input_ids"], torch.full((2, 3), 7)], 1)
        am = torch.cat([inp["attention_mask"], torch.zeros(2, 3, dtype=torch.long)], 1)
        e2, m2, _, _ = p.embed_prefix(inp["pixel_values"], ids, am)
        kv2, plen2 = p.run_prefix(e2, m2)
        v2, _, _ = p.run_expert(kv2, m2, plen2, inp["state"], x, t)
        torch.testing.assert_close(v2, v, atol=1e-5, rtol=1e-5)
        x3 = x.clone()
        x3[:, -1] += 1.0  # the last action changes every action token's output (actions attend to each other)
        v3, _, _ = p.run_expert(kv, mask, plen, inp["state"], x3, t)
        assert ((v3 - v)[:, 0].abs() > 1e-6).all()
        # the state token does not attend to actions: hook its hidden state after layer 0
        seen = []
        h = p.action_expert["layers"][0].register_forward_hook(lambda m, a, o: seen.append(o[0][:, 0].clone()))
        p.run_expert(kv, mask, plen, inp["state"], x, t)
        p.run_expert(kv, mask, plen, inp["state"], x3, t)
        h.remove()
        torch.testing.assert_close(seen[0], seen[1])
        # the image tokens matter (the expert reads the LM keys/values)
        e4, m4, _, _ = p.embed_prefix(inp["pixel_values"].flip(0), inp["input_ids"], inp["attention_mask"])
        kv4, _ = p.run_prefix(e4, m4)
        v4, _, _ = p.run_expert(kv4, m4, plen, inp["state"], x, t)
        assert (v4 - v).abs().max() > 1e-5


def test_sampling_shapes_determinism_and_steps():
    p = _policy()
    p.set_normalization_stats(_stats(p))
    obs = _obs(p)
    a = p.predict_action_chunk(obs, generator=torch.Generator().manual_seed(5))
    b = p.predict_action_chunk(obs, generator=torch.Generator().manual_seed(5))
    c = p.predict_action_chunk(obs, generator=torch.Generator().manual_seed(6))
    d = p.predict_action_chunk(obs, generator=torch.Generator().manual_seed(5), num_inference_steps=1)
    assert a.shape == (2, 4, 2) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, d)
    # one Euler step from noise x0 with step 1: x1 = x0 + v(x0, 0); unnormalised with the action statistics
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 4, 2, generator=g)
    inputs = p.prepare_inputs(obs)
    with torch.no_grad():
        out = p(**inputs, noise=x0, num_inference_steps=1)
        emb, m, _, _ = p.embed_prefix(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
        kv, plen = p.run_prefix(emb, m)
        v, _, _ = p.run_expert(kv, m, plen, inputs["state"], x0, torch.zeros(2))
    torch.testing.assert_close(out.prediction, x0 + v)
    torch.testing.assert_close(d, (x0 + v) * 2 + torch.tensor([0.0, 1.0]), atol=1e-5, rtol=1e-5)


def test_select_action_queue_and_reset():
    p = _policy(n_action_steps=3)
    p.set_normalization_stats(_stats(p))
    obs = _obs(p)
    calls = []
    orig = p.predict_action_chunk

    def spy(o, generator=None, **kw):
        chunk = orig(o, generator=torch.Generator().manual_seed(len(calls)))
        calls.append(chunk)
        return chunk
    p.predict_action_chunk = spy
    acts = [p.select_action(obs) for _ in range(4)]
    assert len(calls) == 2 and all(a.shape == (2, 2) for a in acts)
    for i in range(3):
        torch.testing.assert_close(acts[i], calls[0][:, i])
    torch.testing.assert_close(acts[3], calls[1][:, 0])
    p.reset()
    p.select_action(obs)
    assert len(calls) == 3


def test_statistics_saved_and_loaded(tmp_path):
    p = _policy(num_moe_layers=2, num_experts=3, num_experts_per_tok=2)
    obs = _obs(p)
    with pytest.raises(MissingStatisticsError, match="observation.state.*set_normalization_stats"):
        p.predict_action_chunk(obs)
    p.set_normalization_stats(_stats(p))
    ref = p.predict_action_chunk(obs, generator=torch.Generator().manual_seed(0))
    p.save_pretrained(tmp_path)
    q = MoezooVlaPolicy.from_pretrained(tmp_path).eval()
    assert q.normalize_state.has_stats() and q.normalize_action.has_stats()
    torch.testing.assert_close(q.normalize_action.std, 2 * torch.ones(2))
    got = q.predict_action_chunk(obs, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # raw batch loss: the actions are normalised with the saved statistics
    batch = dict(obs, action=torch.randn(2, 4, 2))
    l1 = q.compute_loss(batch, generator=torch.Generator().manual_seed(1)).action_loss
    l2 = p.compute_loss(batch, generator=torch.Generator().manual_seed(1)).action_loss
    torch.testing.assert_close(l1, l2)
    # identity normalisation needs no statistics
    r = _policy(normalization_mapping={"state": "identity", "action": "identity"})
    assert r.predict_action_chunk(_obs(r)).shape == (2, 4, 2)
    with pytest.raises(ValueError, match="need mean and std"):
        _policy().set_normalization_stats({"observation.state": {"min": torch.zeros(3), "max": torch.ones(3)},
                                   "action": {"mean": torch.zeros(2), "std": torch.ones(2)}})
    with pytest.raises(ValueError, match="has 2 values, expected 3"):
        p.set_normalization_stats({"observation.state": {"mean": torch.zeros(2), "std": torch.ones(2)}})


def test_min_max_normalisation_round_trip():
    p = _policy(normalization_mapping={"state": "min_max", "action": "min_max"})
    p.set_normalization_stats({"observation.state": {"min": -torch.ones(3), "max": 3 * torch.ones(3)},
                               "action": {"min": torch.tensor([0.0, -2.0]), "max": torch.tensor([1.0, 2.0])}})
    a = torch.tensor([[0.5, 0.0], [1.0, 2.0]])
    torch.testing.assert_close(p.normalize_action.normalize(a), torch.tensor([[0.0, 0.0], [1.0, 1.0]]), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(p.normalize_action.unnormalize(p.normalize_action.normalize(a)), a)


def test_bad_observations_are_named():
    p = _policy()
    p.set_normalization_stats(_stats(p))
    obs = _obs(p)
    bad = dict(obs)
    del bad["observation.images.wrist"]
    with pytest.raises(ValueError, match=r"missing camera keys \['observation.images.wrist'\]"):
        p.predict_action_chunk(bad)
    bad = dict(obs, **{"observation.images.front": torch.rand(2, 3, 16, 32)})
    with pytest.raises(ValueError, match=r"observation.images.front has shape \(2, 3, 16, 32\), expected .*32, 32"):
        p.predict_action_chunk(bad)
    with pytest.raises(ValueError, match=r"observation.state.*expected \(batch, state_dim=3\)"):
        p.predict_action_chunk(dict(obs, **{"observation.state": torch.randn(2, 5)}))
    with pytest.raises(ValueError, match=r"action.*expected \(batch, chunk_size=4, action_dim=2\)"):
        p.compute_loss(dict(obs, action=torch.randn(2, 4, 3)))
    with pytest.raises(ValueError, match="'task'"):
        p.predict_action_chunk({k: v for k, v in obs.items() if k != "task"})
    with pytest.raises(ValueError, match="one per sample"):
        p.predict_action_chunk(dict(obs, task=["a", "b", "c"]))
    with pytest.raises(ValueError, match="pixel_values has shape"):
        p(pixel_values=torch.rand(2, 1, 3, 32, 32), input_ids=torch.ones(2, 3, dtype=torch.long),
          state=torch.randn(2, 3))
    with pytest.raises(ValueError, match="num_moe_layers"):
        MoezooVlaConfig(num_moe_layers=3)
    with pytest.raises(ValueError, match="context_cameras"):
        MoezooVlaConfig(camera_names=["a", "b"], context_cameras=["c"])
    with pytest.raises(ValueError, match="n_action_steps"):
        MoezooVlaConfig(chunk_size=2, n_action_steps=3)


def test_any_timm_tower_and_transformers_decoder():
    """A CNN tower (feature map -> tokens) and a Qwen2 decoder with another GQA layout both work."""
    text = dict(model_type="qwen2", vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=256)
    p = _policy(vision_model_name="resnet10t", vision_model_kwargs={}, text_config=text, num_attention_heads=3,
                hidden_size=24, intermediate_size=32)
    assert p.head_dim == 8
    inp = p.example_inputs(generator=torch.Generator().manual_seed(3))
    p.train()
    out = p(**inp)
    out.loss.backward()
    assert p.vision_tower.model.conv1[0].weight.grad.abs().sum() > 0
    assert p.lm.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple of the LM's num_key_value_heads=3"):
        _policy(text_config=text, num_attention_heads=4)


def test_a_few_steps_fit_one_batch():
    p = _policy()
    p.train()
    inp = p.example_inputs(generator=torch.Generator().manual_seed(4))
    opt = torch.optim.AdamW(p.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(inp["actions"].shape, generator=g), torch.rand(2, generator=g)
    losses = []
    for _ in range(20):
        loss = p(**inp, noise=noise, time=t).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_registry_entries():
    names = moezoo.list_models(family="vla")
    assert {"drivemoe_tiny_e6k1", "drivemoe_s_e6k1", "vla_tiny_e4k2"} <= set(names)
    full = moezoo.get_model_config("drivemoe_s_e6k1")
    assert full.use_camera_router and full.num_moe_layers == 2 and full.mlp_layer_types[-2:] == ["skill_moe"] * 2
