"""Audio + text data for ``audio_moe``: the offline Debian corpora, user manifests, LibriTTS folders, and the dataset that
turns clips into token sequences (task id + text bytes + delayed codec frames).

Sources (each returns a list of :class:`AudioItem`):
    :func:`asterisk_speech`: ``asterisk-core-sounds-en-wav`` (real 8 kHz English telephone prompts with transcripts).
    :func:`sonic_pi_music`: ``sonic-pi-samples`` (real 44.1 kHz music samples; the file-name prefix is the style label,
        ``ambi``, ``bass``, ``drum``, ``elec``, ``loop``, ``tabla`` ...; the text is ``"<style> <name words>"``).
    :func:`read_manifest`: a JSONL or CSV file with ``audio_path`` and ``text`` (optional ``task``; relative paths are
        resolved against the manifest's folder).
    :func:`libritts_folder`: LibriTTS layout ``<speaker>/<chapter>/<utt>.wav`` with ``<utt>.normalized.txt`` (or
        ``.original.txt``).
Audio is read with ``soundfile`` (wav / flac), mixed to mono and resampled with torchaudio (:func:`load_audio`).
"""
from __future__ import annotations

import csv
import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

ASTERISK_DIR = Path("/usr/share/asterisk/sounds/en")
ASTERISK_TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
SONIC_PI_DIR = Path("/usr/share/sonic-pi/samples")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


@dataclass
class AudioItem:
    path: str
    text: str
    task: str  # "speech" | "music"
    label: str = ""  # style label (music) or speaker (speech)


def load_audio(path: str | Path, sample_rate: int | None = None) -> tuple[torch.Tensor, int]:
    """(mono float32 samples (T,), sample rate); resampled to ``sample_rate`` when given."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"audio file {str(path)!r} does not exist")
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wav = torch.from_numpy(data).mean(1)
    if wav.numel() == 0:
        raise ValueError(f"audio file {str(path)!r} holds no samples")
    if sample_rate is not None and sr != sample_rate:
        import torchaudio.functional as AF

        wav, sr = AF.resample(wav, sr, sample_rate), sample_rate
    return wav, sr


def _need(path: Path, package: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: install the Debian package with `apt-get install -y {package}`")


def asterisk_speech(root: str | Path = ASTERISK_DIR, transcripts: str | Path = ASTERISK_TRANSCRIPTS) -> list[AudioItem]:
    """Every top-level prompt of ``asterisk-core-sounds-en-wav`` that has a transcript."""
    root, transcripts = Path(root), Path(transcripts)
    _need(root, "asterisk-core-sounds-en-wav")
    _need(transcripts, "asterisk-core-sounds-en-wav")
    opener = gzip.open if transcripts.suffix == ".gz" else open
    texts = {}
    with opener(transcripts, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(";") or ":" not in line:
                continue
            name, text = line.split(":", 1)
            if text.strip():
                texts[name.strip()] = " ".join(text.split())
    items = [AudioItem(str(p), texts[p.stem], "speech", "asterisk") for p in sorted(root.glob("*.wav"))
             if p.stem in texts]
    if not items:
        raise ValueError(f"no wav in {root} matched a transcript of {transcripts}")
    return items


def sonic_pi_music(root: str | Path = SONIC_PI_DIR) -> list[AudioItem]:
    """Every ``sonic-pi-samples`` clip; label = file-name prefix, text = ``"<label> <rest of the name>"``."""
    root = Path(root)
    _need(root, "sonic-pi-samples")
    items = []
    for p in sorted(root.iterdir()):
        if p.suffix.lower() not in AUDIO_SUFFIXES:
            continue
        label, _, rest = p.stem.partition("_")
        items.append(AudioItem(str(p), " ".join([label] + rest.split("_")).strip(), "music", label))
    if not items:
        raise ValueError(f"no audio files in {root}")
    return items


def read_manifest(path: str | Path, default_task: str = "speech") -> list[AudioItem]:
    """A JSONL (one object per line) or CSV manifest with ``audio_path`` and ``text`` (and optionally ``task``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"manifest {str(path)!r} does not exist")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not a JSON object ({exc.msg})") from exc
    elif path.suffix.lower() in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        raise ValueError(f"manifest {str(path)!r} must be .jsonl or .csv (or .tsv)")
    items = []
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or "audio_path" not in r or "text" not in r:
            raise ValueError(f"{path}: row {n} lacks 'audio_path' and/or 'text' (got keys {sorted(r) if isinstance(r, dict) else r})")
        p = Path(r["audio_path"])
        p = p if p.is_absolute() else path.parent / p
        task = r.get("task") or default_task
        if task not in ("speech", "music"):
            raise ValueError(f"{path}: row {n} has task {task!r}; expected 'speech' or 'music'")
        items.append(AudioItem(str(p), str(r["text"]), task, str(r.get("label", ""))))
    return items


def libritts_folder(root: str | Path) -> list[AudioItem]:
    """LibriTTS-style ``<speaker>/<chapter>/<utt>.wav`` + ``<utt>.normalized.txt`` (or ``.original.txt``)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"LibriTTS folder {str(root)!r} does not exist")
    items = []
    for wav in sorted(root.glob("*/*/*.wav")):
        for suffix in (".normalized.txt", ".original.txt"):
            txt = wav.with_name(wav.stem + suffix)
            if txt.is_file():
                items.append(AudioItem(str(wav), " ".join(txt.read_text(encoding="utf-8").split()), "speech",
                                       wav.parent.parent.name))
                break
    if not items:
        raise ValueError(f"no <speaker>/<chapter>/<utt>.wav with a .normalized.txt / .original.txt under {root}")
    return items


def split_items(items: list[AudioItem], held_out: float = 0.1, seed: int = 0) -> tuple[list[AudioItem], list[AudioItem]]:
    """Deterministic (train, held-out) split; music is split within each style label."""
    rng = random.Random(seed)
    groups: dict[str, list[AudioItem]] = {}
    for it in items:
        groups.setdefault(f"{it.task}/{it.label}", []).append(it)
    train, test = [], []
    for key in sorted(groups):
        g = list(groups[key])
        rng.shuffle(g)
        n = int(round(len(g) * held_out)) if len(g) > 1 else 0
        test += g[:n]
        train += g[n:]
    return train, test


class AudioTokenDataset(torch.utils.data.Dataset):
    """Clips -> flat-layout token sequences ``[task id] + text bytes + BOS frame + delayed codes + EOS + PAD``.

    Codes come from ``codec.encode`` once (cached in memory), cut to ``max_frames``. Items: ``{"input_ids": (K, T),
    "labels": (K, T)}`` (text positions ignored by the loss unless the model's ``text_loss_weight`` > 0).
    :meth:`collate` right-pads a batch into ``input_ids`` / ``labels`` (B*K, T) and ``attention_mask`` (B, T).
    """

    def __init__(self, items: list[AudioItem], codec, config, *, max_frames: int = 150, max_text: int = 96):
        from .pipeline_audio_moe import byte_prompt

        if (codec.num_codebooks, codec.codebook_size) != (config.num_codebooks, config.codebook_size):
            raise ValueError(f"codec has {codec.num_codebooks} codebooks of {codec.codebook_size} codes, the model "
                             f"config {config.num_codebooks} of {config.codebook_size}")
        self.items, self.config, self.codec = list(items), config, codec
        self.max_frames, self.max_text = max_frames, max_text
        self._prompt = lambda it: byte_prompt(it.text[:max_text], it.task, config.vocab_size)
        self._codes: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def codes(self, i: int) -> torch.Tensor:
        if i not in self._codes:
            it = self.items[i]
            wav, _ = load_audio(it.path, self.codec.sample_rate)
            wav = wav[: int(self.max_frames * self.codec.sample_rate / self.codec.frame_rate) + 1]
            self._codes[i] = self.codec.encode(wav, self.codec.sample_rate)[0, :, : self.max_frames].T.cpu()  # (F, K)
        return self._codes[i]

    def __getitem__(self, i: int) -> dict:
        from .modeling_audio_moe import apply_delay, flat_from_parts

        cfg = self.config
        text = torch.tensor(self._prompt(self.items[i]), dtype=torch.long)
        frames = apply_delay(cfg, self.codes(i)[None])[0]
        n, F_ = text.numel(), frames.shape[0]
        tid = torch.cat([text, text.new_zeros(F_)])[None]
        cd = torch.cat([frames.new_zeros(n, cfg.num_codebooks), frames])[None]
        audio = (torch.arange(n + F_) >= n)[None]
        ids = flat_from_parts(cfg, tid, cd, audio)
        return {"input_ids": ids, "labels": ids.clone()}

    @staticmethod
    def collate(batch: list[dict]) -> dict:
        K = batch[0]["input_ids"].shape[0]
        T = max(b["input_ids"].shape[1] for b in batch)
        ids = torch.zeros(len(batch) * K, T, dtype=torch.long)
        labels = torch.full((len(batch) * K, T), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for j, b in enumerate(batch):
            n = b["input_ids"].shape[1]
            ids[j * K:(j + 1) * K, :n] = b["input_ids"]
            labels[j * K:(j + 1) * K, :n] = b["labels"]
            mask[j, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


__all__ = ["AudioItem", "load_audio", "asterisk_speech", "sonic_pi_music", "read_manifest", "libritts_folder",
           "split_items", "AudioTokenDataset"]
