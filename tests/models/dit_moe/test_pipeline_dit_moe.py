"""DiTMoEPipeline: every scheduler kind, determinism, cfg_channels semantics, save/load round trip, latent (VAE) path."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       ImagePipelineOutput)

from moezoo.models.dit_moe.pipeline_dit_moe import DiTMoEPipeline, apply_cfg  # noqa: E402


def tiny_model(**kw):
    torch.manual_seed(0)
    return moezoo.create_model("dit_moe_tiny_e4k2", tiny=True, **kw).eval()


SCHEDULERS = {
    "ddpm": lambda: DDPMScheduler(variance_type="learned_range", clip_sample=False),
    "ddim": lambda: DDIMScheduler(clip_sample=False),
    "flow": lambda: FlowMatchEulerDiscreteScheduler(),
}


@pytest.fixture(scope="module")
def model1():
    return tiny_model(in_channels=1)


def _pipe(model, kind):
    p = DiTMoEPipeline(transformer=model, scheduler=SCHEDULERS[kind]())
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_each_scheduler_shapes_range_determinism(model1, kind):
    pipe = _pipe(model1, kind)
    run = lambda seed, **kw: pipe([0, 3, 9], num_inference_steps=2, guidance_scale=2.0,  # noqa: E731
                                  generator=torch.Generator().manual_seed(seed), **kw)
    out = run(0, output_type="np")
    assert isinstance(out, ImagePipelineOutput)
    x = out.images
    assert x.shape == (3, 8, 8, 1) and x.dtype == np.float32
    assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    pt = run(0, output_type="pt").images  # same seed -> identical, in another format
    assert pt.shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(pt.permute(0, 2, 3, 1).numpy(), x)
    assert not np.array_equal(x, run(1, output_type="np").images)
    pil = run(0, output_type="pil").images
    assert len(pil) == 3 and pil[0].size == (8, 8) and pil[0].mode == "L"


def test_learned_variance_reaches_the_ddpm_scheduler_only_when_it_is_learned(model1):
    seen = []

    class Spy(DDPMScheduler):
        def step(self, model_output, timestep, sample, **kw):
            seen.append(model_output.shape[1])
            return super().step(model_output, timestep, sample, **kw)

    for vt in ("learned_range", "fixed_small"):
        seen.clear()
        pipe = DiTMoEPipeline(transformer=model1, scheduler=Spy(variance_type=vt))
        pipe.set_progress_bar_config(disable=True)
        pipe([1], num_inference_steps=2, output_type="pt")
        assert set(seen) == ({2} if vt == "learned_range" else {1})


def test_cfg_matches_model_forward_with_cfg_and_cfg_channels_matter():
    m = tiny_model()  # 4 latent channels, learned sigma -> 8 outputs
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([500.0, 500.0, 500.0, 500.0])
    y = torch.tensor([1, 2, m.config.null_class_id, m.config.null_class_id])
    with torch.no_grad():
        raw = m(sample=torch.cat([x, x]), timestep=t, class_labels=y).sample
        for cc in (None, 3):
            ref = m.forward_with_cfg(torch.cat([x, x]), t, y, guidance_scale=4.0, cfg_channels=cc).sample
            torch.testing.assert_close(apply_cfg(raw, 4.0, cc, 4), ref[:2])
    # channel 3 (eps) is guided only with cfg_channels=None; variance channels never
    full, three = apply_cfg(raw, 4.0, None, 4), apply_cfg(raw, 4.0, 3, 4)
    torch.testing.assert_close(full[:, :3], three[:, :3])
    assert not torch.allclose(full[:, 3], three[:, 3])
    torch.testing.assert_close(three[:, 3:], raw[:2, 3:])
    # in the pipeline: the two settings give different samples, guidance 1 == conditional only
    pipe = _pipe(m, "ddim")
    run = lambda **kw: pipe([1, 2], num_inference_steps=1, generator=torch.Generator().manual_seed(0),  # noqa: E731
                            output_type="latent", **kw).images
    guided3 = run(guidance_scale=4.0, cfg_channels=3)
    assert not torch.allclose(run(guidance_scale=4.0), guided3)
    # one step: the unguided channel 3 follows the conditional prediction alone
    torch.testing.assert_close(guided3[:, 3], run(guidance_scale=1.0)[:, 3], rtol=1e-4, atol=1e-5)


def test_save_load_round_trip_gives_identical_samples(model1, tmp_path):
    pipe = _pipe(model1, "ddpm")
    ref = pipe([0, 5], num_inference_steps=3, generator=torch.Generator().manual_seed(7), output_type="pt").images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["moezoo.models.dit_moe.modeling_dit_moe", "MoezooDiTMoeModel"]
    assert (tmp_path / "transformer" / "model.safetensors").is_file()
    loaded = DiTMoEPipeline.from_pretrained(tmp_path)
    assert type(loaded.transformer) is type(model1) and loaded.vae is None
    assert isinstance(loaded.scheduler, DDPMScheduler) and loaded.scheduler.config.variance_type == "learned_range"
    loaded.set_progress_bar_config(disable=True)
    out = loaded([0, 5], num_inference_steps=3, generator=torch.Generator().manual_seed(7), output_type="pt").images
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5).eval()


def test_latent_pipeline_with_tiny_vae_round_trip(tmp_path):
    m = tiny_model()
    pipe = DiTMoEPipeline(transformer=m, scheduler=DDIMScheduler(clip_sample=False), vae=_tiny_vae())
    pipe.set_progress_bar_config(disable=True)
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe([3, 4], num_inference_steps=2, latents=lat, output_type="pt", cfg_channels=3).images
    assert out.shape == (2, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    # the decode is vae.decode(latents / scaling_factor)
    final = pipe([3, 4], num_inference_steps=2, latents=lat, output_type="latent", cfg_channels=3).images
    with torch.no_grad():
        expect = (pipe.vae.decode(final / 0.5).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out, expect)
    pipe.save_pretrained(tmp_path)
    loaded = DiTMoEPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, AutoencoderKL)
    again = loaded([3, 4], num_inference_steps=2, latents=lat, output_type="pt", cfg_channels=3).images
    torch.testing.assert_close(again, out, rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors(model1):
    pipe = _pipe(model1, "ddim")
    with pytest.raises(ValueError, match="class_labels"):
        pipe([10], num_inference_steps=1)
    with pytest.raises(ValueError, match="class_labels"):
        pipe([0.5], num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe([0], num_inference_steps=1, output_type="jpeg")
    with pytest.raises(ValueError, match="latents"):
        pipe([0], num_inference_steps=1, latents=torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe([0], num_inference_steps=0)
    with pytest.raises(ValueError, match="cfg_channels"):
        pipe([0], num_inference_steps=1, cfg_channels=5)


def test_building_a_pipeline_registers_the_transformer_with_diffusers_loader(model1):
    from diffusers.pipelines import pipeline_loading_utils as plu

    from moezoo.models.dit_moe import DiTMoEPipeline as exported
    from moezoo.models.dit_moe.modeling_dit_moe import MoezooDiTMoeModel

    assert exported is DiTMoEPipeline
    _pipe(model1, "ddim")
    entry = plu.LOADABLE_CLASSES[MoezooDiTMoeModel.__module__]
    assert entry == {"MoezooPreTrainedModel": ["save_pretrained", "from_pretrained"]}
    assert "MoezooPreTrainedModel" in plu.ALL_IMPORTABLE_CLASSES


@pytest.mark.parametrize("name", ["dit_moe_tiny_e4k2", "promoe_tiny_e4k1"])
def test_bf16_autocast_sampling_is_close_to_fp32_and_routers_stay_fp32(name):
    torch.manual_seed(0)
    model = moezoo.create_model(name, tiny=True).eval()
    pipe = _pipe(model, "ddim")
    seen = []
    run = lambda **kw: pipe([1, 2], num_inference_steps=3, guidance_scale=2.0, output_type="latent",  # noqa: E731
                            generator=torch.Generator().manual_seed(0), **kw).images
    ref = run()
    got = run(autocast=torch.bfloat16,
              transformer_output_callback=lambda i, t, out, n: seen.append((out.sample.dtype, out.router_outputs)))
    assert got.dtype == ref.dtype == torch.float32
    assert seen and all(dt == torch.bfloat16 for dt, _ in seen)  # the transformer did run in bf16
    assert all(ro.logits.dtype == torch.float32 for _, ros in seen for ro in ros)
    err = (got - ref).abs().max().item()
    assert 0 < err < 0.05 * ref.abs().max().item(), err
    with pytest.raises(ValueError, match="autocast"):
        run(autocast=torch.int8)
