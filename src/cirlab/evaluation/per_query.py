"""Per-query results: where each query's target landed, so that any two evaluations compare query by query.

One JSONL line per query, `{"query": KEY, "rank": R, "subset_rank": S}`: R is the 1-based rank of the first
ground truth in the ranking the protocol scores (the reference removed where the protocol removes it), S its rank
among the query's img_set members other than the reference, or null where the split has no img_set (or the target
is not a member). Queries with several ground truths (CIRCO) add `"gt_ranks"`, the rank of each, in the order of the
annotation. From these ranks the official metrics follow exactly (`metrics_from_records`): R@K counts R <= K,
Recall_subset@K counts S <= K (null is a miss, as an empty subset ranking is in the official scorer), and CIRCO's
AP@K is the sum over ground truths ranked within K of (ground truths ranked at or above it) / rank, over
min(K, number of ground truths).
"""
from __future__ import annotations

import json
from pathlib import Path

from cirlab.atomic import write_atomic
from cirlab.errors import CirlabError


def write_records(path, records: list) -> Path:
    """Write the records as JSONL in one atomic replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    write_atomic(path, lambda f: f.write(body))
    return path


def read_records(path) -> list:
    """The records of a per-query file; a malformed line or a query given twice names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise CirlabError(f"per-query file not found: {path}")
    out, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key, rank = str(rec["query"]), int(rec["rank"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CirlabError(f"{path}: line {n} is not a per-query record "
                              f'({{"query", "rank", "subset_rank"}}): {e}') from None
        if rank < 1:
            raise CirlabError(f"{path}: line {n}: rank must be 1 or more, got {rank}")
        if key in seen:
            raise CirlabError(f"{path}: line {n}: query {key!r} appears twice")
        seen.add(key)
        out.append(rec)
    if not out:
        raise CirlabError(f"{path}: no per-query records")
    return out


def _hits(ranks: list, k: int) -> list:
    return [1.0 if r is not None and r <= k else 0.0 for r in ranks]


def average_precision(gt_ranks: list, k: int) -> float:
    """CIRCO's AP@k from the ranks of a query's ground truths."""
    if not gt_ranks:
        return 0.0
    within = sorted(r for r in gt_ranks if r <= k)
    return sum((i + 1) / r for i, r in enumerate(within)) / min(k, len(gt_ranks))


def metric_values(records: list, metric: str) -> list:
    """Each query's value of `metric` (R@K, Rsubset@K or mAP@K), in percent, in record order."""
    name, _, k = metric.partition("@")
    try:
        k = int(k)
    except ValueError:
        raise CirlabError(f"unknown metric {metric!r}; use R@K, Rsubset@K or mAP@K") from None
    if name == "R":
        return [100.0 * h for h in _hits([r["rank"] for r in records], k)]
    if name == "Rsubset":
        if all(r.get("subset_rank") is None for r in records):
            raise CirlabError(f"{metric}: these results have no subset ranks (the split has no img_set)")
        return [100.0 * h for h in _hits([r.get("subset_rank") for r in records], k)]
    if name == "mAP":
        if any("gt_ranks" not in r for r in records):
            raise CirlabError(f"{metric}: these results have no gt_ranks (not a multi-target split)")
        return [100.0 * average_precision(r["gt_ranks"], k) for r in records]
    raise CirlabError(f"unknown metric {metric!r}; use R@K, Rsubset@K or mAP@K")


def metrics_from_records(records: list, metrics: list) -> dict:
    """The mean of each metric over the queries, in percent."""
    return {m: sum(v := metric_values(records, m)) / len(v) for m in metrics}


def records_from_ranking(queries: list, target_ranks: list, subset_ranked: list, gt_ranks: list | None) -> list:
    """Per-query records from an evaluation: the full ranks of each query's first ground truth (`target_ranks`),
    its subset rankings (lists of names) and, for multi-target splits, the ranks of every ground truth."""
    out = []
    for i, q in enumerate(queries):
        members = subset_ranked[i] if subset_ranked else []
        target = q.targets[0]
        rec = {"query": q.key, "rank": int(target_ranks[i]),
               "subset_rank": members.index(target) + 1 if target in members else None}
        if gt_ranks is not None:
            rec["gt_ranks"] = [int(r) for r in gt_ranks[i]]
        out.append(rec)
    return out
