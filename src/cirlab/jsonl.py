"""Append-only JSONL record files that survive a kill: the caption cache and the edit manifest build on it.

Records are appended, flushed and synced per batch. A run killed mid-write leaves at most a partial last line;
opening the file cuts it back to its last complete line, so a resumed run neither duplicates nor loses a record.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from cirlab.errors import CirlabError


def read_records(path, key, what: str = "record", data: bytes | None = None) -> dict:
    """`key(record) -> record` over the lines of the JSONL file at `path` (a later record with the same key
    replaces an earlier one). A last line without its newline counts when it is a whole record (a file written by
    hand) and is left out when it is not (a write still going, or killed); the file is not touched. A malformed
    line elsewhere names the file and line number."""
    path = Path(path)
    if data is None:
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            try:
                json.loads(data[end:])
            except ValueError:
                data = data[:end]
    records = {}
    for n, line in enumerate(data.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            records[key(rec)] = rec
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CirlabError(f"{path}: line {n} is not a {what} ({e})") from None
    return records


def json_lines(path, what: str) -> list:
    """(line number, object) of each non-empty line of a hand-written JSONL file of `what` (a queries file, a
    metadata sidecar); a missing file, a line that is not JSON or not a JSON object names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise CirlabError(f"{what} file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CirlabError(f"{path}: line {n} is not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise CirlabError(f"{path}: line {n} is not a JSON object")
        out.append((n, obj))
    return out


class JsonlRecords:
    """Records keyed by `key(record)`; a later record with the same key replaces the earlier one in memory."""

    what = "record"

    def __init__(self, path):
        self.path = Path(path)
        self.records: dict = {}
        if self.path.exists():
            self._load()

    def key(self, record: dict):
        raise NotImplementedError

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a partial last line from an interrupted write
            with open(self.path, "r+b") as f:
                f.truncate(end)
        self.records = read_records(self.path, self.key, self.what, data[:end])

    def reload(self) -> None:
        self.records = {}
        if self.path.exists():
            self._load()

    @contextlib.contextmanager
    def writing(self):
        """Hold the file's writer lock (`PATH.lock`, fcntl) while a run appends: a second run on the same file
        stops at once with an error instead of writing duplicate records."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CirlabError(f"another run is writing {self.path}; wait for it to finish (or stop it), "
                                  "then run again to resume") from None
            try:
                yield self
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def __contains__(self, key) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, records: list) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records[self.key(r)] = r
