"""DDPM (learned sigma) and rectified-flow objectives: finiteness, gradients to both output halves, the VB term
against the closed form, and conventions shared with diffusers' DDPMScheduler / FlowMatchEulerDiscreteScheduler."""
from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

from moezoo.models.dit_moe.objectives import (DDPMObjective, RectifiedFlowObjective, build_objective,  # noqa: E402
                                              discretized_gaussian_log_likelihood, normal_kl)


def _model(**kw):
    torch.manual_seed(0)
    return moezoo.create_model("dit_moe_tiny_e4k2", tiny=True, in_channels=1, **kw).train()


def _batch(n=4, c=1):
    g = torch.Generator().manual_seed(1)
    return {"sample": torch.rand(n, c, 8, 8, generator=g) * 2 - 1, "class_labels": torch.arange(n) % 10}


def _final_grad_by_channel(model):
    """|grad| of the final projection rows, summed per output channel (unpatchify puts the channel last)."""
    w = model.final_layer.linear.weight.grad
    C = model.config.out_channels
    return torch.stack([w[c::C].abs().sum() for c in range(C)])


def test_ddpm_learned_sigma_loss_finite_and_trains_both_halves():
    m = _model()
    torch.manual_seed(0)
    loss, logs = DDPMObjective()(m, _batch())
    assert torch.isfinite(loss) and {"mse", "vb", "aux", "loss"} <= set(logs)
    assert logs["vb"] > 0
    torch.testing.assert_close(loss.detach(), torch.tensor(logs["mse"] + logs["vb"] + logs["aux"]), rtol=1e-4, atol=1e-5)
    loss.backward()
    g = _final_grad_by_channel(m)
    assert g[0] > 0 and g[1] > 0, "eps half (MSE) and variance half (VB) must both get gradient"


def test_vb_term_only_trains_the_variance_and_is_zero_at_the_true_posterior():
    obj = DDPMObjective()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([1, 5, 50, 300, 700, 999])
    xt = obj.scheduler.add_noise(x0, noise, t)
    eps = noise.clone().requires_grad_(True)
    v = torch.full_like(x0, -1.0, requires_grad=True)  # frac 0 -> the posterior variance
    vb = obj.vb_term(x0, xt, t, eps, v)
    torch.testing.assert_close(vb, torch.zeros(6), atol=2e-4, rtol=0)
    (vb.sum() + obj.vb_term(x0, xt, t, eps * 1.1, v * 0.5).sum()).backward()
    assert eps.grad is None or eps.grad.abs().sum() == 0, "the VB term must not train the mean (eps is detached)"
    assert v.grad.abs().sum() > 0


def test_vb_variance_parametrisation_matches_diffusers_learned_range():
    obj = DDPMObjective()
    sched = DDPMScheduler(variance_type="learned_range")
    sched.set_timesteps(1000)
    for t in (1, 10, 500, 999):
        v = torch.tensor([-0.5, 0.0, 0.7])
        frac = (v + 1) / 2
        ours = frac * obj._buf["betas_log"][t] + (1 - frac) * obj._buf["post_logvar"][t]
        theirs = sched._get_variance(t, predicted_variance=v)
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-4, atol=1e-4)  # diffusers: fp32


def test_normal_kl_and_discretized_likelihood_closed_forms():
    m1, lv1, m2, lv2 = torch.tensor(0.3), torch.tensor(-1.0), torch.tensor(-0.2), torch.tensor(0.5)
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), torch.distributions.kl_divergence(p, q))
    # probabilities of the 256 bins sum to one for any mean / scale
    bins = torch.linspace(-1, 1, 256)
    ll = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, 0.1), torch.full_like(bins, math.log(0.3)))
    torch.testing.assert_close(ll.exp().sum(), torch.tensor(1.0), rtol=1e-4, atol=1e-4)


def test_rectified_flow_convention_matches_flow_match_euler():
    obj = RectifiedFlowObjective()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    # interpolation == the scheduler's scale_noise at its own timesteps
    sched.set_timesteps(5)
    t = sched.timesteps[2]
    sigma = sched.sigmas[2]
    torch.testing.assert_close(obj.interpolate(x0, noise, sigma.repeat(3)),
                               sched.scale_noise(x0, t.reshape(1), noise))
    # one Euler step from pure noise with the true velocity lands on x0
    sched.set_timesteps(1)
    assert float(sched.sigmas[0]) == 1.0 and float(sched.timesteps[0]) == 1000.0
    x1 = obj.interpolate(x0, noise, torch.ones(3))
    out = sched.step(obj.velocity(x0, noise), sched.timesteps[0], x1).prev_sample
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)
    # and from any sigma to any smaller sigma it stays on the straight line
    sched.set_timesteps(4)
    xs = obj.interpolate(x0, noise, sched.sigmas[1].repeat(3))
    nxt = sched.step(obj.velocity(x0, noise), sched.timesteps[1], xs).prev_sample
    torch.testing.assert_close(nxt, obj.interpolate(x0, noise, sched.sigmas[2].repeat(3)), rtol=1e-5, atol=1e-5)


def test_rectified_flow_loss_timesteps_and_gradient():
    m = _model(learn_sigma=False)
    obj = build_objective("rectified_flow", logit_mean=0.0, logit_std=1.0)
    seen = []
    m.register_forward_hook(lambda mod, args, kwargs, out: seen.append(kwargs["timestep"]), with_kwargs=True)
    torch.manual_seed(0)
    loss, logs = obj(m, _batch())
    assert torch.isfinite(loss) and "mse" in logs and "aux" in logs
    assert seen and (seen[0] > 0).all() and (seen[0] < 1000).all()
    loss.backward()
    assert _final_grad_by_channel(m)[0] > 0
    s = obj.sample_sigmas(20000, "cpu")
    assert 0 < float(s.min()) and float(s.max()) < 1 and abs(float(s.median()) - 0.5) < 0.02


def test_objectives_add_the_routing_contrastive_loss_of_promoe():
    torch.manual_seed(0)
    m = moezoo.create_model("promoe_tiny_e4k1", tiny=True, in_channels=1, routing_contrastive_coef=0.5).train()
    b = _batch()
    b["class_labels"] = torch.tensor([0, 1, 2, 3])
    loss, logs = DDPMObjective()(m, b)
    assert "rcl" in logs and math.isfinite(logs["rcl"])
    torch.testing.assert_close(loss.detach(), torch.tensor(logs["mse"] + logs["vb"] + logs["aux"] + logs["rcl"]),
                               rtol=1e-4, atol=1e-5)


def test_bad_objective_inputs():
    with pytest.raises(ValueError, match="objective type"):
        build_objective("score_sde")
    with pytest.raises(ValueError, match="batch"):
        DDPMObjective()(_model(), {"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="weighting_scheme"):
        RectifiedFlowObjective(weighting_scheme="cosmap")
