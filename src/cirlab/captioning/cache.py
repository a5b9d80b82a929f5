"""The caption cache: JSONL, one record per (image, prompt version), appended, flushed and synced per batch.

A run killed mid-write leaves at most a partial last line; opening the cache cuts the file back to its last
complete line, so a resumed run neither duplicates nor loses a record (cirlab.jsonl).
"""
from __future__ import annotations

from cirlab.jsonl import JsonlRecords


class CaptionCache(JsonlRecords):
    what = "caption record"

    def key(self, record: dict):
        return (record["image"], record["prompt_version"])
