"""``moezoo demo`` step ``deweather``: train a tiny MoFME on the built-in multi-weather set (real photographs degraded
with rain / snow / fog / raindrops), report PSNR / SSIM per weather type before and after, save a triptych PNG."""
from __future__ import annotations

from ...demo import DemoContext, register_demo_step


def demo_config(ctx: DemoContext) -> dict:
    """The recipe config of the demo: quick = the registry's tiny= MoFME on 32-pixel crops for 30 steps."""
    out = ctx.step_dir("deweather")
    if ctx.quick:
        data = {"photo_size": 96, "crop_size": 32, "train_variants": 1, "train_crops": 16, "test_crops": 4}
        trainer = {"max_steps": 30, "batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 3, "log_every": 5}
        model = {"name": "deweather_mofme_tiny_e4k2", "tiny": True}
    else:
        data = {"photo_size": 192, "crop_size": 64}
        trainer = {"max_steps": 300, "batch_size": 16, "learning_rate": 2e-3, "warmup_steps": 20, "log_every": 10}
        model = {"name": "deweather_mofme_tiny_e4k2"}
    trainer.update(output_dir=str(out / "run"), resume="never", overwrite_output_dir=True, save_every=None,
                   seed=ctx.seed, weight_decay=0.01, min_lr_ratio=0.1)
    # tiny tensors gain nothing from intra-op threads, and on a shared machine extra threads only spin: 1 thread
    return {"threads": 1, "model": model, "data": {**data, "seed": ctx.seed}, "trainer": trainer,
            "loss": {"perceptual_weight": 0.0}, "eval": {"batch_size": 32, "triptychs": 1}}


@register_demo_step("deweather", order=40, description="tiny MoFME removes rain / snow / fog / raindrops from real "
                    "photos: PSNR / SSIM before and after a short training, triptych PNG")
def deweather_demo(ctx: DemoContext) -> dict:
    from moezoo.metrics.restoration import format_metrics_table

    from .recipe import train

    res = train(demo_config(ctx), printer=ctx.print, progress=not ctx.quick)
    m = res["metrics"]
    ctx.print(format_metrics_table({"degraded input": m["degraded input"], "MoFME before training": m["before"],
                                    f"MoFME after {res['step']} steps": m["after"]}))
    for p in res["triptychs"]:
        ctx.print(f"triptych: {p}")
    return {"model_dir": res["model_dir"], "steps": res["step"], "train_seconds": round(res["train_time_s"], 1),
            "parameters": res["parameters"], "psnr_input": m["degraded input"]["overall"]["psnr"],
            "psnr_before": m["before"]["overall"]["psnr"], "psnr_after": m["after"]["overall"]["psnr"],
            "ssim_before": m["before"]["overall"]["ssim"], "ssim_after": m["after"]["overall"]["ssim"],
            "metrics": m, "triptychs": res["triptychs"], "routing_plots": res["routing_plots"]}
