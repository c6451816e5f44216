"""Speed of the core MoE layer against the dense FFN of equal active FLOPs and transformers' experts kernels.

``moezoo bench moe-layer`` / ``python eval/speed/moe_layer.py``.  For every (E, k) it times, interleaved in one
process, forward and forward+backward of

- ``moezoo``: :class:`moezoo.core.MoELayer` (router + dispatch + experts, the default ``"moezoo"`` implementation),
- ``dense``: a SwiGLU FFN with intermediate ``k * I`` (same active FLOPs; no router),
- ``hf_eager`` / ``hf_grouped_mm``: transformers' ``MixtralExperts`` with the same weights on the same routing
  (experts only: these rows get the router's time of the moezoo row added, so all rows are whole layers),

and prints a table of medians (min in brackets) with the ratios ``moezoo / dense`` and ``moezoo / best transformers``;
``--json`` writes everything.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


class DenseSwiGLU(torch.nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up = torch.nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = torch.nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


def _hf_experts(layer, impl: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    ex = layer.experts
    cfg = MixtralConfig(hidden_size=ex.hidden_dim, intermediate_size=ex.intermediate_dim, num_local_experts=ex.num_experts,
                        num_experts_per_tok=layer.num_experts_per_tok)
    cfg._experts_implementation = impl
    hf = MixtralExperts(cfg)
    with torch.no_grad():
        hf.gate_up_proj.copy_(ex.gate_up_proj)
        hf.down_proj.copy_(ex.down_proj)
    return hf


def _timeit(fn, backward: bool, x: torch.Tensor) -> float:
    xi = x.clone().requires_grad_(backward)
    t0 = time.perf_counter()
    if backward:
        y = fn(xi)
        y.backward(torch.ones_like(y))
    else:
        with torch.no_grad():
            fn(xi)
    return time.perf_counter() - t0


def bench_case(E: int, k: int, *, T: int, H: int, I: int, reps: int, warmup: int, backends: list[str]) -> dict:
    from moezoo.core import build_moe_layer

    torch.manual_seed(0)
    layer = build_moe_layer(hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=I)
    dense = DenseSwiGLU(H, k * I)
    x = torch.randn(T, H)
    with torch.no_grad():
        ro = layer.gate(x)
    idx, w = ro.indices, ro.weights.detach()

    fns = {"moezoo": lambda xi: layer(xi)[0], "dense": dense}
    for impl in ("eager", "grouped_mm"):
        name = f"hf_{impl}"
        if name in backends:
            hf = _hf_experts(layer, impl)
            # same routing as moezoo; the router's cost is measured separately and added
            fns[name] = (lambda m: (lambda xi: m(xi, idx, w)))(hf)
    fns = {n: f for n, f in fns.items() if n in backends or n in ("moezoo", "dense")}

    def router_only(xi):
        return layer.gate(xi).weights

    results = {}
    for mode, bwd in (("fwd", False), ("fwd+bwd", True)):
        times = {n: [] for n in fns}
        rtimes = []
        for _ in range(warmup):
            for n, f in fns.items():
                _timeit(f, bwd, x)
        for _ in range(reps):
            for n, f in fns.items():
                times[n].append(_timeit(f, bwd, x))
            if any(n.startswith("hf_") for n in fns):
                rtimes.append(_timeit(router_only, bwd, x))
        r_med = statistics.median(rtimes) if rtimes else 0.0
        entry = {}
        for n, ts in times.items():
            add = r_med if n.startswith("hf_") else 0.0
            entry[n] = {"median_s": statistics.median(ts) + add, "min_s": min(ts) + add}
        ratios = {}
        # paired ratios, interleaved repetitions
        ratios["moezoo/dense"] = statistics.median(a / b for a, b in zip(times["moezoo"], times["dense"]))
        hf_names = [n for n in times if n.startswith("hf_")]
        if hf_names:
            best = min(hf_names, key=lambda n: entry[n]["median_s"])
            ratios["moezoo/best_transformers"] = entry["moezoo"]["median_s"] / entry[best]["median_s"]
            ratios["best_transformers"] = best
        results[mode] = {"times": entry, "ratios": ratios}
    return {"E": E, "k": k, "T": T, "H": H, "I": I, "reps": reps, "results": results}


def format_table(rows: list[dict]) -> str:
    lines = ["| E | k | T | mode | moezoo ms | dense ms | hf eager ms | hf grouped_mm ms | moezoo/dense | moezoo/best hf |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for mode, res in r["results"].items():
            t = res["times"]

            def ms(n):
                return f"{t[n]['median_s'] * 1e3:.1f} ({t[n]['min_s'] * 1e3:.1f})" if n in t else "-"
            rat = res["ratios"]
            best = f"{rat['moezoo/best_transformers']:.3f}" if "moezoo/best_transformers" in rat else "-"
            lines.append(f"| {r['E']} | {r['k']} | {r['T']} | {mode} | {ms('moezoo')} | {ms('dense')} | {ms('hf_eager')} | "
                         f"{ms('hf_grouped_mm')} | {rat['moezoo/dense']:.3f} | {best} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moezoo bench moe-layer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="8x2,32x2,64x8", help="comma-separated ExK list (default: 8x2,32x2,64x8)")
    p.add_argument("--tokens", default="4096,64", help="comma-separated token counts T (default: 4096,64)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backends", default="hf_eager,hf_grouped_mm",
                   help="transformers kernels to compare with (hf_eager, hf_grouped_mm; empty for none)")
    p.add_argument("--json", default=None, help="write all timings to this JSON file")
    p.add_argument("--buffer-pool", choices=["on", "off"], default="on",
                   help="the opt-in CPU buffer pool of the experts kernel (default on here: what a tuned CPU run uses)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from moezoo.core import cpu_pool

    cpu_pool.enable(args.buffer_pool == "on")
    print(f"CPU buffer pool (moezoo.core.cpu_pool): {args.buffer_pool}")
    backends = [b for b in args.backends.split(",") if b]
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        for case in args.cases.split(","):
            E, k = (int(v) for v in case.lower().split("x"))
            rows.append(bench_case(E, k, T=T, H=args.hidden, I=args.intermediate, reps=args.reps, warmup=args.warmup,
                                   backends=backends))
            print(f"done E={E} k={k} T={T}", flush=True)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
