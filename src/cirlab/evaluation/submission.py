"""Test-server files for CIRR and CIRCO: written from a checkpoint, and checked offline before upload.

CIRR (rc2): a recall file with the top 50 of the split's gallery and a recall_subset file with the top 3 of the
query's img_set, each keyed by pairid as a string, with "version": "rc2" and "metric". CIRCO: {"<id>": [50 ids]}.

The checker lists every problem the servers would reject: a query missing or extra, a wrong list length, an id
given twice, an id outside the split's gallery, the reference in its own CIRR ranking, a subset entry outside the
query's img_set or equal to the reference, missing version/metric keys, a CIRR file over 5 MB. The reference is
not flagged for CIRCO: the maintainers' own example test submission ranks it in 10 of its 800 lists.
"""
from __future__ import annotations

import json
from pathlib import Path

from cirlab.data.readers import circo_gallery_listing, read_split
from cirlab.errors import CirlabError
from cirlab.evaluation.scoring import load_predictions

CIRR_LENGTHS = {"recall": 50, "recall_subset": 3}
CIRCO_LENGTH = 50
CIRR_MAX_BYTES = 5 * 1024 * 1024
TEST_SPLITS = {"cirr": "test1", "circo": "test"}  # the split each test server scores


def _check_lists(name: str, preds: dict, queries: dict, gallery: set | None, length: int, no_reference: bool,
                 subset: bool) -> list:
    problems = []
    for k in queries:
        if k not in preds:
            problems.append(f"{name}: query {k} is missing")
    for k, ranked in preds.items():
        q = queries.get(k)
        if q is None:
            problems.append(f"{name}: key {k!r} is not a query of this split")
            continue
        if not isinstance(ranked, list):
            problems.append(f"{name}: query {k}: expected a list, got {type(ranked).__name__}")
            continue
        ids = [str(x) for x in ranked]
        if len(ids) != length:
            problems.append(f"{name}: query {k}: {len(ids)} ids, expected {length}")
        dups = sorted({x for i, x in enumerate(ids) if x in ids[:i]})
        if dups:
            problems.append(f"{name}: query {k}: ids given twice: {', '.join(dups[:3])}")
        if gallery is not None:
            outside = [x for x in ids if x not in gallery]
            if outside:
                problems.append(f"{name}: query {k}: {len(outside)} ids outside the gallery (first: {outside[0]})")
        if no_reference and q.reference in ids:
            problems.append(f"{name}: query {k}: the reference {q.reference} is in its own ranking")
        if subset:
            members = set(q.subset) - {q.reference}
            stray = [x for x in ids if x not in members and x != q.reference]
            if stray:
                problems.append(f"{name}: query {k}: subset entries outside its img_set: {', '.join(stray[:3])}")
    return problems


def _load(path: Path) -> tuple:
    try:
        return load_predictions(path), None
    except CirlabError as e:
        return None, str(e)


def check_cirr(data_root, split: str, files) -> list:
    data = read_split("cirr", data_root, split)
    queries = {q.key: q for q in data.queries}
    gallery = set(data.gallery)
    problems = []
    for path in map(Path, files):
        if path.exists() and path.stat().st_size > CIRR_MAX_BYTES:
            problems.append(f"{path}: {path.stat().st_size / 2**20:.1f} MB, over the server's 5 MB limit")
        preds, error = _load(path)
        if error:
            problems.append(error)
            continue
        version, metric = preds.pop("version", None), preds.pop("metric", None)
        if version is None:
            problems.append(f"{path}: missing key 'version' (expected \"rc2\")")
        elif version != "rc2":
            problems.append(f"{path}: 'version' is {version!r}, expected \"rc2\"")
        if metric is None:
            problems.append(f"{path}: missing key 'metric' (\"recall\" or \"recall_subset\")")
            lengths = {len(v) for v in preds.values() if isinstance(v, list)}
            metric = "recall_subset" if lengths == {3} else "recall"
        elif metric not in CIRR_LENGTHS:
            problems.append(f"{path}: 'metric' is {metric!r}, expected \"recall\" or \"recall_subset\"")
            continue
        problems += _check_lists(str(path), preds, queries, gallery, CIRR_LENGTHS[metric], True,
                                 metric == "recall_subset")
    return problems


def check_circo(data_root, split: str, files) -> tuple:
    """Problems, and notes (what could not be checked)."""
    data = read_split("circo", data_root, split, require_gallery=False)
    queries = {q.key: q for q in data.queries}
    notes = []
    gallery = set(data.gallery) if data.gallery else None
    if gallery is None:
        notes.append(f"gallery listing {circo_gallery_listing(Path(data_root))[0]} not found: ids were not checked "
                     "against the gallery")
    problems = []
    for path in map(Path, files):
        preds, error = _load(path)
        if error:
            problems.append(error)
            continue
        problems += _check_lists(str(path), preds, queries, gallery, CIRCO_LENGTH, False, False)
    return problems, notes


def check_submission(dataset: str, data_root, split: str, files) -> tuple:
    """(problems, notes) for the given files; no problems means the server would accept them."""
    if not files:
        raise CirlabError("no submission files given")
    if dataset == "cirr":
        return check_cirr(data_root, split, files), []
    if dataset == "circo":
        return check_circo(data_root, split, files)
    raise CirlabError(f"test-server files exist for cirr and circo, not {dataset!r}")


def _write_json(path: Path, obj) -> None:
    from cirlab.atomic import write_atomic

    write_atomic(path, lambda f: f.write(json.dumps(obj).encode()))


def write_submission(model, dataset: str, data_root, out, split: str | None = None, progress: bool = True) -> list:
    """Rank the test split with `model` and write the server files into `out`; returns their paths."""
    import torch

    from cirlab.data.images import PixelStore
    from cirlab.evaluation.protocols import encode_gallery, encode_queries, rank

    split = split or TEST_SPLITS.get(dataset)
    if split is None:
        raise CirlabError(f"test-server files exist for cirr and circo, not {dataset!r}")
    data = read_split(dataset, data_root, split)
    store = PixelStore(data.gallery, model.preprocess)
    with torch.no_grad():
        names, gfeat = encode_gallery(model, data, store, progress=progress)
        qfeat = encode_queries(model, data.queries, store, split=data)
    ranking = rank(model, data.queries, qfeat, names, gfeat, remove_reference=dataset == "cirr", depth=50)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dataset == "circo":
        path = out / f"circo_{split}_submission.json"
        _write_json(path, {q.key: [int(x) for x in r] for q, r in zip(data.queries, ranking.ranked)})
        return [path]
    recall = out / f"{split}_pred_ranks_recall.json"
    subset = out / f"{split}_pred_ranks_recall_subset.json"
    _write_json(recall, {"version": "rc2", "metric": "recall",
                         **{q.key: r for q, r in zip(data.queries, ranking.ranked)}})
    _write_json(subset, {"version": "rc2", "metric": "recall_subset",
                         **{q.key: r[:3] for q, r in zip(data.queries, ranking.subset_ranked)}})
    return [recall, subset]
