"""Readers for the benchmark layouts the synthetic world is written in (CIRR and CIRCO).

Both give a `Split`: the queries and the gallery (image name -> file path). Malformed files raise a CirlabError that
names the file, the row and the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cirlab.errors import CirlabError
from cirlab.types import Query


@dataclass
class Split:
    dataset: str
    name: str
    queries: list
    gallery: dict  # name -> absolute path
    captions: dict = field(default_factory=dict)  # name -> final caption, when known (synthetic oracle)


def load_json(path: Path):
    if not path.exists():
        raise CirlabError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CirlabError(f"malformed JSON in {path}: {e}") from None


def _field(row, name: str, path: Path, i: int, kind=None):
    if not isinstance(row, dict) or name not in row:
        raise CirlabError(f"{path}: row {i} has no field {name!r}")
    value = row[name]
    if kind is not None and not isinstance(value, kind):
        raise CirlabError(f"{path}: row {i} field {name!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


def read_cirr(root, split: str, dataset: str = "cirr") -> Split:
    """CIRR layout: captions/cap.rc2.{split}.json and image_splits/split.rc2.{split}.json."""
    root = Path(root)
    if not root.exists():
        raise CirlabError(f"data root not found: {root}")
    cap_path = root / "captions" / f"cap.rc2.{split}.json"
    split_path = root / "image_splits" / f"split.rc2.{split}.json"
    rows = load_json(cap_path)
    names = load_json(split_path)
    if not isinstance(rows, list):
        raise CirlabError(f"{cap_path}: expected a JSON list of queries")
    if not isinstance(names, dict):
        raise CirlabError(f"{split_path}: expected a JSON object mapping image names to paths")
    gallery = {n: str((root / p).resolve()) for n, p in names.items()}
    queries = []
    for i, row in enumerate(rows):
        pairid = _field(row, "pairid", cap_path, i, int)
        ref = _field(row, "reference", cap_path, i, str)
        text = _field(row, "caption", cap_path, i, str)
        members = tuple(_field(_field(row, "img_set", cap_path, i, dict), "members", cap_path, i, list))
        target = row.get("target_hard")
        for n in (ref, target, *members):
            if n is not None and n not in gallery:
                raise CirlabError(f"{cap_path}: row {i} names image {n!r}, which is not in {split_path}")
        queries.append(Query(str(pairid), ref, text, (target,) if target else (), members))
    captions = {}
    oracle = root / "synth" / "captions.jsonl"
    if oracle.exists():
        for line in oracle.read_text().splitlines():
            rec = json.loads(line)
            if rec["image"] in gallery:
                captions[rec["image"]] = rec["final_caption"]
    return Split(dataset, split, queries, gallery, captions)


def read_circo(root, split: str) -> Split:
    """CIRCO layout: annotations/{split}.json; gallery listed by image_info_unlabeled2017.json."""
    root = Path(root)
    ann_path = root / "annotations" / f"{split}.json"
    rows = load_json(ann_path)
    info_path = root / "image_info_unlabeled2017.json"
    info = load_json(info_path)
    folder = root / "unlabeled2017"
    gallery = {}
    for i, img in enumerate(_field(info, "images", info_path, 0, list)):
        gallery[str(_field(img, "id", info_path, i, int))] = str(folder / _field(img, "file_name", info_path, i, str))
    queries = []
    for i, row in enumerate(rows):
        ref = str(_field(row, "reference_img_id", ann_path, i, int))
        text = _field(row, "relative_caption", ann_path, i, str)
        gts = tuple(str(g) for g in row.get("gt_img_ids", []))
        queries.append(Query(str(_field(row, "id", ann_path, i, int)), ref, text, gts, ()))
    return Split("circo", split, queries, gallery)


def read_split(dataset: str, root, split: str) -> Split:
    """Entry point used by training and evaluation; `synth` is the CIRR layout written by `cirlab synth`."""
    if dataset in ("synth", "cirr"):
        return read_cirr(root, split, dataset)
    if dataset == "synth-circo":
        return read_circo(Path(root) / "circo", split)
    if dataset == "circo":
        return read_circo(root, split)
    raise CirlabError(f"unknown dataset {dataset!r}; choose one of synth, synth-circo, cirr, circo")
