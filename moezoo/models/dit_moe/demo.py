"""``moezoo demo`` step ``dit_moe``: train a tiny pixel-space DiT-MoE on Fashion-MNIST, sample, score offline.

The demo trains with rectified flow (logit-normal sigma, velocity target) and samples with diffusers'
``FlowMatchEulerDiscreteScheduler``: at a CPU budget of a few hundred steps it gives recognisable classes, where the
DDPM objective (``training/dit_moe/configs/tiny_fmnist.yaml``) needs a few thousand steps.
"""
from __future__ import annotations

from ...demo import DemoContext, register_demo_step

# the demo's model: the registry's pixel-space tiny DiT-MoE (hidden 128, 4 blocks, 4 experts top-2 + 2 shared)
DEMO_MODEL = "dit_moe_tiny_e4k2"
DEMO_OVERRIDES: dict = {"learn_sigma": False}  # a flow model predicts no variance


def demo_settings(quick: bool) -> dict:
    """Steps / batch / sampling budget of the demo (quick: < 60 s on a free CPU core)."""
    if quick:
        return dict(steps=30, batch_size=32, per_class=4, inference_steps=8, classifier_train=5000,
                    classifier_epochs=2, ema_decay=None, learning_rate=2e-3, warmup=3)
    return dict(steps=400, batch_size=64, per_class=20, inference_steps=30, classifier_train=20000,
                classifier_epochs=3, ema_decay=0.99, learning_rate=2e-3, warmup=40)


@register_demo_step("dit_moe", order=30, description="train a tiny DiT-MoE on Fashion-MNIST (rectified flow), "
                    "sample with DiTMoEPipeline, offline FID + conditional accuracy, routing heatmaps")
def dit_moe_demo(ctx: DemoContext) -> dict:
    import time

    import torch

    import moezoo
    from moezoo.data.images import FASHION_MNIST_APT, FashionMNIST, fashion_mnist_available
    from moezoo.metrics.generation import evaluate_generation, results_markdown
    from moezoo.trainer import Trainer, TrainerConfig

    from .objectives import RectifiedFlowObjective
    from .pipeline_dit_moe import DiTMoEPipeline

    if not fashion_mnist_available():
        reason = f"Fashion-MNIST is not installed (sudo {FASHION_MNIST_APT})"
        ctx.print(f"skipping dit_moe: {reason}")
        return {"skipped": reason}
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = demo_settings(ctx.quick)
    out = ctx.step_dir("dit_moe")
    train_ds, test_ds = FashionMNIST("train"), FashionMNIST("test")
    torch.manual_seed(ctx.seed)
    model = moezoo.create_model(DEMO_MODEL, **DEMO_OVERRIDES)
    summ = model.parameter_summary()
    ctx.print(f"model: {DEMO_MODEL} (hidden {model.config.hidden_size}), {summ['total']:,} parameters "
              f"({summ['active']:,} active per token), {model.config.num_moe_layers} MoE layers x "
              f"{model.config.num_experts} experts top-{model.config.num_experts_per_tok} + "
              f"{model.config.num_shared_experts} shared; data: Fashion-MNIST {len(train_ds):,} train / "
              f"{len(test_ds):,} test 28x28")
    objective = RectifiedFlowObjective()
    tconf = TrainerConfig(output_dir=str(out / "train"), max_steps=s["steps"], batch_size=s["batch_size"],
                          learning_rate=s["learning_rate"], warmup_steps=s["warmup"], lr_schedule="cosine",
                          min_lr_ratio=0.1, grad_clip=1.0, ema_decay=s["ema_decay"], log_every=max(1, s["steps"] // 10),
                          seed=ctx.seed, resume="never", overwrite_output_dir=True, save_final=not ctx.quick,
                          mixed_precision="no")
    trainer = Trainer(model, tconf, train_data=train_ds, loss_fn=objective)
    t0 = time.time()
    tres = trainer.train()
    train_seconds = time.time() - t0
    losses = tres["losses"]
    ctx.print(f"trained {s['steps']} steps x batch {s['batch_size']} in {train_seconds:.0f} s "
              f"({train_seconds / s['steps']:.2f} s/step); loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    final = (trainer.ema_model if trainer.ema_model is not None else model).eval()
    pipe = DiTMoEPipeline(transformer=final, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000))
    pipe_dir = out / "pipeline"
    pipe.save_pretrained(str(pipe_dir))
    pipe = DiTMoEPipeline.from_pretrained(str(pipe_dir))
    res = evaluate_generation(
        pipe, (train_ds.images, train_ds.labels), (test_ds.images, test_ds.labels), out / "eval",
        per_class=s["per_class"], num_inference_steps=s["inference_steps"], guidance_scale=2.0,
        class_names=FashionMNIST.class_names, seed=ctx.seed, classifier_epochs=s.get("classifier_epochs", 1), grid_per_class=min(8, s["per_class"]),
        classifier_cache=out, classifier_max_train=s["classifier_train"], progress=False)
    ctx.print(results_markdown(res))
    ctx.print(f"sample grid: {res['grid_png']}; routing heatmaps: {', '.join(res.get('routing_pngs', []))}")
    return {
        "steps": s["steps"], "train_seconds": round(train_seconds, 1), "loss_first": losses[0],
        "loss_last": losses[-1], "pipeline_dir": str(pipe_dir), "parameters": summ["total"],
        **{k: res[k] for k in ("classifier_fid", "classifier_fid_real_vs_real", "conditional_accuracy",
                               "classifier_test_accuracy", "precision", "recall", "images_per_second", "grid_png")},
        "routing_pngs": res.get("routing_pngs", []),
    }
