"""The UniMoE-Audio three-stage recipe on the shared :class:`moezoo.trainer.Trainer`.

Stages (one YAML each under ``training/audio_moe/configs/``, each resumable with ``trainer.resume: auto``):

1. ``specialists``: two dense models (``moe_type: topk`` with one expert, i.e. a dense SwiGLU FFN), one trained on
   speech only, one on music only (``stage: specialist_speech`` / ``specialist_music``).
2. ``integrate``: the MoE model (``model`` section) is upcycled from the two specialists (:func:`upcycle_specialists`):
   routed experts ``[0, E/2)`` copy the speech specialist's FFN, ``[E/2, E)`` the music one's; attention, norms,
   embeddings and heads are the average of the two; a shared expert whose width is twice the specialists' FFN starts as
   their average. Then only the routers and the shared expert train (``trainable: gate_and_shared``) on a task-balanced
   subset.
3. ``joint``: everything trains end to end on the task-balanced set (``init_from`` = the stage-2 output).

Config sections: ``stage``, ``model`` (registry ``name`` + ``tiny`` + ``overrides``, or ``init_from``), ``specialists``
(stage 2: ``speech`` / ``music`` folders), ``codec`` (``path`` of an Encodec/DAC/Mimi ``save_pretrained`` folder, or
``bundled: true`` for the mel-RVQ codec shipped with the package, or ``random: dac`` for a smoke test), ``data`` (``speech`` / ``music`` sources: ``asterisk``, ``sonic_pi``, a manifest
path or ``libritts:<dir>``; ``max_items``, ``max_frames``, ``max_text``), ``trainable`` (``all`` or
``gate_and_shared``), ``routing_stats`` (expert-load logging and plots, default on), ``trainer`` (:class:`TrainerConfig`
fields).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

STAGES = ("specialist_speech", "specialist_music", "integrate", "joint")
SECTIONS = ("stage", "model", "specialists", "codec", "data", "trainer", "trainable", "routing_stats")


def load_codec(codec_cfg: Mapping):
    from .codec import AudioCodec

    codec_cfg = dict(codec_cfg or {})
    if codec_cfg.get("bundled"):  # the mel-RVQ codec shipped with the package (true = the default one)
        name = codec_cfg["bundled"]
        return AudioCodec.bundled() if name is True else AudioCodec.bundled(str(name))
    if codec_cfg.get("path"):
        return AudioCodec.from_pretrained(codec_cfg["path"])
    if codec_cfg.get("random") == "dac":  # untrained tiny DAC: smoke tests only
        from transformers import DacConfig, DacModel

        torch.manual_seed(int(codec_cfg.get("seed", 0)))
        return AudioCodec(DacModel(DacConfig(encoder_hidden_size=4, downsampling_ratios=[2, 4], decoder_hidden_size=8,
                                             n_codebooks=3, codebook_size=32, codebook_dim=4, hidden_size=16,
                                             upsampling_ratios=[4, 2], sampling_rate=8000)))
    raise ValueError("codec: give bundled: true (the shipped mel-RVQ codec), path (an Encodec/DAC/Mimi/mel-RVQ "
                     "save_pretrained folder) or random: dac")


def load_items(source: str):
    from .data_audio import asterisk_speech, libritts_folder, read_manifest, sonic_pi_music

    if source == "asterisk":
        return asterisk_speech()
    if source == "sonic_pi":
        return sonic_pi_music()
    if source.startswith("libritts:"):
        return libritts_folder(source.split(":", 1)[1])
    return read_manifest(source)


def build_dataset(stage: str, data_cfg: Mapping, codec, config):
    from .data_audio import AudioTokenDataset

    d = {"speech": "asterisk", "music": "sonic_pi", "max_items": None, "max_frames": 150, "max_text": 96,
         **dict(data_cfg or {})}
    tasks = {"specialist_speech": ["speech"], "specialist_music": ["music"]}.get(stage, ["speech", "music"])
    per_task = {t: load_items(d[t])[: d["max_items"]] for t in tasks}
    if len(tasks) == 2:  # task-balanced: the smaller task is repeated up to the larger one's size
        n = max(len(v) for v in per_task.values())
        per_task = {t: (v * (n // len(v) + 1))[:n] for t, v in per_task.items()}
    items = [it for t in tasks for it in per_task[t]]
    return AudioTokenDataset(items, codec, config, max_frames=d["max_frames"], max_text=d["max_text"])


def build_model(model_cfg: Mapping, stage: str, codec):
    import moezoo
    from . import MoezooAudioMoeForCausalLM

    m = dict(model_cfg or {})
    if m.get("init_from"):
        return MoezooAudioMoeForCausalLM.from_pretrained(m["init_from"])
    over = dict(m.get("overrides") or {})
    over.setdefault("num_codebooks", codec.num_codebooks)
    over.setdefault("codebook_size", codec.codebook_size)
    over.setdefault("vocab_size", 256)
    if stage.startswith("specialist"):
        over.update(moe_type="topk", num_experts=1, num_experts_per_tok=1, num_null_experts=0, num_shared_experts=0)
    return moezoo.create_model(m["name"], tiny=bool(m.get("tiny", False)), **over)


def upcycle_specialists(moe, speech, music) -> None:
    """Initialise ``moe`` (routed experts E, even) from two dense specialists (one-expert ``topk`` models)."""
    E = moe.config.num_experts
    if E % 2:
        raise ValueError(f"upcycling from two specialists needs an even num_experts, got {E}")
    sp, mu, dst = speech.state_dict(), music.state_dict(), moe.state_dict()
    new = {}
    for k, v in dst.items():
        if ".mlp." in k:
            continue
        if k in sp and sp[k].shape == v.shape and k in mu:
            new[k] = (sp[k] + mu[k]) / 2
    for i in range(moe.config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        for name in ("experts.gate_up_proj", "experts.down_proj"):
            w = dst[p + name].clone()
            a, b = sp[p + name][0], mu[p + name][0]
            if a.shape != w.shape[1:]:
                raise ValueError(f"specialist FFN {tuple(a.shape)} does not fit the MoE experts {tuple(w.shape[1:])}: "
                                 "train the specialists with the MoE model's moe_intermediate_size")
            w[: E // 2], w[E // 2:] = a, b
            new[p + name] = w
        se = p + "shared_expert."
        if se + "gate_proj.weight" in dst and dst[se + "gate_proj.weight"].shape[0] == 2 * sp[p + "experts.down_proj"].shape[-1]:
            I = sp[p + "experts.down_proj"].shape[-1]
            ga, ua = sp[p + "experts.gate_up_proj"][0].split(I)
            gb, ub = mu[p + "experts.gate_up_proj"][0].split(I)
            new[se + "gate_proj.weight"] = torch.cat([ga, gb])
            new[se + "up_proj.weight"] = torch.cat([ua, ub])
            new[se + "down_proj.weight"] = torch.cat([sp[p + "experts.down_proj"][0], mu[p + "experts.down_proj"][0]], 1) / 2
    missing = moe.load_state_dict(new, strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"unexpected keys while upcycling: {missing.unexpected_keys}")


def set_trainable(model, which: str) -> None:
    if which == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    if which != "gate_and_shared":
        raise ValueError(f"trainable must be 'all' or 'gate_and_shared', got {which!r}")
    for n, p in model.named_parameters():
        p.requires_grad_(".mlp.gate." in n or ".mlp.shared_expert" in n)


def train_from_config(cfg: Mapping, *, progress: bool = False) -> dict:
    from ...trainer import Trainer, TrainerConfig
    from . import MoezooAudioMoeForCausalLM

    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; expected {list(SECTIONS)}")
    stage = cfg.get("stage")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    codec = load_codec(cfg.get("codec"))
    model = build_model(cfg.get("model"), stage, codec)
    if stage == "integrate" and not (cfg.get("model") or {}).get("init_from"):
        spec = dict(cfg.get("specialists") or {})
        if not spec.get("speech") or not spec.get("music"):
            raise ValueError("stage integrate needs specialists: {speech: <folder>, music: <folder>}")
        upcycle_specialists(model, MoezooAudioMoeForCausalLM.from_pretrained(spec["speech"]),
                            MoezooAudioMoeForCausalLM.from_pretrained(spec["music"]))
    set_trainable(model, cfg.get("trainable") or ("gate_and_shared" if stage == "integrate" else "all"))
    data = build_dataset(stage, cfg.get("data"), codec, model.config)
    tcfg = TrainerConfig.from_dict({"progress_bar": progress, **dict(cfg.get("trainer") or {})})
    trainer = Trainer(model.train(), tcfg, train_data=data, collate_fn=data.collate,
                      routing_stats=bool(cfg.get("routing_stats", True)))
    result = trainer.train()
    final = Path(tcfg.output_dir) / "final"
    model.save_pretrained(final)
    return {"stage": stage, "final": str(final), "result": result}


__all__ = ["STAGES", "train_from_config", "upcycle_specialists", "set_trainable", "build_dataset", "load_codec"]
