"""Training recipe of the vla family (``training/vla/train.py`` wraps :func:`train`).

Recipe config (YAML; nested dict)::

    model:   {name: drivemoe_tiny_e6k1, tiny: true, variant: drivemoe, config: {}}
    data:    {dir: runs/vla_data, scenarios: [highway, merge, roundabout, intersection], seeds: [0, 1, 2, 3],
              image_size: 64}
    stage1_fraction: 0.5     # DriveMoE stage 1: camera router teacher-forced by the labels; stage 2: Gumbel-softmax
    trainer: {output_dir: runs/vla, max_steps: 200, batch_size: 8, learning_rate: 1e-3, ...}   # moezoo.trainer

Variants (:data:`VARIANTS`) set the two MoEs on the same registry entry, so every variant has the same data and budget:
``drive_pi0`` (both off: all views, dense action expert), ``drivemoe`` (both on), ``camera_moe`` and ``action_moe``
(each alone). Demonstrations are collected with the IDM expert when ``data.dir`` has none. Stage 1 trains with the
labelled camera (teacher forcing) and supervised skill routing; stage 2 switches the camera router to straight-through
Gumbel-softmax selection (the paper's two stages); both stages use the shared :class:`moezoo.trainer.Trainer`.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import torch

VARIANTS = {
    "drive_pi0": dict(use_camera_router=False, num_moe_layers=0),
    "drivemoe": dict(use_camera_router=True),
    "camera_moe": dict(use_camera_router=True, num_moe_layers=0),
    "action_moe": dict(use_camera_router=False),
}

DEFAULT_RECIPE = {
    "model": {"name": "drivemoe_tiny_e6k1", "tiny": True, "variant": "drivemoe", "config": {}},
    "data": {"dir": "runs/vla_data", "scenarios": ["highway", "merge", "roundabout", "intersection"],
             "seeds": [0, 1, 2, 3], "image_size": 64},
    "stage1_fraction": 0.5,
    "threads": 1,
    "trainer": {"output_dir": "runs/vla", "max_steps": 200, "batch_size": 8, "learning_rate": 1e-3,
                "warmup_steps": 10, "log_every": 10, "resume": "never", "overwrite_output_dir": True,
                "progress_bar": False, "keep_last": 1, "mixed_precision": "no"},
}


def _merge(base: dict, over) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_policy(model_cfg: dict, seed: int = 0):
    """Registry model with the variant's MoE switches (and ``config`` overrides)."""
    import moezoo

    variant = model_cfg.get("variant", "drivemoe")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    torch.manual_seed(seed)
    over = dict(VARIANTS[variant])
    over.update(model_cfg.get("config") or {})
    return moezoo.create_model(model_cfg["name"], tiny=bool(model_cfg.get("tiny", False)), **over)


def ensure_data(data_cfg: dict, printer: Callable = print) -> Path:
    from .data import collect_demonstrations

    folder = Path(data_cfg["dir"])
    if not (folder / "meta.json").is_file():
        collect_demonstrations(folder, data_cfg["scenarios"], data_cfg["seeds"],
                               image_size=int(data_cfg.get("image_size", 64)), log=printer)
    return folder


def collate(items: list[dict]) -> dict:
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = vals if isinstance(vals[0], str) else torch.stack([torch.as_tensor(v) for v in vals])
    return out


def train(config: dict, printer: Callable = print) -> dict:
    """Train one variant (two stages) and save it to ``<output_dir>/model``; returns paths and final losses."""
    from ...trainer import Trainer
    from .data import EpisodeDataset

    cfg = _merge(DEFAULT_RECIPE, config)
    torch.set_num_threads(int(cfg.get("threads") or 1))
    folder = ensure_data(cfg["data"], printer)
    tcfg = dict(cfg["trainer"])
    policy = build_policy(cfg["model"], seed=int(tcfg.get("seed", 0)))
    pc = policy.config
    ds = EpisodeDataset(folder, pc.chunk_size, image_size=pc.image_size[0], cameras=pc.camera_names)
    policy.set_normalization_stats(ds.stats)
    total = int(tcfg["max_steps"])
    s1 = int(round(total * float(cfg["stage1_fraction"]))) if policy.camera_router is not None else total
    out_dir = Path(tcfg["output_dir"])
    losses = {}

    from .driving import SKILLS

    supervise_skills = pc.num_moe_layers > 0 and pc.num_experts == len(SKILLS)
    if pc.num_moe_layers and not supervise_skills:
        printer(f"[vla] {pc.num_experts} skill experts != {len(SKILLS)} skills: skill routing is not supervised")

    def loss_fn(model, batch):
        if not supervise_skills:
            batch = {k: v for k, v in batch.items() if k != "skill_label"}
        out = model.compute_loss(batch)
        logs = {"action_loss": out.action_loss.detach()}
        if out.camera_loss is not None:
            logs["camera_loss"] = out.camera_loss.detach()
        if out.skill_loss is not None:
            logs["skill_loss"] = out.skill_loss.detach()
        return out.loss, logs

    for stage, steps, forcing in ((1, s1, True), (2, total - s1, False)):
        if steps <= 0:
            continue
        pc.camera_teacher_forcing = forcing
        st = dict(tcfg, max_steps=steps, output_dir=str(out_dir / f"stage{stage}"),
                  seed=int(tcfg.get("seed", 0)) + stage)
        printer(f"[vla] {cfg['model']['variant']} stage {stage}: {steps} steps (camera teacher forcing={forcing})")
        res = Trainer(policy, st, train_data=ds, loss_fn=loss_fn, collate_fn=collate).train()
        losses[f"stage{stage}"] = res.get("loss") if isinstance(res, dict) else None
    pc.camera_teacher_forcing = False
    policy.eval()
    model_dir = out_dir / "model"
    policy.save_pretrained(model_dir)
    (out_dir / "recipe.json").write_text(json.dumps(cfg, indent=1, default=str))
    return {"model_dir": str(model_dir), "losses": losses, "samples": len(ds), "policy": policy}


__all__ = ["VARIANTS", "DEFAULT_RECIPE", "build_policy", "ensure_data", "collate", "train"]


# ----------------------------------------------------------------------------------------------------------------------
# HiMoE-VLA on heterogeneous robots (moezoo.models.vla.robots)
# ----------------------------------------------------------------------------------------------------------------------


def robot_variant(name: str, num_layers: int) -> dict:
    """Config overrides of the comparison's action experts (same registry entry, data and budget; the tiny entry's
    widths make every variant's active FFN width per layer equal):

    - ``dense``: π0-style dense action expert;
    - ``topk``: a plain token-level top-k MoE (``num_experts`` / ``num_experts_per_tok``, Switch balance loss 0.01)
      in every slot HiMoE uses;
    - ``himoe``: AS-MoE + HB-MoE in the official placement;
    - ``as_only`` / ``hb_only``: one of the two, dense FFNs in the other's slots.
    """
    from .configuration_vla import himoe_layer_types

    full = himoe_layer_types(num_layers)
    if name == "dense":
        return {"mlp_layer_types": ["dense"] * num_layers}
    if name == "topk":
        return {"mlp_layer_types": ["topk_moe" if t != "dense" else "dense" for t in full],
                "router_aux_loss_coef": 0.01}
    if name == "himoe":
        return {"mlp_layer_types": full}
    if name == "as_only":
        return {"mlp_layer_types": himoe_layer_types(num_layers, hb_moe=False)}
    if name == "hb_only":
        return {"mlp_layer_types": himoe_layer_types(num_layers, as_moe=False)}
    raise ValueError(f"unknown robot variant {name!r}; expected one of {ROBOT_VARIANTS}")


ROBOT_VARIANTS = ("dense", "topk", "himoe", "as_only", "hb_only")

DEFAULT_ROBOT_RECIPE = {
    "model": {"name": "himoe_vla_tiny_e8k2", "tiny": True, "variant": "himoe", "config": {}},
    "data": {"dir": "runs/vla_robot_data", "embodiments": ["reacher", "pusher"], "seeds": list(range(8)),
             "image_size": 32},
    "threads": 1,
    "trainer": {"output_dir": "runs/vla_robots", "max_steps": 100, "batch_size": 8, "learning_rate": 2e-3,
                "warmup_steps": 20, "log_every": 50, "resume": "never", "overwrite_output_dir": True,
                "progress_bar": False, "keep_last": 1, "mixed_precision": "no"},
}


def build_robot_policy(model_cfg: dict, seed: int = 0):
    """Registry model with the robot variant's action-expert layout (and ``config`` overrides)."""
    import moezoo

    cfg = moezoo.get_model_config(model_cfg["name"], tiny=bool(model_cfg.get("tiny", False)))
    over = robot_variant(model_cfg.get("variant", "himoe"), len(cfg.mlp_layer_types))
    over.update(model_cfg.get("config") or {})
    torch.manual_seed(seed)
    return moezoo.create_model(model_cfg["name"], tiny=bool(model_cfg.get("tiny", False)), **over)


def ensure_robot_data(data_cfg: dict, printer: Callable = print) -> Path:
    from .robots import collect_robot_demonstrations

    folder = Path(data_cfg["dir"])
    if not (folder / "meta.json").is_file():
        collect_robot_demonstrations(folder, data_cfg["embodiments"], data_cfg["seeds"],
                                     image_size=int(data_cfg.get("image_size", 32)), log=printer)
    return folder


def train_robots(config: dict, printer: Callable = print) -> dict:
    """Train one robot variant on the scripted demonstrations of every embodiment; save to ``<output_dir>/model``."""
    from ...trainer import Trainer
    from .robots import RobotEpisodeDataset

    cfg = _merge(DEFAULT_ROBOT_RECIPE, config)
    torch.set_num_threads(int(cfg.get("threads") or 1))
    folder = ensure_robot_data(cfg["data"], printer)
    tcfg = dict(cfg["trainer"])
    policy = build_robot_policy(cfg["model"], seed=int(tcfg.get("seed", 0)))
    ds = RobotEpisodeDataset(folder, policy.config, embodiments=cfg["data"].get("embodiments"))
    policy.set_normalization_stats(ds.stats)

    def loss_fn(model, batch):
        out = model.compute_loss(batch)
        logs = {"action_loss": out.action_loss.detach()}
        for k in ("as_loss", "hb_loss"):
            if getattr(out, k) is not None:
                logs[k] = getattr(out, k).detach()
        return out.loss, logs

    out_dir = Path(tcfg["output_dir"])
    printer(f"[vla-robots] {cfg['model']['variant']}: {len(ds)} samples, {tcfg['max_steps']} steps")
    res = Trainer(policy, dict(tcfg, output_dir=str(out_dir / "train")), train_data=ds, loss_fn=loss_fn,
                  collate_fn=collate).train()
    policy.eval()
    model_dir = out_dir / "model"
    policy.save_pretrained(model_dir)
    (out_dir / "recipe.json").write_text(json.dumps(cfg, indent=1, default=str))
    return {"model_dir": str(model_dir), "loss": res.get("loss") if isinstance(res, dict) else None,
            "samples": len(ds), "policy": policy}


__all__ += ["ROBOT_VARIANTS", "DEFAULT_ROBOT_RECIPE", "robot_variant", "build_robot_policy", "ensure_robot_data",
            "train_robots"]
