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

    def final_captions(self, prompt_version: str | None = None) -> dict:
        """image -> final caption (the newest record of each image when no version is given)."""
        return {img: rec["final_caption"] for (img, ver), rec in self.records.items()
                if prompt_version is None or ver == prompt_version}
