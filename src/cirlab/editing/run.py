"""`cirlab edit`: N pseudo-target images per training triplet, written beside a JSONL manifest.

Each image is written to a temporary file and renamed. Every `SYNC_EVERY` images or `SYNC_SECONDS` seconds,
whichever comes first (and at the end), the images written since are made durable together (one syncfs of their file
system, `atomic.sync_written`), then their manifest records are appended and synced: a record never outlives its
image, even if the machine dies. A run killed at any moment resumes where the manifest ends (an image whose record
was not yet written is simply made again, with the same seed, so the same pixels); an editor that raises, or
Ctrl-C, still has the records of the batches before it written. An fsync for each image, as
before, kept the demo's TMCIR lane waiting on the disk: 16,000 oracle pseudo-targets took 31.9-45.1 s that way
against 11.2-12.6 s grouped on a 2-core AMD EPYC (`bench/edit_sync.py`, docs/results/edit_sync_amd_epyc.json).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from cirlab.atomic import sync_written, write_atomic
from cirlab.data.readers import read_split
from cirlab.errors import CirlabError
from cirlab.jsonl import JsonlRecords

MANIFEST = "manifest.jsonl"
SYNC_EVERY = 256  # images made durable, and their records appended, together
SYNC_SECONDS = 2.0  # ... or fewer, when a slow editor took this long since the last group


class EditManifest(JsonlRecords):
    what = "pseudo-target record"

    def key(self, record: dict):
        return (record["query"], record["sample"])

    def files(self) -> dict:
        """query key -> [image file paths, by sample]."""
        out: dict = {}
        for (query, sample), rec in sorted(self.records.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            out.setdefault(query, []).append(self.path.parent / rec["file"])
        return out


@dataclass
class EditStats:
    triplets: int = 0
    images: int = 0  # asked for: triplets x n
    cached: int = 0  # already in the manifest
    made: int = 0


def _save_png(img, path: Path) -> None:
    """Write the image under a temporary name and rename it (no fsync: `_Pending.flush` syncs a group at once)."""
    write_atomic(path, lambda f: img.save(f, format="PNG"), sync=False)


class _Pending:
    """Records whose images are written but not yet durable: `flush` syncs the images, then appends the records."""

    def __init__(self, manifest: EditManifest, folder: Path):
        self.manifest, self.folder, self.records, self.since = manifest, folder, [], time.monotonic()

    def add(self, records: list) -> None:
        self.records += records
        if len(self.records) >= SYNC_EVERY or time.monotonic() - self.since >= SYNC_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.records:
            sync_written([self.manifest.path.parent / r["file"] for r in self.records], self.folder)
            self.manifest.append(self.records)
            self.records = []
        self.since = time.monotonic()


def safe_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


class _Editor:
    """Edits one batch of (query, sample) pairs: (image, info) each."""

    def __init__(self, editor, data):
        self.editor, self.data = editor, data

    def __call__(self, chunk: list) -> list:
        if hasattr(self.editor, "edit_batch"):
            return self.editor.edit_batch(chunk, self.data)
        return [self.editor.edit(q.key, q.reference, k) for q, k in chunk]


def _editor(editor_factory, dataset: str, data_root, split: str):
    return _Editor(editor_factory(), read_split(dataset, data_root, split))


def edit_split(dataset: str, data_root, split: str, editor, out, n: int = 1, batch_size: int = 32,
               progress: bool = True, limit: int | None = None, engine: str = "local", editor_factory=None,
               address: str | None = None, concurrency: int = 1, force: bool = False) -> EditStats:
    """Make `n` pseudo-targets for each query with a target in the split (the first `limit` queries if given).
    With `engine="ray"`, `editor_factory` (picklable) builds the editor inside each of `concurrency` Ray actors;
    images and the manifest are written here either way. A rerun resumes, and refuses (unless `force`) when the
    manifest's pseudo-targets were made with another editor, model, options or seed; one run writes a manifest at
    a time (a lock beside it)."""
    from functools import partial

    from cirlab.batches import run_batches

    if n < 1:
        raise CirlabError(f"the number of pseudo-targets per triplet must be at least 1, got {n}")
    data = read_split(dataset, data_root, split)
    queries = [q for q in data.queries if q.targets][:limit]
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest = EditManifest(out / MANIFEST)
    settings = {"backend": editor.name, "model": editor.model_id, "options": editor.options(),
                "editor_seed": getattr(editor, "seed", None)}
    with manifest.writing():
        manifest.reload()  # what a run that held the lock before this one wrote
        if not force:
            _check_same_settings(manifest, settings)
        for stale in (out / "images").glob(".*.tmp-*"):  # images a killed run was writing: never in the manifest
            stale.unlink(missing_ok=True)
        todo = [(q, k) for q in queries for k in range(n) if (q.key, k) not in manifest]
        stats = EditStats(len(queries), len(queries) * n, len(queries) * n - len(todo), 0)
        if engine == "ray":
            if editor_factory is None:
                raise CirlabError("the ray engine needs a picklable editor_factory to build the editor in each actor")
            factory = partial(_editor, editor_factory, dataset, data_root, split)
        else:
            factory = partial(_Editor, editor, data)
        bar = tqdm(total=len(todo), desc=f"edit ({editor.name})", disable=not progress, mininterval=1.0)
        pending = _Pending(manifest, out / "images")
        try:
            for chunk, made in run_batches(todo, factory, batch_size, engine, address, concurrency):
                records = []
                for (q, k), (img, info) in zip(chunk, made):
                    rel = f"images/{safe_name(q.key)}-{k}.png"
                    _save_png(img, out / rel)
                    records.append({"query": q.key, "sample": k, "reference": q.reference, "text": q.text,
                                    "file": rel, **settings, **info})
                pending.add(records)
                stats.made += len(records)
                bar.update(len(chunk))
        finally:  # an editor that fails (or Ctrl-C) keeps the images of the batches before it
            pending.flush()
            bar.close()
    return stats


def _check_same_settings(manifest: EditManifest, settings: dict) -> None:
    """A manifest holds one editor's pseudo-targets: a resumed run must ask for the same (keys an older record
    lacks are not compared)."""
    if not manifest.records:
        return
    first = next(iter(manifest.records.values()))
    for key, value in settings.items():
        if key in first and first[key] != value:
            raise CirlabError(f"{manifest.path} holds pseudo-targets made with {key} {first[key]!r}; this run asks "
                              f"for {value!r}: choose another --out, or pass --force to add to it anyway")
