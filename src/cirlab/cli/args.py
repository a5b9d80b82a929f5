"""Argument helpers shared by the command modules."""
from __future__ import annotations

import json
from pathlib import Path

from cirlab.errors import CirlabError

DATASETS = ("synth", "synth-circo", "cirr", "circo", "fashioniq", "shoes")  # what --dataset accepts
JOINS = ("and", "reversed", "both")  # FashionIQ's ways of joining a query's two captions


def json_arg(text: str | None, what: str) -> dict:
    """A JSON object given inline or as a file path; {} when not given."""
    if not text:
        return {}
    try:
        value = json.loads(Path(text).read_text() if Path(text).is_file() else text)
    except json.JSONDecodeError as e:
        raise CirlabError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CirlabError(f"{what} must be a JSON object")
    return value
