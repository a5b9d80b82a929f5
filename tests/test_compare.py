"""Per-query results reproduce the official metrics, and `cirlab compare` is a paired bootstrap that an
independent implementation reproduces."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from cirlab.cli.main import main
from cirlab.evaluation.per_query import metrics_from_records, read_records, write_records
from cirlab.evaluation.protocols import benchmark_metrics, rank
from cirlab.methods.base import CIRModel
from cirlab.types import Query


class _Dot:
    """Anything with the interface's `similarity` can be ranked; the base class's is a dot product."""
    similarity = CIRModel.similarity

    def __init__(self):
        pass


def _queries(n_queries: int, names: list, multi: bool, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n_queries):
        ref, *targets = rng.sample(names, 5 if multi else 2)
        subset = () if multi else tuple(rng.sample([n for n in names if n not in (ref, targets[0])], 4)
                                         + [ref, targets[0]])
        out.append(Query(f"q{i}", ref, "text", tuple(targets), subset))
    return out


@pytest.mark.parametrize("multi", [False, True])
def test_records_give_exactly_the_protocols_metrics(multi):
    torch.manual_seed(0)
    names = [f"img{i}" for i in range(120)]
    queries = _queries(200, names, multi, seed=1)
    gallery = torch.nn.functional.normalize(torch.randn(len(names), 8), dim=-1)
    index = {n: i for i, n in enumerate(names)}
    # queries near their first target, so that ranks spread from 1 to far beyond the depth of 50
    qfeat = torch.nn.functional.normalize(
        torch.stack([gallery[index[q.targets[0]]] * 0.6 + torch.randn(8) for q in queries]), dim=-1)
    ranking = rank(_Dot(), queries, qfeat, names, gallery, remove_reference=not multi, depth=50,
                   all_targets=multi)
    records = ranking.records(queries)
    dataset = "circo" if multi else "cirr"
    official = benchmark_metrics(dataset, queries, ranking.ranked, ranking.subset_ranked)
    mine = metrics_from_records(records, list(official))
    assert mine == pytest.approx(official, abs=1e-9)
    assert any(r["rank"] > 50 for r in records) and any(r["rank"] == 1 for r in records)
    scores = qfeat @ gallery.t()
    for q, r, s in zip(queries, records, scores):  # beyond the top list, the rank is the full sort's
        if not multi:
            s[index[q.reference]] = float("-inf")
        assert r["rank"] == int((s > s[index[q.targets[0]]]).sum()) + 1
        if multi:
            assert r["gt_ranks"][0] == r["rank"] and len(r["gt_ranks"]) == len(q.targets)
        else:
            members = [m for m in q.subset if m != q.reference]
            assert r["subset_rank"] == int((s[[index[m] for m in members]] > s[index[q.targets[0]]]).sum()) + 1


def _independent_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> tuple:
    """A plain loop: draw seed and query indices with replacement, the same for both sides."""
    rng = np.random.default_rng(seed + 12345)
    s, q = a.shape
    stats = []
    for _ in range(resamples):
        seeds = rng.integers(0, s, s) if s > 1 else np.zeros(1, dtype=int)
        qs = rng.integers(0, q, q)
        stats.append(np.mean([b[i, qs].mean() - a[i, qs].mean() for i in seeds]))
    return tuple(np.percentile(stats, [2.5, 97.5]))


def _write_ranks(path, ranks: list, subset: list) -> None:
    write_records(path, [{"query": f"q{i}", "rank": int(r), "subset_rank": int(s)}
                         for i, (r, s) in enumerate(zip(ranks, subset))])


@pytest.mark.parametrize("seeds", [1, 3])
def test_compare_is_a_paired_bootstrap_an_independent_one_reproduces(tmp_path, capsys, seeds):
    rng = np.random.default_rng(seeds)
    a_files, b_files, a_hits, b_hits = [], [], [], []
    for s in range(seeds):
        skill = rng.normal(size=400)  # a query's difficulty is shared by both methods: the pairing matters
        a = np.maximum(1, np.round(np.exp(1.5 - skill + rng.normal(0, 0.5, 400)))).astype(int)
        b = np.maximum(1, np.round(np.exp(1.3 - skill + rng.normal(0, 0.5, 400)))).astype(int)
        sub_a, sub_b = np.minimum(a, 5), np.minimum(b, 5)
        _write_ranks(tmp_path / f"a{s}.jsonl", a, sub_a)
        _write_ranks(tmp_path / f"b{s}.jsonl", b, sub_b)
        a_files.append(str(tmp_path / f"a{s}.jsonl"))
        b_files.append(str(tmp_path / f"b{s}.jsonl"))
        a_hits.append(100.0 * (a <= 1))
        b_hits.append(100.0 * (b <= 1))
    assert main(["compare", ",".join(a_files), ",".join(b_files), "--resamples", "4000", "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {"R@1", "R@10", "Rsubset@1"}
    a_hits, b_hits = np.array(a_hits), np.array(b_hits)
    r1 = result["R@1"]
    assert r1["a"] == pytest.approx(a_hits.mean(), abs=1e-3) and r1["b"] == pytest.approx(b_hits.mean(), abs=1e-3)
    assert r1["diff"] == pytest.approx((b_hits - a_hits).mean(), abs=1e-3)
    lo, hi = _independent_bootstrap(a_hits, b_hits, 4000, 0)
    assert abs(r1["ci"][0] - lo) < 0.5 and abs(r1["ci"][1] - hi) < 0.5
    assert r1["ci"][0] < r1["diff"] < r1["ci"][1]
    # resampling the two sides apart would give a wider interval: the pairing is what the shared difficulty buys
    if seeds == 1:
        rng = np.random.default_rng(7)
        apart = [b_hits[0, rng.integers(0, 400, 400)].mean() - a_hits[0, rng.integers(0, 400, 400)].mean()
                 for _ in range(2000)]
        assert np.subtract(*np.percentile(apart, [97.5, 2.5])) > r1["ci"][1] - r1["ci"][0]
    assert "paired bootstrap over queries" in out


def test_compare_refuses_mismatched_inputs(tmp_path, capsys):
    _write_ranks(tmp_path / "a.jsonl", [1, 2, 3], [1, 1, 2])
    write_records(tmp_path / "b.jsonl", [{"query": f"x{i}", "rank": 1, "subset_rank": 1} for i in range(3)])
    assert main(["compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 2
    assert "not the same queries" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a.jsonl"), f"{tmp_path / 'a.jsonl'},{tmp_path / 'a.jsonl'}"]) == 2
    assert "one file per seed" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"query": "q0", "rank": 1}\n{"query": "q1"}\n')
    with pytest.raises(Exception, match="line 2"):
        read_records(tmp_path / "bad.jsonl")
    assert main(["compare", str(tmp_path / "a.jsonl"), str(tmp_path / "a.jsonl"), "--metrics", "mAP@5"]) == 2
    assert "gt_ranks" in capsys.readouterr().err
