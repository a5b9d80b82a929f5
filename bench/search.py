"""Search backends on clustered random vectors: latency (p50/p99 per single query), queries/s (batches of 64)
and recall@10 against exact search, for exact (torch), FAISS IVF-Flat and FAISS HNSW.

    python bench/search.py [--sizes 10000,100000,1000000] [--dim 256] [--queries 200] [--out bench.json]

Vectors: `clusters` Gaussian centres, each point a centre plus `spread` times Gaussian noise, L2-normalised (scored by inner product, as
cirlab's features are). Queries come from the same distribution. Build time is printed too. Threads: torch and
FAISS use every core they see.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from cirlab.index import make_backend


def sample(centres: np.ndarray, n: int, rng, spread: float = 1.0) -> np.ndarray:
    """n points: a random centre plus noise each, L2-normalised; made in chunks (1M x 256 floats is 1 GB)."""
    out = np.empty((n, centres.shape[1]), np.float32)
    for lo in range(0, n, 100_000):
        m = min(100_000, n - lo)
        x = centres[rng.integers(len(centres), size=m)] + spread * rng.normal(size=(m, centres.shape[1]))
        out[lo:lo + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def measure(backend, queries: np.ndarray, k: int = 10) -> dict:
    lat = []
    for q in queries:
        t = time.perf_counter()
        backend.search(q[None], k)
        lat.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    for lo in range(0, len(queries), 64):
        backend.search(queries[lo:lo + 64], k)
    qps = len(queries) / (time.perf_counter() - t)
    _, rows = backend.search(queries, k)
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), "qps": qps,
            "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--spread", type=float, default=1.0, help="noise around each centre (centres are N(0, 1))")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-search", type=int, default=64)
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = []
    print("| items | backend | build s | p50 ms | p99 ms | queries/s | recall@10 |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in map(int, args.sizes.split(",")):
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(args.clusters, args.dim)).astype(np.float32)
        x, q = sample(centres, n, rng, args.spread), sample(centres, args.queries, rng, args.spread)
        exact_rows = None
        for name, kind, params in (("exact", "flat", {}), ("faiss", "ivf", {"nprobe": args.nprobe}),
                                   ("faiss", "hnsw", {"hnsw_m": args.hnsw_m, "ef_search": args.ef_search})):
            t = time.perf_counter()
            backend = make_backend(name, x, kind, **params)
            build = time.perf_counter() - t
            m = measure(backend, q)
            if exact_rows is None:
                exact_rows = m["rows"]
            recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(m["rows"], exact_rows)]))
            label = "exact" if name == "exact" else f"faiss {kind}"
            row = {"items": n, "backend": label, "build_s": round(build, 2), "p50_ms": round(m["p50_ms"], 3),
                   "p99_ms": round(m["p99_ms"], 3), "qps": round(m["qps"], 1), "recall_at_10": round(recall, 4)}
            rows.append(row)
            print(f"| {n:,} | {label} | {build:.2f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | {m['qps']:.0f} | "
                  f"{recall:.3f} |", flush=True)
            del backend
        del x
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"dim": args.dim, "queries": args.queries, "clusters": args.clusters, "spread": args.spread,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
