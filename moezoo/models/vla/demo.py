"""``moezoo demo`` step ``vla``: collect IDM demonstrations in highway-env, train a tiny DriveMoE briefly (stage 1
camera teacher forcing, stage 2 Gumbel-softmax) and drive a few closed-loop episodes on held-out seeds."""
from __future__ import annotations

from ...demo import DemoContext, register_demo_step


def demo_config(ctx: DemoContext) -> dict:
    out = ctx.step_dir("vla")
    scenarios = ["highway", "intersection"] if ctx.quick else ["highway", "merge", "roundabout", "intersection"]
    seeds = [ctx.seed] if ctx.quick else [ctx.seed + i for i in range(3)]
    steps = 20 if ctx.quick else 150
    return {"threads": 1, "model": {"name": "drivemoe_tiny_e6k1", "tiny": True, "variant": "drivemoe"},
            "data": {"dir": str(out / "data"), "scenarios": scenarios, "seeds": seeds, "image_size": 64},
            "trainer": {"output_dir": str(out / "run"), "max_steps": steps, "batch_size": 8, "learning_rate": 1e-3,
                        "warmup_steps": 5, "seed": ctx.seed, "log_every": 5}}


@register_demo_step("vla", order=50, description="DriveMoE (camera router + skill action MoE) trained briefly on "
                    "highway-env IDM demonstrations, then driven closed-loop on held-out seeds")
def vla_demo(ctx: DemoContext) -> dict:
    from .harness import evaluate
    from .recipe import train

    cfg = demo_config(ctx)
    res = train(cfg, printer=ctx.print)
    policy = res["policy"].eval()
    held_out = [1000 + ctx.seed] if ctx.quick else [1000 + ctx.seed + i for i in range(2)]
    metrics = evaluate(policy, cfg["data"]["scenarios"], held_out, printer=ctx.print, tag="drivemoe",
                       record_dir=ctx.step_dir("vla") / "videos")
    summary = {sc: {k: round(v, 3) for k, v in m.items() if isinstance(v, float)} for sc, m in metrics.items()}
    return {"model_dir": res["model_dir"], "samples": res["samples"], "steps": cfg["trainer"]["max_steps"],
            "closed_loop": summary}
