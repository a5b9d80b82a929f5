"""Readers for the benchmark layouts: CIRR and CIRCO here, FashionIQ and Shoes in their own modules.

Each gives a `Split`: the queries and the gallery (image name -> file path). Malformed files raise a CirlabError that
names the file, the row and the field.
"""
from __future__ import annotations

import os
from pathlib import Path

from cirlab.data.split import Split, attach_captions, field, load_json  # noqa: F401  (re-exported)
from cirlab.errors import CirlabError
from cirlab.types import Query


def cirr_roots(root: Path) -> tuple:
    """(annotation root, image root) for the layouts in use: annotations at the root (the CIRR repository's
    cirr/ folder used as the root), or under root/cirr/ with the images beside it (CLIP4Cir's cirr_dataset/); the
    split files' relative paths resolve against root/img_raw/ when that folder exists (CIRR's raw images)."""
    ann = root / "cirr" if not (root / "captions").exists() and (root / "cirr" / "captions").exists() else root
    for images in (root / "img_raw", root):
        if images.is_dir():
            return ann, images
    return ann, root


def read_cirr(root, split: str, dataset: str = "cirr") -> Split:
    """CIRR layout: captions/cap.rc2.{split}.json and image_splits/split.rc2.{split}.json."""
    root = Path(root)
    if not root.exists():
        raise CirlabError(f"data root not found: {root}")
    ann, images = cirr_roots(root)
    cap_path = ann / "captions" / f"cap.rc2.{split}.json"
    split_path = ann / "image_splits" / f"split.rc2.{split}.json"
    rows = load_json(cap_path)
    names = load_json(split_path)
    if not isinstance(rows, list):
        raise CirlabError(f"{cap_path}: expected a JSON list of queries")
    if not isinstance(names, dict):
        raise CirlabError(f"{split_path}: expected a JSON object mapping image names to paths")
    base = images.resolve()  # once: resolving each of tens of thousands of paths took most of a read
    gallery = {n: os.path.normpath(os.path.join(base, p)) for n, p in names.items()}
    queries = []
    for i, row in enumerate(rows):
        pairid = field(row, "pairid", cap_path, i, int)
        ref = field(row, "reference", cap_path, i, str)
        text = field(row, "caption", cap_path, i, str)
        members = tuple(field(field(row, "img_set", cap_path, i, dict), "members", cap_path, i, list))
        target = row.get("target_hard")
        for n in (ref, target, *members):
            if n is not None and n not in gallery:
                raise CirlabError(f"{cap_path}: row {i} names image {n!r}, which is not in {split_path}")
        queries.append(Query(str(pairid), ref, text, (target,) if target else (), members))
    return attach_captions(Split(dataset, split, queries, gallery), ann / "synth" / "captions.jsonl", required=False)


def read_chains(root) -> tuple:
    """(the chains' gallery as a Split with the world's captions, the chains) of a synthetic world written with
    `cirlab synth --chains N`: synth/chains.json and image_splits/split.rc2.chains.json."""
    root = Path(root)
    path, listing = root / "synth" / "chains.json", root / "image_splits" / "split.rc2.chains.json"
    if not path.exists():
        raise CirlabError(f"no multi-turn chains in {root} ({path} not found): write the world with "
                          "`cirlab synth --chains N`")
    chains, names = load_json(path), load_json(listing)
    base = root.resolve()
    gallery = {n: os.path.normpath(os.path.join(base, p)) for n, p in names.items()}
    for i, chain in enumerate(chains):
        turns = field(chain, "turns", path, i, list)
        for n in [field(chain, "reference", path, i, str)] + [t.get("target") for t in turns]:
            if n not in gallery:
                raise CirlabError(f"{path}: chain {i} names image {n!r}, which is not in {listing}")
    split = Split("synth", "chains", [], gallery)
    return attach_captions(split, root / "synth" / "captions.jsonl", required=False), chains


def circo_gallery_listing(root: Path) -> tuple:
    """(listing file, image folder) of the COCO 2017 unlabeled gallery, in either layout cirlab accepts:
    COCO2017_unlabeled/annotations/image_info_unlabeled2017.json with COCO2017_unlabeled/unlabeled2017/ (the
    CIRCO repository's layout), or image_info_unlabeled2017.json with unlabeled2017/ at the data root."""
    nested = root / "COCO2017_unlabeled"
    if (nested / "annotations" / "image_info_unlabeled2017.json").exists():
        return nested / "annotations" / "image_info_unlabeled2017.json", nested / "unlabeled2017"
    return root / "image_info_unlabeled2017.json", root / "unlabeled2017"


def read_circo(root, split: str, require_gallery: bool = True) -> Split:
    """CIRCO layout: annotations/{split}.json; the gallery is listed by image_info_unlabeled2017.json.

    Without the listing (`require_gallery=False`, for scoring from annotations alone) the gallery is empty.
    """
    root = Path(root)
    ann_path = root / "annotations" / f"{split}.json"
    rows = load_json(ann_path)
    if not isinstance(rows, list):
        raise CirlabError(f"{ann_path}: expected a JSON list of queries")
    info_path, folder = circo_gallery_listing(root)
    gallery = {}
    if require_gallery or info_path.exists():
        info = load_json(info_path)
        for i, img in enumerate(field(info, "images", info_path, 0, list)):
            gallery[str(field(img, "id", info_path, i, int))] = str(folder / field(img, "file_name", info_path, i,
                                                                                   str))
    queries = []
    for i, row in enumerate(rows):
        ref = str(field(row, "reference_img_id", ann_path, i, int))
        text = field(row, "relative_caption", ann_path, i, str)
        gts = row.get("gt_img_ids", [])
        if not isinstance(gts, list):
            raise CirlabError(f"{ann_path}: row {i} field 'gt_img_ids' should be list")
        queries.append(Query(str(field(row, "id", ann_path, i, int)), ref, text, tuple(str(g) for g in gts), ()))
    return Split("circo", split, queries, gallery)


DATASETS = ("synth", "synth-circo", "cirr", "circo", "fashioniq", "shoes")


def read_split(dataset: str, root, split: str, join: str = "and", category: str | None = None,
               require_gallery: bool = True) -> Split:
    """Entry point used by training, evaluation and scoring.

    `synth` is the CIRR layout written by `cirlab synth` (its CIRCO variant is `synth-circo`). FashionIQ reads one
    category, or all three merged when `category` is None.
    """
    if dataset in ("synth", "cirr"):
        return read_cirr(root, split, dataset)
    if dataset == "synth-circo":
        s = read_circo(Path(root) / "circo", split, require_gallery)
        return Split("synth-circo", s.name, s.queries, s.gallery)
    if dataset == "circo":
        return read_circo(root, split, require_gallery)
    if dataset == "fashioniq":
        from cirlab.data.fashioniq import CATEGORIES, read_fashioniq

        parts = [read_fashioniq(root, split, c, join) for c in ([category] if category else CATEGORIES)]
        if len(parts) == 1:
            return parts[0]
        gallery = {k: v for p in parts for k, v in p.gallery.items()}
        return Split("fashioniq", split, [q for p in parts for q in p.queries], gallery)
    if dataset == "shoes":
        from cirlab.data.shoes import read_shoes

        return read_shoes(root, split)
    raise CirlabError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
