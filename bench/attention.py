"""Attention of the tiny backbones' shapes, forward and backward on one thread: torch's scaled_dot_product_attention
with its flash kernel (what CLIP's layers call, `backbones/clip.py`), with its math kernel, and written out as two
products and a softmax. The demo's image tower attends over 17 tokens (16 patches and the class token, 4 heads of
32), its text tower over about 20 with a causal mask.

    python bench/attention.py [--repeats 200] [--rounds 3] [--json docs/results/x.json]

(the demo's lanes run under tcmalloc: LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 for the same)

Rounds alternate the three kernels; prints and writes the median milliseconds of each over the rounds, and the
machine. Only a measurement: the backbones keep the flash kernel (another kernel sums in another order, so every
trained figure would change and the demo's comparisons would need measuring again over seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

SHAPES = [((64, 4, 17, 32), False), ((128, 4, 17, 32), False), ((64, 4, 22, 32), True), ((128, 4, 20, 32), True)]


def _kernels():
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(q, k, v, causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def math(q, k, v, causal):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def products(q, k, v, causal):
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if causal:
            n = q.shape[-2]
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return scores.softmax(-1) @ v

    return {"flash": flash, "math": math, "products": products}


def _time(fn, shape, causal, repeats: int) -> float:
    import torch

    q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(*shape)
    for _ in range(10):
        fn(q, k, v, causal).backward(grad)
    t = time.perf_counter()
    for _ in range(repeats):
        fn(q, k, v, causal).backward(grad)
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    from cirlab.experiments import machine

    torch.set_num_threads(1)
    kernels, rows = _kernels(), []
    for shape, causal in SHAPES:
        ms = {name: [] for name in kernels}
        for _ in range(args.rounds):
            for name, fn in kernels.items():
                ms[name].append(_time(fn, shape, causal, args.repeats))
        row = {"shape": list(shape), "causal": causal,
               **{f"{name}_ms": round(statistics.median(v), 3) for name, v in ms.items()}}
        row["flash_over_products"] = round(row["flash_ms"] / row["products_ms"], 2)
        rows.append(row)
        print(row, flush=True)
    doc = {"threads": 1, "what": "forward and backward, median ms over rounds", "rows": rows,
           "ld_preload": os.environ.get("LD_PRELOAD"), "machine": machine.describe()}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
