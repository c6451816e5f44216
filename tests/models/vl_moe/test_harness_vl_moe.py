"""vl_moe harness: accuracy / POPE / routing-by-modality figures / tokens/s on a tiny saved model, and the CLI table."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import moezoo
from moezoo.models.vl_moe import MoezooVlMoeProcessor
from moezoo.models.vl_moe.data import VqaSample, build_word_tokenizer, load_easy_vqa, pope_probe
from moezoo.models.vl_moe.harness import pope_metrics, routing_by_modality, vqa_accuracy

ROOT = Path(__file__).resolve().parents[3]


def _saved(tmp_path, name="vl_moe_smol_e4k2.moiie"):
    samples = load_easy_vqa("test", limit=12, seed=0)
    tok = build_word_tokenizer([s.question + " " + s.answer for s in samples])
    base = moezoo.get_model_config(name, tiny=True)
    torch.manual_seed(0)
    model = moezoo.create_model(name, tiny=True, image_token_id=len(tok) - 1,
                                text_config=dict(base.text_config.to_dict(), vocab_size=len(tok)))
    proc = MoezooVlMoeProcessor.for_model(model.config, tok)
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    return model.eval(), proc, samples


def test_metrics_count_right_answers(tmp_path, monkeypatch):
    model, proc, samples = _saved(tmp_path)
    import moezoo.models.vl_moe.harness as h

    truth = [s.answer for s in samples]
    monkeypatch.setattr(h, "answer_questions", lambda m, p, ss, **kw: [s.answer for s in ss[:-1]] + ["wrong"])
    acc = vqa_accuracy(model, proc, samples)
    assert abs(acc["accuracy"] - (len(truth) - 1) / len(truth)) < 1e-9
    probe = pope_probe(samples + [VqaSample(samples[0].image, "is there a circle?", "yes")])
    monkeypatch.setattr(h, "answer_questions", lambda m, p, ss, **kw: ["yes"] * len(ss))
    pm = pope_metrics(model, proc, probe)
    assert pm["yes_ratio"] == 1.0 and abs(pm["accuracy"] - pm["gold_yes_ratio"]) < 1e-9


def test_routing_splits_modalities_and_cli_writes_table(tmp_path, capsys):
    model, proc, samples = _saved(tmp_path)
    r = routing_by_modality(model, proc, samples[:4], batch_size=2)
    counts = torch.tensor(r["counts"])  # (layers, modality, experts)
    assert counts.shape == (4, 2, 4)
    assert counts[:, 1, 3].sum() == 0 and counts[:, 0, 0].sum() == 0  # MoIIE pools: image-only 0, text-only 3
    used = counts[:, :, 0].sum(-1) > 0  # expert 0 only ever sees image tokens
    assert used.any() and torch.equal(torch.tensor(r["image_preference"])[:, 0][used], torch.ones(int(used.sum())))
    sys.path.insert(0, str(ROOT / "eval" / "vl_moe"))
    try:
        import run as harness_cli
    finally:
        sys.path.pop(0)
    rep = harness_cli.main([f"moiie={tmp_path / 'm'}", "--limit", "8", "--batch-size", "4", "--out", str(tmp_path / "ev")])
    out = capsys.readouterr().out
    assert "| moiie | 1 |" in out
    res = rep["moiie"][0]
    assert 0 <= res["vqa"]["accuracy"] <= 1 and res["speed"]["tokens_per_s"] > 0
    assert all(Path(p).is_file() for p in res["routing_plots"])
    assert (tmp_path / "ev" / "report.json").is_file()


def test_blind_prior_answers_by_question_template():
    from moezoo.models.vl_moe.harness import blind_prior, question_template

    img = None
    train = [VqaSample(img, "is there a red shape?", "no"), VqaSample(img, "is there a blue shape?", "no"),
             VqaSample(img, "is there a teal shape?", "yes"), VqaSample(img, "is there not a red shape?", "yes"),
             VqaSample(img, "what color is the shape?", "red"), VqaSample(img, "what color is the shape?", "red"),
             VqaSample(img, "what color is the shape?", "blue"), VqaSample(img, "what color is the shape?", "teal")]
    assert question_template("Is there a Blue shape?", {"blue"}) == "is there a <w> shape"
    test = [VqaSample(img, "is there a green shape?", "no"), VqaSample(img, "is there not a blue shape?", "no"),
            VqaSample(img, "what color is the shape?", "red"), VqaSample(img, "what shape is it?", "circle")]
    res = blind_prior(train, test, pope_probe(test))
    # "no" (template majority), "yes" (wrong), "red" (right), unseen template -> overall majority "no"/"red" (wrong)
    assert res["vqa"]["accuracy"] == 0.5 and res["templates"] == 3
    assert res["pope"] == {"accuracy": 0.5, "yes_ratio": 0.5, "n": 2}


def test_blind_prior_on_easy_vqa_is_a_real_bar():
    from moezoo.models.vl_moe.harness import blind_prior

    test = load_easy_vqa("test", limit=400, seed=0)
    res = blind_prior(load_easy_vqa("train"), test, pope_probe(test))
    # easy-VQA's yes/no questions are skewed by phrasing ("is there a <colour> shape?" is mostly "no"), so a model
    # that never looks at the image already gets well above chance: the bar every trained model must clear
    assert 0.6 < res["vqa"]["accuracy"] < 0.75 and 0.75 < res["pope"]["accuracy"] < 0.9
    assert abs(res["pope"]["yes_ratio"] - 0.5) < 0.1
