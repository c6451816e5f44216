"""vl_moe data (easy-VQA, LLaVA JSON, POPE probe) and the MoE-tuning stages on the shared Trainer."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from moezoo.models.vl_moe.data import (VqaDataset, build_word_tokenizer, collate_vqa, load_easy_vqa, load_llava_json,
                                       pope_probe)
from moezoo.models.vl_moe.recipe import run_stages

TINY_TOWER = {"vision_tower_kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}}


def _config(tmp_path, stages=None, name="vl_moe_smol_e4k2"):
    return {"model": {"name": name, "tiny": True, "overrides": TINY_TOWER},
            "data": {"source": "easy_vqa", "train_limit": 8},
            "stages": stages or [{"name": "projector", "train": ["projector", "vision_tower"]},
                                 {"name": "instruct", "train": ["projector", "language_model"]},
                                 {"name": "moe", "train": ["moe"], "upcycle": True}],
            "trainer": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "log_every": 1,
                        "progress_bar": False, "mixed_precision": "no"},
            "output_dir": str(tmp_path / "run")}


def test_easy_vqa_and_pope_probe():
    s = load_easy_vqa("test", limit=50, seed=1)
    assert len(s) == 50 and all(os.path.isfile(x.image) for x in s)
    probe = pope_probe(s)
    assert probe and {x.answer for x in probe} <= {"yes", "no"}


def test_llava_json_loader_and_dataset(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 40), (0, 0, 255)).save(tmp_path / "a.png")
    recs = [{"id": "x1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat color is the shape?"},
                                                           {"from": "gpt", "value": "blue"}]},
            {"id": "x2", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "no"}]}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    samples = load_llava_json(tmp_path / "d.json", tmp_path)
    assert len(samples) == 1 and samples[0].question == "what color is the shape?" and samples[0].answer == "blue"
    import moezoo
    from moezoo.models.vl_moe import MoezooVlMoeProcessor

    tok = build_word_tokenizer([samples[0].question, "blue"])
    model = moezoo.create_model("vl_moe_smol_e4k2", tiny=True, image_token_id=len(tok) - 1,
                                text_config=dict(moezoo.get_model_config("vl_moe_smol_e4k2", tiny=True).text_config.to_dict(),
                                                 vocab_size=len(tok)))
    proc = MoezooVlMoeProcessor.for_model(model.config, tok)
    item = VqaDataset(samples, proc)[0]
    batch = collate_vqa([item, item], pad_token_id=0)
    kept = batch["labels"][0][batch["labels"][0] != -100]
    assert tok.decode(kept[:-1]) == "blue" and int(kept[-1]) == tok.eos_token_id
    out = model(**batch)
    assert torch.isfinite(out.loss)
    (tmp_path / "bad.json").write_text(json.dumps([recs[1]]))
    with pytest.raises(ValueError, match="no record with an image"):
        load_llava_json(tmp_path / "bad.json")


def test_three_stage_moe_tuning_freezes_what_it_should_and_resumes(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    res = run_stages(_config(tmp_path))
    by = {r["stage"]: r for r in res["stages"]}
    s1 = AutoModelForImageTextToText.from_pretrained(by["projector"]["model_dir"])
    s2 = AutoModelForImageTextToText.from_pretrained(by["instruct"]["model_dir"])
    s3 = AutoModelForImageTextToText.from_pretrained(by["moe"]["model_dir"])
    assert not s1.moe_layers() and not s2.moe_layers() and len(s3.moe_layers()) == 2
    assert s3.config.router_type == "top2_capacity" and s3.config.moe_mode == "sparse"
    # stage 2 trained the LM; stage 3 only the MoE layers (attention and the dense layers unchanged)
    a2 = s2.model.language_model.layers[0].self_attn.q_proj.weight
    a3 = s3.model.language_model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(a3, a2, atol=0, rtol=0)
    torch.testing.assert_close(s3.model.language_model.layers[1].mlp.down_proj.weight,
                               s2.model.language_model.layers[1].mlp.down_proj.weight, atol=0, rtol=0)
    torch.testing.assert_close(s3.model.multi_modal_projector[0].weight, s2.model.multi_modal_projector[0].weight)
    assert not torch.equal(s3.model.language_model.layers[0].mlp.experts.down_proj[0],
                           s2.model.language_model.layers[0].mlp.down_proj.weight.detach())
    assert by["moe"]["trainable_params"] < by["instruct"]["trainable_params"] * 2
    # a re-run skips the finished stages
    again = run_stages(_config(tmp_path))
    assert all(r.get("skipped") for r in again["stages"])
    proc = AutoProcessor.from_pretrained(by["moe"]["model_dir"])
    from PIL import Image

    from moezoo.models.vl_moe.data import prompt_text
    inputs = proc(images=Image.new("RGB", (64, 64)), text=prompt_text(proc, "what shape is this?"))
    out = s3.eval().generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_moiie_two_stage_variant_and_bad_stage(tmp_path):
    stages = [{"name": "projector", "train": ["projector"]},
              {"name": "moiie", "train": ["projector", "language_model"], "upcycle": True}]
    res = run_stages(_config(tmp_path, stages, name="vl_moe_smol_e4k2.moiie"))
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(res["model_dir"])
    assert m.config.router_type == "modality" and len(m.moe_layers()) == 4
    with pytest.raises(ValueError, match="unknown trainable parts"):
        run_stages(_config(tmp_path / "b", [{"name": "x", "train": ["everything"]}]))
    with pytest.raises(ValueError, match="needs MoE layers"):
        run_stages(_config(tmp_path / "c", [{"name": "x", "train": ["moe"]}]))


def test_lora_stage_merges_adapters_into_plain_weights(tmp_path):
    from transformers import AutoModelForImageTextToText

    stages = [{"name": "projector", "train": ["projector"], "trainer": {"max_steps": 1}},
              {"name": "lora", "train": ["projector"], "lora": {"r": 4, "target_modules": ["q_proj"]}}]
    res = run_stages(_config(tmp_path, stages))
    a = AutoModelForImageTextToText.from_pretrained(res["stages"][0]["model_dir"])
    b = AutoModelForImageTextToText.from_pretrained(res["stages"][1]["model_dir"])
    assert not any("lora" in k for k in b.state_dict())
    la, lb = a.model.language_model.layers[0].self_attn, b.model.language_model.layers[0].self_attn
    assert not torch.equal(la.q_proj.weight, lb.q_proj.weight)  # LoRA update merged
    assert torch.equal(la.k_proj.weight, lb.k_proj.weight)  # not targeted, frozen
    with pytest.raises(ValueError, match="lora trains adapters"):
        run_stages(_config(tmp_path / "x", [{"name": "l", "train": ["language_model"], "lora": {"r": 2}}]))


def test_easy_vqa_captions_from_annotations():
    from moezoo.models.vl_moe.data import CAPTION_PROMPT, VqaSample, easy_vqa_captions

    s = [VqaSample("a.png", "what color is the shape?", "red", 1), VqaSample("a.png", "what shape is present?", "circle", 1),
         VqaSample("a.png", "is there a circle?", "yes", 1), VqaSample("b.png", "what color is the shape?", "teal", 2)]
    caps = easy_vqa_captions(s)
    assert [(c.image, c.question, c.answer, c.image_id) for c in caps] == [("a.png", CAPTION_PROMPT, "a red circle", 1)]
    with pytest.raises(ValueError, match="cannot build captions"):
        easy_vqa_captions(s[2:])
    real = easy_vqa_captions(load_easy_vqa("train"))
    assert len(real) > 2000 and all(c.answer.split()[2] in ("circle", "rectangle", "triangle") for c in real)


def test_caption_stage_trains_on_captions_and_bad_stage_data_is_named(tmp_path, monkeypatch):
    import moezoo.models.vl_moe.recipe as recipe

    seen = []
    real = recipe.VqaDataset

    def spy(samples, processor):
        seen.append({x.question for x in samples})
        return real(samples, processor)

    monkeypatch.setattr(recipe, "VqaDataset", spy)
    cfg = _config(tmp_path, stages=[{"name": "projector", "train": ["projector", "vision_tower"], "data": "captions"},
                                    {"name": "instruct", "train": ["projector", "language_model"]}])
    res = run_stages(cfg)
    assert seen[0] == {"describe the image."} and "describe the image." not in seen[1]
    assert all(r.get("loss") is not None for r in res["stages"])
    with pytest.raises(ValueError, match="data must be 'vqa' or 'captions'"):
        run_stages(_config(tmp_path / "x", stages=[{"name": "p", "train": ["projector"], "data": "pairs"}]))
    bad = _config(tmp_path / "y", stages=[{"name": "p", "train": ["projector"], "data": "captions"}])
    bad["data"] = {"source": "llava_json", "llava_json": "x.json"}
    with pytest.raises(ValueError, match="data=captions needs data.source=easy_vqa"):
        run_stages(bad)
