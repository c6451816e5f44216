"""moezoo.core.parallel: expert-parallel plans for transformers, and a real 2-process EP run (gloo, CPU).

Run as a script (``python tests/core/test_parallel.py --ep-worker``) it is one rank of the EP test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers

from moezoo.core import MoELayer, build_moe_layer
from moezoo.core.parallel import (EP_DISPATCH_STYLE, EP_PARAM_STYLE, base_model_ep_plan, distribute_experts, ep_plan,
                                  expert_parameter_names, set_ep_plan)
from moezoo.core.upcycle import upcycle_model

VOCAB = 128


def tiny_upcycled(num_layers=2, seed=0, mlp_bias=False, **upcycle_kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   mlp_bias=mlp_bias)
    model = transformers.LlamaForCausalLM(cfg)
    upcycle_kw.setdefault("num_experts", 4)
    upcycle_kw.setdefault("num_experts_per_tok", 2)
    upcycle_model(model, verify=False, **upcycle_kw)
    return model


def _names(model):
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard as wc

    params = {wc(n): p for n, p in model.named_parameters()}
    modules = {wc(n): m for n, m in model.named_modules()}
    return params, modules


# ----------------------------------------------------------------------------------------------------------------------
# plans
# ----------------------------------------------------------------------------------------------------------------------


def test_base_plan_matches_transformers_moe_configs():
    from transformers import GptOssConfig, MixtralConfig, Qwen3MoeConfig

    assert base_model_ep_plan() == Qwen3MoeConfig.base_model_ep_plan == MixtralConfig.base_model_ep_plan
    assert base_model_ep_plan(bias=True) == GptOssConfig.base_model_ep_plan
    assert base_model_ep_plan(gated=False)["layers.*.mlp.experts.up_proj"] == EP_PARAM_STYLE
    with pytest.raises(ValueError, match="mlp_path"):
        base_model_ep_plan("layers.*.mlp.")


def test_plan_of_upcycled_llama_matches_real_names():
    model = tiny_upcycled(num_layers=3)
    plan = ep_plan(model)
    assert plan == {
        "model.layers.*.mlp.experts.gate_up_proj": EP_PARAM_STYLE,
        "model.layers.*.mlp.experts.down_proj": EP_PARAM_STYLE,
        "model.layers.*.mlp.experts": EP_DISPATCH_STYLE,
    }
    # the base model gives the `base_model_ep_plan` form, identical to transformers' MoE models
    assert ep_plan(model.model) == base_model_ep_plan()
    params, modules = _names(model)
    E = model.model.layers[0].mlp.num_experts
    for key, style in plan.items():
        if style == EP_PARAM_STYLE:
            assert key in params and params[key].shape[0] == E
        else:
            assert key in modules and modules[key] is model.model.layers[-1].mlp.experts  # last one under that name
    # transformers' own resolution expands every rule to every converted layer, without leftovers
    from transformers.distributed import DistributedConfig

    set_ep_plan(model)
    assert model.ep_plan == plan
    _, expanded, _ = model._resolve_parallel_plans(DistributedConfig(ep_size=2, fsdp_size=2))
    assert {k: v for k, v in expanded.items() if "experts" in k} == {
        f"model.layers.{i}.mlp.experts{p}": (EP_PARAM_STYLE if p else EP_DISPATCH_STYLE)
        for i in range(3) for p in (".gate_up_proj", ".down_proj", "")
    }


def test_plan_lists_expert_biases_and_only_converted_layers():
    model = tiny_upcycled(num_layers=4, mlp_bias=True, every_n_layers=2, num_shared_experts=1)
    plan = ep_plan(model)
    assert set(plan) == {f"model.layers.*.mlp.experts{p}" for p in
                         (".gate_up_proj", ".down_proj", ".gate_up_proj_bias", ".down_proj_bias", "")}
    params, _ = _names(model)
    assert all(k in params for k, v in plan.items() if v == EP_PARAM_STYLE)
    assert "model.layers.*.mlp.shared_expert.gate_proj.weight" in params  # replicated: not in the plan
    assert not any("shared_expert" in k or k.endswith("mlp.gate") for k in plan)
    from transformers.distributed import DistributedConfig

    set_ep_plan(model)
    _, expanded, _ = model._resolve_parallel_plans(DistributedConfig(ep_size=2, fsdp_size=2))
    layers = sorted({int(k.split(".")[2]) for k in expanded if "experts" in k})
    assert layers == [1, 3]  # the dense layers 0 and 2 get no expert rule


def test_plan_of_a_bare_layer_and_errors():
    layer = build_moe_layer(hidden_size=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, expert_bias=True)
    assert ep_plan(layer) == {"experts.gate_up_proj": EP_PARAM_STYLE, "experts.down_proj": EP_PARAM_STYLE,
                              "experts.gate_up_proj_bias": EP_PARAM_STYLE, "experts.down_proj_bias": EP_PARAM_STYLE,
                              "experts": EP_DISPATCH_STYLE}
    assert ep_plan(layer, prefix="model.mlp")["model.mlp.experts"] == EP_DISPATCH_STYLE
    blocks = torch.nn.Module()
    blocks.layers = torch.nn.ModuleList([build_moe_layer(hidden_size=8, num_experts=4, moe_intermediate_size=16) for _ in range(2)])
    assert set(ep_plan(blocks)) == {"layers.*.experts.gate_up_proj", "layers.*.experts.down_proj", "layers.*.experts"}
    assert set(ep_plan(blocks, wildcard=False)) >= {"layers.0.experts", "layers.1.experts.down_proj"}
    assert expert_parameter_names(layer.experts) == ["gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"]
    plain = build_moe_layer(hidden_size=8, num_experts=4, moe_intermediate_size=16, gated_experts=False)
    assert ep_plan(plain) == {"experts.up_proj": EP_PARAM_STYLE, "experts.down_proj": EP_PARAM_STYLE,
                              "experts": EP_DISPATCH_STYLE}
    with pytest.raises(ValueError, match="no MoELayer"):
        ep_plan(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="PreTrainedModel"):
        set_ep_plan(layer)
    with pytest.raises(ValueError, match="not initialised"):
        distribute_experts(tiny_upcycled())


# ----------------------------------------------------------------------------------------------------------------------
# a real expert-parallel run: 2 processes, gloo on CPU, transformers' EP machinery (all-to-all dispatch, FSDP2 dense)
# ----------------------------------------------------------------------------------------------------------------------


def _ep_worker() -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"file://{os.environ['EP_STORE']}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    # decisive routing (router std 1) onto perturbed copies (noise) so that a wrong dispatch changes the numbers;
    # one null expert per layer sends sentinel slots through transformers' dispatch
    model = tiny_upcycled(num_layers=2, num_experts=4, num_experts_per_tok=2, router_init_std=1.0,
                          expert_noise_std=0.5, num_shared_experts=1, layer_kwargs={"num_null_experts": 1})
    batches = [torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]
    ids = batches[rank]
    # single-process reference: data-parallel mean of the ranks' losses
    losses = [model(b, labels=b).loss for b in batches]
    (sum(losses) / world).backward()
    ref_loss = losses[rank].detach()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        ref_logits = model(ids).logits

    model = distribute_experts(model)
    experts = model.model.layers[0].mlp.experts
    result = {"rank": rank, "local_experts": experts.num_experts,
              "local_shape": list(experts.gate_up_proj.to_local().shape)}
    with torch.no_grad():
        logits = model(ids).logits
    result["logits_diff"] = float((logits - ref_logits).abs().max())
    out = model(ids, labels=ids)
    out.loss.backward()
    result["loss_diff"] = float((out.loss.detach() - ref_loss).abs())
    grad_diff, n_sharded = 0.0, 0
    for name, p in model.named_parameters():
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        r = ref_grads[name]
        if g.shape != r.shape:  # a dim-0 shard (experts over EP, dense weights over FSDP)
            n_sharded += "experts" in name
            r = r.chunk(world, dim=0)[rank]
        grad_diff = max(grad_diff, float((g - r).abs().max()))
    result["grad_diff"] = grad_diff
    result["sharded_expert_params"] = n_sharded
    print("EPRESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


def test_two_process_expert_parallel_matches_single_process(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    world = 2
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pythonpath = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, WORLD_SIZE=str(world), EP_STORE=str(tmp_path / "store"), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", MASTER_ADDR="127.0.0.1", PYTHONPATH=pythonpath)
    procs = [subprocess.Popen([sys.executable, __file__, "--ep-worker"], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-4000:]
        lines = [l for l in text.splitlines() if l.startswith("EPRESULT ")]
        assert lines, text[-4000:]
        results.append(json.loads(lines[-1][len("EPRESULT "):]))
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["local_experts"] == 2 and r["local_shape"] == [2, 128, 32]  # 4 experts split over 2 ranks
        assert r["sharded_expert_params"] == 4  # gate_up_proj and down_proj of both layers
        assert r["logits_diff"] < 1e-5
        assert r["loss_diff"] < 1e-5
        assert r["grad_diff"] < 1e-5


if __name__ == "__main__" and "--ep-worker" in sys.argv:
    _ep_worker()
