"""A second-stage re-ranker: the cascade's scores by hand, its evaluation against each stage alone (exact
identities at K = 1, K = 10 and K = the whole gallery), and the engine's re-ranking against brute force."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from cirlab.evaluation.per_query import read_records
from cirlab.evaluation.protocols import cascade_scores
from helpers.cli import run_cli

INF = float("-inf")


def cli(*args):
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_cascade_scores_rank_the_top_k_by_the_second_stage_then_the_rest_by_the_first():
    first = torch.tensor([[0.9, 0.8, 0.1, INF, 0.3], [0.0, 0.2, 0.4, 0.6, 0.8]])
    second = torch.tensor([[0.1, 0.5, 0.9, 0.99, 0.0], [0.9, 0.8, 0.7, 0.6, 0.5]])
    out = cascade_scores(first, second, 2)
    assert out[0].argsort(descending=True).tolist()[:4] == [1, 0, 4, 2]  # top 2 by second, the rest by first
    assert out[0, 3] == INF  # a removed reference stays removed, though the second stage scores it highest
    assert out[1].argsort(descending=True).tolist() == [3, 4, 2, 1, 0]
    whole = cascade_scores(first, second, 5)
    assert whole[1].argsort(descending=True).tolist() == second[1].argsort(descending=True).tolist()


def test_eval_cascade_matches_each_stage_where_it_must(clip_dir, world, tmp_path):
    for m in ("text_only", "sum"):
        cli("init", "--method", m, "--backbone", clip_dir, "--out", tmp_path / m)
    runs = {}
    for name, extra in (("first", []), ("second", None), ("k1", ["--rerank-k", "1"]), ("k10", ["--rerank-k", "10"]),
                        ("all", ["--rerank-k", "100000"])):
        ckpt = tmp_path / ("sum" if extra is None else "text_only")
        rerank = [] if extra in (None, []) else ["--rerank", tmp_path / "sum", *extra]
        cli("eval", "--checkpoint", ckpt, *rerank, "--data-root", world, "--split", "test1", "--json",
            tmp_path / f"{name}.json", "--no-progress")
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    m = {k: v["metrics"] for k, v in runs.items()}
    assert m["k1"]["R@1"] == m["first"]["R@1"]  # the top 1 rescored alone is still the first stage's
    assert m["k10"]["R@10"] == m["first"]["R@10"] and m["k10"]["R@50"] == m["first"]["R@50"]  # the same top 10
    first, k10 = (read_records(tmp_path / f"{n}.per_query.jsonl") for n in ("first", "k10"))
    for a, b in zip(first, k10):  # a target outside the top 10 keeps its rank; inside, it stays inside
        assert (b["rank"] == a["rank"]) if a["rank"] > 10 else (b["rank"] <= 10)
    assert any(a["rank"] != b["rank"] for a, b in zip(first, k10))  # the top 10 was reordered
    assert read_records(tmp_path / "all.per_query.jsonl") == read_records(tmp_path / "second.per_query.jsonl")
    assert runs["k10"]["rerank"]["k"] == 10 and runs["k10"]["rerank"]["method"] == "sum"


def test_engine_reranks_the_first_results_with_the_second_model(clip_dir, world, tmp_path):
    from cirlab.serving.engine import Engine

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((Path(world) / "test1").glob("*.png"))[:30]:
        shutil.copy(p, photos / p.name)
    for m in ("text_only", "sum"):
        cli("index", "build", "--method", m, "--backbone", clip_dir, "--images", photos, "--out", tmp_path / m,
            "--no-progress")
    query = ("test1-00003", "make the circle red")
    first = [h.id for h in Engine(tmp_path / "text_only").search(*query, k=29)]
    second = [h.id for h in Engine(tmp_path / "sum").search(*query, k=29)]
    whole = Engine(tmp_path / "text_only", rerank=tmp_path / "sum" / "checkpoint", rerank_k=29).search(*query, k=29)
    assert [h.id for h in whole] == second  # every candidate rescored: the second model's own ranking
    part = [h.id for h in Engine(tmp_path / "text_only", rerank=tmp_path / "sum" / "checkpoint",
                                 rerank_k=5).search(*query, k=10)]
    assert part[:5] == [i for i in second if i in first[:5]] and part[5:] == first[5:10]
    out = json.loads(cli("search", "--index", tmp_path / "text_only", "--image-id", query[0], "--text", query[1],
                         "--rerank", tmp_path / "sum" / "checkpoint", "--rerank-k", "5", "-k", "10",
                         "--json").stdout)
    assert [h["id"] for h in out["hits"]] == part


def test_feedback_moves_the_query_toward_more_and_away_from_less(clip_dir, world, tmp_path):
    import numpy as np

    from cirlab.serving.engine import Engine

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((Path(world) / "test1").glob("*.png"))[:30]:
        shutil.copy(p, photos / p.name)
    cli("index", "build", "--method", "sum", "--backbone", clip_dir, "--images", photos, "--out", tmp_path / "ix",
        "--no-progress")
    engine = Engine(tmp_path / "ix")
    query = ("test1-00003", "make the circle red")
    plain = [h.id for h in engine.search(*query, k=28)]
    liked, disliked = plain[-1], plain[0]  # the worst result liked, the best disliked
    snap = engine.index.snapshot
    vec = {i: snap.vectors[snap.position[i]][0] for i in snap.ids}
    q = engine.query_vector(*query)
    moved = q + 0.5 * vec[liked] - 0.25 * vec[disliked]
    moved /= np.linalg.norm(moved)
    assert np.allclose(engine.feedback_vector(q, [liked], [disliked]), moved, atol=1e-5)
    hits = engine.search(*query, k=26, more=[liked], less=[disliked])
    truth = sorted((i for i in snap.ids if i not in {query[0], liked, disliked}), key=lambda i: -float(moved @ vec[i]))
    assert [h.id for h in hits] == truth[:26]  # the feedback items themselves are left out, as the reference is
    weighted = engine.feedback_vector(q, [(liked, 3.0), (plain[-2], 1.0)])
    mean = (3 * vec[liked] + vec[plain[-2]]) / 4
    assert np.allclose(weighted, (q + 0.5 * mean) / np.linalg.norm(q + 0.5 * mean), atol=1e-5)
    out = json.loads(cli("search", "--index", tmp_path / "ix", "--image-id", query[0], "--text", query[1], "-k", "26",
                         "--more", liked, "--less", disliked, "--json").stdout)
    assert [h["id"] for h in out["hits"]] == truth[:26]

    session = tmp_path / "session.json"
    one = json.loads(cli("search", "--index", tmp_path / "ix", "--session", session, "--image-id", query[0], "--text",
                         query[1], "-k", "5", "--json").stdout)
    two = json.loads(cli("search", "--index", tmp_path / "ix", "--session", session, "--choose", one["hits"][3]["id"],
                         "--text", "now make it small", "-k", "5", "--json").stdout)
    assert two["turn"] == 2 and two["reference"] == one["hits"][3]["id"]
    turns = json.loads(session.read_text())["turns"]
    assert [t["reference"] for t in turns] == [query[0], one["hits"][3]["id"]]
    assert turns[0]["chosen"] == two["reference"]
