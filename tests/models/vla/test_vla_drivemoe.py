"""DriveMoE on the VLA base: skill action MoE (per-sample routing computed once, shared expert), camera router (top-k,
Gumbel straight-through, teacher forcing, supervision), Drive-π0 baseline, and the official-key converter checked
against the shared parity fixture and against a plain reference on another random config."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import moezoo
from moezoo.core import MoELayer
from moezoo.models.vla import MoezooVlaConfig, MoezooVlaPolicy
from moezoo.models.vla.convert_drivemoe import convert_drivemoe_state_dict

FIXTURE = Path(os.environ.get("MOEZOO_PARITY_DIR", Path(__file__).resolve().parents[3].parent / "shared" / "parity")) \
    / "drivemoe_action_moe"


def _drivemoe(**over):
    torch.manual_seed(0)
    return moezoo.create_model("drivemoe_tiny_e6k1", tiny=True, **over)


def test_skill_moe_routes_per_sample_once_with_shared_expert():
    p = _drivemoe(num_experts_per_tok=2, router_aux_loss_coef=0.01).train()
    moe = [(n, m) for n, m in p.moe_layers()]
    assert [n for n, _ in moe] == ["action_expert.layers.1.mlp", "action_expert.layers.2.mlp"]
    first, second = moe[0][1], moe[1][1]
    assert first.gate.weight is not None and second.gate.weight is None  # one router, reused
    assert first.shared_expert is not None and second.shared_expert is not None
    inp = p.example_inputs(generator=torch.Generator().manual_seed(3))
    seen = {}
    hook = p.action_expert["layers"][0].post_attention_layernorm.register_forward_hook(
        lambda m, a, o: seen.setdefault("h", o))
    out = p(**inp)
    hook.remove()
    B, S = 2, p.config.chunk_size + 1
    for logits in out.router_logits:
        lg = logits.view(B, S, -1)
        assert torch.equal(lg, lg[:, :1].expand_as(lg))  # every token of a sample: same logits
    assert torch.equal(out.router_logits[0], out.router_logits[1])  # computed once, reused
    # the router reads the FFN input of the action tokens of the layer before the first MoE layer
    want = (seen["h"][:, 1:] @ first.gate.weight.T).mean(1) / first.gate.temperature.abs()
    torch.testing.assert_close(out.skill_logits, want)
    torch.testing.assert_close(out.skill_loss, F.cross_entropy(out.skill_logits, inp["skill_labels"]))
    out.loss.backward()
    assert first.gate.weight.grad.abs().sum() > 0 and first.gate.temperature.grad is not None
    assert out.skill_selection.shape == (B,)


def test_camera_router_eval_topk_encodes_only_chosen_views():
    p = _drivemoe(num_cameras_selected=2).eval()
    inp = p.example_inputs(generator=torch.Generator().manual_seed(4), labels=False)
    sizes = []
    h = p.vision_tower.register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[0]))
    with torch.no_grad():
        out = p(**inp)
    h.remove()
    assert sizes == [2 * 1, 2 * 2]  # context view, then only the 2 chosen views
    assert torch.equal(out.camera_selection, out.camera_logits.topk(2, -1).indices)
    assert out.camera_selection.shape == (2, 2)
    with pytest.raises(ValueError, match="waypoint"):
        p(**{k: v for k, v in inp.items() if k != "waypoint"})


def test_camera_router_stage2_gumbel_gets_action_gradient_and_stage1_teacher_forcing():
    p = _drivemoe(camera_router_loss_coef=0.0).train()
    inp = p.example_inputs(generator=torch.Generator().manual_seed(5))
    labels = inp.pop("camera_labels")
    sizes = []
    h = p.vision_tower.register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[0]))
    out = p(**inp)
    out.action_loss.backward()  # no supervision: only the straight-through selection carries gradient
    assert sizes == [2, 2 * 4]  # stage 2 encodes every candidate view
    assert p.camera_router.router_query.grad.abs().sum() > 0
    p.zero_grad()
    sizes.clear()
    p.config.camera_teacher_forcing = True
    out = p(**inp, camera_labels=labels)
    h.remove()
    assert torch.equal(out.camera_selection[:, 0], labels) and sizes == [2, 2]
    out.action_loss.backward()
    g = p.camera_router.router_query.grad
    assert g is None or g.abs().sum() == 0  # teacher forcing: the router learns only from its supervision
    p.zero_grad()
    p.config.camera_router_loss_coef = 0.5
    out = p(**inp, camera_labels=labels)
    torch.testing.assert_close(out.camera_loss, F.cross_entropy(out.camera_logits, labels))
    out.loss.backward()
    assert p.camera_router.router_query.grad.abs().sum() > 0


def test_drive_pi0_baseline_is_the_same_model_with_both_moes_off():
    p = _drivemoe(use_camera_router=False, num_moe_layers=0).train()
    assert p.camera_router is None and not p.moe_layers()
    inp = p.example_inputs(generator=torch.Generator().manual_seed(6))
    assert "waypoint" not in inp and "camera_labels" not in inp and "skill_labels" not in inp
    sizes = []
    h = p.vision_tower.register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[0]))
    out = p(**inp)
    h.remove()
    assert sizes == [2 * 5] and out.router_logits is None and out.camera_logits is None
    out.loss.backward()
    full = _drivemoe()
    n_dense, n_moe = sum(x.numel() for x in p.parameters()), sum(x.numel() for x in full.parameters())
    assert n_moe > n_dense


# ----------------------------------------------------------------------------------------------------------------------
# converter
# ----------------------------------------------------------------------------------------------------------------------


def _official_full(state: dict, moe_layers: list[int]) -> dict:
    """Block-fixture keys -> full official checkpoint keys (``joint_model.mixtures.action.layers.<i>.mlp.`` etc.)."""
    out = {}
    for k, v in state.items():
        if k.startswith("moe_mlp."):
            for i in moe_layers:
                out[f"joint_model.mixtures.action.layers.{i}.mlp." + k[len("moe_mlp."):]] = v
        elif k.startswith("action_router."):
            out["joint_model." + k] = v
        else:
            out[k] = v
    out["joint_model.mixtures.vlm.layers.0.mlp.gate_proj.weight"] = torch.zeros(2, 2)  # not ours: reported unmapped
    return out


def _policy_for(H, I, E, k, n_shared, D, labels, heads, waypoint_hidden=128):
    text = dict(model_type="llama", vocab_size=300, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=3,
                num_attention_heads=heads, num_key_value_heads=heads, head_dim=D // heads)
    cams = ["front"] + [f"view{i}" for i in range(labels)]
    cfg = MoezooVlaConfig(text_config=text, camera_names=cams, use_camera_router=True, camera_router_heads=heads,
                          hidden_size=H, intermediate_size=2 * H, num_attention_heads=heads, num_moe_layers=2,
                          num_experts=E, num_experts_per_tok=k, moe_intermediate_size=I, num_shared_experts=n_shared,
                          shared_intermediate_size=I, state_dim=3, action_dim=2, chunk_size=4, n_action_steps=2,
                          num_inference_steps=2)
    torch.manual_seed(0)
    return MoezooVlaPolicy(cfg).eval()


def _load(policy, official):
    state, unmapped = convert_drivemoe_state_dict(official, policy.config)
    _, unexpected = policy.load_state_dict(state, strict=False)
    assert not unexpected
    # every camera-router and MoE-layer tensor comes from the checkpoint (layer 2's gate has only a fixed
    # temperature buffer: it receives layer 1's logits)
    want = {k for k in policy.state_dict() if k.startswith(("camera_router.", "action_expert.layers.1.mlp.",
                                                            "action_expert.layers.2.mlp."))}
    assert set(state) == want - {"action_expert.layers.2.mlp.gate.temperature"}
    return unmapped


def test_converter_reproduces_the_shared_fixture():
    if not FIXTURE.is_dir():
        pytest.skip(f"{FIXTURE} not available")
    state, io = load_file(str(FIXTURE / "model.safetensors")), load_file(str(FIXTURE / "io.safetensors"))
    p = _policy_for(H=32, I=48, E=7, k=3, n_shared=1, D=32, labels=5, heads=8)
    unmapped = _load(p, _official_full(state, [1, 2]))
    assert unmapped == ["joint_model.mixtures.vlm.layers.0.mlp.gate_proj.weight"]
    first, second = p.action_expert["layers"][1].mlp, p.action_expert["layers"][2].mlp
    with torch.no_grad():
        y, ro = first(io["in.hidden_states"], router_hidden_states=io["in.router_hidden_states"])
        y2, _ = second(io["in.hidden_states"], router_logits=ro.extras["sample_logits"])
        cam = p.camera_router(io["in.front_tokens"], io["in.waypoint"])
    tol = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y, io["out.moe_output"], **tol)
    torch.testing.assert_close(y2, io["out.moe_output"], **tol)
    torch.testing.assert_close(ro.extras["sample_logits"], io["out.action_router_logits"], **tol)
    torch.testing.assert_close(ro.extras["sample_probs"], io["out.routing_probs"], **tol)
    torch.testing.assert_close(ro.extras["sample_weights"], io["out.topk_weight"], **tol)
    assert torch.equal(ro.extras["sample_indices"], io["out.topk_idx"])
    torch.testing.assert_close(cam, io["out.camera_logits"], **tol)
    assert torch.equal(cam.argmax(-1), io["out.camera_selected"])
    # the converted policy runs end to end; its camera choice is the router's argmax
    inp = p.example_inputs(generator=torch.Generator().manual_seed(0), labels=False)
    with torch.no_grad():
        out = p(**inp)
    assert torch.equal(out.camera_selection[:, 0], out.camera_logits.argmax(-1))


def _plain_moe(x, rh, st, pre, router, k, n_shared):
    """README quirks in plain torch: per-sample mean logits / |T|, softmax, top-k renormalised, GemmaMLP experts
    (gelu tanh), shared experts summed unweighted."""
    logits = (rh @ router["w"].T).mean(1) / router["t"].abs()
    w, idx = logits.softmax(-1).topk(k, -1)
    w = w / w.sum(-1, keepdim=True)

    def mlp(p, h):
        return (F.gelu(h @ st[p + "gate_proj.weight"].T, approximate="tanh") * (h @ st[p + "up_proj.weight"].T)) \
            @ st[p + "down_proj.weight"].T
    y = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for j in range(k):
            y[b] += w[b, j] * mlp(f"{pre}skill_experts.{int(idx[b, j])}.", x[b])
        for s in range(n_shared):
            y[b] += mlp(f"{pre}shared_experts.{s}.", x[b])
    return y, logits, idx


def test_converter_on_another_random_config():
    H, I, E, k, n_shared, D, labels, heads = 24, 20, 5, 2, 2, 16, 3, 4
    g = torch.Generator().manual_seed(7)
    st = {"joint_model.action_router.router_linear.weight": torch.randn(E, H, generator=g) * 0.5,
          "joint_model.action_router.temperature": torch.tensor([-1.3])}
    for i in (1, 2):  # different weights per MoE layer
        pre = f"joint_model.mixtures.action.layers.{i}.mlp."
        for kind, n in (("skill_experts", E), ("shared_experts", n_shared)):
            for e in range(n):
                st[f"{pre}{kind}.{e}.gate_proj.weight"] = torch.randn(I, H, generator=g) * 0.5
                st[f"{pre}{kind}.{e}.up_proj.weight"] = torch.randn(I, H, generator=g) * 0.5
                st[f"{pre}{kind}.{e}.down_proj.weight"] = torch.randn(H, I, generator=g) * 0.3
    from moezoo.core import CameraRouter
    cam_ref = CameraRouter(D, labels, heads, waypoint_hidden=128)
    for n, t in cam_ref.state_dict().items():
        st["camera_router." + n] = torch.randn(t.shape, generator=g) * 0.3
    p = _policy_for(H=H, I=I, E=E, k=k, n_shared=n_shared, D=D, labels=labels, heads=heads)
    assert _load(p, st) == []
    x, rh = torch.randn(3, 4, H, generator=g), torch.randn(3, 6, H, generator=g)
    router = {"w": st["joint_model.action_router.router_linear.weight"], "t": st["joint_model.action_router.temperature"]}
    with torch.no_grad():
        y1, ro = p.action_expert["layers"][1].mlp(x, router_hidden_states=rh)
        y2, _ = p.action_expert["layers"][2].mlp(x, router_logits=ro.extras["sample_logits"])
    for i, y in ((1, y1), (2, y2)):
        want, logits, idx = _plain_moe(x, rh, st, f"joint_model.mixtures.action.layers.{i}.mlp.", router, k, n_shared)
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ro.extras["sample_logits"], logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(ro.extras["sample_indices"], idx)
    assert not torch.allclose(y1, y2)  # the two layers really hold different experts
    cam_ref.load_state_dict({n[len("camera_router."):]: t for n, t in st.items() if n.startswith("camera_router.")})
    ft, wp = torch.randn(2, 5, D, generator=g), torch.randn(2, 2, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(p.camera_router(ft, wp), cam_ref.eval()(ft, wp))
    # placement and size mismatches are named
    bad = {k2.replace("layers.2.", "layers.0."): v for k2, v in st.items()}
    with pytest.raises(ValueError, match=r"action layers \[0, 1\], the config in \[1, 2\]"):
        convert_drivemoe_state_dict(bad, p.config)
    q = _policy_for(H=H, I=I + 4, E=E, k=k, n_shared=n_shared, D=D, labels=labels, heads=heads)
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        convert_drivemoe_state_dict(st, q.config)
