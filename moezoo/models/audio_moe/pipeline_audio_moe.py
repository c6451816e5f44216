"""``AudioMoEPipeline(model, codec)``: text (+ task) -> waveform, with a progress bar.

Prompt format (the one :mod:`moezoo.models.audio_moe.data_audio` trains with): ``[task id] + utf-8 bytes of the text``,
then the BOS frame; task ids are the control bytes ``TASK_IDS`` (``speech`` = 1, ``music`` = 2), so the text vocabulary
must hold the 256 byte values. Another tokenizer can be passed as ``tokenizer(text, task) -> list[int]``.
"""
from __future__ import annotations

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .codec import AudioCodec
from .modeling_audio_moe import MoezooAudioMoeForCausalLM, split_flat, undo_delay

TASK_IDS = {"speech": 1, "music": 2}


def byte_prompt(text: str, task: str, vocab_size: int = 256) -> list[int]:
    """``[TASK_IDS[task]] + utf-8 bytes``."""
    if task not in TASK_IDS:
        raise ValueError(f"task must be one of {sorted(TASK_IDS)}, got {task!r}")
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if vocab_size < 256:
        raise ValueError(f"the byte prompt needs a text vocabulary of >= 256 ids, the model has {vocab_size}; pass "
                         "tokenizer=")
    return [TASK_IDS[task]] + list(text.encode("utf-8"))


class _Progress(StoppingCriteria):
    """Never stops; advances a tqdm bar by one frame per generation step."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids, scores, **kwargs):
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class AudioMoEPipeline:
    """Generate speech (``task="speech"``, text = the words) or music (``task="music"``, text = a description).

    Args:
        model: a :class:`MoezooAudioMoeForCausalLM`.
        codec: an :class:`AudioCodec` whose codebook count and size match the model's.
        tokenizer: ``tokenizer(text, task) -> list[int]`` (default: :func:`byte_prompt`).
    """

    def __init__(self, model: MoezooAudioMoeForCausalLM, codec: AudioCodec, tokenizer=None):
        if not isinstance(model, MoezooAudioMoeForCausalLM):
            raise ValueError(f"model must be a MoezooAudioMoeForCausalLM, got {type(model).__name__}")
        if not isinstance(codec, AudioCodec):
            raise ValueError(f"codec must be an AudioCodec, got {type(codec).__name__}")
        cfg = model.config
        if (codec.num_codebooks, codec.codebook_size) != (cfg.num_codebooks, cfg.codebook_size):
            raise ValueError(f"codec has {codec.num_codebooks} codebooks of {codec.codebook_size} codes, the model "
                             f"expects {cfg.num_codebooks} of {cfg.codebook_size}")
        self.model, self.codec = model.eval(), codec
        self.tokenizer = tokenizer or (lambda text, task: byte_prompt(text, task, cfg.vocab_size))

    @torch.no_grad()
    def __call__(self, text: str, task: str = "speech", *, max_new_tokens: int = 256, min_new_tokens: int = 1,
                 do_sample: bool = True, temperature: float = 0.9, top_k: int | None = 50, seed: int | None = 0,
                 progress: bool = True) -> dict:
        """Returns ``{"audio": (samples,) float tensor, "sampling_rate": int, "codes": (frames, K)}``."""
        from tqdm.auto import tqdm

        if task not in TASK_IDS:
            raise ValueError(f"task must be one of {sorted(TASK_IDS)}, got {task!r}")
        ids = self.tokenizer(text, task)
        cfg = self.model.config
        if not ids or max(ids) >= cfg.vocab_size or min(ids) < 0:
            raise ValueError(f"the tokenizer produced ids outside [0, vocab_size={cfg.vocab_size})")
        dev = self.model.device
        prompt = torch.tensor([ids], dtype=torch.long, device=dev).repeat_interleave(cfg.num_codebooks, 0)
        if seed is not None:
            torch.manual_seed(seed)
        kw = dict(do_sample=do_sample)
        if do_sample:
            kw.update(temperature=temperature, top_k=top_k)
        with tqdm(total=max_new_tokens, desc=f"audio_moe {task}", unit="frame", disable=not progress) as bar:
            out = self.model.generate(prompt, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                      stopping_criteria=StoppingCriteriaList([_Progress(bar)]), **kw)
        _, codes, _ = split_flat(cfg, out)
        frames = undo_delay(cfg, codes[:, prompt.shape[1]:])[0]  # (F, K), special ids removed
        if frames.shape[0] == 0:
            return {"audio": torch.zeros(0), "sampling_rate": self.codec.sample_rate, "codes": frames}
        wav = self.codec.decode(frames.T[None].to(self.codec.device))[0]
        return {"audio": wav.cpu(), "sampling_rate": self.codec.sample_rate, "codes": frames.cpu()}


__all__ = ["AudioMoEPipeline", "byte_prompt", "TASK_IDS"]
