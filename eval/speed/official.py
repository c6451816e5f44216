"""Side-by-side speed of moezoo against an official implementation, on identical weights, in one command.

    python eval/speed/official.py --family time_moe --official-src ~/src/Time-MoE [--official-path DIR ...]
    python eval/speed/official.py --family dit_moe            # moezoo alone: fp32 vs bf16 autocast (vs compile)

The official code is never vendored: ``--official-src`` is a user's checkout, imported by a worker process
(``--official-python`` picks its interpreter; ``--official-path`` adds directories in front of its ``sys.path``, e.g. a
folder where the transformers version the official repository pins was installed with ``pip install --target``).
The worker builds the official model, hands its state dict to this process, which loads it through moezoo's converter
(identical weights), then the two take turns: every repetition runs each variant once, in the same order, and the
table reports the best of ``--reps`` times as ``speed = reference time / variant time`` (reference: the official
code when given, else moezoo fp32). Machine load hits both sides alike; run it on a quiet machine for final numbers.

Rows (batch ``--batch``, 8 by default): Time-MoE forward 8x512, generate 512->96 (``forecast`` too), train step
(forward + backward); DiT-MoE / ProMoE train step, eval forward, classifier-free-guidance forward (2B); MoFME train
step and eval forward (the official MoWE: eval only). Columns: official fp32, moezoo fp32, moezoo bf16 autocast, and with ``--compile`` moezoo
fp32 under ``torch.compile`` (inductor). Two roofline lines give the fp32 and bf16 GEMM speed of this machine
(2048x1536x1536), the upper bound of every fp32/bf16 ratio. Official adapters: ``time_moe`` (Time-MoE/Time-MoE),
``dit_moe`` (feizc/DiT-MoE ``models.py``), ``mofme`` (RoyZry98/MoFME-Pytorch ``models/mowe.py``, at the
official all-weather config; it needs ``einops``, e.g. ``--official-path`` to a ``pip install --target`` folder); the
other families run moezoo alone until an adapter is added to
``OFFICIAL``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

# ---------------------------------------------------------------------------------------------------------- helpers


def gemm_gflops(dtype: torch.dtype, reps: int = 3, n: int = 2048, k: int = 1536, m: int = 1536) -> float:
    a, b = torch.randn(n, k, dtype=dtype), torch.randn(k, m, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n * k * m / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def series(batch: int, length: int, seed: int = 1234) -> torch.Tensor:
    """Normalised random walks (B, length): the same values in every process (same torch, same seed)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, length, generator=g).cumsum(-1)
    return (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True)


def autocast_ctx(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()


# ---------------------------------------------------------------------------------------------------------- Time-MoE

TIME_MOE_50M = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=12,
                    num_key_value_heads=12, num_experts=8, num_experts_per_tok=2, horizon_lengths=[1, 8, 32, 64],
                    max_position_embeddings=4096, input_size=1, rope_theta=10000, rms_norm_eps=1e-6,
                    hidden_act="silu", use_dense=False, router_aux_loss_factor=0.02, apply_aux_loss=True,
                    tie_word_embeddings=False)
TIME_MOE_TINY = dict(TIME_MOE_50M, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, num_experts=4)


def time_moe_tasks(model, args, official: bool):
    """name -> callable running one repetition (the same work on both sides)."""
    B, T, H = args.batch, args.context, args.horizon
    x = series(B, T + 1)
    inp, lab = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    # fresh copies per call on both sides: the official code unsqueezes its inputs and labels in place

    def forward():
        with torch.no_grad():
            model(input_ids=inp.clone(), use_cache=False)

    def generate():
        with torch.no_grad():
            out = model.generate(inp.clone(), max_new_tokens=H)
        assert out.shape == (B, T + H), out.shape

    def train():
        model.train()
        try:
            model(input_ids=inp.clone(), labels=lab.clone()).loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            model.eval()

    tasks = {"forward": forward, "generate": generate, "train": train}
    if not official:
        tasks["forecast"] = lambda: model.forecast(inp, H)
    return tasks


def time_moe_official_model(args):
    sys.path.insert(0, args.official_src)
    from time_moe.models.configuration_time_moe import TimeMoeConfig
    from time_moe.models.modeling_time_moe import TimeMoeForPrediction

    torch.manual_seed(args.seed)
    cfg = TIME_MOE_TINY if args.tiny else TIME_MOE_50M
    return TimeMoeForPrediction(TimeMoeConfig(**cfg)).eval(), cfg


def time_moe_moezoo_model(official_cfg, state_dict):
    from moezoo.models.time_moe.convert_time_moe import build_model

    return build_model(official_cfg, state_dict)


def time_moe_moezoo_alone(args):
    import moezoo

    torch.manual_seed(args.seed)
    return moezoo.create_model("time_moe_50m", tiny=args.tiny).eval()


# ---------------------------------------------------------------------------------------------------------- DiT-MoE / ProMoE / MoFME (moezoo alone)


def _train_and_eval(model, train_inputs: dict, eval_inputs: dict) -> dict:
    """``train``: one forward + backward of the loss (gradients dropped); ``eval``: one no-grad forward."""

    def train():
        model.train()
        try:
            model(**train_inputs).loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            model.eval()

    def evaluate():
        with torch.no_grad():
            model(**eval_inputs)

    return {"train": train, "eval": evaluate}


def dit_inputs(batch: int, channels: int, size: int, num_classes: int, null_id: int, seed: int) -> dict:
    """DiT inputs both sides build alike (plain torch): ``sample``, ``timestep``, ``class_labels`` (the last sample
    unconditional), ``target``; the same draws as ``MoezooDiTMoeModel.example_inputs``."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, channels, size, size)
    ex = {"sample": torch.randn(shape, generator=g),
          "timestep": torch.randint(0, 1000, (batch,), generator=g).float(),
          "class_labels": torch.randint(0, num_classes, (batch,), generator=g)}
    if batch >= 2:
        ex["class_labels"][-1] = null_id
    ex["target"] = torch.randn(shape, generator=g)
    return ex


def deweather_inputs(batch: int, in_channels: int, out_channels: int, height: int, width: int, seed: int) -> dict:
    """``pixel_values`` and clean ``labels`` in [0, 1], both sides alike (plain torch; the same draws as
    ``MoezooDeweatherForImageRestoration.example_inputs``)."""
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.rand(batch, in_channels, height, width, generator=g),
            "labels": torch.rand(batch, out_channels, height, width, generator=g)}


def image_tasks(model, args, kind: str):
    B = args.batch
    if kind == "deweather":
        c = model.config
        ex = deweather_inputs(B, c.in_channels, c.out_channels, *c.image_hw, args.seed)
        return _train_and_eval(model, ex, {"pixel_values": ex["pixel_values"]})
    c = model.config
    ex = dit_inputs(B, c.in_channels, c.sample_size, c.num_classes, c.null_class_id, args.seed)
    eval_inputs = {k: v for k, v in ex.items() if k != "target"}
    cfg_inputs = {"sample": torch.cat([ex["sample"]] * 2), "timestep": torch.cat([ex["timestep"]] * 2),
                  "class_labels": torch.cat([ex["class_labels"],
                                             torch.full_like(ex["class_labels"], model.config.null_class_id)])}

    tasks = _train_and_eval(model, ex, eval_inputs)

    def cfg_forward():
        with torch.no_grad():
            model(**cfg_inputs)

    return tasks | {"cfg": cfg_forward}


FAMILIES = {
    # family: (registry name, tiny ok, task builder)
    "time_moe": ("time_moe_50m", lambda m, a: time_moe_tasks(m, a, official=False)),
    "dit_moe": ("dit_moe_s2_e8k2", lambda m, a: image_tasks(m, a, "dit")),
    "promoe": ("promoe_s2_e12k1", lambda m, a: image_tasks(m, a, "dit")),
    "mofme": ("deweather_mofme_s_e4k2", lambda m, a: image_tasks(m, a, "deweather")),
}
TINY_NAMES = {"time_moe": "time_moe_tiny_e4k2", "dit_moe": "dit_moe_tiny_e4k2", "promoe": "promoe_tiny_e4k1",
              "mofme": "deweather_mofme_tiny_e4k2"}
# feizc/DiT-MoE ``models.DiT`` keyword arguments: DiT-S/2 with 8 experts, 2 active (``dit_moe_s2_e8k2``), and a tiny one
DIT_MOE_S2 = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6, mlp_ratio=4,
                  class_dropout_prob=0.1, num_classes=1000, num_experts=8, num_experts_per_tok=2, learn_sigma=True)
DIT_MOE_TINY = dict(DIT_MOE_S2, input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10, num_experts=4)


def dit_moe_official_model(args):
    sys.path.insert(0, args.official_src)
    from models import DiT  # feizc/DiT-MoE models.py

    torch.manual_seed(args.seed)
    cfg = DIT_MOE_TINY if args.tiny else DIT_MOE_S2
    return DiT(**cfg).eval(), cfg


def dit_moe_moezoo_model(official_cfg, state_dict):
    from moezoo.models.dit_moe.convert_dit_moe import load_model

    return load_model(official_cfg, state_dict)


def dit_moe_official_tasks(model, args, cfg: dict) -> dict:
    """The official DiT's rows on the inputs moezoo gets: train = MSE on the first ``in_channels`` output channels
    (+ its gates' auxiliary loss, which the official MoE adds in training) backward; eval; cfg (``forward_with_cfg``)."""
    C = cfg["in_channels"]
    ex = dit_inputs(args.batch, C, cfg["input_size"], cfg["num_classes"], cfg["num_classes"], args.seed)
    x, t, y = ex["sample"], ex["timestep"], ex["class_labels"]
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])
    y2 = torch.cat([y, torch.full_like(y, cfg["num_classes"])])

    def train():
        model.train()
        try:
            torch.nn.functional.mse_loss(model(x, t, y)[:, :C], ex["target"]).backward()
        finally:
            model.zero_grad(set_to_none=True)
            model.eval()

    def evaluate():
        with torch.no_grad():
            model(x, t, y)

    def cfg_forward():
        with torch.no_grad():
            model.forward_with_cfg(x2, t2, y2, 4.0)

    return {"train": train, "eval": evaluate, "cfg": cfg_forward}


# RoyZry98/MoFME-Pytorch ``models.mowe.MoWE`` as its all-weather script builds it (scripts_allweather_mofme_ours.sh:
# embed 384, 2 layers, patch 8, FiLM gate, 4 experts top-2; 480x720 frames cropped by (1/2, 1/3) = 240x240; the
# other arguments are MoWE's defaults: 8 heads x 64, out_ch 32 x 4, mlp x4), and the parity fixture's tiny one
MOWE_OFFICIAL = dict(task_scale="1+1+1", is_single_task=False, img_size=[240, 240], patch_size=8,
                     residual_learning=False, transformer_type="vit", moe_enable=True, num_expert=4, type_expert="ffn",
                     top_k=2, gate="film", embed_dim=384, depth=2, scale_dim=4)
MOWE_TINY = dict(MOWE_OFFICIAL, img_size=[32, 32], out_ch=8, embed_dim=32, dim_head=16, n_heads=4)


def mofme_official_model(args):
    sys.path.insert(0, args.official_src)
    from models.mowe import MoWE  # RoyZry98/MoFME-Pytorch (needs einops)

    torch.manual_seed(args.seed)
    cfg = MOWE_TINY if args.tiny else MOWE_OFFICIAL
    return MoWE(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}).eval(), cfg


def mofme_moezoo_model(official_cfg, state_dict):
    from moezoo.models.deweather.convert_mofme import load_official

    return load_official(official_cfg, state_dict)


def mofme_official_tasks(model, args, cfg: dict) -> dict:
    """The official MoWE's eval forward on the inputs moezoo gets. No train row: the official uncertainty-aware router
    fails in ``train()`` (see ../shared/parity/mofme/README.md), so only inference is compared."""
    h, w = cfg["img_size"]
    x = deweather_inputs(args.batch, 3, 3, h, w, args.seed)["pixel_values"]

    def evaluate():
        with torch.no_grad():
            model(x)

    return {"eval": evaluate}


# family: (build the official model and its config, load its weights into moezoo, the official side's rows)
OFFICIAL = {"time_moe": (time_moe_official_model, time_moe_moezoo_model,
                         lambda model, args, cfg: time_moe_tasks(model, args, official=True)),
            "dit_moe": (dit_moe_official_model, dit_moe_moezoo_model, dit_moe_official_tasks),
            "mofme": (mofme_official_model, mofme_moezoo_model, mofme_official_tasks)}


# ---------------------------------------------------------------------------------------------------------- worker


def worker(args) -> None:
    """The official side: build the model, write its weights, then run tasks on request (one line each)."""
    torch.set_num_threads(args.threads)
    build, _, official_tasks = OFFICIAL[args.family]
    model, cfg = build(args)
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(args.worker_dir, "official.safetensors"))
    Path(args.worker_dir, "official_config.json").write_text(json.dumps(cfg))
    tasks = official_tasks(model, args, cfg)
    print("ready " + ",".join(tasks), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        if name == "quit":
            break
        print(f"{_timed(tasks[name]):.6f}", flush=True)


class OfficialProcess:
    def __init__(self, args, workdir: str):
        env = dict(os.environ)
        paths = list(args.official_path or []) + [args.official_src]
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        cmd = [args.official_python, os.path.abspath(__file__), "--worker", "--worker-dir", workdir,
               "--family", args.family, "--official-src", args.official_src, "--threads", str(args.threads),
               "--batch", str(args.batch), "--context", str(args.context), "--horizon", str(args.horizon),
               "--seed", str(args.seed)] + (["--tiny"] if args.tiny else [])
        # run from the checkout's parent so that this repository's moezoo is not what the worker imports
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=tempfile.gettempdir())
        said = []  # official code may print on import (e.g. feizc/DiT-MoE without flash_attn): skip until "ready"
        self.tasks: list[str] = []
        for line in self.proc.stdout:
            if line.startswith("ready"):
                self.tasks = line.split()[1].split(",") if len(line.split()) > 1 else []
                break
            said.append(line)
        else:
            raise RuntimeError(f"the official worker did not start (it printed {''.join(said[-5:])!r}); run it by "
                               f"hand to see why: {' '.join(cmd)}")

    def run(self, task: str) -> float:
        self.proc.stdin.write(task + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            try:
                return float(line)
            except ValueError:  # something the official code printed
                continue
        raise RuntimeError(f"the official worker stopped while running {task!r}")

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()


# ---------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), required=True)
    p.add_argument("--official-src", help="checkout of the official repository (import root)")
    p.add_argument("--official-python", default=sys.executable, help="interpreter for the official side")
    p.add_argument("--official-path", action="append", help="extra sys.path entry for the official side (repeatable)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--horizon", type=int, default=96)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", help="comma-separated subset of the family's rows")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast column")
    p.add_argument("--compile", action="store_true", help="add a torch.compile (inductor) fp32 column")
    p.add_argument("--tiny", action="store_true", help="tiny configs (a smoke test of the harness)")
    p.add_argument("--json", help="write the timings here too")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    torch.set_num_threads(args.threads)
    if args.official_src and args.family not in OFFICIAL:
        p.error(f"no official adapter for {args.family} yet (have: {sorted(OFFICIAL)}); run without --official-src")

    print(f"threads={args.threads} batch={args.batch} reps={args.reps} (best of reps, interleaved) torch "
          f"{torch.__version__}; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    fp32 = gemm_gflops(torch.float32)
    # a small probe first: without hardware bf16 (avx512_bf16 / AMX) the big bf16 GEMM takes minutes
    bf16 = gemm_gflops(torch.bfloat16, reps=1, n=512, k=512, m=512)
    if bf16 > fp32 / 2:
        bf16 = gemm_gflops(torch.bfloat16)
    print(f"roofline: fp32 GEMM 2048x1536x1536 {fp32:.1f} GFLOP/s, bf16 {bf16:.2f} GFLOP/s ({bf16 / fp32:.2f}x)",
          flush=True)
    if bf16 < fp32 and not args.no_bf16:
        print("note: this CPU has no fast bf16 GEMM (no avx512_bf16 / AMX): bf16 autocast runs slower than fp32 here; "
              "pass --no-bf16 to skip it", flush=True)

    official = None
    with tempfile.TemporaryDirectory() as workdir:
        if args.official_src:
            official = OfficialProcess(args, workdir)
            from safetensors.torch import load_file

            cfg = json.loads(Path(workdir, "official_config.json").read_text())
            model = OFFICIAL[args.family][1](cfg, load_file(os.path.join(workdir, "official.safetensors")))
        else:
            import moezoo

            torch.manual_seed(args.seed)
            name = TINY_NAMES[args.family] if args.tiny else FAMILIES[args.family][0]
            model = moezoo.create_model(name, tiny=args.tiny).eval()
        tasks = FAMILIES[args.family][1](model, args)
        compiled_tasks = None
        if args.compile:
            cmodel = torch.compile(model)
            compiled_tasks = FAMILIES[args.family][1](cmodel, args)
        names = [t for t in tasks if not args.tasks or t in args.tasks.split(",")]
        variants = []  # (column, task name) -> callable
        for t in names:
            if official is not None and t in official.tasks:
                variants.append(("official fp32", t, lambda t=t: official.run(t)))
            variants.append(("moezoo fp32", t, lambda t=t: _timed(tasks[t])))
            if not args.no_bf16:
                def run_bf16(t=t):
                    with autocast_ctx(torch.bfloat16):
                        return _timed(tasks[t])
                variants.append(("moezoo bf16", t, run_bf16))
            if compiled_tasks is not None and t != "forecast":
                variants.append(("moezoo compiled", t, lambda t=t: _timed(compiled_tasks[t])))
        best: dict = {}
        for col, t, fn in variants:  # warm-up (and compilation) outside the timings
            fn()
        for r in range(args.reps):
            for col, t, fn in variants:
                s = fn()
                best[(col, t)] = min(best.get((col, t), float("inf")), s)
            print(f"rep {r + 1}/{args.reps} done", flush=True)
        if official is not None:
            official.close()

    cols = []
    for col, _, _ in sorted(variants, key=lambda v: v[0] != "official fp32"):  # the official column first
        if col not in cols:
            cols.append(col)
    ref_col = "official fp32" if official is not None else "moezoo fp32"
    print(f"\n| {args.family}, batch {args.batch} | " + " | ".join(cols) + f" |   (speed = {ref_col} time / time)")
    print("|---|" + "---|" * len(cols))
    for t in names:
        ref = best.get((ref_col, t)) or best.get(("moezoo fp32", t))
        cells = []
        for c in cols:
            v = best.get((c, t))
            cells.append("" if v is None else f"{ref / v:.2f} ({v:.2f} s)")
        print(f"| {t} | " + " | ".join(cells) + " |")
    print(f"roofline bf16/fp32 GEMM: {bf16 / fp32:.2f}x; load average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps({"family": args.family, "batch": args.batch, "threads": args.threads,
                                               "gemm_gflops": {"fp32": fp32, "bf16": bf16},
                                               "seconds": {f"{c}|{t}": v for (c, t), v in best.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
