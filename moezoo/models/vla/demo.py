"""``moezoo demo`` steps ``vla`` and ``vla_himoe``.

``vla``: collect IDM demonstrations in highway-env, train a tiny DriveMoE briefly (stage 1 camera teacher forcing,
stage 2 Gumbel-softmax) and drive a few closed-loop episodes on held-out seeds. ``vla_himoe``: scripted demonstrations
of two MuJoCo robots with different action spaces, a tiny HiMoE-VLA trained briefly, the reacher task run closed-loop
on held-out seeds (GIF, expert-use heatmap)."""
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


def himoe_demo_config(ctx: DemoContext) -> dict:
    out = ctx.step_dir("vla_himoe")
    seeds = [ctx.seed + i for i in range(2 if ctx.quick else 8)]
    steps = 20 if ctx.quick else 200
    return {"threads": 1, "model": {"name": "himoe_vla_tiny_e8k2", "tiny": True, "variant": "himoe"},
            "data": {"dir": str(out / "data"), "embodiments": ["reacher", "pusher"], "seeds": seeds, "image_size": 32},
            "trainer": {"output_dir": str(out / "run"), "max_steps": steps, "batch_size": 16, "learning_rate": 2e-3,
                        "warmup_steps": 5 if ctx.quick else 20, "seed": ctx.seed, "log_every": 10 if ctx.quick else 50}}


@register_demo_step("vla_himoe", order=51, description="HiMoE-VLA (AS-MoE + HB-MoE action expert) trained briefly on "
                    "scripted MuJoCo Reacher (2-D) + Pusher-arm (7-D) demonstrations, then run closed-loop on the "
                    "reacher task on held-out seeds (GIF + expert-use heatmap)")
def vla_himoe_demo(ctx: DemoContext) -> dict:
    from .recipe import train_robots
    from .robot_harness import evaluate_robots, expert_use_heatmap

    cfg = himoe_demo_config(ctx)
    res = train_robots(cfg, printer=ctx.print)
    policy = res["policy"].eval()
    held_out = [1000 + ctx.seed] if ctx.quick else [1000 + ctx.seed + i for i in range(3)]
    out = ctx.step_dir("vla_himoe")
    metrics = evaluate_robots(policy, ["reacher"], held_out, printer=ctx.print, tag="himoe",
                              record_dir=out / "videos")
    heat = expert_use_heatmap(metrics, out / "expert_use.png", title="HiMoE-VLA expert use (reacher, held-out)")
    return {"model_dir": res["model_dir"], "samples": res["samples"], "steps": cfg["trainer"]["max_steps"],
            "closed_loop": {e: {k: round(v, 3) for k, v in m.items() if isinstance(v, float)}
                            for e, m in metrics.items()}, "heatmap": heat}
