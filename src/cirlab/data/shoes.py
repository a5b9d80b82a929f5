"""Shoes (Guo et al. 2018): relative_captions_shoes.json, train_im_names.txt, eval_im_names.txt.

A query (row of relative_captions_shoes.json) is in `test` when both its reference and target are eval images
(1,761 queries) and in `train` when both are train images (8,990); the test gallery is the eval images, the train
gallery the train images. The reference stays in the ranking by default, as in FashionIQ. Images are found by file
name anywhere under images/ (the Attribute Discovery archive keeps them in womens_* folders). Query keys are
"<row>", row = 0-based position in relative_captions_shoes.json.
"""
from __future__ import annotations

from pathlib import Path

from cirlab.data.split import Split, field, load_json
from cirlab.errors import CirlabError
from cirlab.types import Query

SPLIT_FILES = {"train": "train_im_names.txt", "test": "eval_im_names.txt"}


def read_names(path: Path) -> list:
    if not path.exists():
        raise CirlabError(f"image list not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def find_images(root: Path) -> dict:
    """File name -> path for every image under root/images (recursively)."""
    folder = root / "images"
    if not folder.is_dir():
        return {}
    return {p.name: str(p) for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")}


def read_shoes(root, split: str) -> Split:
    root = Path(root)
    if split not in SPLIT_FILES:
        raise CirlabError(f"Shoes has splits {', '.join(SPLIT_FILES)}, not {split!r}")
    names = read_names(root / SPLIT_FILES[split])
    keep = set(names)
    cap_path = root / "relative_captions_shoes.json"
    rows = load_json(cap_path)
    if not isinstance(rows, list):
        raise CirlabError(f"{cap_path}: expected a JSON list of rows")
    found = find_images(root)
    gallery = {n: found.get(n, str(root / "images" / n)) for n in names}
    queries = []
    for i, row in enumerate(rows):
        ref = field(row, "ReferenceImageName", cap_path, i, str)
        target = field(row, "ImageName", cap_path, i, str)
        text = field(row, "RelativeCaption", cap_path, i, str)
        if ref in keep and target in keep:
            queries.append(Query(str(i), ref, text, (target,)))
    return Split("shoes", split, queries, gallery)
