"""Pure retrieval metrics on ranked lists, as the official CIRR and CIRCO scorers define them.

A ranked list is taken as given. R@K: 1 when the target is among the first K entries. Recall_subset@K: the same,
on the list restricted to the query's subset. AP@K (CIRCO): the sum over k <= K of precision@k at each position k
holding a ground truth, divided by min(K, number of ground truths). Values are returned in percent, averaged over
queries.
"""
from __future__ import annotations

from typing import Sequence


def recall_at_k(ranked: Sequence[Sequence[str]], targets: Sequence[str], k: int) -> float:
    if not ranked:
        return 0.0
    hits = sum(1 for r, t in zip(ranked, targets) if t in r[:k])
    return 100.0 * hits / len(ranked)


def subset_recall_at_k(ranked: Sequence[Sequence[str]], subsets: Sequence[Sequence[str]],
                       targets: Sequence[str], k: int) -> float:
    """Recall within each query's subset: the full ranking filtered to the subset members, order kept."""
    restricted = []
    for r, members in zip(ranked, subsets):
        keep = set(members)
        restricted.append([x for x in r if x in keep])
    return recall_at_k(restricted, targets, k)


def average_precision_at_k(ranked: Sequence[str], gts: Sequence[str], k: int) -> float:
    gt = set(gts)
    if not gt:
        return 0.0
    hits, total = 0, 0.0
    for i, x in enumerate(ranked[:k]):
        if x in gt:
            hits += 1
            total += hits / (i + 1)
    return total / min(k, len(gt))


def map_at_k(ranked: Sequence[Sequence[str]], gts: Sequence[Sequence[str]], k: int) -> float:
    if not ranked:
        return 0.0
    return 100.0 * sum(average_precision_at_k(r, g, k) for r, g in zip(ranked, gts)) / len(ranked)
