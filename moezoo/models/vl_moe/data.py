"""Visual question answering data for the ``vl_moe`` recipe and harness.

- :func:`load_easy_vqa`: the ``easy-vqa`` package (38,575 train / 9,673 test questions over 64x64 shape images, 13
  answers), offline.
- :func:`load_llava_json`: LLaVA-format JSON (``[{"image": "x.jpg", "conversations": [{"from": "human", "value":
  "<image>\\n..."}, {"from": "gpt", "value": "..."}]}]``) with an image folder, so LLaVA-Instruct works too.
- :func:`pope_probe`: a POPE-style hallucination probe (yes/no existence questions) from easy-vqa's annotations.
- :class:`VqaDataset` + :func:`collate_vqa`: chat-formatted prompts through the model's processor, labels only on the
  answer tokens (and the end-of-turn token).
- :func:`build_word_tokenizer`: a word-level tokenizer (with ``<image>``, padding and a chat template) built from the
  data's own words, for tiny models that have no pretrained tokenizer.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100


@dataclass
class VqaSample:
    """One question about one image; ``image`` is a path or a PIL image; ``answer`` may hold several turns' answers
    joined (LLaVA JSON keeps the first human/gpt pair)."""

    image: object
    question: str
    answer: str
    image_id: int | str | None = None


def load_easy_vqa(split: str = "train", limit: int | None = None, seed: int = 0) -> list[VqaSample]:
    """easy-VQA questions of ``split`` (``"train"`` or ``"test"``), optionally a seeded random subset of ``limit``."""
    try:
        import easy_vqa
    except ImportError as exc:  # pragma: no cover - the recipe's documented dependency
        raise ImportError("the easy-vqa data need the package easy-vqa (pip install easy-vqa==1.0)") from exc
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    qs, answers, image_ids = easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    samples = [VqaSample(paths[i], q, a, i) for q, a, i in zip(qs, answers, image_ids)]
    if limit is not None and limit < len(samples):
        samples = random.Random(seed).sample(samples, limit)
    return samples


EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
CAPTION_PROMPT = "describe the image."


def easy_vqa_captions(samples: list[VqaSample]) -> list[VqaSample]:
    """Image-caption pairs for LLaVA's stage 1 (feature alignment) from easy-VQA's own annotations: one ``"a <colour>
    <shape>"`` caption per image whose colour and shape some question answers (``question`` is :data:`CAPTION_PROMPT`).
    Unlike a VQA answer, a caption cannot be guessed from the question's wording, so only the image lowers its loss."""
    colour, shape, image = {}, {}, {}
    for s in samples:
        a = s.answer.lower()
        if a in ("yes", "no") or s.image_id is None:
            continue
        image[s.image_id] = s.image
        (shape if a in EASY_VQA_SHAPES else colour)[s.image_id] = a
    out = [VqaSample(image[i], CAPTION_PROMPT, f"a {colour[i]} {shape[i]}", i) for i in image if i in colour and i in shape]
    if not out:
        raise ValueError("no image has both a colour and a shape answer among the samples: cannot build captions")
    return out


def easy_vqa_answers() -> list[str]:
    import easy_vqa

    return list(easy_vqa.get_answers())


def load_llava_json(path: str | Path, image_folder: str | Path | None = None, limit: int | None = None,
                    image_token: str = "<image>") -> list[VqaSample]:
    """Samples of a LLaVA-format JSON file: the first human turn (its ``<image>`` placeholder removed; the prompt
    template puts the image first) and the first gpt answer of every record that has an image."""
    path = Path(path)
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of LLaVA records")
    folder = Path(image_folder) if image_folder is not None else path.parent
    out = []
    for n, rec in enumerate(records):
        conv = rec.get("conversations")
        if not rec.get("image") or not isinstance(conv, list) or len(conv) < 2:
            continue
        human = next((t["value"] for t in conv if t.get("from") == "human"), None)
        gpt = next((t["value"] for t in conv if t.get("from") == "gpt"), None)
        if human is None or gpt is None:
            raise ValueError(f"record {n} of {path} lacks a human or gpt turn")
        question = human.replace(image_token, "").strip()
        out.append(VqaSample(str(folder / rec["image"]), question, gpt.strip(), rec.get("id", n)))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path} holds no record with an image and a human/gpt pair")
    return out


def pope_probe(samples: list[VqaSample]) -> list[VqaSample]:
    """POPE-style probe: the yes/no existence questions (``does the image contain / not contain a <shape>?``,
    ``is there a <shape>?``) with their annotated answers."""
    probe = [s for s in samples if s.answer in ("yes", "no")]
    if not probe:
        raise ValueError("no yes/no questions in the samples to build the probe from")
    return probe


def _open_image(image):
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return im.convert("RGB")
    return image.convert("RGB") if hasattr(image, "convert") else image


def prompt_text(processor, question: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


class VqaDataset(torch.utils.data.Dataset):
    """Processor-ready VQA items: ``input_ids``, ``attention_mask``, ``pixel_values`` (1 image) and ``labels``
    (``-100`` except the answer tokens and the closing eos)."""

    def __init__(self, samples: list[VqaSample], processor, max_length: int | None = None):
        self.samples, self.processor, self.max_length = samples, processor, max_length

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        tok = self.processor.tokenizer
        prompt = prompt_text(self.processor, s.question)
        enc = self.processor(images=_open_image(s.image), text=prompt, padding=False)
        ids = enc["input_ids"][0]
        ans = tok(" " + s.answer, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        eos = torch.tensor([tok.eos_token_id]) if tok.eos_token_id is not None else ans[:0]
        full = torch.cat([ids, ans, eos])
        labels = torch.cat([torch.full_like(ids, IGNORE_INDEX), ans, eos])
        if self.max_length is not None and full.numel() > self.max_length:
            raise ValueError(f"sample {i} has {full.numel()} tokens > max_length={self.max_length}")
        return {"input_ids": full, "labels": labels, "pixel_values": enc["pixel_values"][0]}


def collate_vqa(batch: list[dict], pad_token_id: int = 0) -> dict:
    """Right-pad ``input_ids`` / ``labels``, build ``attention_mask``, stack ``pixel_values``."""
    n = max(b["input_ids"].numel() for b in batch)
    ids = torch.full((len(batch), n), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for r, b in enumerate(batch):
        k = b["input_ids"].numel()
        ids[r, :k], labels[r, :k], mask[r, :k] = b["input_ids"], b["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.stack([b["pixel_values"] for b in batch])}


def build_word_tokenizer(texts, *, image_token: str = "<image>", extra_words=()):
    """A word-level ``PreTrainedTokenizerFast`` over the words of ``texts`` (lower-cased, '?' split off) with
    ``<pad>`` (0), ``<s>``, ``</s>``, ``<unk>``, the chat roles, and ``image_token`` as the LAST id (the vl_moe
    default ``image_token_id = vocab_size - 1``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = set(extra_words)
    for t in texts:
        words.update(t.lower().replace("?", " ?").replace(":", " :").split())
    vocab_list = ["<pad>", "<s>", "</s>", "<unk>", "USER", "ASSISTANT", ":"]
    vocab_list += sorted(w for w in words if w not in vocab_list) + [image_token]
    vocab = {w: i for i, w in enumerate(vocab_list)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split("?", "isolated"),
                                                 pre_tokenizers.Split(":", "isolated")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": [image_token]})
    return fast
