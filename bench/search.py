"""Search backends at one size (default 1M x 256) in one run: brute force as the peers do it (torch matmul; single
queries and batches of 64) and on numpy's BLAS (the speed-ups stay against torch's), FAISS flat, IVF and HNSW each
tuned to several recall targets, and the quantised IVF kinds (8-bit scalar codes, product-quantised codes) rescored
exactly from float vectors memory-mapped from disk.

    python bench/search.py [--n 1000000] [--dim 256] [--queries 200] [--targets 0.95,0.99,0.999]
                           [--out docs/results/search_bench.json]

Per row: p50 and p99 of single-query latency, queries/s in batches of 64, recall@10 against exact search on the
evaluation queries, bytes a vector in memory (the FAISS index's serialised size over the rows; the float rows a
quantised kind rescores from stay in the memory-mapped file, in the page cache, not in the process), build time,
and the speed-up of the p50 over brute force's single-query p50. The IVF kinds add what a query reads: the rows
of its probed cells (`scanned_rows`, `scanned_mb` of codes) and the coarse centroids (`centroid_mb`); over the p50
that is `read_gb_per_s`, which brute force's row gives for its whole matrix: when the two are alike, the speed-up
is the ratio of bytes read, and only reading fewer (fewer, smaller or better-placed rows) raises it. Each row also
gives the process's anonymous resident memory once the index is built (`rss_anon_gb`; brute force's row: its
torch copy of the rows), the figure that decides whether a size fits the machine.

Vectors: `clusters` Gaussian centres, each point a centre plus `spread` times Gaussian noise, L2-normalised
(scored by inner product, as cirlab's features are). Tuning queries and evaluation queries are drawn separately
from the same distribution: the knob (nprobe, efSearch) is calibrated on the first (`cirlab.index.calibrate`, as
`cirlab index tune` does), and the figures are measured on the second. Threads: torch and FAISS use every core.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cirlab.experiments import machine
from cirlab.index.backends import ExactBackend, FaissBackend, calibrate


def sample(centres: np.ndarray, n: int, rng, spread: float = 1.0, out=None) -> np.ndarray:
    """n points: a random centre plus noise each, L2-normalised; made in chunks (1M x 256 floats is 1 GB)."""
    out = np.empty((n, centres.shape[1]), np.float32) if out is None else out
    for lo in range(0, n, 100_000):
        m = min(100_000, n - lo)
        x = centres[rng.integers(len(centres), size=m)] + spread * rng.normal(size=(m, centres.shape[1]))
        out[lo:lo + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def measure(backend, queries: np.ndarray, truth: np.ndarray, k: int = 10) -> dict:
    """Single-query p50/p99 (ms), queries/s in batches of 64, recall@k against `truth` (B, k)."""
    backend.search(queries[:8], k)  # warm the caches
    lat = []
    for q in queries:
        t = time.perf_counter()
        backend.search(q[None], k)
        lat.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    rows = np.concatenate([backend.search(queries[lo:lo + 64], k)[1] for lo in range(0, len(queries), 64)])
    qps = len(queries) / (time.perf_counter() - t)
    recall = float(np.mean([len(set(a) & set(e)) / k for a, e in zip(rows, truth)]))
    return {"p50_ms": round(float(np.percentile(lat, 50)), 3), "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "qps": round(qps, 1), "recall_at_10": round(recall, 4)}


class NumpyBrute:
    """Brute force on numpy (its BLAS, OpenBLAS in the PyPI wheel) over an in-memory copy of the rows: a second
    baseline, since one BLAS's single-query product can run at half another's memory rate on the same CPU."""

    def __init__(self, x: np.ndarray):
        self.x = np.array(x, np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple:
        scores = np.asarray(queries, np.float32) @ self.x.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
        rows = np.take_along_axis(top, order, 1)
        return np.take_along_axis(scores, rows, 1), rows


def brute_row(label: str, backend, build_s: float, x: np.ndarray, queries: np.ndarray, truth: np.ndarray,
              baseline_p50: float | None = None) -> dict:
    """A brute-force row: every query reads all of `x`, so its read rate is x's bytes over the p50; the speed-up is
    against `baseline_p50` (None: this row is the baseline)."""
    m = measure(backend, queries, truth)
    return {"backend": label, "build_s": round(build_s, 2), **m, "bytes_per_vector": 4 * x.shape[1],
            "speedup_vs_brute_p50": round((baseline_p50 or m["p50_ms"]) / m["p50_ms"], 1),
            "read_gb_per_s": round(x.nbytes / 1e6 / m["p50_ms"], 1), "rss_anon_gb": round(anon_gb(), 2)}


def brute_rows(x: np.ndarray, tune_q: np.ndarray, eval_q: np.ndarray, skip: set, report) -> tuple:
    """Exact search on torch (the baseline; it also gives the true top 10 of both query sets) and on numpy, each
    handed to `report` and freed before the next: ({"tune", "eval"} -> true rows, torch's row)."""
    t = time.perf_counter()
    exact = ExactBackend(x)
    exact_build = time.perf_counter() - t
    truth = {name: np.concatenate([exact.search(q[lo:lo + 64], 10)[1] for lo in range(0, len(q), 64)])
             for name, q in (("tune", tune_q), ("eval", eval_q))}  # 64 at a time: 200 x 10M scores are 8 GB
    brute = brute_row("brute force (torch matmul)", exact, exact_build, x, eval_q, truth["eval"])
    report(brute)
    del exact
    if "numpy" not in skip:
        t = time.perf_counter()
        plain = NumpyBrute(x)
        report(brute_row("brute force (numpy matmul)", plain, time.perf_counter() - t, x, eval_q, truth["eval"],
                         brute["p50_ms"]))
    return truth, brute


def index_bytes(backend) -> int:
    """The index's size as FAISS writes it, streamed to a temporary file: serialising to memory holds up to three
    copies of the index at once (a doubling buffer, then the array), which killed a 10M x 256 run at 24 GB."""
    import faiss

    with tempfile.TemporaryDirectory(prefix="cirlab-bench-size-") as folder:
        path = Path(folder) / "index.faiss"
        faiss.write_index(backend.index, str(path))
        return path.stat().st_size


def scanned(backend, queries: np.ndarray, p50_ms: float | None = None) -> dict:
    """What one IVF query reads, averaged over `queries`: the rows in its `nprobe` probed cells, their codes' bytes,
    and the coarse quantizer's centroids (all of them for a flat quantizer; for an HNSW graph over them, those whose
    distance its search computed); over `p50_ms` these give the bytes a second the search streams, to set against
    brute force's (which reads every row)."""
    import faiss

    index = backend.index
    sizes = np.array([index.invlists.list_size(c) for c in range(index.nlist)])
    faiss.cvar.hnsw_stats.reset()
    _, cells = index.quantizer.search(np.ascontiguousarray(queries, np.float32), index.nprobe)
    rows = float(sizes[cells].sum(1).mean())
    graph = hasattr(faiss.downcast_index(index.quantizer), "hnsw")
    visited = faiss.cvar.hnsw_stats.ndis / len(queries) if graph else index.nlist
    codes, centroids = rows * index.code_size / 1e6, visited * index.d * 4 / 1e6
    out = {"scanned_rows": round(rows), "scanned_mb": round(codes, 4), "centroid_mb": round(centroids, 4)}
    return out | ({"read_gb_per_s": round((codes + centroids) / p50_ms, 2)} if p50_ms else {})


def anon_gb() -> float:
    """The process's anonymous resident memory (GB): what the indexes hold, not the memory-mapped rows' pages."""
    status = Path("/proc/self/status")
    if not status.exists():
        return float("nan")
    return int(status.read_text().split("RssAnon:")[1].split()[0]) / 1e6


def lean_malloc(threshold: int = 65536) -> bool:
    """glibc only: every block of `threshold` bytes or more gets a mapping of its own, handed back to the system
    when freed. FAISS grows each IVF list by doubling; under glibc's default (a threshold that rises to 32 MB) the
    outgrown buffers stay in the heap. Measured at 4M x 256 (4.1 GB of rows, IVF-Flat, 4 sqrt(N) cells): 5.38 GB
    resident once built by default, 4.25 GB with this. True when set."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.gnu_get_libc_version and libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):
        return False


def build(kind: str, x: np.ndarray, **params) -> tuple:
    t = time.perf_counter()
    backend = FaissBackend(x, kind, **params)
    return backend, time.perf_counter() - t


def make_data(args) -> tuple:
    """(path, rows, tuning queries, evaluation queries): the rows written to a temporary .npy and memory-mapped
    back (the float rows on disk, as the index store keeps them), the queries drawn apart."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.clusters, args.dim)).astype(np.float32)
    path = Path(tempfile.mkdtemp(prefix="cirlab-bench-")) / "vectors.npy"
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(args.n, args.dim))
    sample(centres, args.n, rng, args.spread, out=x)
    x.flush()
    del x
    return (path, np.load(path, mmap_mode="r"), sample(centres, args.queries, rng, args.spread),
            sample(centres, args.queries, rng, args.spread))


def ivf_rows(args, x: np.ndarray, skip: set, rescore: dict, tuned_rows) -> None:
    """The IVF kinds, each with every coarse quantizer asked for, built one at a time and handed to `tuned_rows`."""
    for coarse in args.coarse.split(","):
        graph = ", HNSW coarse quantizer" if coarse == "hnsw" else ""
        if "ivf" not in skip:
            backend, s = build("ivf", x, coarse=coarse)
            tuned_rows(f"faiss ivf (nlist {backend.index.nlist}{graph})", backend, s, {"coarse": coarse})
            del backend
        for kind, name in (("ivf_sq8", "sq8"), ("ivf_pq", "pq")):
            if kind in skip or (coarse != "flat" and kind == "ivf_pq"):  # PQ's rows are about its codes, not cells
                continue
            pq = {"pq_m": args.pq_m} if kind == "ivf_pq" else {}
            backend, s = build(kind, x, rescore=int(rescore[name]), coarse=coarse, **pq)
            label = f"faiss {kind} (nlist {backend.index.nlist}{graph}) + rescoring {rescore[name]}x from disk"
            tuned_rows(label, backend, s, {"rescore": int(rescore[name]), "code_bytes": backend.actual["code_bytes"],
                                           "coarse": coarse})
            del backend


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=200, help="evaluation queries (as many again tune)")
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--spread", type=float, default=1.0, help="noise around each centre (centres are N(0, 1))")
    ap.add_argument("--targets", default="0.95,0.99,0.999", help="recall@10 targets IVF and HNSW are tuned to")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--pq-m", type=int, default=32)
    ap.add_argument("--rescore", default="sq8:4,pq:16", help="candidates per result rescored, per quantised kind")
    ap.add_argument("--coarse", default="flat,hnsw", help="the IVF kinds' coarse quantizers to run: flat (every "
                    "centroid scored), hnsw (a graph over the centroids)")
    ap.add_argument("--skip", default="", help="comma-separated kinds to leave out (numpy: the second brute force; "
                    "hnsw: 5 min to build)")
    ap.add_argument("--mmap-threshold", type=int, default=65536, help="glibc: blocks of this many bytes or more "
                    "are mapped apart and handed back when freed (0: glibc's default; see lean_malloc)")
    ap.add_argument("--out", help="write the rows as JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    lean = args.mmap_threshold > 0 and lean_malloc(args.mmap_threshold)
    targets = [float(t) for t in args.targets.split(",")]
    rescore = dict(item.split(":") for item in args.rescore.split(","))
    skip = set(filter(None, args.skip.split(",")))
    path, x, tune_q, eval_q = make_data(args)
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    truth, brute = brute_rows(x, tune_q, eval_q, skip, report)

    def tuned_rows(label: str, backend, build_s: float, extra: dict) -> None:
        size = index_bytes(backend) / args.n
        for target in targets:
            found = calibrate(backend, tune_q, [list(r) for r in truth["tune"]], target)
            m = measure(backend, eval_q, truth["eval"])
            if hasattr(backend.index, "nprobe"):
                m |= scanned(backend, eval_q, m["p50_ms"])
            report({"backend": label, "target_recall": target, found["knob"]: found["value"],
                    "tune_recall": round(found["recall"], 4), "build_s": round(build_s, 2), **m,
                    "bytes_per_vector": round(size, 1), "speedup_vs_brute_p50": round(brute["p50_ms"] / m["p50_ms"], 1),
                    "rss_anon_gb": round(anon_gb(), 2), **extra})

    if "flat" not in skip:
        backend, s = build("flat", x)
        report({"backend": "faiss flat", "build_s": round(s, 2), **measure(backend, eval_q, truth["eval"]),
                "bytes_per_vector": round(index_bytes(backend) / args.n, 1)})
        rows[-1]["speedup_vs_brute_p50"] = round(brute["p50_ms"] / rows[-1]["p50_ms"], 1)
        del backend
    ivf_rows(args, x, skip, rescore, tuned_rows)
    if "hnsw" not in skip:
        backend, s = build("hnsw", x, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
        tuned_rows(f"faiss hnsw (M {args.hnsw_m})", backend, s, {})
        del backend
    if args.out:
        doc = {"n": args.n, "dim": args.dim, "queries": args.queries, "clusters": args.clusters,
               "spread": args.spread, "threads": os.cpu_count(), "machine": machine.describe(),
               "malloc_mmap_threshold": args.mmap_threshold if lean else None, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    path.unlink()
    path.parent.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
