"""The multi-level chain-of-thought (MCoT) captioning prompt of CSMCIR (seed 000), and the parser of its answers.

The prompt walks a multimodal LLM from coarse to fine: the category and overall layout, the salient objects and
their attributes, the fine details that tell the image apart from similar ones, and ends with a final caption
written the way a target should be described. The answer is one JSON object with a key per level. The paper's own
prompt text is not available; this wording is cirlab's, versioned by PROMPT_VERSION and hashed into each record.
"""
from __future__ import annotations

import hashlib
import json
import re

PROMPT_VERSION = "mcot-v1"
LEVELS = ("global", "objects", "details")
KEYS = LEVELS + ("final_caption",)

INSTRUCTION = (
    "Describe this image step by step, from coarse to fine.\n"
    "1. global: what kind of image it is and its overall layout.\n"
    "2. objects: the salient objects and their attributes (colour, material, shape, size).\n"
    "3. details: the fine details that tell this image apart from similar images.\n"
    "4. final_caption: one sentence that describes the image precisely, the way a search for exactly this image "
    "would describe it.\n"
    'Answer with only a JSON object with the keys "global", "objects", "details" and "final_caption", each a string.'
)
REPAIR = (
    "Your answer could not be read. Answer again with only a JSON object with the keys \"global\", \"objects\", "
    "\"details\" and \"final_caption\", each a non-empty string, and nothing else."
)


def prompt_hash() -> str:
    return hashlib.sha1((PROMPT_VERSION + INSTRUCTION + REPAIR).encode()).hexdigest()[:12]


def messages(repair_of: str | None = None) -> list:
    """Chat messages in the transformers / OpenAI format; the image goes in the first user turn."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]}]
    if repair_of is not None:
        msgs += [{"role": "assistant", "content": [{"type": "text", "text": repair_of}]},
                 {"role": "user", "content": [{"type": "text", "text": REPAIR}]}]
    return msgs


class MalformedAnswer(ValueError):
    """The model's answer is not a JSON object with every level; `levels` holds what could be read."""

    def __init__(self, message: str, levels: dict):
        super().__init__(message)
        self.levels = levels


def _json_objects(text: str):
    """Every decodable JSON object in `text` (code fences and prose around it are ignored)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text[match.start():])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            yield obj


def _loose_levels(text: str) -> dict:
    """Levels written as `key: value` lines, for answers that are not JSON."""
    out = {}
    for key in KEYS:
        m = re.search(rf'"?{key}"?\s*[:=]\s*"?([^"\n]+)"?', text, flags=re.IGNORECASE)
        if m and m.group(1).strip():
            out[key] = m.group(1).strip().rstrip(",")
    return out


def parse_answer(text: str) -> dict:
    """The four levels of a well-formed answer; MalformedAnswer (with whatever levels it held) otherwise."""
    best: dict = {}
    for obj in _json_objects(text):
        levels = {k: v.strip() for k, v in obj.items() if k in KEYS and isinstance(v, str) and v.strip()}
        if len(levels) > len(best):
            best = levels
        if len(levels) == len(KEYS):
            return levels
    if not best:
        best = _loose_levels(text)
    missing = [k for k in KEYS if k not in best]
    raise MalformedAnswer(f"answer lacks {', '.join(missing)}", best)


def fallback_levels(levels: dict) -> dict | None:
    """Complete a partial answer: the final caption falls back to the finest usable level; None if none is."""
    for key in ("final_caption",) + LEVELS[::-1]:
        if levels.get(key):
            return {k: levels.get(k, "") for k in LEVELS} | {"final_caption": levels[key]}
    return None
