"""Speed of moezoo's MoE layer vs the dense FFN of equal active FLOPs and transformers' experts kernels.

Run from the project root: ``python eval/speed/moe_layer.py [--cases 8x2,32x2,64x8] [--tokens 4096,64] [--json out.json]``
(the same as ``moezoo bench moe-layer``)."""
from moezoo.bench_moe_layer import main

if __name__ == "__main__":
    raise SystemExit(main())
