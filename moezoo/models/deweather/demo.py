"""``moezoo demo`` step ``deweather``: train a tiny MoFME on the built-in multi-weather set (real photographs -- scikit-image,
scikit-learn and Debian background photos -- degraded with rain / snow / fog / raindrops, split by photo), report
PSNR / SSIM per weather type on held-out photos before and after, save a triptych PNG."""
from __future__ import annotations

from ...demo import DemoContext, register_demo_step


def demo_config(ctx: DemoContext) -> dict:
    """The recipe config of the demo = ``training/deweather/configs/tiny_mofme.yaml`` (the registry's tiny= MoFME with
    ``tail_skip`` on 16-pixel crops of 48-pixel photos, PSNR loss, batch 64, 1000 steps, lr 2e-3: chosen on the
    validation photos); quick = 30 steps on the built-in photos only."""
    out = ctx.step_dir("deweather")
    model = {"name": "deweather_mofme_tiny_e4k2", "tiny": True, "config": {"tail_skip": True}}
    data = {"photos": "all", "photo_size": 48, "crop_size": 16, "train_variants": 2, "train_crops": 8, "test_crops": 4}
    trainer = {"max_steps": 1000, "batch_size": 64, "learning_rate": 2e-3, "warmup_steps": 10, "log_every": 100}
    if ctx.quick:
        data = {**data, "photos": "builtin", "train_variants": 1}
        trainer = {**trainer, "max_steps": 30, "batch_size": 16, "warmup_steps": 3, "log_every": 5}
    trainer.update(output_dir=str(out / "run"), resume="never", overwrite_output_dir=True, save_every=None,
                   seed=ctx.seed, weight_decay=0.01, min_lr_ratio=0.1)
    # tiny tensors gain nothing from intra-op threads, and on a shared machine extra threads only spin: 1 thread
    return {"threads": 1, "model": model, "data": {**data, "seed": ctx.seed}, "trainer": trainer,
            "loss": {"perceptual_weight": 0.0, "pixel": "psnr"}, "eval": {"batch_size": 64, "triptychs": 1}}


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
