"""``moezoo demo``: an offline end-to-end run, made of registered steps.

The first step (``lm``) trains ``lm_tiny_e8k2`` on the Python language reference that ships with the standard library
(``pydoc_data.topics``), with a byte-level BPE tokenizer trained on the same text in a fraction of a second; it saves
model + tokenizer, reloads them with ``AutoModelForCausalLM`` / ``AutoTokenizer``, generates a sample, prints the
validation loss before / after training and a routing-statistics table, and writes a routing heatmap PNG.

Families add steps with :func:`register_demo_step` in ``moezoo/models/<family>/demo.py`` (imported automatically)::

    @register_demo_step("time_moe", order=20, description="forecast ETT-like series")
    def time_moe_demo(ctx: DemoContext) -> dict:
        ...  # write under ctx.output_dir / "time_moe", print with ctx.print, return a dict of results
"""
from __future__ import annotations

import importlib
import json
import math
import pkgutil
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class DemoStep:
    name: str
    fn: Callable
    order: int = 100
    description: str = ""


@dataclass
class DemoContext:
    """What a demo step gets: where to write, how long to run, and a printer."""

    output_dir: Path
    quick: bool = False
    seed: int = 0
    results: dict = field(default_factory=dict)
    print: Callable = print

    def step_dir(self, name: str) -> Path:
        p = self.output_dir / name
        p.mkdir(parents=True, exist_ok=True)
        return p


_STEPS: dict[str, DemoStep] = {}


def register_demo_step(name: str, *, order: int = 100, description: str | None = None):
    """Decorator adding ``fn(ctx: DemoContext) -> dict`` as a demo step (run in ``order``, then name)."""
    def deco(fn: Callable) -> Callable:
        desc = description if description is not None else ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        _STEPS[name] = DemoStep(name, fn, order, desc)
        return fn

    return deco


def _discover_steps() -> None:
    import moezoo.models as models

    for fam in pkgutil.iter_modules(models.__path__):
        if not fam.ispkg or fam.name in getattr(models, "SKIPPED", {}):
            continue
        pkg = importlib.import_module(f"moezoo.models.{fam.name}")
        if any(m.name == "demo" for m in pkgutil.iter_modules(pkg.__path__)):
            importlib.import_module(f"moezoo.models.{fam.name}.demo")


def list_demo_steps() -> list[DemoStep]:
    _discover_steps()
    return sorted(_STEPS.values(), key=lambda s: (s.order, s.name))


def run_demo(output_dir: str | Path = "outputs/demo", steps: list[str] | None = None, quick: bool = False,
             seed: int = 0, printer: Callable = print) -> dict:
    """Run the demo steps (all, or the named ones) and write ``<output_dir>/results.json``."""
    available = list_demo_steps()
    if steps:
        known = {s.name for s in available}
        unknown = [s for s in steps if s not in known]
        if unknown:
            raise ValueError(f"unknown demo step(s) {unknown}; available: {sorted(known)}")
        available = [s for s in available if s.name in steps]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(output_dir=out, quick=quick, seed=seed, print=printer)
    t0 = time.time()
    for step in available:
        printer(f"\n=== demo step {step.name}: {step.description}")
        t = time.time()
        result = step.fn(ctx) or {}
        result["seconds"] = round(time.time() - t, 1)
        ctx.results[step.name] = result
    ctx.results["total_seconds"] = round(time.time() - t0, 1)
    merged = _merge_results(out / "results.json", ctx.results)
    printer(f"\ndemo finished in {ctx.results['total_seconds']} s; results in {out / 'results.json'}")
    return merged


def _merge_results(path: Path, results: dict) -> dict:
    """Write ``results`` into ``path``, keeping the other steps' results of earlier runs (a ``--steps`` run updates
    only its own steps); ``total_seconds`` is the sum of the steps' latest times."""
    old = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if not isinstance(old, dict):
            old = {}
    merged = {**old, **results}
    merged["total_seconds"] = round(sum(v.get("seconds", 0.0) for v in merged.values() if isinstance(v, dict)), 1)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=2, default=str) + "\n")
    tmp.replace(path)
    return merged


# ------------------------------------------------------------------------------------------------ step: lm
LM_PROMPT = "The assert statement"
LM_BIAS_GAMMA = 1e-3  # DeepSeek-V3's speed for the auxiliary-loss-free selection-bias update in the lm step


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_text_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained offline on ``texts``, wrapped as a transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    eot = "<|endoftext|>"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[eot], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=eot, eos_token=eot, pad_token=eot)


def pydoc_corpus() -> list[str]:
    """The Python language reference topics shipped with CPython (``pydoc_data.topics``), in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics)]


def _eval_loss(model, data, seq_len: int, batches: int, batch_size: int, gen) -> float:
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for _ in range(batches):
            x = _batch(data, seq_len, batch_size, gen)
            losses.append(model(input_ids=x, labels=x, use_cache=False).loss.item())
    model.train()
    return sum(losses) / len(losses)


def _batch(data, seq_len: int, batch_size: int, gen):
    import torch

    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([data[s: s + seq_len] for s in starts.tolist()])


def _routing_on(model, data, seq_len: int, batches: int, batch_size: int, gen):
    """Routing statistics of ``model`` (eval mode, no updates) on ``batches`` random windows of ``data``."""
    import torch

    from moezoo.core.stats import RoutingStats

    stats = RoutingStats(keep_history=False)
    model.eval()
    with torch.no_grad():
        for _ in range(batches):
            o = model(input_ids=_batch(data, seq_len, batch_size, gen), use_cache=False)
            for (name, _), ro in zip(model.moe_layers(), o.router_outputs):
                stats.update(name.removeprefix("model.").removesuffix(".mlp"), ro)
    model.train()
    return stats


@register_demo_step("lm", order=10, description="train lm_tiny_e8k2 on the Python reference (pydoc_data), reload, "
                    "generate, routing statistics")
def lm_demo(ctx: DemoContext) -> dict:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moezoo
    from moezoo.core.losses import update_selection_bias
    from moezoo.core.stats import RoutingStats

    _seed_all(ctx.seed)
    out = ctx.step_dir("lm")
    texts = pydoc_corpus()
    tokenizer = build_text_tokenizer(texts, vocab_size=1024)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts):
        ids.extend(enc.ids + [eos])
    data = torch.tensor(ids, dtype=torch.long)
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    ctx.print(f"corpus: {len(texts)} pydoc topics, {sum(map(len, texts)):,} characters -> {data.numel():,} BPE tokens "
              f"(vocab {len(tokenizer)}); train {train.numel():,} / validation {val.numel():,}")

    seq_len, batch_size = 128, (8 if ctx.quick else 16)
    steps = 12 if ctx.quick else 400
    eval_batches = 2 if ctx.quick else 4
    # balance: the switch loss (router_aux_loss_coef) plus DeepSeek-V3's auxiliary-loss-free selection bias, nudged
    # towards the mean load after every step. Measured on this step (400 steps, validation text): switch loss alone
    # 4.068 validation loss, worst layer 3.27x the ideal load; with the bias (gamma 1e-3) 3.953 and 1.25x
    model = moezoo.create_model("lm_tiny_e8k2", vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos,
                                pad_token_id=eos, max_position_embeddings=512,
                                router_kwargs={"use_selection_bias": True})
    s = model.parameter_summary()
    ctx.print(f"model: lm_tiny_e8k2, {s['total']:,} parameters ({s['active']:,} active per token), "
              f"{len(s['moe_layers'])} MoE layers x {model.config.num_experts} experts (top-{model.config.num_experts_per_tok}), "
              f"experts implementation {model.config._experts_implementation!r}")
    eval_gen = torch.Generator().manual_seed(ctx.seed + 1)
    val_loss_before = _eval_loss(model, val, seq_len, eval_batches, batch_size, eval_gen)

    lr, warmup = 3e-3, max(1, steps // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))
    gen = torch.Generator().manual_seed(ctx.seed)
    stats = RoutingStats(keep_history=True)
    model.train()
    t0 = time.time()
    bar = tqdm(range(steps), desc="training lm_tiny_e8k2", unit="step", mininterval=1.0)
    train_losses = []
    for step in bar:
        x = _batch(train, seq_len, batch_size, gen)
        o = model(input_ids=x, labels=x, use_cache=False)
        o.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for (name, layer), ro in zip(model.moe_layers(), o.router_outputs):
                update_selection_bias(layer, ro, gamma=LM_BIAS_GAMMA)
                stats.update(name.removeprefix("model.").removesuffix(".mlp"), ro)
        train_losses.append(o.loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{o.loss.item():.3f}", aux=f"{o.aux_loss.item():.4f}")
    bar.close()
    train_seconds = time.time() - t0
    eval_gen = torch.Generator().manual_seed(ctx.seed + 1)
    val_loss_after = _eval_loss(model, val, seq_len, eval_batches, batch_size, eval_gen)
    val_stats = _routing_on(model, val, seq_len, eval_batches, batch_size, torch.Generator().manual_seed(ctx.seed + 2))
    ctx.print(f"validation loss: {val_loss_before:.3f} before -> {val_loss_after:.3f} after {steps} steps "
              f"({train_seconds:.0f} s, perplexity {math.exp(val_loss_before):.0f} -> {math.exp(val_loss_after):.1f})")

    model_dir = out / "lm_tiny_e8k2"
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    reloaded = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok2 = AutoTokenizer.from_pretrained(str(model_dir))
    model.eval()
    probe = val[: seq_len].unsqueeze(0)
    with torch.no_grad():
        max_diff = (reloaded(input_ids=probe).logits - model(input_ids=probe).logits).abs().max().item()
    ctx.print(f"saved to {model_dir} and reloaded with AutoModelForCausalLM ({type(reloaded).__name__}); "
              f"max |logits difference| = {max_diff:.2e}")
    prompt = tok2(LM_PROMPT, return_tensors="pt")
    torch.manual_seed(ctx.seed)
    with torch.no_grad():
        gen_ids = reloaded.generate(**prompt, max_new_tokens=60, do_sample=True, top_k=20, temperature=0.8,
                                    pad_token_id=eos)
    sample = tok2.decode(gen_ids[0], skip_special_tokens=True)
    ctx.print(f"sample: {sample!r}")

    ctx.print("routing of the trained model on validation text (fraction of routing slots per expert; "
              "max/ideal 1 = balanced):")
    ctx.print(val_stats.table())
    heatmap = stats.save_heatmap(out / "routing_heatmap.png", steps_path=out / "routing_over_steps.png",
                                 title="lm_tiny_e8k2: expert load per layer (training)")
    ctx.print(f"routing heatmap: {heatmap}")
    summary = stats.summary()
    return {
        "model_dir": str(model_dir), "steps": steps, "train_seconds": round(train_seconds, 1),
        "tokens": int(data.numel()), "val_loss_before": val_loss_before, "val_loss_after": val_loss_after,
        "train_loss_first": train_losses[0], "train_loss_last": train_losses[-1], "reload_max_abs_diff": max_diff,
        "sample": sample, "heatmap": heatmap, "routing_training": summary.get("_all", {}),
        "routing_validation": {k: (v if k == "_all" else {"max_load_ratio": v["max_load_ratio"], "load": v["load"]})
                               for k, v in val_stats.summary().items()},
        "worst_layer_max_load_ratio": max(v["max_load_ratio"] for k, v in val_stats.summary().items() if k != "_all"),
        "parameters": s["total"], "active_parameters": s["active"],
    }
