"""The split record every reader returns, and the helpers the readers share: annotation JSON that names its file
on error, row fields that name file, row and field, and caption caches attached to a split's gallery."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cirlab.errors import CirlabError


@dataclass
class Split:
    dataset: str
    name: str
    queries: list
    gallery: dict  # name -> absolute path
    captions: dict = field(default_factory=dict)  # name -> final caption (MCoT cache or the synthetic oracle)
    caption_levels: dict = field(default_factory=dict)  # name -> {level: text} of the same records

    def caption_texts(self, names, level: str = "final_caption") -> list:
        """Captions of `names` at one level ("final_caption" or an MCoT level such as "objects")."""
        if level == "final_caption":
            return [self.captions[n] for n in names]
        return [self.caption_levels[n][level] for n in names]


def read_caption_records(path, required: bool = True) -> dict:
    """image -> its newest record in a caption cache (JSONL records with image, levels, final_caption), the one
    reader of caption files (training, evaluation, serving and the index read through it). A partial last line (a
    caption run still writing) is left out; a malformed line or a record without `final_caption` names the file and
    line number."""
    from cirlab.jsonl import read_records

    path = Path(path)
    if not path.exists():
        if required:
            raise CirlabError(f"caption file not found: {path}")
        return {}
    return read_records(path, _caption_key, "caption record")


def _caption_key(rec: dict) -> str:
    if not isinstance(rec["final_caption"], str) or not isinstance(rec.get("levels", {}), dict):
        raise TypeError("final_caption must be a string and levels an object")
    return rec["image"]


def attach_captions(split: Split, path, required: bool = True) -> Split:
    """Read a caption cache into the split's gallery captions (final caption and levels); records of images outside
    the gallery are skipped."""
    for name, rec in read_caption_records(path, required).items():
        if name in split.gallery:
            split.captions[name] = rec["final_caption"]
            split.caption_levels[name] = dict(rec.get("levels", {}))
    return split


def load_json(path: Path):
    if not path.exists():
        raise CirlabError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CirlabError(f"malformed JSON in {path}: {e}") from None


def field(row, name: str, path: Path, i: int, kind=None):
    if not isinstance(row, dict) or name not in row:
        raise CirlabError(f"{path}: row {i} has no field {name!r}")
    value = row[name]
    if kind is not None and not isinstance(value, kind):
        raise CirlabError(f"{path}: row {i} field {name!r} should be {kind.__name__}, got {type(value).__name__}")
    return value
