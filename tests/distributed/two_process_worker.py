"""One rank of the 2-process (gloo, CPU) scale-out checks of ``test_two_process.py``; run as a script under the
environment torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

It writes ``result_<rank>.json`` (and the DDP runs' final weights) into the folder given as its only argument:

- ``ep``: each model folder of ``spec.json`` loaded with ``from_pretrained(..., distributed_config=
  DistributedConfig(ep_size=2, ...))`` (transformers' EP plan from the config's ``base_model_ep_plan``), outputs and
  gradients against the same model in one process;
- ``ddp``: the moezoo Trainer on 2 processes (accelerate, DDP over gloo), straight and killed after a checkpoint +
  resumed;
- ``fsdp``: ``ACCELERATE_USE_FSDP=true`` on CPU processes is refused with a clear error;
- ``fsdp2``: torch's FSDP2 through transformers (``DistributedConfig(fsdp_size=2)``) trains ``moezoo_lm``, saves a
  sharded checkpoint with ``torch.distributed.checkpoint`` and resumes from it exactly.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch


def _batches(kind: str, config, world: int, seed: int = 10):
    """One input dict per rank (deterministic, different per rank)."""
    out = []
    for r in range(world):
        g = torch.Generator().manual_seed(seed + r)
        if kind == "lm":
            ids = torch.randint(3, config.vocab_size, (2, 12), generator=g)
            out.append({"input_ids": ids, "labels": ids})
        elif kind == "time_moe":
            x = torch.randn(2, 24, config.input_size, generator=g)
            out.append({"input_ids": x, "labels": torch.randn(2, 24, config.input_size, generator=g)})
        else:  # dit
            s = config.sample_size
            out.append({"sample": torch.randn(2, config.in_channels, s, s, generator=g),
                        "timestep": torch.randint(0, 1000, (2,), generator=g).float(),
                        "class_labels": torch.randint(0, config.num_classes, (2,), generator=g),
                        "target": torch.randn(2, config.in_channels, s, s, generator=g)})
    return out


def _loss(model, batch):
    out = model(**batch)
    return out.loss, out


def check_ep(spec: dict, rank: int, world: int) -> dict:
    import importlib

    from transformers.distributed import DistributedConfig

    results = {}
    for name, entry in spec["ep"].items():
        path, kind = entry["path"], entry["kind"]
        module, qualname = entry["cls"].split(":")
        cls = getattr(importlib.import_module(module), qualname)
        ref = cls.from_pretrained(path).eval()
        batches = _batches(kind, ref.config, world)
        losses = [_loss(ref, b)[0] for b in batches]
        (sum(losses) / world).backward()
        ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
        with torch.no_grad():
            ref_out = _loss(ref, batches[rank])[1]
        model = cls.from_pretrained(path, distributed_config=DistributedConfig(ep_size=world, fsdp_size=world))
        model.eval()
        loss, out = _loss(model, batches[rank])
        main = "logits" if kind == "lm" else ("sample" if kind == "dit" else "logits")
        res = {"loss_diff": float((loss.detach() - losses[rank].detach()).abs()),
               "out_diff": float((getattr(out, main) - getattr(ref_out, main)).abs().max())}
        loss.backward()
        grad_diff, sharded, n_grads, n_fsdp = 0.0, [], 0, 0
        for pname, p in model.named_parameters():
            if p.grad is None:
                continue
            if "experts" not in pname and hasattr(p.grad, "full_tensor"):  # an FSDP2 shard of a dense parameter
                n_fsdp += 1
            g = p.grad.full_tensor() if "experts" not in pname and hasattr(p.grad, "full_tensor") else p.grad
            g = g.to_local() if hasattr(g, "to_local") else g
            r = ref_grads[pname]
            if g.shape != r.shape:  # this rank's slice of the experts
                sharded.append(pname)
                r = r.chunk(world, dim=0)[rank]
            grad_diff = max(grad_diff, float((g - r).abs().max()))
            n_grads += 1
        res.update(grad_diff=grad_diff, sharded=sorted(sharded), n_grads=n_grads, n_ref=len(ref_grads), n_fsdp=n_fsdp,
                   local_experts=[m.num_experts for n, m in model.named_modules() if n.endswith("mlp.experts")][:1])
        results[name] = res
    return results


def check_fsdp2_resume(spec: dict, rank: int, world: int, out: Path) -> dict:
    """torch's FSDP2 (transformers' ``DistributedConfig(fsdp_size=2)``) training of one family on CPU, with a sharded
    checkpoint (``torch.distributed.checkpoint``) after step 2 and an exact resume from it."""
    import importlib

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from transformers.distributed import DistributedConfig

    entry = spec["ep"]["moezoo_lm"]
    module, qualname = entry["cls"].split(":")
    cls = getattr(importlib.import_module(module), qualname)

    def build():
        model = cls.from_pretrained(entry["path"], distributed_config=DistributedConfig(fsdp_size=world)).train()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(model, opt, i):
        batch = _batches("lm", model.config, world, seed=100 * i)[rank]
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    ckpt = out / "fsdp2_ckpt"
    model, opt = build()
    n_sharded = sum(hasattr(p, "to_local") for p in model.parameters())
    straight = []
    for i in range(4):
        straight.append(step(model, opt, i))
        if i == 1:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(ckpt))
    final = {n: p.to_local().clone() for n, p in model.named_parameters()}
    model, opt = build()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    resumed = [step(model, opt, i) for i in (2, 3)]
    same = all(torch.equal(final[n], p.to_local()) for n, p in model.named_parameters())
    return {"straight": straight, "resumed": resumed, "params_equal": same, "n_sharded": n_sharded,
            "n_params": len(final)}


class _Kill(Exception):
    pass


def check_ddp(spec: dict, rank: int, out: Path) -> dict:
    from safetensors.torch import save_file

    from moezoo.trainer import Trainer, TrainerCallback, TrainerConfig
    import moezoo

    d = spec["ddp"]
    data = _TokenData(d["vocab"], n=d["n"])

    def model():
        torch.manual_seed(0)
        return moezoo.create_model(d["model"], tiny=True, **d["overrides"])

    def cfg(name, **kw):
        return TrainerConfig(output_dir=str(out / name), max_steps=d["steps"], batch_size=d["batch_size"],
                             learning_rate=3e-3, warmup_steps=1, log_every=1, progress_bar=False,
                             mixed_precision="no", **{"save_final": False, **kw})

    class KillAfterSave(TrainerCallback):
        def on_save(self, trainer, step, path):
            if step == 2:
                raise _Kill(path)

    times = [time.perf_counter()]
    straight = model()
    ra = Trainer(straight, cfg("straight"), data, routing_stats=False).train()
    times.append(time.perf_counter())
    try:
        Trainer(model(), cfg("resumed", save_every=2, save_final=True), data, routing_stats=False,
                callbacks=[KillAfterSave()]).train()
        raise AssertionError("the run was not interrupted")
    except _Kill:
        pass
    resumed = model()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)
    times.append(time.perf_counter())
    tr = Trainer(resumed, cfg("resumed", save_every=2, save_final=True), data, routing_stats=False)
    start = tr.step
    rb = tr.train()
    times.append(time.perf_counter())
    same = all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in straight.state_dict().items()}, str(out / "ddp_final.safetensors"))
    files = sorted(p.name for p in (out / "resumed" / f"checkpoint-{d['steps']}").iterdir())
    return {"losses": ra["losses"], "resumed_losses": rb["losses"], "resumed_from_step": start,
            "resumed_equal": same, "checkpoint_files": files,
            "seconds": [round(b - a, 2) for a, b in zip(times, times[1:])]}


class _TokenData(torch.utils.data.Dataset):
    def __init__(self, vocab, n=16, length=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def check_fsdp_refused(out: Path) -> dict:
    from moezoo.trainer import Trainer, TrainerConfig

    os.environ["ACCELERATE_USE_FSDP"] = "true"
    try:
        Trainer(torch.nn.Linear(2, 1), TrainerConfig(output_dir=str(out / "fsdp"), max_steps=1, mixed_precision="no",
                                                     progress_bar=False), lambda g, bs: (torch.zeros(bs, 2),),
                loss_fn=lambda m, b: m(b[0]).sum())
        return {"error": None}
    except RuntimeError as e:
        return {"error": str(e)}
    finally:
        del os.environ["ACCELERATE_USE_FSDP"]


def main(out: Path) -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    spec = json.loads((out / "spec.json").read_text())
    result = {"rank": rank}
    t0 = time.perf_counter()
    try:
        result["ddp"] = check_ddp(spec, rank, out)  # accelerate initialises the gloo process group
        result["fsdp"] = check_fsdp_refused(out)
        if not dist.is_initialized():
            raise RuntimeError("accelerate did not initialise torch.distributed")
        t1 = time.perf_counter()
        result["ep"] = check_ep(spec, rank, world)
        t2 = time.perf_counter()
        result["fsdp2"] = check_fsdp2_resume(spec, rank, world, out)
        result["seconds"] = {"ddp": t1 - t0, "ep": t2 - t1, "fsdp2": time.perf_counter() - t2}
    except Exception:
        result["error"] = traceback.format_exc()
    (out / f"result_{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
