"""A persistent image index: a folder with a manifest, the vectors and the item table, never half-written.

Layout of INDEX/:
- `manifest.json`: format version, generation g, checkpoint (path and identity), method and its scoring (inner
  product; for multi-token items the max over an item's tokens), dimension, tokens per item, backend with the
  parameters asked for (`params`) and those its index really uses (`actual`, such as IVF's `nlist`), item count,
  and the names of generation g's files;
- `vectors-g.npy` (N, K, D) float32, `items-g.jsonl` (id, path, caption per item, in vector order) and, for FAISS,
  `faiss-g.index`; for Milvus, the collection `<collection>_g<g>` (at `params.uri`: by default a milvus-lite file
  `milvus.db` in the folder), written whole before the commit, older generations' collections dropped after it;
- `images/`: image files uploaded through the service (built items point to their original files).

The store never asks which backend it holds: each answers the protocol in `backends.py` (settings, build, open,
retire, search) and owns its own files or collection.
Every write makes generation g+1's files (each written to a temporary name, flushed, fsynced and renamed), then
replaces the manifest the same way: that rename is the commit. Only then are other generations' files deleted.
A kill at any moment therefore leaves a manifest that names complete files: the old state or the new one.
Writers take an exclusive lock on `INDEX/.lock` (fcntl), so the CLI and a running service never interleave writes.
Readers (`search`) use an immutable snapshot that a write replaces whole: a search sees the old or the new index.
Readers take no lock: opening reads the manifest, then its files, and when a commit by another process deleted
them in between (the manifest has moved on), reads the new manifest again. An open index follows commits made by
other processes: each access to its snapshot checks the manifest file (one stat) and loads a newer generation.
A commit also deletes uploads under `images/` that no item names and that are over ORPHAN_AGE_S old (left by a
service killed between storing an upload and indexing it; younger ones may be an upload about to be indexed).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cirlab.atomic import write_atomic
from cirlab.errors import CirlabError
from cirlab.index.backends import ExactBackend, backend_class, calibrate, fold_tokens
from cirlab.index.filters import check_filter, matches
from cirlab.types import SearchHit

FORMAT = 1
MANIFEST = "manifest.json"
ORPHAN_AGE_S = 3600
OPEN_TRIES = 20
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_id(item_id: str) -> str:
    """Item ids are 1-128 characters of letters, digits, '.', '_' and '-' (not first): no path separators."""
    if not isinstance(item_id, str) or not ID_PATTERN.match(item_id) or item_id in (".", ".."):
        raise CirlabError(f"invalid item id {item_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting "
                          "with a letter or digit")
    return item_id


@dataclass(frozen=True)
class Snapshot:
    """One committed state: items in vector order, their vectors (N, K, D) and the backend over them."""
    ids: tuple
    paths: tuple
    captions: tuple
    vectors: np.ndarray
    backend: object
    position: dict  # id -> row in `ids`
    metas: tuple = ()  # each item's metadata (a dict, {} when none was given)


class ImageIndex:
    """Open with `ImageIndex(folder)`; create with `ImageIndex.create(...)`."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not (self.folder / MANIFEST).exists():
            raise CirlabError(f"no index at {self.folder} (missing {MANIFEST})")
        self._lock = threading.Lock()
        self._seen, self.manifest, self._snapshot = self._open()

    def _read_manifest(self) -> tuple:
        """(the manifest file's stat signature, the manifest)."""
        path = self.folder / MANIFEST
        st = path.stat()
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CirlabError(f"{path}: not valid JSON ({e})") from e
        if manifest.get("format") != FORMAT:
            raise CirlabError(f"{path}: index format {manifest.get('format')!r}, this cirlab reads {FORMAT}")
        return (st.st_ino, st.st_mtime_ns, st.st_size), manifest

    def _open(self) -> tuple:
        """(signature, manifest, snapshot) of the newest commit, read again while a commit by another process
        removes the files of the one being read."""
        for attempt in range(OPEN_TRIES):
            seen, manifest = self._read_manifest()
            try:
                return seen, manifest, self._load(manifest)
            except Exception:  # noqa: BLE001 - a file of a generation another process has just retired
                if attempt == OPEN_TRIES - 1 or self._read_manifest()[1]["generation"] == manifest["generation"]:
                    raise
        raise AssertionError("unreachable")

    @property
    def snapshot(self) -> Snapshot:
        """The newest committed state: the one held, or a newer one another process has committed since."""
        try:
            st = (self.folder / MANIFEST).stat()
        except FileNotFoundError:
            return self._snapshot
        if (st.st_ino, st.st_mtime_ns, st.st_size) != self._seen:
            with self._lock:
                seen, manifest = self._read_manifest()
                if (manifest["generation"], manifest["params"]) != (self.manifest["generation"],
                                                                    self.manifest["params"]):
                    seen, manifest, self._snapshot = self._open()  # a commit, or a tuning, by another process
                self._seen, self.manifest = seen, manifest
        return self._snapshot

    # ----------------------------------------------------------------- creation and loading
    @classmethod
    def create(cls, folder, *, checkpoint: str, checkpoint_id: str, method: str, backend: str = "exact",
               params: dict | None = None, ids: list, paths: list, captions: list | None = None,
               vectors: np.ndarray, metas: list | None = None) -> "ImageIndex":
        """A new index at `folder` (which must not hold one) from items and their vectors (N, D) or (N, K, D)."""
        folder = Path(folder)
        if (folder / MANIFEST).exists():
            raise CirlabError(f"{folder} already holds an index; remove it first or use `cirlab index add`")
        folder.mkdir(parents=True, exist_ok=True)
        vectors = _as_items(vectors, len(ids))
        settings = backend_class(backend).settings(folder, dict(params or {}))  # bad settings fail before writing
        scoring = "inner product" if vectors.shape[1] == 1 else \
            f"inner product, an item's score the max over its {vectors.shape[1]} token vectors"
        manifest = {"format": FORMAT, "generation": 0, "checkpoint": str(checkpoint),
                    "checkpoint_id": checkpoint_id, "method": method, "scoring": scoring,
                    "dim": int(vectors.shape[2]), "tokens": int(vectors.shape[1]), "backend": backend,
                    "params": settings, "actual": {}, "count": 0, "files": {}}
        with _exclusive(folder):
            cls._commit(folder, manifest, _dedupe(ids), list(paths), list(captions or [""] * len(ids)), vectors,
                        _check_metas(metas, len(ids)))
        return cls(folder)

    def _load(self, manifest: dict) -> Snapshot:
        files = manifest["files"]
        # memory-mapped: backends that keep their own copy (exact, flat, HNSW) read it whole, the quantised ones
        # only codes, rescoring from this file
        vectors = np.load(self.folder / files["vectors"], mmap_mode="r") if files else \
            np.zeros((0, manifest["tokens"], manifest["dim"]), np.float32)
        rows = []
        if files:
            for n, line in enumerate((self.folder / files["items"]).read_text().splitlines(), 1):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise CirlabError(f"{self.folder / files['items']}: line {n} is not JSON ({e})") from e
        if len(rows) != vectors.shape[0]:
            raise CirlabError(f"{self.folder}: {len(rows)} items but {vectors.shape[0]} vectors")
        flat = vectors.reshape(-1, vectors.shape[2])
        cls = backend_class(manifest["backend"])
        backend = cls.open(self.folder, files, manifest["params"], flat)
        ids = tuple(r["id"] for r in rows)
        return Snapshot(ids, tuple(r["path"] for r in rows), tuple(r.get("caption", "") for r in rows), vectors,
                        backend, {i: n for n, i in enumerate(ids)}, tuple(r.get("meta", {}) for r in rows))

    @staticmethod
    def _commit(folder: Path, manifest: dict, ids: list, paths: list, captions: list, vectors: np.ndarray,
                metas: list) -> dict:
        """Write generation g+1 and switch the manifest to it; returns the new manifest."""
        g = manifest["generation"] + 1
        files = {"vectors": f"vectors-{g}.npy", "items": f"items-{g}.jsonl"}
        write_atomic(folder / files["vectors"], lambda f: np.save(f, vectors.astype(np.float32)))
        lines = "".join(json.dumps({"id": i, "path": p, "caption": c} | ({"meta": m} if m else {})) + "\n"
                        for i, p, c, m in zip(ids, paths, captions, metas))
        write_atomic(folder / files["items"], lambda f: f.write(lines.encode()))
        built = backend_class(manifest["backend"]).build(vectors.reshape(-1, vectors.shape[2]), folder, g,
                                                         manifest["params"])  # its own files or collection
        files |= built.files
        new = manifest | {"generation": g, "count": len(ids), "files": files, "actual": built.actual}
        write_atomic(folder / MANIFEST, lambda f: f.write((json.dumps(new, indent=1) + "\n").encode()))
        built.retire(folder, manifest["params"])
        _delete_orphaned_uploads(folder, paths)
        for old in folder.iterdir():  # the store's files of other generations, and temporary files of killed writers
            if re.match(r"^(vectors|items)-\d+\.", old.name) and old.name not in files.values() \
                    or old.name.startswith(".") and ".tmp-" in old.name:
                old.unlink(missing_ok=True)
        return new

    # ----------------------------------------------------------------- reading
    def __len__(self) -> int:
        return len(self.snapshot.ids)

    @property
    def ids(self) -> tuple:
        return self.snapshot.ids

    def item(self, item_id: str) -> dict:
        snap = self.snapshot
        if item_id not in snap.position:
            raise KeyError(item_id)
        n = snap.position[item_id]
        return {"id": item_id, "path": snap.paths[n], "caption": snap.captions[n], "meta": snap.metas[n]}

    def search(self, queries: np.ndarray, k: int = 10, filter: dict | None = None) -> list:
        """Per query (rows of (B, D)), up to k SearchHits, best first; with a metadata `filter` (index/filters.py)
        only items that pass it, searched inside the backend, and k of them whenever k pass (a backend that finds
        fewer, an IVF or HNSW index whose probes miss the few that pass, is completed by exact search)."""
        snap = self.snapshot  # one state for the whole call
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.manifest["dim"]:
            raise CirlabError(f"query dimension {queries.shape[1]} does not match the index's {self.manifest['dim']}")
        tokens = snap.vectors.shape[1] if snap.vectors.ndim == 3 else 1
        if filter is None:
            scores, rows = snap.backend.search(queries, k * tokens)
            folded_scores, items = fold_tokens(scores, rows, tokens, k)
        else:
            check_filter(filter)
            passing = np.array([n for n, m in enumerate(snap.metas) if matches(filter, m)], np.int64)
            rows = (passing[:, None] * tokens + np.arange(tokens)).reshape(-1)
            scores, found = snap.backend.search(queries, k * tokens, rows)
            folded_scores, items = fold_tokens(scores, found, tokens, k)
            if any(len(its) < min(k, len(passing)) for its in items):
                exact = ExactBackend(snap.vectors.reshape(-1, snap.vectors.shape[2]))
                folded_scores, items = fold_tokens(*exact.search(queries, k * tokens, rows), tokens, k)
        return [[SearchHit(snap.ids[i], s) for i, s in zip(its, ss)] for its, ss in zip(items, folded_scores)]

    # ----------------------------------------------------------------- tuning
    def tune(self, target_recall: float, queries: np.ndarray | None = None, n_queries: int = 200, k: int = 10,
             seed: int = 0) -> dict:
        """Calibrate a FAISS IVF index's nprobe (or HNSW's efSearch) to the smallest value (doubled, then
        bisected: `backends.calibrate`) whose recall@k against exact search reaches `target_recall`, on `queries`
        (B, D) or else on `n_queries` indexed vectors with Gaussian noise (0.1 / sqrt(D) a dimension, then
        L2-normalised). The value and the recall measured go to the manifest (`params` and `tuned`), so every later
        open searches with them; items added later are not re-measured (tune again). Returns `tuned`."""
        from cirlab.index.backends import FaissBackend

        if not 0.0 < target_recall <= 1.0:
            raise CirlabError(f"the target recall must be in (0, 1], got {target_recall}")
        snap = self.snapshot
        backend = snap.backend
        knob = backend.search_knob() if isinstance(backend, FaissBackend) else None
        if knob is None:
            raise CirlabError(f"nothing to tune: a {self.manifest['backend']} index of kind "
                              f"{self.manifest['params'].get('kind', '-')} searches exactly or on its own terms; "
                              "--target-recall applies to FAISS ivf, ivf_sq8, ivf_pq and hnsw")
        flat = snap.vectors.reshape(-1, snap.vectors.shape[2])
        tokens = snap.vectors.shape[1]
        if queries is None:
            rng = np.random.default_rng(seed)
            picks = flat[rng.integers(len(flat), size=min(n_queries, len(flat)))]
            queries = picks + rng.normal(scale=0.1 / np.sqrt(flat.shape[1]), size=picks.shape)
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        queries = np.asarray(queries, np.float32)
        _, truth = fold_tokens(*ExactBackend(flat).search(queries, k * tokens), tokens, k)
        found = calibrate(backend, queries, truth, target_recall, k, tokens)
        knob, value, recall = found["knob"], found["value"], found["recall"]
        tuned = {"target_recall": target_recall, f"recall@{k}": round(recall, 4), knob: value,
                 "queries": len(queries), "reached": recall >= target_recall}
        with self._lock, _exclusive(self.folder):
            manifest = json.loads((self.folder / MANIFEST).read_text())
            manifest["params"] = manifest["params"] | {knob: value}
            manifest["actual"] = manifest.get("actual", {}) | {knob: value}
            manifest["tuned"] = tuned
            write_atomic(self.folder / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode()))
            self._seen, self.manifest = self._read_manifest()
        return tuned

    # ----------------------------------------------------------------- writing
    def add(self, ids: list, paths: list, vectors: np.ndarray, captions: list | None = None,
            replace: bool = False, metas: list | None = None) -> None:
        """Append items (ids new unless `replace`, which overwrites items with the same id), each with its caption
        and metadata (a JSON object) when given."""
        ids = _dedupe([check_id(i) for i in ids])
        vectors = _as_items(vectors, len(ids))
        if vectors.shape[1:] != (self.manifest["tokens"], self.manifest["dim"]):
            raise CirlabError(f"vectors of shape {vectors.shape[1:]} do not fit the index's "
                              f"({self.manifest['tokens']}, {self.manifest['dim']})")
        captions = list(captions or [""] * len(ids))
        metas = _check_metas(metas, len(ids))

        def change(snap: Snapshot) -> tuple:
            taken = [i for i in ids if i in snap.position]
            if taken and not replace:
                raise CirlabError(f"{len(taken)} id(s) already in the index (first: {taken[0]})")
            keep = [n for n, i in enumerate(snap.ids) if i not in set(ids)]
            return ([snap.ids[n] for n in keep] + ids, [snap.paths[n] for n in keep] + list(paths),
                    [snap.captions[n] for n in keep] + captions, np.concatenate([snap.vectors[keep], vectors]),
                    [snap.metas[n] for n in keep] + metas)
        self._write(change)

    def remove(self, ids: list) -> list:
        """Remove items; returns their paths. An unknown id raises KeyError and nothing is removed."""
        removed = []

        def change(snap: Snapshot) -> tuple:
            unknown = [i for i in ids if i not in snap.position]
            if unknown:
                raise KeyError(unknown[0])
            drop = set(ids)
            removed.extend(snap.paths[snap.position[i]] for i in ids)
            keep = [n for n, i in enumerate(snap.ids) if i not in drop]
            return ([snap.ids[n] for n in keep], [snap.paths[n] for n in keep], [snap.captions[n] for n in keep],
                    snap.vectors[keep], [snap.metas[n] for n in keep])
        self._write(change)
        return removed

    def _write(self, change) -> None:
        """Under the thread and process locks: re-read the committed state (another process may have written),
        let `change(snapshot)` compute the new (ids, paths, captions, vectors), commit them, swap the snapshot."""
        with self._lock, _exclusive(self.folder):
            manifest = json.loads((self.folder / MANIFEST).read_text())
            snap = self._snapshot if manifest["generation"] == self.manifest["generation"] else self._load(manifest)
            ids, paths, captions, vectors, metas = change(snap)
            manifest = self._commit(self.folder, manifest, ids, paths, captions, vectors, metas)
            self._seen = self._read_manifest()[0]
            self._snapshot, self.manifest = self._load(manifest), manifest


def _delete_orphaned_uploads(folder: Path, paths: list) -> None:
    """Files under INDEX/images/ that no item names and that are older than ORPHAN_AGE_S."""
    import time

    uploads = folder / "images"
    if not uploads.is_dir():
        return
    named = {Path(p).resolve() for p in paths}
    now = time.time()
    for f in uploads.iterdir():
        try:
            if f.is_file() and f.resolve() not in named and now - f.stat().st_mtime > ORPHAN_AGE_S:
                f.unlink()
        except FileNotFoundError:
            continue


def _check_metas(metas: list | None, n: int) -> list:
    """Each item's metadata: a JSON object ({} for none)."""
    metas = [{} if m is None else m for m in (metas or [None] * n)]
    if len(metas) != n:
        raise CirlabError(f"expected metadata for {n} items, got {len(metas)}")
    for m in metas:
        if not isinstance(m, dict):
            raise CirlabError(f"item metadata must be a JSON object, got {type(m).__name__}: {str(m)[:80]}")
    return metas


def _as_items(vectors, n: int) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 2:
        vectors = vectors[:, None, :]
    if vectors.ndim != 3 or vectors.shape[0] != n:
        raise CirlabError(f"expected {n} vectors of shape (D,) or (K, D), got an array of shape {vectors.shape}")
    return vectors


def _dedupe(ids: list) -> list:
    seen = set()
    for i in ids:
        if i in seen:
            raise CirlabError(f"id {i!r} appears twice")
        seen.add(i)
    return list(ids)


@contextlib.contextmanager
def _exclusive(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
