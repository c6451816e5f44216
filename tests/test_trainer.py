"""moezoo.trainer: configs, schedules, loss decrease, bit-exact resume (in-process and after a real SIGKILL), atomic
checkpoints, EMA, gradient accumulation and expert-load logging."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

import moezoo
from moezoo.core import MoELayer
from moezoo.trainer import (Trainer, TrainerCallback, TrainerConfig, find_checkpoints, load_yaml_config, lr_factor,
                            parse_config_args)


# ---------------------------------------------------------------------------------------------------------- helpers


class Regression(torch.utils.data.Dataset):
    """y = x @ w + 0.1 * noise, as (x, y) tuples."""

    def __init__(self, n=64, d=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g)
        self.y = self.x @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class MLP(nn.Module):
    def __init__(self, d=4, hidden=16, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout), nn.LayerNorm(hidden),
                                 nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x)


def mse_loss(model, batch):
    x, y = batch
    loss = nn.functional.mse_loss(model(x), y)
    return loss, {"mse": loss.detach()}


class TokenData(torch.utils.data.Dataset):
    def __init__(self, vocab, n=16, length=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return moezoo.create_model("lm_tiny_e8k2", tiny=True)


class Kill(Exception):
    """Stands in for a preemption right after a checkpoint was written."""


class KillAfterSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, trainer, step, path):
        if step == self.step:
            raise Kill(path)


def cfg(tmp, **kw):
    base = dict(output_dir=str(tmp), max_steps=6, batch_size=4, learning_rate=1e-2, log_every=2, progress_bar=False,
                mixed_precision="no")
    base.update(kw)
    return TrainerConfig(**base)


def assert_same_params(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------------- configs


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match=r"learnin_rate.*warmup") as e:
        TrainerConfig.from_dict({"output_dir": str(tmp_path), "max_steps": 3, "learnin_rate": 1.0, "warmup": 2})
    assert "valid keys" in str(e.value)
    with pytest.raises(ValueError, match="batch_size"):
        TrainerConfig(output_dir=str(tmp_path), max_steps=3, batch_size=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainerConfig(output_dir=str(tmp_path), max_steps=3, lr_schedule="exponential")
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainerConfig(output_dir=str(tmp_path), max_steps=3, mixed_precision="int8")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainerConfig(output_dir=str(tmp_path), max_steps=3, ema_decay=1.0)
    with pytest.raises(ValueError, match="max_steps"):
        TrainerConfig.from_dict({"output_dir": str(tmp_path)})
    c = TrainerConfig.from_dict({"output_dir": tmp_path, "max_steps": 3, "learning_rate": "1e-3", "grad_clip": 0})
    assert c.learning_rate == 1e-3 and c.grad_clip is None and c.output_dir == str(tmp_path)
    assert TrainerConfig(output_dir="x", max_steps=1, mixed_precision="fp32").resolved_mixed_precision() == "no"


def test_yaml_config_and_typed_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  max_steps: 5\n  learning_rate: 1e-3\nmodel:\n  name: lm_tiny_e8k2\n")
    c = load_yaml_config(f, ["trainer.max_steps=10", "trainer.ema_decay=null", "trainer.warmup_steps=2",
                             "model.tiny=true", "data.window.sizes=[96, 192]", "trainer.min_lr_ratio=1e-1",
                             "model.name=lm_small_e16k2"])
    assert c == {"trainer": {"max_steps": 10, "learning_rate": 1e-3, "ema_decay": None, "warmup_steps": 2,
                             "min_lr_ratio": 0.1},
                 "model": {"name": "lm_small_e16k2", "tiny": True}, "data": {"window": {"sizes": [96, 192]}}}
    assert isinstance(c["trainer"]["learning_rate"], float) and isinstance(c["trainer"]["max_steps"], int)
    with pytest.raises(ValueError, match="key.subkey=value"):
        load_yaml_config(f, ["trainer.max_steps"])
    with pytest.raises(ValueError, match="trainer.max_steps is a int, not a mapping or a list"):
        load_yaml_config(f, ["trainer.max_steps.x=1"])
    with pytest.raises(FileNotFoundError):
        load_yaml_config(tmp_path / "missing.yaml")
    g = tmp_path / "stages.yaml"
    g.write_text("stages:\n  - {name: a, trainer: {max_steps: 3}}\n  - {name: b}\n")
    st = load_yaml_config(g, ["stages.1.trainer.max_steps=7", "stages.-2.name=first", "stages.0.trainer.lr=1e-2"])
    assert st["stages"] == [{"name": "first", "trainer": {"max_steps": 3, "lr": 0.01}},
                           {"name": "b", "trainer": {"max_steps": 7}}]
    with pytest.raises(ValueError, match="stages is a list of 2; '2' is not an index"):
        load_yaml_config(g, ["stages.2.name=x"])
    with pytest.raises(ValueError, match="stages is a list of 2; 'x' is not an index"):
        load_yaml_config(g, ["stages.x=1"])
    assert parse_config_args(["--config", str(f), "trainer.seed=3"])["trainer"]["seed"] == 3
    assert parse_config_args(["a.b=1"]) == {"a": {"b": 1}}
    TrainerConfig.from_dict(c["trainer"], output_dir=str(tmp_path))


def test_lr_schedule_values():
    kw = dict(max_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    # transformers' warm-up: step s < warmup uses s / warmup of the peak, raised to min_lr_ratio
    assert lr_factor(0, **kw) == pytest.approx(0.1) and lr_factor(1, **kw) == pytest.approx(0.55)
    assert lr_factor(2, **kw) == 1.0 and lr_factor(0, max_steps=10, warmup_steps=2) == 0.0
    assert lr_factor(10, **kw) == pytest.approx(0.1) and lr_factor(6, **kw) == pytest.approx(0.55)
    assert lr_factor(6, schedule="linear", **kw) == pytest.approx(0.55)
    assert lr_factor(7, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 3 / 8)
    assert lr_factor(9, schedule="constant", **kw) == 1.0 and lr_factor(1, schedule="constant", **kw) == 0.5


# ---------------------------------------------------------------------------------------------------------- training


def test_loss_decreases_plain_module_and_logs(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    res = Trainer(model, cfg(tmp_path, max_steps=40, batch_size=16, log_every=10, warmup_steps=4, weight_decay=0.01),
                  Regression(), loss_fn=mse_loss).train()
    losses = res["losses"]
    assert len(losses) == 40 and res["step"] == 40
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5
    log = read_log(res["log_file"])
    assert [e["step"] for e in log] == [10, 20, 30, 40]
    assert all({"loss", "lr", "grad_norm", "mse", "epoch"} <= e.keys() for e in log)
    assert log[0]["lr"] == pytest.approx(1e-2 * lr_factor(9, max_steps=40, warmup_steps=4))  # lr of step 10
    assert log[-1]["epoch"] == 9  # 4 batches per epoch; the 40th batch ends epoch 9
    assert res["routing_plots"] == [] and res["routing_summary"] is None  # no MoE layers
    assert [p.name for _, p in find_checkpoints(tmp_path)] == ["checkpoint-40"]
    # AdamW: no weight decay on biases / LayerNorm
    tr = Trainer(MLP(), cfg(tmp_path / "b", weight_decay=0.1), Regression(), loss_fn=mse_loss)
    groups = tr.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(p.numel() for p in groups[0]["params"]) == 4 * 16 + 16


def test_moe_lm_default_loss_routing_stats_and_plots(tmp_path):
    model = tiny_lm()
    n_moe = sum(isinstance(m, MoELayer) for m in model.modules())
    assert n_moe >= 2
    seen = []
    res = Trainer(model, cfg(tmp_path, max_steps=8, learning_rate=3e-3, log_every=4, batch_size=4),
                  TokenData(model.config.vocab_size, n=4), eval_fn=lambda m, s: {"ppl": 1.0 + s},
                  callbacks=[lambda tr, step, logs: seen.append(step)]).train()
    assert seen == list(range(1, 9))
    assert res["losses"][-1] < res["losses"][0] - 0.05  # memorising one batch
    log = [e for e in read_log(res["log_file"]) if "loss" in e]
    assert [e["step"] for e in log] == [4, 8]
    for e in log:
        assert e["aux_loss"] > 0
        assert len(e["routing/max_load"]) == n_moe and all(1.0 <= v <= 8.0 for v in e["routing/max_load"].values())
    evals = [e for e in read_log(res["log_file"]) if "eval/ppl" in e]
    assert evals == [{"step": 8, "eval/ppl": 9.0}] and res["eval_history"] == [{"step": 8, "ppl": 9.0}]
    summ = res["routing_summary"]
    assert len(summ) == n_moe + 1 and all(summ[k]["steps"] == 2 for k in summ if k != "_all")
    assert all(summ[k]["tokens"] == 2 * 4 * 12 for k in summ if k != "_all")
    for p in res["routing_plots"]:
        assert Path(p).stat().st_size > 1000 and Path(p).read_bytes()[:4] == b"\x89PNG"
    assert {Path(p).name for p in res["routing_plots"]} == {"routing_heatmap.png", "routing_load_over_steps.png"}


def test_exact_resume_moe_lm(tmp_path):
    data = TokenData(128, n=16)
    straight = tiny_lm()
    ra = Trainer(straight, cfg(tmp_path / "a", warmup_steps=2, log_every=1), data).train()
    with pytest.raises(Kill):
        Trainer(tiny_lm(), cfg(tmp_path / "b", warmup_steps=2, log_every=1, save_every=3), data,
                callbacks=[KillAfterSave(3)]).train()
    resumed = tiny_lm(seed=123)  # different init: the weights must come from the checkpoint
    tr = Trainer(resumed, cfg(tmp_path / "b", warmup_steps=2, log_every=1, save_every=3), data)
    assert tr.step == 3 and tr.resumed_from.endswith("checkpoint-3")
    rb = tr.train()
    assert_same_params(straight, resumed)
    assert ra["losses"] == rb["losses"] and len(rb["losses"]) == 6
    assert ra["routing_summary"] == rb["routing_summary"]
    la = [{k: v for k, v in e.items() if k != "time"} for e in read_log(ra["log_file"])]
    lb = [{k: v for k, v in e.items() if k != "time"} for e in read_log(rb["log_file"])]
    assert la == lb


def test_exact_resume_dropout_ema_accumulation_and_eval_isolation(tmp_path):
    data = Regression(n=20)

    def make(seed=0):
        torch.manual_seed(seed)
        return MLP(dropout=0.3)

    def evalf(m, s):  # consumes RNG: must not change the training trajectory
        return {"r": float(torch.rand(()))}

    kw = dict(ema_decay=0.9, gradient_accumulation_steps=2, eval_every=2, log_every=1)
    a = make()
    tra = Trainer(a, cfg(tmp_path / "a", **kw), data, loss_fn=mse_loss, eval_fn=evalf)
    ra = tra.train()
    with pytest.raises(Kill):  # killed mid-epoch (5 batches per epoch, 2 per step)
        Trainer(make(), cfg(tmp_path / "b", save_every=3, **kw), data, loss_fn=mse_loss, eval_fn=evalf,
                callbacks=[KillAfterSave(3)]).train()
    b = make(seed=7)
    trb = Trainer(b, cfg(tmp_path / "b", save_every=3, **kw), data, loss_fn=mse_loss, eval_fn=evalf)
    assert trb.step == 3 and trb._data.epoch == 1 and trb._data.pos == 1
    rb = trb.train()
    assert_same_params(a, b)
    assert_same_params(tra.ema_model, trb.ema_model)
    assert ra["losses"] == rb["losses"] and ra["eval_history"] == rb["eval_history"]
    c = make()  # no eval at all: identical trajectory
    rc = Trainer(c, cfg(tmp_path / "c", **{**kw, "eval_every": None}), data, loss_fn=mse_loss).train()
    assert rc["losses"] == ra["losses"]
    assert_same_params(a, c)
    assert not torch.equal(tra.ema_model.net[0].weight, a.net[0].weight)


def test_exact_resume_sample_batch_callable(tmp_path):
    w = torch.randn(3, 1, generator=torch.Generator().manual_seed(1))

    def sample_batch(g, bs):
        x = torch.randn(bs, 3, generator=g)
        return x, x @ w

    def run(out, seed, callbacks=()):
        torch.manual_seed(seed)
        m = nn.Linear(3, 1)
        return m, Trainer(m, cfg(out, save_every=2, max_steps=5), sample_batch, loss_fn=mse_loss,
                          callbacks=list(callbacks))

    ma, ta = run(tmp_path / "a", 0)
    ra = ta.train()
    with pytest.raises(Kill):
        run(tmp_path / "b", 0, [KillAfterSave(2)])[1].train()
    mb, tb = run(tmp_path / "b", 5)
    assert tb.step == 2
    rb = tb.train()
    assert ra["losses"] == rb["losses"]
    assert_same_params(ma, mb)


KILL_STEPS = 12


def _kill_setup(out, sleep=0.0):
    torch.manual_seed(0)
    model = MLP(dropout=0.2)
    callbacks = [lambda tr, step, logs: time.sleep(sleep)] if sleep else []
    return model, Trainer(model, cfg(out, max_steps=KILL_STEPS, save_every=2, keep_last=2, log_every=1,
                                     ema_decay=0.5), Regression(n=24), loss_fn=mse_loss, callbacks=callbacks)


def test_resume_after_real_sigkill(tmp_path, one_thread):
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, __file__, "--kill-child", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while not (out / "checkpoint-2" / "trainer_state.pt").is_file():
            if proc.poll() is not None:
                pytest.fail(f"child exited early: {proc.stderr.read().decode()[-2000:]}")
            assert time.time() < deadline, "child wrote no checkpoint in 90 s"
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = [s for s, _ in find_checkpoints(out)]
    assert done and max(done) < KILL_STEPS, f"child finished before the kill: {done}"
    model_b, tb = _kill_setup(out)
    assert tb.step == max(done)
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    rb = tb.train()
    model_a, ta = _kill_setup(tmp_path / "straight")
    ra = ta.train()
    assert ra["losses"] == rb["losses"]
    assert_same_params(model_a, model_b)
    assert_same_params(ta.ema_model, tb.ema_model)
    steps = [e["step"] for e in read_log(out / "log.jsonl")]
    assert steps == list(range(1, KILL_STEPS + 1))  # lines written after the checkpoint by the killed run were dropped
    assert [s for s, _ in find_checkpoints(out)] == [KILL_STEPS - 2, KILL_STEPS]


def test_atomic_checkpoints_leftovers_rotation_and_contents(tmp_path):
    data = Regression(n=16)
    torch.manual_seed(0)
    with pytest.raises(Kill):
        Trainer(MLP(), cfg(tmp_path, save_every=3, ema_decay=0.5), data, loss_fn=mse_loss,
                callbacks=[KillAfterSave(3)]).train()
    ck = tmp_path / "checkpoint-3"
    state = torch.load(ck / "trainer_state.pt", weights_only=True)
    assert state["step"] == 3 and len(state["loss_history"]) == 3
    # accelerate's files: optimizer / scheduler / RNG states, all loadable without pickle (NumPy arrays allow-listed)
    from accelerate.utils.other import load

    rng = load(ck / "random_states_0.pkl")  # weights_only=True
    assert {"random_state", "numpy_random_seed", "torch_manual_seed"} <= rng.keys()
    assert load(ck / "optimizer.bin")["state"] and load(ck / "scheduler.bin")["last_epoch"] == 3
    assert json.loads((ck / "trainer_config.json").read_text())["save_every"] == 3
    assert (ck / "model.safetensors").is_file() and (ck / "ema" / "model.safetensors").is_file()
    # a checkpoint write killed halfway, and a folder without trainer state, are both ignored
    (tmp_path / ".checkpoint-6.tmp").mkdir()
    (tmp_path / ".checkpoint-6.tmp" / "trainer_state.pt").write_bytes(b"garbage")
    (tmp_path / "checkpoint-9").mkdir()
    assert [s for s, _ in find_checkpoints(tmp_path)] == [3]
    tr = Trainer(MLP(), cfg(tmp_path, save_every=1, keep_last=2, ema_decay=0.5), data, loss_fn=mse_loss)
    assert tr.step == 3 and not (tmp_path / ".checkpoint-6.tmp").exists()
    tr.train()
    assert [s for s, _ in find_checkpoints(tmp_path)] == [5, 6]
    with pytest.raises(ValueError, match="overwrite_output_dir"):
        Trainer(MLP(), cfg(tmp_path, resume="never"), data, loss_fn=mse_loss)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        Trainer(MLP(), cfg(tmp_path, resume=str(tmp_path / "checkpoint-9")), data, loss_fn=mse_loss)
    tr = Trainer(MLP(), cfg(tmp_path, resume=str(tmp_path / "checkpoint-5")), data, loss_fn=mse_loss)
    assert tr.step == 5
    tr = Trainer(MLP(), cfg(tmp_path, resume="never", overwrite_output_dir=True), data, loss_fn=mse_loss)
    assert tr.step == 0 and find_checkpoints(tmp_path) == []


class NotAllowed:
    """A class torch's weights_only unpickler refuses."""


def test_unsafe_or_missing_rng_state_is_refused_not_skipped(tmp_path):
    # accelerate's load_state swallows any error while restoring RNG states; the Trainer must not resume silently
    torch.manual_seed(0)
    Trainer(MLP(), cfg(tmp_path, max_steps=2, save_every=2), Regression(n=16), loss_fn=mse_loss).train()
    rng_file = tmp_path / "checkpoint-2" / "random_states_0.pkl"
    torch.save({"torch_manual_seed": torch.get_rng_state(), "payload": NotAllowed()}, rng_file)
    with pytest.raises(RuntimeError, match="weights_only"):
        Trainer(MLP(), cfg(tmp_path, max_steps=3), Regression(n=16), loss_fn=mse_loss)
    rng_file.unlink()
    with pytest.raises(FileNotFoundError, match="RNG state"):
        Trainer(MLP(), cfg(tmp_path, max_steps=3), Regression(n=16), loss_fn=mse_loss)


def test_ema_matches_hand_computed(tmp_path):
    torch.manual_seed(0)
    m = nn.Linear(3, 1)
    snaps = [{k: v.clone() for k, v in m.state_dict().items()}]
    d = 0.7
    tr = Trainer(m, cfg(tmp_path, max_steps=2, ema_decay=d, save_final=False), Regression(n=8, d=3),
                 loss_fn=mse_loss, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                 callbacks=[lambda t, s, logs: snaps.append({k: v.clone() for k, v in m.state_dict().items()})])
    tr.train()
    for k, v in tr.ema_model.state_dict().items():
        expected = d * (d * snaps[0][k] + (1 - d) * snaps[1][k]) + (1 - d) * snaps[2][k]
        torch.testing.assert_close(v, expected, rtol=0, atol=1e-7)
        assert v.dtype == torch.float32 and not torch.equal(snaps[2][k], snaps[0][k])


def test_gradient_accumulation_equals_big_batch(tmp_path):
    results = []
    for bs, accum in ((8, 1), (4, 2), (2, 4)):
        torch.manual_seed(0)
        m = nn.Linear(4, 1)
        Trainer(m, cfg(tmp_path / f"{bs}", max_steps=3, batch_size=bs, gradient_accumulation_steps=accum,
                       grad_clip=None, lr_schedule="constant", save_final=False), Regression(n=24),
                loss_fn=mse_loss, optimizer=torch.optim.SGD(m.parameters(), lr=0.1)).train()
        results.append(m.state_dict())
    for other in results[1:]:
        for k in results[0]:
            torch.testing.assert_close(other[k], results[0][k], rtol=0, atol=1e-6)


def test_dataset_sharding_across_processes():
    from moezoo.trainer import _DatasetSource

    data = Regression(n=22)
    kw = dict(batch_size=3, seed=4, world_size=2, collate_fn=lambda xs: [int(x[0][0] * 1e6) for x in xs],
              num_workers=0, drop_last=True, pin_memory=False)
    one = _DatasetSource(data, **{**kw, "world_size": 1}, rank=0)
    ranks = [_DatasetSource(data, **kw, rank=r) for r in range(2)]
    assert one.batches_per_epoch == 7 and ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 3
    for epoch in range(2):
        full = [one.next() for _ in range(7)]
        got = [[src.next() for _ in range(3)] for src in ranks]
        assert got[0] == full[0:6:2] and got[1] == full[1:6:2]  # rank r takes global batches r, r + W, ...
    assert one.epoch == 1 and ranks[0].epoch == 1


def test_mixed_precision_switches_between_trainers(tmp_path):
    for i, mp in enumerate(("bf16", "no")):
        torch.manual_seed(0)
        tr = Trainer(MLP(), cfg(tmp_path / str(i), mixed_precision=mp, max_steps=2, ema_decay=0.9), Regression(),
                     loss_fn=mse_loss)
        assert tr.accelerator.mixed_precision == mp
        res = tr.train()
        assert all(torch.isfinite(torch.tensor(res["losses"])))
        assert all(p.dtype == torch.float32 for p in tr.ema_model.parameters())


def test_bad_inputs_raise_clear_errors(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(3)

    with pytest.raises(TypeError, match="map-style Dataset"):
        Trainer(MLP(), cfg(tmp_path), Stream())
    with pytest.raises(ValueError, match="too few"):
        Trainer(MLP(), cfg(tmp_path, batch_size=32), Regression(n=16), loss_fn=mse_loss)
    with pytest.raises(TypeError, match="config"):
        Trainer(MLP(), 3, Regression())
    with pytest.raises(ValueError, match="nope"):
        Trainer(MLP(), {"output_dir": str(tmp_path), "max_steps": 1, "nope": 1}, Regression())
    with pytest.raises(ValueError, match="scalar"):
        Trainer(MLP(), cfg(tmp_path / "a"), Regression(), loss_fn=lambda m, b: m(b[0])).train()
    model = tiny_lm()
    nolabels = [{"input_ids": torch.zeros(4, dtype=torch.long)}] * 8
    with pytest.raises(ValueError, match="labels"):
        Trainer(model, cfg(tmp_path / "b"), nolabels).train()


if __name__ == "__main__" and sys.argv[1:2] == ["--kill-child"]:
    torch.set_num_threads(1)
    _kill_setup(Path(sys.argv[2]), sleep=0.25)[1].train()
