"""Evaluation harness of ``vl_moe`` (``eval/vl_moe/run.py``): VQA accuracy, a POPE-style probe, MoE-LLaVA's routing
figures by modality, and generation speed with the KV cache.

- accuracy: greedy answer (first generated word) == annotated answer, on easy-VQA test questions (or LLaVA JSON);
- POPE-style probe: the yes/no existence questions; accuracy and yes-ratio (0.5 = no yes-bias on easy-VQA's balance);
- routing (``routing_load.png``, ``routing_modality_preference.png``): per MoE layer, the share of image tokens' and of
  text tokens' expert assignments that each expert receives, and per expert the fraction of its assignments that come
  from image tokens (MoE-LLaVA Fig. 5/6 style); the numbers are in the returned dict too;
- speed: new tokens per second of batched greedy ``generate`` with ``use_cache=True``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .data import _open_image, collate_vqa, prompt_text, VqaDataset

__all__ = ["answer_questions", "vqa_accuracy", "pope_metrics", "question_template", "blind_prior", "routing_by_modality", "plot_routing", "generation_speed",
           "evaluate_model"]


@torch.no_grad()
def answer_questions(model, processor, samples, batch_size: int = 16, max_new_tokens: int = 3) -> list[str]:
    """Greedy answers (first generated word, lower-cased) to each sample's question."""
    tok = processor.tokenizer
    answers = []
    model.eval()
    for i in range(0, len(samples), batch_size):
        chunk = samples[i: i + batch_size]
        tok.padding_side = "left"
        inputs = processor(images=[_open_image(s.image) for s in chunk],
                           text=[prompt_text(processor, s.question) for s in chunk])
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        for row in tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True):
            words = row.strip().lower().split()
            answers.append(words[0].strip(".?!,") if words else "")
    return answers


def vqa_accuracy(model, processor, samples, **kw) -> dict:
    pred = answer_questions(model, processor, samples, **kw)
    correct = sum(p == s.answer.lower() for p, s in zip(pred, samples))
    return {"accuracy": correct / max(len(samples), 1), "n": len(samples)}


def pope_metrics(model, processor, probe, **kw) -> dict:
    pred = answer_questions(model, processor, probe, **kw)
    acc = sum(p == s.answer for p, s in zip(pred, probe)) / max(len(probe), 1)
    yes = sum(p == "yes" for p in pred) / max(len(probe), 1)
    return {"accuracy": acc, "yes_ratio": yes, "gold_yes_ratio": sum(s.answer == "yes" for s in probe) / len(probe),
            "n": len(probe)}


def question_template(question: str, content_words) -> str:
    """The question with its content words (shape / colour names: any non yes/no answer word) replaced by ``<w>``."""
    words = question.lower().strip().rstrip("?").split()
    return " ".join("<w>" if w in content_words else w for w in words)


def blind_prior(train, test, probe=None) -> dict:
    """The language-only baseline a VQA model must beat: answer each test question with the most frequent training
    answer of its question template (:func:`question_template`), without looking at the image. Returns the VQA
    accuracy and, with ``probe``, the POPE accuracy and yes-ratio of the same rule."""
    from collections import Counter, defaultdict

    if not train:
        raise ValueError("blind_prior needs training samples to count answers in")
    content = {s.answer.lower() for s in train} - {"yes", "no"}
    by_template, overall = defaultdict(Counter), Counter()
    for s in train:
        by_template[question_template(s.question, content)][s.answer.lower()] += 1
        overall[s.answer.lower()] += 1
    fallback = overall.most_common(1)[0][0]

    def answer(q):
        c = by_template.get(question_template(q, content))
        return c.most_common(1)[0][0] if c else fallback

    out = {"vqa": {"accuracy": sum(answer(s.question) == s.answer.lower() for s in test) / max(len(test), 1),
                   "n": len(test)}, "templates": len(by_template)}
    if probe is not None:
        pred = [answer(s.question) for s in probe]
        out["pope"] = {"accuracy": sum(p == s.answer for p, s in zip(pred, probe)) / max(len(probe), 1),
                       "yes_ratio": sum(p == "yes" for p in pred) / max(len(probe), 1), "n": len(probe)}
    return out


@torch.no_grad()
def routing_by_modality(model, processor, samples, batch_size: int = 16) -> dict:
    """Expert assignment counts per MoE layer, split by image (1) and text (0) tokens (padding excluded)."""
    ds = VqaDataset(samples, processor)
    model.eval()
    counts = None
    for i in range(0, len(ds), batch_size):
        batch = collate_vqa([ds[j] for j in range(i, min(i + batch_size, len(ds)))], processor.tokenizer.pad_token_id or 0)
        out = model.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                          attention_mask=batch["attention_mask"])
        modality = (batch["input_ids"] == model.config.image_token_id).long().reshape(-1)
        valid = batch["attention_mask"].reshape(-1).bool()
        ros = out.router_outputs
        if counts is None:
            counts = torch.zeros(len(ros), 2, model.config.num_experts)
        for layer, ro in enumerate(ros):
            idx = ro.indices
            for m in (0, 1):
                sel = idx[valid & (modality == m)]
                sel = sel[sel < model.config.num_experts]
                counts[layer, m] += torch.bincount(sel, minlength=model.config.num_experts)[: model.config.num_experts].float()
    if counts is None:
        raise ValueError("no samples to route")
    load = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    pref = counts[:, 1] / counts.sum(1).clamp_min(1)
    return {"counts": counts.tolist(), "load_text": load[:, 0].tolist(), "load_image": load[:, 1].tolist(),
            "image_preference": pref.tolist()}


def plot_routing(routing: dict, out_dir: str | Path, title: str = "") -> list[str]:
    """``routing_load.png`` (per MoE layer the expert load of image and of text tokens) and
    ``routing_modality_preference.png`` (image share of each expert's tokens), drawn by :mod:`moezoo.plots`."""
    from ...plots import heatmap_panels

    out_dir = Path(out_dir)
    load = {"expert load, image tokens": routing["load_image"], "expert load, text tokens": routing["load_text"]}
    p1 = heatmap_panels(out_dir / "routing_load.png", load, title=title or None, ylabel="MoE layer (in order)")
    p2 = heatmap_panels(out_dir / "routing_modality_preference.png", [routing["image_preference"]], cmap="coolwarm",
                        vmin=0.0, vmax=1.0, ylabel="MoE layer", title="image share of each expert's tokens")
    return [p1, p2]


@torch.no_grad()
def generation_speed(model, processor, samples, batch_size: int = 8, max_new_tokens: int = 16) -> dict:
    """New tokens per second of greedy generation with the KV cache (``min_new_tokens`` forces the full length)."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    chunk = samples[:batch_size]
    inputs = processor(images=[_open_image(s.image) for s in chunk], text=[prompt_text(processor, s.question) for s in chunk])
    model.eval()
    model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
    t = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                         use_cache=True, pad_token_id=tok.pad_token_id)
    dt = time.perf_counter() - t
    new = (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
    return {"tokens_per_s": new / dt, "new_tokens": new, "seconds": dt, "batch_size": len(chunk)}


def evaluate_model(model_dir: str | Path, samples, probe, out_dir: str | Path, *, batch_size: int = 16,
                   speed_tokens: int = 16) -> dict:
    """Every metric of the harness for one saved model + processor folder; writes ``metrics.json`` and the PNGs."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    out_dir = Path(out_dir)
    res = {"model_dir": str(model_dir), "router_type": model.config.router_type if model.moe_layers() else "dense",
           "moe_layers": len(model.moe_layers()), "params": model.parameter_summary()["total"],
           "active_params": model.parameter_summary()["active"]}
    res["vqa"] = vqa_accuracy(model, processor, samples, batch_size=batch_size)
    res["pope"] = pope_metrics(model, processor, probe, batch_size=batch_size)
    if model.moe_layers():
        res["routing"] = routing_by_modality(model, processor, samples[: 4 * batch_size], batch_size=batch_size)
        res["routing_plots"] = plot_routing(res["routing"], out_dir, title=Path(model_dir).name)
    res["speed"] = generation_speed(model, processor, samples, batch_size=min(8, len(samples)), max_new_tokens=speed_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(res, indent=2))
    return res
