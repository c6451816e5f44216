"""MoFME's FME layer vs a conventional MoE layer of the same width and expert count (CPU, fp32).

    python eval/speed/fme_layer.py                     # H 256, T 1024 tokens, (E, k) in (4, 2), (8, 2), (16, 4)
    python eval/speed/fme_layer.py --threads 2 --tokens 4096

Both layers route with the same top-k router. The FME layer is one shared gated basenet (H -> W=H), k FiLM experts
(W -> 2W each) and an adaptor (H -> 4H -> H): about (10 + 2k) H^2 multiply-adds per token. The conventional layer
runs k GELU FFN experts (H -> 4H -> H) through moezoo's experts kernel: 8k H^2. Prints the median ms of the forward
and of forward + backward, and the ratio FME / MoE (< 1: FME is faster). Also compares FME's "sparse" and "dense"
implementations.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from moezoo.core import FMEMoELayer, build_moe_layer  # noqa: E402


def _time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def measure(layer, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    def fwd():
        with torch.no_grad():
            layer(x)

    def fwd_bwd():
        layer.zero_grad(set_to_none=True)
        out, _ = layer(x)
        out.backward(torch.ones_like(out))

    return _time(fwd, repeats), _time(fwd_bwd, repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--configs", default="4x2,8x2,16x4", help="E x k pairs, comma separated")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    H = args.hidden
    x = torch.randn(args.tokens, H)
    rows = []
    for pair in args.configs.split(","):
        E, k = (int(v) for v in pair.lower().split("x"))
        router = dict(router_type="topk", router_kwargs={"softmax_after_topk": True, "bias": True})
        fme = {impl: FMEMoELayer(hidden_size=H, num_experts=E, num_experts_per_tok=k, implementation=impl, **router)
               for impl in ("sparse", "dense")}
        moe = build_moe_layer(hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=4 * H,
                       hidden_act="gelu", gated_experts=False, expert_bias=True, **router)
        t_moe = measure(moe, x, args.repeats)
        for impl, layer in fme.items():
            t = measure(layer, x, args.repeats)
            params = sum(q.numel() for q in layer.parameters()), sum(q.numel() for q in moe.parameters())
            rows.append((E, k, impl, t[0], t_moe[0], t[1], t_moe[1], params))
    print(f"H {H}, T {args.tokens}, {args.threads} thread(s), median of {args.repeats}, ms")
    print("| E | k | FME impl | FME fwd | MoE fwd | ratio | FME fwd+bwd | MoE fwd+bwd | ratio | params FME / MoE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for E, k, impl, f, m, fb, mb, (pf, pm) in rows:
        print(f"| {E} | {k} | {impl} | {f:.1f} | {m:.1f} | {f / m:.2f} | {fb:.1f} | {mb:.1f} | {fb / mb:.2f} | "
              f"{pf / 1e6:.2f}M / {pm / 1e6:.2f}M |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
