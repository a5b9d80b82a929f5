"""Vector search backends behind one interface: exact (torch) and FAISS (flat, IVF, HNSW).

A backend holds row vectors (M, D), inner-product scored (cirlab's features are L2-normalised, so this is cosine),
and answers `search(queries (B, D), k) -> (scores (B, k'), rows (B, k'))` with k' = min(k, M), best first. It is
built from the vectors in one call and never mutated afterwards: the index (`store.py`) builds a new backend for
every write and swaps it in whole, so a search never sees a half-applied write.

Multi-token targets (csmcir's (N, K, D)) are stored as N*K rows; `TokenOwners` folds row hits back to items by
the max over each item's K rows (the CIRModel's `similarity`). FAISS backends fetch `k * K` rows first, so an item
whose best row falls outside them can be missed: the fold is exact for `exact`, approximate for FAISS.
"""
from __future__ import annotations

import numpy as np
import torch

from cirlab.errors import CirlabError

BACKENDS = ("exact", "faiss", "milvus")
FAISS_KINDS = ("flat", "ivf", "hnsw")
FAISS_DEFAULTS = {"nlist": 0, "nprobe": 16, "hnsw_m": 32, "ef_construction": 80, "ef_search": 64}


class ExactBackend:
    """Brute force on torch: every query against every row."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple:
        k = min(k, len(self))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)) @ self.vectors.t()
        top = scores.topk(k, dim=1)
        return top.values.numpy(), top.indices.numpy()


class FaissBackend:
    """FAISS inner-product index: `flat` (exact), `ivf` (IVF-Flat: `nlist` cells, 0 = about 4 sqrt(M), `nprobe`
    searched) or `hnsw` (`hnsw_m` links, `ef_construction`, `ef_search`)."""

    def __init__(self, vectors: np.ndarray, kind: str = "flat", **params):
        try:
            import faiss
        except ImportError as e:
            raise CirlabError("the faiss backend needs faiss-cpu: pip install 'cirlab[faiss]'") from e
        if kind not in FAISS_KINDS:
            raise CirlabError(f"unknown faiss index {kind!r}; choose one of {', '.join(FAISS_KINDS)}")
        unknown = set(params) - set(FAISS_DEFAULTS)
        if unknown:
            raise CirlabError(f"unknown faiss parameter(s) {sorted(unknown)}; known: {', '.join(FAISS_DEFAULTS)}")
        self.kind, self.params = kind, FAISS_DEFAULTS | params
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = x.shape
        p = self.params
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, int(p["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(p["ef_construction"])
            index.hnsw.efSearch = int(p["ef_search"])
        else:
            nlist = int(p["nlist"]) or max(1, int(4 * np.sqrt(max(n, 1))))
            nlist = max(1, min(nlist, n // 39 if n >= 39 else 1))  # FAISS wants about 39 points per cell
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            if n:
                index.train(x)
            index.nprobe = min(int(p["nprobe"]), nlist)
            self._quantizer = quantizer  # the IVF index does not own it
        if n:
            index.add(x)
        self.index, self.dim = index, d

    @classmethod
    def read(cls, path) -> "FaissBackend":
        """A backend over an index saved with `faiss.write_index` (or serialised bytes written to a file)."""
        import faiss

        backend = cls.__new__(cls)
        backend.index = faiss.read_index(str(path))
        backend.dim, backend.kind, backend.params = backend.index.d, "saved", {}
        return backend

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple:
        k = min(k, len(self))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows  # rows of -1 (IVF with too few probed cells) are dropped by the caller


class MilvusBackend:
    """A Milvus collection (pymilvus; a local milvus-lite file when `uri` is a path, a Milvus server when it is a
    URL), for galleries larger than one machine. Rows are stored with their row number as primary key, scored by
    inner product. `index_type`: FLAT (exact; the only one milvus-lite offers), or IVF_FLAT / HNSW on a server.

    A collection is written once and never changed: the persistent index (`store.py`) writes each generation to
    a collection of its own, names it in the manifest, and drops the older ones after the commit, so a kill
    leaves the manifest's collection whole."""

    BATCH = 5000  # rows per insert call

    def __init__(self, client, collection: str):
        self.client, self.collection = client, collection
        self.count = int(client.get_collection_stats(collection)["row_count"])

    @staticmethod
    def connect(uri: str):
        try:
            from pymilvus import MilvusClient
        except ImportError as e:
            raise CirlabError("the milvus backend needs pymilvus (and milvus-lite for a local file): "
                              "pip install 'cirlab[milvus]'") from e
        return MilvusClient(uri)

    @classmethod
    def build(cls, vectors: np.ndarray, uri: str, collection: str, index_type: str = "FLAT") -> "MilvusBackend":
        client = cls.connect(uri)
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if client.has_collection(collection):
            client.drop_collection(collection)  # left by a writer killed before its commit
        index = client.prepare_index_params()
        index.add_index(field_name="vector", index_type=index_type, metric_type="IP")
        client.create_collection(collection, dimension=x.shape[1], metric_type="IP", id_type="int",
                                 auto_id=False, index_params=index)
        for lo in range(0, len(x), cls.BATCH):
            client.insert(collection, [{"id": lo + i, "vector": v.tolist()} for i, v in enumerate(x[lo:lo + cls.BATCH])])
        client.flush(collection)
        return cls(client, collection)

    @classmethod
    def open(cls, uri: str, collection: str) -> "MilvusBackend":
        client = cls.connect(uri)
        if not client.has_collection(collection):
            raise CirlabError(f"Milvus at {uri} has no collection {collection!r}; rebuild the index")
        client.load_collection(collection)
        return cls(client, collection)

    def __len__(self) -> int:
        return self.count

    def search(self, queries: np.ndarray, k: int) -> tuple:
        k = min(k, len(self))
        scores = np.full((len(queries), k), -np.inf, np.float32)
        rows = np.full((len(queries), k), -1, np.int64)
        if k == 0:
            return scores, rows
        found = self.client.search(self.collection, data=np.asarray(queries, np.float32).tolist(), limit=k,
                                   search_params={"metric_type": "IP"})
        for b, hits in enumerate(found):
            for j, hit in enumerate(hits[:k]):
                scores[b, j], rows[b, j] = hit["distance"], hit["id"]
        return scores, rows


def make_backend(name: str, vectors: np.ndarray, kind: str = "flat", **params):
    """An in-process backend over `vectors` (Milvus collections are built by the index store, which names them)."""
    if name == "exact":
        return ExactBackend(vectors)
    if name == "faiss":
        return FaissBackend(vectors, kind, **params)
    if name == "milvus":
        raise CirlabError("a milvus backend lives in a named collection: build it through ImageIndex")
    raise CirlabError(f"unknown index backend {name!r}; choose one of {', '.join(BACKENDS)}")


def fold_tokens(scores: np.ndarray, rows: np.ndarray, tokens: int, k: int) -> tuple:
    """Row hits (B, k') of an index of N*`tokens` rows -> item hits (B, <=k): the best row of each item, best
    first; rows of -1 (no hit) are skipped."""
    out_scores, out_items = [], []
    for s_row, r_row in zip(scores, rows):
        best: dict = {}
        for s, r in zip(s_row, r_row):
            if r < 0:
                continue
            item = int(r) // tokens
            if item not in best or s > best[item]:
                best[item] = float(s)
        ranked = sorted(best.items(), key=lambda x: (-x[1], x[0]))[:k]
        out_items.append([i for i, _ in ranked])
        out_scores.append([s for _, s in ranked])
    return out_scores, out_items
