"""Scale-out on existing engines, with 2 real processes (gloo on CPU), one spawned group for every check:

- DDP training of ``moezoo_lm`` through the moezoo Trainer (accelerate) equals one process with the same global batch,
  and a 2-process run killed after a checkpoint resumes bit-exactly;
- FSDP through accelerate cannot run here: accelerate 1.16 switches to ``DistributedType.FSDP`` only for
  multi-GPU/NPU/XPU/... groups; on CPU processes (``cpu=True``, gloo) ``AcceleratorState`` stays ``MULTI_CPU``, the
  ``FullyShardedDataParallelPlugin`` is ignored without an error and ``prepare`` returns a DDP model.  The Trainer
  refuses ``ACCELERATE_USE_FSDP=true`` there with a clear error instead of silently training with DDP; what runs on
  CPU is tested: the 2-process Trainer checkpoint + exact resume (DDP), and torch's FSDP2 (``fully_shard`` over gloo,
  applied by transformers with ``DistributedConfig(fsdp_size=2)``): ``moezoo_lm`` trained fully sharded, checkpointed
  with ``torch.distributed.checkpoint`` and resumed exactly, and the dense modules of the EP checks below;
- expert parallelism with transformers' EP plans (``from_pretrained(..., distributed_config=DistributedConfig(
  ep_size=2, fsdp_size=2))``, the plan taken from each config's ``base_model_ep_plan``) for ``moezoo_lm``,
  ``time_moe``, ``dit_moe`` and ProMoE: outputs and gradients equal to the same model in one process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import moezoo

WORLD = 2
HERE = Path(__file__).resolve().parent
DDP = {"model": "lm_tiny_e8k2", "overrides": {"router_aux_loss_coef": 0.0}, "vocab": 128, "n": 16, "batch_size": 2,
       "steps": 3}
EP_MODELS = {  # name: (registry name, overrides, kind)
    "moezoo_lm": ("lm_tiny_e8k2", {}, "lm"),
    "time_moe": ("time_moe_tiny_e4k2", {}, "time_moe"),
    "dit_moe": ("dit_moe_tiny_e4k2", {}, "dit"),
    "promoe": ("promoe_tiny_e4k1", {"num_experts": 3}, "dit"),  # 3 routed + the unconditional expert = 4 = 2 x 2
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """Spawn the 2 ranks once; returns (their results, the folder)."""
    import torch.distributed as dist

    assert dist.is_available() and dist.is_gloo_available(), "torch.distributed with gloo is required"
    out = tmp_path_factory.mktemp("two_process")
    spec = {"ddp": DDP, "ep": {}}
    for name, (reg, overrides, kind) in EP_MODELS.items():
        torch.manual_seed(0)
        m = moezoo.create_model(reg, tiny=True, **overrides)
        # decisive routing so that a wrong dispatch changes the numbers
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("mlp.gate.weight"):
                    p.normal_(0.0, 1.0)
        m.save_pretrained(out / name)
        spec["ep"][name] = {"path": str(out / name), "kind": kind,
                            "cls": f"{type(m).__module__}:{type(m).__qualname__}"}
    (out / "spec.json").write_text(json.dumps(spec))
    root = str(HERE.parents[1])
    env = dict(os.environ, WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, str(HERE / "two_process_worker.py"), str(out)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(WORLD)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for r, (p, log) in enumerate(zip(procs, logs)):
        f = out / f"result_{r}.json"
        assert p.returncode == 0 and f.is_file(), f"rank {r} failed:\n{log[-4000:]}"
        res = json.loads(f.read_text())
        assert "error" not in res, f"rank {r}:\n{res['error']}"
        results.append(res)
    return results, out


def test_ddp_equals_one_process_with_the_same_global_batch(group, tmp_path):
    from safetensors.torch import load_file

    from moezoo.trainer import Trainer, TrainerConfig

    sys.path.insert(0, str(HERE))
    from two_process_worker import _TokenData

    results, out = group
    torch.manual_seed(0)
    model = moezoo.create_model(DDP["model"], tiny=True, **DDP["overrides"])
    one = Trainer(model, TrainerConfig(output_dir=str(tmp_path), max_steps=DDP["steps"],
                                       batch_size=WORLD * DDP["batch_size"], learning_rate=3e-3, warmup_steps=1,
                                       log_every=1, progress_bar=False, mixed_precision="no"),
                  _TokenData(DDP["vocab"], n=DDP["n"])).train()
    for r in results:  # the logged loss is the mean over processes = the loss of the global batch
        torch.testing.assert_close(torch.tensor(r["ddp"]["losses"]), torch.tensor(one["losses"]), rtol=1e-5,
                                   atol=1e-6)
    ddp = load_file(str(out / "ddp_final.safetensors"))
    ref = model.state_dict()
    assert ddp.keys() == ref.keys()
    torch.manual_seed(0)
    init = moezoo.create_model(DDP["model"], tiny=True, **DDP["overrides"]).state_dict()
    for k, v in ddp.items():
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not torch.equal(ddp["model.embed_tokens.weight"], init["model.embed_tokens.weight"])  # training moved it


def test_ddp_checkpoint_resumes_exactly_on_two_processes(group):
    results, _ = group
    for r in results:
        d = r["ddp"]
        assert d["resumed_from_step"] == 2 and d["resumed_equal"]
        assert d["resumed_losses"] == d["losses"]
        # accelerate's per-process RNG states and our per-process data position are both in the checkpoint
        assert {"random_states_0.pkl", "random_states_1.pkl", "rank_state_1.pt", "trainer_state.pt",
                "optimizer.bin", "scheduler.bin", "model.safetensors", "config.json"} <= set(d["checkpoint_files"])


def test_fsdp_on_cpu_is_refused_clearly(group):
    for r in group[0]:
        assert "FSDP" in r["fsdp"]["error"] and "MULTI_CPU" in r["fsdp"]["error"]


@pytest.mark.parametrize("name", list(EP_MODELS))
def test_expert_parallel_equals_one_process(group, name):
    results, _ = group
    for r in results:
        e = r["ep"][name]
        assert e["local_experts"] == [2]  # 4 experts over 2 ranks
        assert e["sharded"] and all(".experts." in n for n in e["sharded"])
        assert e["n_grads"] == e["n_ref"]
        assert e["n_fsdp"] > 0  # the dense modules are FSDP2-sharded (torch fully_shard over gloo runs on CPU)
        assert e["out_diff"] < 1e-5 and e["loss_diff"] < 1e-5 and e["grad_diff"] < 1e-5, e
    if name == "promoe":  # the per-expert biases are sharded too (they were left whole by the old hard-coded plan)
        assert any(n.endswith("up_proj_bias") for n in results[0]["ep"][name]["sharded"])


def test_fsdp2_training_checkpoint_and_exact_resume(group):
    for r in group[0]:
        f = r["fsdp2"]
        assert f["n_sharded"] == f["n_params"]  # every parameter is a DTensor shard
        assert f["resumed"] == f["straight"][2:] and f["params_equal"]
        assert len(set(f["straight"])) == 4  # the steps did change the model
