"""Paired comparison of two evaluations: B minus A with a bootstrap interval over queries (and seeds).

A and B are each one per-query file (evaluation/per_query.py) or several, one per training seed, paired by
position (A's seed i with B's seed i). Every file must hold the same queries. The point estimate is the mean over
seeds of B's metric minus A's. Each bootstrap resample draws the queries with replacement (the same draw for every
seed and both sides: the pairing over queries) and, with several seeds, the seeds with replacement (the same for
both sides), and takes the mean over the drawn seeds of the difference over the drawn queries; the interval is the
resamples' 2.5th and 97.5th percentiles. Query weights are multinomial counts, which is the same resampling as
drawing indices and is vectorised over resamples.
"""
from __future__ import annotations

import numpy as np

from cirlab.errors import CirlabError
from cirlab.evaluation.per_query import metric_values, read_records

DEFAULT_METRICS = ("R@1", "R@10", "Rsubset@1")


def _aligned(files: list, keys: list | None) -> tuple:
    """Records of each file ordered by `keys` (default: the first file's order); every file must hold them all."""
    out = []
    for f in files:
        recs = read_records(f)
        by_key = {str(r["query"]): r for r in recs}
        if keys is None:
            keys = [str(r["query"]) for r in recs]
        if set(by_key) != set(keys):
            missing = [k for k in keys if k not in by_key][:3]
            extra = [k for k in by_key if k not in set(keys)][:3]
            raise CirlabError(f"{f}: not the same queries as {files[0]} (missing {missing}, extra {extra}); "
                              "compare evaluations of one split")
        out.append([by_key[k] for k in keys])
    return out, keys


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """a, b: (S, Q) per-query values of S seeds. {"a", "b", "diff", "ci": [lo, hi]} (means over seeds and
    queries; the interval of b - a)."""
    if a.shape != b.shape:
        raise CirlabError(f"A has {a.shape[0]} seed(s) of {a.shape[1]} queries, B {b.shape[0]} of {b.shape[1]}; "
                          "give as many files on each side")
    s, q = a.shape
    d = b - a  # (S, Q)
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    chunk = max(1, 2_000_000 // max(q, 1))  # resamples per block, to bound memory
    for lo in range(0, resamples, chunk):
        n = min(chunk, resamples - lo)
        w = rng.multinomial(q, np.full(q, 1.0 / q), size=n) / q  # (n, Q): query weights of each resample
        per_seed = w @ d.T  # (n, S): each seed's mean difference over the drawn queries
        if s > 1:
            v = rng.multinomial(s, np.full(s, 1.0 / s), size=n) / s  # (n, S): seed weights
            stats[lo:lo + n] = (per_seed * v).sum(1)
        else:
            stats[lo:lo + n] = per_seed[:, 0]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return {"a": float(a.mean()), "b": float(b.mean()), "diff": float(d.mean()), "ci": [float(lo), float(hi)]}


def compare_files(a_files: list, b_files: list, metrics=DEFAULT_METRICS, resamples: int = 10000,
                  seed: int = 0) -> dict:
    """{metric: paired_bootstrap result} of B minus A, in percent. A metric the files cannot give (Rsubset
    without img_sets, mAP without gt_ranks) is an error unless it is one of the defaults, which are then skipped."""
    if not a_files or not b_files:
        raise CirlabError("compare needs at least one per-query file on each side")
    if len(a_files) != len(b_files):
        raise CirlabError(f"A has {len(a_files)} file(s), B {len(b_files)}: give one file per seed on each side, "
                          "in the same seed order")
    a_recs, keys = _aligned(list(a_files), None)
    b_recs, _ = _aligned(list(b_files), keys)
    return compare_records(a_recs, b_recs, metrics, resamples, seed)


def compare_records(a_recs: list, b_recs: list, metrics=DEFAULT_METRICS, resamples: int = 10000,
                    seed: int = 0) -> dict:
    """As `compare_files`, from records already aligned by query (lists of per-seed record lists)."""
    out = {}
    for m in metrics:
        try:
            a = np.array([metric_values(r, m) for r in a_recs])
            b = np.array([metric_values(r, m) for r in b_recs])
        except CirlabError:
            if m in DEFAULT_METRICS and not m.startswith("R@"):
                continue
            raise
        out[m] = paired_bootstrap(a, b, resamples, seed)
    return out


def format_comparison(result: dict, a_name: str, b_name: str) -> str:
    lines = [f"| metric | A: {a_name} | B: {b_name} | B - A | 95% interval |", "|---|---:|---:|---:|---|"]
    for m, r in result.items():
        lines.append(f"| {m} | {r['a']:.2f} | {r['b']:.2f} | {r['diff']:+.2f} | "
                     f"[{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}] |")
    return "\n".join(lines)
