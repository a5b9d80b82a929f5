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


def attach_captions(split: Split, path, required: bool = True) -> Split:
    """Read a caption cache (JSONL records with image, levels, final_caption) into the split's gallery captions.

    Records of images outside the gallery are skipped; a malformed line names the file and line number.
    """
    path = Path(path)
    if not path.exists():
        if required:
            raise CirlabError(f"caption file not found: {path}")
        return split
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            name, final = rec["image"], rec["final_caption"]
            levels = dict(rec.get("levels", {}))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CirlabError(f"{path}: line {i} is not a caption record ({e})") from None
        if name in split.gallery:
            split.captions[name] = final
            split.caption_levels[name] = levels
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
