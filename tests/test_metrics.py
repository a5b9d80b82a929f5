"""Metric functions against hand-computed cases and the official definitions; the protocol's ranking against a
plain full-matrix argsort."""
from __future__ import annotations

import pytest
import torch

from cirlab.evaluation.metrics import average_precision_at_k, map_at_k, recall_at_k, subset_recall_at_k
from cirlab.evaluation.protocols import rank
from cirlab.types import Query


def test_recall_at_k_hand_computed():
    ranked = [["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"], ["x", "y", "z"]]
    targets = ["a", "a", "a", "a"]
    assert recall_at_k(ranked, targets, 1) == pytest.approx(25.0)
    assert recall_at_k(ranked, targets, 2) == pytest.approx(50.0)
    assert recall_at_k(ranked, targets, 3) == pytest.approx(75.0)
    assert recall_at_k([], [], 5) == 0.0


def test_subset_recall_keeps_the_order_of_the_full_ranking():
    ranked = [["z", "q", "t", "m"], ["m", "t", "z"]]
    subsets = [["t", "m"], ["t", "m", "z"]]
    targets = ["t", "t"]
    # query 0 restricted: [t, m] -> hit at 1; query 1 restricted: [m, t, z] -> hit at 2
    assert subset_recall_at_k(ranked, subsets, targets, 1) == pytest.approx(50.0)
    assert subset_recall_at_k(ranked, subsets, targets, 2) == pytest.approx(100.0)


def test_average_precision_circo_definition():
    # relevant at positions 1 and 3 of 5; 3 ground truths; K = 5:
    # (1/1 + 2/3) / min(5, 3)
    ranked = ["g1", "n1", "g2", "n2", "n3"]
    assert average_precision_at_k(ranked, ["g1", "g2", "g3"], 5) == pytest.approx((1 + 2 / 3) / 3)
    # K = 2 sees only the first hit: 1 / min(2, 3)
    assert average_precision_at_k(ranked, ["g1", "g2", "g3"], 2) == pytest.approx(0.5)
    # one ground truth at position 4: (1/4) / 1
    assert average_precision_at_k(["a", "b", "c", "g"], ["g"], 10) == pytest.approx(0.25)
    assert average_precision_at_k(["a"], [], 5) == 0.0
    assert map_at_k([ranked, ["a", "b", "c", "g"]], [["g1", "g2", "g3"], ["g"]], 5) == pytest.approx(
        100 * ((1 + 2 / 3) / 3 + 0.25) / 2)


class _Dot:
    """The CIRModel.similarity contract in its simplest form."""

    @staticmethod
    def similarity(q, t):
        return q @ t.t()


def test_rank_matches_full_argsort_and_removes_the_reference():
    torch.manual_seed(0)
    names = [f"img{i}" for i in range(300)]
    gallery = torch.nn.functional.normalize(torch.randn(300, 16), dim=-1)
    qfeat = torch.nn.functional.normalize(torch.randn(37, 16), dim=-1)
    queries = [Query(str(i), names[(i * 7) % 300], "t", (names[i],), tuple(names[i:i + 6])) for i in range(37)]
    ranking = rank(_Dot(), queries, qfeat, names, gallery, remove_reference=True, depth=50, batch_size=8)
    scores = qfeat @ gallery.t()
    for i, q in enumerate(queries):
        full = [names[j] for j in scores[i].argsort(descending=True).tolist() if names[j] != q.reference]
        assert ranking.ranked[i] == full[:50]
        members = [m for m in q.subset if m != q.reference]
        assert ranking.subset_ranked[i] == [n for n in full if n in members]
