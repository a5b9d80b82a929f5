"""FashionIQ (Wu et al. 2021): captions/cap.{category}.{split}.json and image_splits/split.{category}.{split}.json.

Each row holds a candidate (the reference), a target (absent in test) and two relative captions. Protocol choices,
each an option with the default most CIR papers use (CLIP4Cir, BLIP4CIR, SPRC):
- `join`: "and" (default) writes `"{c1.strip('.?, ').capitalize()} and {c2.strip('.?, ')}"`; "reversed" swaps the
  two captions; "both" scores both orders and averages the two similarities.
- the gallery of a category is that category's split images; the reference stays in the ranking by default
  (`remove_reference=True` removes it, as some papers do).
Images are images/<asin>.jpg or images/<asin>.png, whichever is present (detected once per data root).
Query keys are "<category>/<row>", row = 0-based position in the captions file, as `cirlab score` expects.
"""
from __future__ import annotations

from pathlib import Path

from cirlab.data.split import Split, field, load_json
from cirlab.errors import CirlabError
from cirlab.types import Query

CATEGORIES = ("dress", "shirt", "toptee")
JOINS = ("and", "reversed", "both")


def join_captions(c1: str, c2: str) -> str:
    return f"{c1.strip('.?, ').capitalize()} and {c2.strip('.?, ')}"


def image_extension(root: Path) -> str:
    """'.jpg' or '.png', whichever the images folder holds (jpg when it holds neither)."""
    folder = root / "images"
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.suffix.lower() in (".jpg", ".png"):
                return entry.suffix
    return ".jpg"


def read_fashioniq(root, split: str, category: str, join: str = "and") -> Split:
    root = Path(root)
    if category not in CATEGORIES:
        raise CirlabError(f"unknown FashionIQ category {category!r}; choose one of {', '.join(CATEGORIES)}")
    if join not in JOINS:
        raise CirlabError(f"unknown caption join {join!r}; choose one of {', '.join(JOINS)}")
    cap_path = root / "captions" / f"cap.{category}.{split}.json"
    split_path = root / "image_splits" / f"split.{category}.{split}.json"
    rows, names = load_json(cap_path), load_json(split_path)
    if not isinstance(rows, list):
        raise CirlabError(f"{cap_path}: expected a JSON list of rows")
    if not isinstance(names, list):
        raise CirlabError(f"{split_path}: expected a JSON list of image names")
    ext = image_extension(root)
    gallery = {n: str(root / "images" / f"{n}{ext}") for n in names}
    queries = []
    for i, row in enumerate(rows):
        ref = field(row, "candidate", cap_path, i, str)
        caps = field(row, "captions", cap_path, i, list)
        if len(caps) != 2 or not all(isinstance(c, str) for c in caps):
            raise CirlabError(f"{cap_path}: row {i} field 'captions' should hold two strings")
        target = row.get("target")
        if target is not None and not isinstance(target, str):
            raise CirlabError(f"{cap_path}: row {i} field 'target' should be str")
        forward, backward = join_captions(caps[0], caps[1]), join_captions(caps[1], caps[0])
        text = backward if join == "reversed" else forward
        alt = (backward,) if join == "both" else ()
        queries.append(Query(f"{category}/{i}", ref, text, (target,) if target else (), (), alt))
    return Split("fashioniq", f"{category}.{split}", queries, gallery)
