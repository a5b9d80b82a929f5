"""Score a predictions file from annotation files alone (no images), as the official scorers do.

Predictions are a JSON object {query_key: [ranked image ids]}: CIRR keys are pairids (the file may also carry the
test server's "version" and "metric" keys), CIRCO keys are query ids, FashionIQ keys "<category>/<row>" and Shoes
keys "<row>" (row = 0-based position in the annotation file). Each ranked list is taken as given. A missing query,
an unknown key, a key given twice or an id repeated within one list is an error that names the file and the key.
"""
from __future__ import annotations

import json
from pathlib import Path

from cirlab.data.readers import read_split
from cirlab.errors import CirlabError
from cirlab.evaluation.protocols import benchmark_metrics

CIRR_META_KEYS = ("version", "metric")


def _no_duplicate_keys(path: Path):
    def hook(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise CirlabError(f"{path}: key {k!r} appears twice")
            seen.add(k)
        return dict(pairs)
    return hook


def load_predictions(path) -> dict:
    """Read a predictions JSON object; a key given twice is an error (json would keep the last silently)."""
    path = Path(path)
    if not path.exists():
        raise CirlabError(f"predictions file not found: {path}")
    try:
        data = json.loads(path.read_text(), object_pairs_hook=_no_duplicate_keys(path))
    except json.JSONDecodeError as e:
        raise CirlabError(f"malformed JSON in {path}: {e}") from None
    if not isinstance(data, dict):
        raise CirlabError(f"{path}: expected a JSON object mapping query keys to ranked lists of image ids")
    return data


def ranked_lists(path, queries: list, meta_keys=()) -> list:
    """The ranked list of every query, in query order, after checking keys and duplicates."""
    preds = {k: v for k, v in load_predictions(path).items() if k not in meta_keys}
    keys = [q.key for q in queries]
    missing = [k for k in keys if k not in preds]
    if missing:
        raise CirlabError(f"{path}: {len(missing)} of {len(keys)} queries have no prediction "
                          f"(first: {', '.join(missing[:5])})")
    known = set(keys)
    extra = [k for k in preds if k not in known]
    if extra:
        raise CirlabError(f"{path}: {len(extra)} keys are not queries of this split (first: {', '.join(extra[:5])})")
    out = []
    for k in keys:
        ranked = preds[k]
        if not isinstance(ranked, list):
            raise CirlabError(f"{path}: query {k}: expected a list of image ids, got {type(ranked).__name__}")
        ids = [str(x) for x in ranked]
        if len(set(ids)) != len(ids):
            dup = next(x for i, x in enumerate(ids) if x in ids[:i])
            raise CirlabError(f"{path}: query {k}: image id {dup!r} appears twice in its ranking")
        out.append(ids)
    return out


def score(dataset: str, data_root, split: str, predictions, subset_predictions=None, join: str = "and") -> dict:
    """Official metrics (percent) of a predictions file against the split's annotations."""
    data = read_split(dataset, data_root, split, join=join, require_gallery=False)
    queries = [q for q in data.queries if q.targets]
    if not queries:
        raise CirlabError(f"{dataset} split {split!r} has no ground truth in {data_root}; its test server scores it")
    if len(queries) != len(data.queries):
        raise CirlabError(f"{dataset} split {split!r}: {len(data.queries) - len(queries)} queries lack a target")
    meta = CIRR_META_KEYS if dataset in ("cirr", "synth") else ()
    ranked = ranked_lists(predictions, queries, meta)
    subset = None
    if subset_predictions is not None:
        if dataset not in ("cirr", "synth"):
            raise CirlabError("--subset-predictions applies to CIRR only")
        subset = ranked_lists(subset_predictions, queries, meta)
    return benchmark_metrics(dataset, queries, ranked, subset, cirr_avg=True)
