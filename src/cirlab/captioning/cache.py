"""The caption cache: JSONL, one record per (image, prompt version), appended, flushed and synced per batch.

A run killed mid-write leaves at most a partial last line; opening the cache cuts the file back to its last
complete line, so a resumed run neither duplicates nor loses a record.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from cirlab.errors import CirlabError


class CaptionCache:
    def __init__(self, path):
        self.path = Path(path)
        self.records: dict = {}  # (image, prompt_version) -> record
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a partial last line from an interrupted write
            with open(self.path, "r+b") as f:
                f.truncate(end)
            data = data[:end]
        for n, line in enumerate(data.decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = (rec["image"], rec["prompt_version"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CirlabError(f"{self.path}: line {n} is not a caption record ({e})") from None
            self.records[key] = rec

    def __contains__(self, key) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def final_captions(self, prompt_version: str | None = None) -> dict:
        """image -> final caption (the newest record of each image when no version is given)."""
        return {img: rec["final_caption"] for (img, ver), rec in self.records.items()
                if prompt_version is None or ver == prompt_version}

    def append(self, records: list) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records[(r["image"], r["prompt_version"])] = r
