"""Compute follows the experts used: time per token of the audio_moe MoE layer against the mean number of REAL experts
per token, for top-p routing (thresholds 0.3 .. 0.9, with null experts) and top-k routing (k = 1, 2, 4).

Every layer is built the way the family builds it (``MoezooAudioMoeConfig.moe_layer_config()`` -> ``build_moe_layer``), with
the same expert weights; the router weight is scaled (``--router-scale``) so that its softmax is as peaked as a trained
router's and top-p selects a varying number of experts. Each top-p row is compared with the top-k cost at the same mean
k, interpolated linearly between the measured k = 1, 2, 4 rows (``ratio vs top-k``; the target is <= 1.1).
Null experts are selected by top-p but run no FFN: ``null share`` is the fraction of selections that hit one.

Run from the project root (one thread by default, like the rest of the CPU benchmarks)::

    python eval/speed/audio_moe_capacity.py [--tokens 2048] [--hidden 256] [--inter 512] [--experts 16] [--null 2]
                                            [--reps 7] [--backward] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build_layer(moe_type: str, *, hidden: int, inter: int, experts: int, null: int, k: int = 2, top_p: float = 0.5,
                shared: int = 0):
    from moezoo.core import build_moe_layer
    from moezoo.models.audio_moe import MoezooAudioMoeConfig

    cfg = MoezooAudioMoeConfig(hidden_size=hidden, num_attention_heads=4, moe_type=moe_type, num_experts=experts,
                               num_experts_per_tok=k, moe_intermediate_size=inter, router_top_p=top_p,
                               num_null_experts=null if moe_type == "topp" else 0, num_shared_experts=shared,
                               shared_intermediate_size=inter)
    cfg._experts_implementation = "moezoo"  # what a model's from_pretrained / __init__ sets
    return build_moe_layer(cfg.moe_layer_config(), experts_config=cfg)


def copy_weights(dst, src, router_scale: float, seed: int = 0):
    """Same experts for every row; router rows of the routed experts shared, null rows drawn once (seed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dst.experts.gate_up_proj.copy_(src.experts.gate_up_proj)
        dst.experts.down_proj.copy_(src.experts.down_proj)
        E, H = src.experts.gate_up_proj.shape[0], src.hidden_size
        base = torch.randn(dst.gate.weight.shape[0], H, generator=g) * router_scale / H ** 0.5
        dst.gate.weight.copy_(base)


def time_layer(layer, x, reps: int, warmup: int, backward: bool) -> list[float]:
    ts = []
    for i in range(warmup + reps):
        xi = x.clone().requires_grad_(backward)
        t0 = time.perf_counter()
        if backward:
            y, _ = layer(xi)
            y.backward(torch.ones_like(y))
        else:
            with torch.no_grad():
                layer(xi)
        if i >= warmup:
            ts.append(time.perf_counter() - t0)
    return ts


def real_experts_per_token(layer, x) -> tuple[float, float]:
    with torch.no_grad():
        ro = layer.route(x)
    E = layer.num_experts
    real = (ro.indices < E).sum(-1).float()
    sel = (ro.indices < ro.num_experts).sum().item()
    null = ((ro.indices >= E) & (ro.indices < ro.num_experts)).sum().item()
    return real.mean().item(), (null / sel if sel else 0.0)


def interp(k: float, pts: list[tuple[float, float]]) -> float:
    pts = sorted(pts)
    if k <= pts[0][0]:
        (k0, t0), (k1, t1) = pts[0], pts[1]
    elif k >= pts[-1][0]:
        (k0, t0), (k1, t1) = pts[-2], pts[-1]
    else:
        (k0, t0), (k1, t1) = next((a, b) for a, b in zip(pts, pts[1:]) if a[0] <= k <= b[0])
    return t0 + (t1 - t0) * (k - k0) / (k1 - k0)


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.tokens, args.hidden)
    ref = build_layer("topk", hidden=args.hidden, inter=args.inter, experts=args.experts, null=0, k=1)
    rows = []
    layers = []
    for k in (1, 2, 4):
        lay = build_layer("topk", hidden=args.hidden, inter=args.inter, experts=args.experts, null=0, k=k)
        copy_weights(lay, ref, args.router_scale)
        layers.append((f"top-k k={k}", "topk", lay))
    for p in args.top_p:
        lay = build_layer("topp", hidden=args.hidden, inter=args.inter, experts=args.experts, null=args.null, top_p=p)
        copy_weights(lay, ref, args.router_scale)
        layers.append((f"top-p p={p:.1f}", "topp", lay))
    for name, kind, lay in layers:
        lay.train(args.backward)
        k_mean, null_share = real_experts_per_token(lay, x)
        rows.append({"name": name, "kind": kind, "mean_real_experts": k_mean, "null_share": null_share, "times": []})
    # interleave repetitions so that machine-load drift hits every row alike
    for _ in range(args.rounds):
        for row, (_, _, lay) in zip(rows, layers):
            row["times"] += time_layer(lay, x, args.reps, args.warmup, args.backward)
    for row in rows:
        row["us_per_token"] = statistics.median(row["times"]) / args.tokens * 1e6
        row["us_per_token_min"] = min(row["times"]) / args.tokens * 1e6
    # ratios on the minimum over repetitions: on a shared machine, load only ever adds time
    pts = [(r["mean_real_experts"], r["us_per_token_min"]) for r in rows if r["kind"] == "topk"]
    for r in rows:
        if r["kind"] == "topp":
            r["topk_us_at_same_k"] = interp(r["mean_real_experts"], pts)
            r["ratio_vs_topk"] = r["us_per_token_min"] / r["topk_us_at_same_k"]
    return {"args": vars(args), "rows": [{k: v for k, v in r.items() if k != "times"} for r in rows]}


def format_table(res: dict) -> str:
    a = res["args"]
    mode = "fwd+bwd" if a["backward"] else "fwd"
    out = [f"audio_moe MoE layer, {mode}, T={a['tokens']} tokens, H={a['hidden']}, I={a['inter']}, "
           f"E={a['experts']} routed (+{a['null']} null for top-p), {a['threads']} thread(s)",
           "| layer | mean real experts/token | null share | us/token median | us/token min | top-k us (min) at same k "
           "| ratio vs top-k |",
           "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        tk = f"{r['topk_us_at_same_k']:.2f}" if "topk_us_at_same_k" in r else "-"
        ratio = f"{r['ratio_vs_topk']:.3f}" if "ratio_vs_topk" in r else "-"
        out.append(f"| {r['name']} | {r['mean_real_experts']:.2f} | {r['null_share']:.2f} | {r['us_per_token']:.2f} | "
                   f"{r['us_per_token_min']:.2f} | {tk} | {ratio} |")
    ratios = [r["ratio_vs_topk"] for r in res["rows"] if "ratio_vs_topk" in r]
    if ratios:
        out.append(f"max ratio vs top-k at equal k: {max(ratios):.3f} (target <= 1.10)")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--null", type=int, default=2)
    ap.add_argument("--top-p", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    ap.add_argument("--router-scale", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = run(args)
    print(format_table(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
