"""Vector search backends behind one protocol: exact (torch), FAISS (flat, IVF, HNSW) and Milvus.

A backend holds row vectors (M, D), inner-product scored (cirlab's features are L2-normalised, so this is cosine),
and answers `search(queries (B, D), k) -> (scores (B, k'), rows (B, k'))` with k' = min(k, M), best first. The
persistent index (`store.py`) drives every backend through the same five calls, and never asks which one it holds:

- `settings(folder, params)`: the full parameters of a new index (defaults filled in), checked before any write;
- `build(vectors, folder, generation, params)`: a backend over the rows, its own files written (or its Milvus
  collection created) for that generation; `files` names them for the manifest and `actual` gives the parameters
  it really used (FAISS's IVF picks `nlist` from the row count when it is 0);
- `open(folder, files, params, vectors)`: the backend of a committed generation, from its files;
- `retire(folder, params)`: after the commit, what older generations left behind is removed;
- `search(queries, k)`.

Adding and removing items write a new generation: the store builds a new backend over the new rows and swaps it in
whole, so a search never sees a half-applied write and a kill leaves the last committed generation.

Multi-token targets (csmcir's (N, K, D)) are stored as N*K rows; `fold_tokens` folds row hits back to items by
the max over each item's K rows (the CIRModel's `similarity`). FAISS and Milvus fetch `k * K` rows first, so an
item whose best row falls outside them can be missed: the fold is exact for `exact` and `faiss` flat, approximate
for the others.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from cirlab.errors import CirlabError

BACKENDS = ("exact", "faiss", "milvus")
FAISS_KINDS = ("flat", "ivf", "hnsw", "ivf_sq8", "ivf_pq")
QUANTISED = ("ivf_sq8", "ivf_pq")  # codes in memory, float rows rescored from the store's memory-mapped file
# pq_m: PQ sub-quantisers (bytes a vector, 8 bits each); rescore: candidates fetched per result and rescored
# exactly from the float rows (0: the quantised scores as they are); train_size: rows the quantisers train on;
# coarse: how the IVF kinds find a query's nprobe cells, "flat" (every centroid scored) or "hnsw" (a graph of
# `hnsw_m` links over the centroids, searched with efSearch max(64, 2 nprobe): a choice, not FAISS's default)
FAISS_DEFAULTS = {"nlist": 0, "nprobe": 16, "hnsw_m": 32, "ef_construction": 80, "ef_search": 64, "pq_m": 32,
                  "rescore": 4, "train_size": 100_000, "coarse": "flat"}
COARSE = ("flat", "hnsw")
IVF_KINDS = ("ivf", "ivf_sq8", "ivf_pq")
# the kinds each parameter acts on (hnsw_m and ef_construction also build an IVF kind's graph with coarse hnsw);
# one given to any other kind is refused rather than silently ignored
FAISS_PARAM_KINDS = {"nlist": IVF_KINDS, "nprobe": IVF_KINDS, "train_size": IVF_KINDS, "coarse": IVF_KINDS,
                     "hnsw_m": ("hnsw",), "ef_construction": ("hnsw",), "ef_search": ("hnsw",),
                     "pq_m": ("ivf_pq",), "rescore": QUANTISED}
EXACT_DTYPES = ("float32", "float16")


class VectorBackend:
    """The protocol every backend answers (see the module docstring); the defaults suit a backend that keeps
    nothing of its own on disk (it is rebuilt from the store's vectors)."""
    name = ""

    def __init__(self):
        self.files: dict = {}  # file or collection names of this generation, recorded in the manifest
        self.actual: dict = {}  # the parameters the built backend really uses

    @classmethod
    def settings(cls, folder: Path, params: dict) -> dict:
        if params:
            raise CirlabError(f"the {cls.name} backend takes no parameters, got {sorted(params)}")
        return {}

    @classmethod
    def check(cls, params: dict) -> None:
        """Refuses bad parameters with no side effect, before anything is embedded or written (by default what
        `settings` refuses; a backend whose settings reach a server or a file checks less here)."""
        cls.settings(Path("."), dict(params))

    @classmethod
    def build(cls, vectors: np.ndarray, folder: Path, generation: int, params: dict) -> VectorBackend:
        return cls(vectors)

    @classmethod
    def open(cls, folder: Path, files: dict, params: dict, vectors: np.ndarray) -> VectorBackend:
        return cls(vectors)

    def retire(self, folder: Path, params: dict) -> None:
        """Remove what other generations left (files, collections); a backend with none keeps the default."""

    def __len__(self) -> int:
        raise NotImplementedError

    def search(self, queries: np.ndarray, k: int, rows: np.ndarray | None = None) -> tuple:
        """(scores (B, k'), rows (B, k')), best first; `rows`, when given, the only rows that may be returned
        (a metadata filter), k' = min(k, their number)."""
        raise NotImplementedError


class ExactBackend(VectorBackend):
    """Brute force on torch: every query against every row. `dtype` float16 keeps the rows in half the memory
    (scored in float32, a block of rows at a time; scores then differ from float32's by about 1e-3)."""
    name = "exact"
    BLOCK = 65536  # float16 rows converted to float32 at a time

    def __init__(self, vectors: np.ndarray, dtype: str = "float32"):
        super().__init__()
        if dtype not in EXACT_DTYPES:
            raise CirlabError(f"unknown exact dtype {dtype!r}; choose one of {', '.join(EXACT_DTYPES)}")
        self.dtype = dtype
        self.vectors = torch.from_numpy(np.array(vectors, dtype=np.float32 if dtype == "float32" else np.float16))
        self.actual = {"dtype": dtype} if dtype != "float32" else {}

    @classmethod
    def settings(cls, folder: Path, params: dict) -> dict:
        unknown = set(params) - {"dtype"}
        if unknown:
            raise CirlabError(f"the exact backend takes only dtype, got {sorted(unknown)}")
        cls(np.zeros((0, 1), np.float32), **params)
        return dict(params)

    @classmethod
    def build(cls, vectors: np.ndarray, folder: Path, generation: int, params: dict) -> ExactBackend:
        return cls(vectors, **params)

    @classmethod
    def open(cls, folder: Path, files: dict, params: dict, vectors: np.ndarray) -> ExactBackend:
        return cls(vectors, **params)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def _scores(self, q: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        if vectors.dtype == torch.float32:
            return q @ vectors.t()
        return torch.cat([q @ vectors[lo:lo + self.BLOCK].float().t() for lo in range(0, len(vectors), self.BLOCK)],
                         dim=1)

    def search(self, queries: np.ndarray, k: int, rows: np.ndarray | None = None) -> tuple:
        vectors = self.vectors if rows is None else self.vectors[torch.from_numpy(np.asarray(rows, np.int64))]
        k = min(k, vectors.shape[0])
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores = self._scores(torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)), vectors)
        top = scores.topk(k, dim=1)
        found = top.indices.numpy()
        return top.values.numpy(), found if rows is None else np.asarray(rows, np.int64)[found]


class FaissBackend(VectorBackend):
    """FAISS inner-product index: `flat` (exact), `ivf` (IVF-Flat: `nlist` cells, 0 = about 4 sqrt(M), `nprobe`
    searched; `coarse` "hnsw" finds the cells through a graph over the centroids instead of scoring all of them),
    `hnsw` (`hnsw_m` links, `ef_construction`, `ef_search`), or the quantised `ivf_sq8` (IVF with 8-bit
    scalar codes: D bytes a vector) and `ivf_pq` (IVF with product-quantised codes: `pq_m` bytes a vector). The
    quantised kinds keep only codes in memory; with `rescore` R > 0 each search fetches R * k candidates by their
    codes and rescores them exactly from the float rows, which the index store keeps in its memory-mapped vectors
    file (as Qdrant rescores from vectors on disk). Each generation is one file, `faiss-<g>.index`; the manifest's
    `params` hold what the user asked, `actual` what the index uses."""
    name = "faiss"

    def __init__(self, vectors: np.ndarray, kind: str = "flat", **params):
        super().__init__()
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
        if self.params["coarse"] not in COARSE:
            raise CirlabError(f"unknown coarse quantizer {self.params['coarse']!r}; choose one of {', '.join(COARSE)}")
        _check_kind_params(kind, params)
        x = vectors  # rows are copied to float32 a block at a time (a memory-mapped file stays on disk)
        n, d = x.shape
        p = self.params
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, int(p["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(p["ef_construction"])
            index.hnsw.efSearch = int(p["ef_search"])
        else:
            index = self._ivf(faiss, kind, x, p)
        if n:
            cells = _exact_cells(faiss, index) if kind in IVF_KINDS and p["coarse"] == "hnsw" else None
            for lo in range(0, n, 200_000):  # added in blocks: a memory-mapped input is read a block at a time
                block = np.ascontiguousarray(x[lo:lo + 200_000], dtype=np.float32)
                if cells is None:
                    index.add(block)
                else:  # each row to its nearest centroid, found exactly (one product), not through the graph
                    nearest = np.ascontiguousarray(cells.search(block, 1)[1].ravel())
                    index.add_core(len(block), faiss.swig_ptr(block), None, faiss.swig_ptr(nearest))
        self.index, self.dim = index, d
        self.rescore_rows = vectors if kind in QUANTISED and int(p["rescore"]) > 0 else None
        self.rescore = int(p["rescore"]) if kind in QUANTISED else 0
        self.actual = {"kind": kind} | (
            {"nlist": index.nlist, "nprobe": index.nprobe, "coarse": p["coarse"]} if kind in IVF_KINDS else
            {"hnsw_m": int(p["hnsw_m"]), "ef_construction": index.hnsw.efConstruction,
             "ef_search": index.hnsw.efSearch} if kind == "hnsw" else {}) | (
            {"rescore": self.rescore, "code_bytes": int(index.code_size)} if kind in QUANTISED else {}) | (
            {"pq_m": int(p["pq_m"])} if kind == "ivf_pq" else {})

    def _ivf(self, faiss, kind: str, x: np.ndarray, p: dict):
        """An IVF index of `kind`, its coarse cells (and codes) trained on up to `train_size` rows."""
        n, d = x.shape
        nlist = int(p["nlist"]) or max(1, int(4 * np.sqrt(max(n, 1))))
        nlist = max(1, min(nlist, n // 39 if n >= 39 else 1))  # FAISS wants about 39 points per cell
        quantizer = faiss.IndexFlatIP(d)
        if p["coarse"] == "hnsw":
            quantizer = faiss.IndexHNSWFlat(d, int(p["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
            quantizer.hnsw.efConstruction = int(p["ef_construction"])
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        elif kind == "ivf_sq8":
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
        else:
            m = int(p["pq_m"])
            if d % m:
                if n:
                    raise CirlabError(f"pq_m {m} must divide the vectors' dimension {d}")
                m = 1  # a settings check on no rows: the dimension is not known yet
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        self._quantizer = quantizer  # the IVF index does not own it
        if p["coarse"] == "hnsw":  # k-means assigns with exact search; the graph is built over its centroids
            self._clustering = index.clustering_index = faiss.IndexFlatIP(d)
        index.nprobe = min(int(p["nprobe"]), nlist)
        _coarse_ef(index)  # the graph's search breadth follows nprobe
        if n:
            take = min(n, max(int(p["train_size"]), 39 * nlist))
            picks = np.sort(np.random.default_rng(0).choice(n, size=take, replace=False)) if take < n else slice(None)
            index.train(np.ascontiguousarray(x[picks], dtype=np.float32))
        return index

    @classmethod
    def settings(cls, folder: Path, params: dict) -> dict:
        params = {"kind": "flat"} | dict(params)
        cls(np.zeros((0, 1), np.float32), **params)  # unknown kinds and parameters fail before any write
        return params

    @classmethod
    def build(cls, vectors: np.ndarray, folder: Path, generation: int, params: dict) -> FaissBackend:
        import faiss

        from cirlab.atomic import write_atomic

        backend = cls(vectors, **params)
        backend.files = {"faiss": f"faiss-{generation}.index"}
        # streamed to the file: serialising to memory first held the index two or three times over at once
        write_atomic(Path(folder) / backend.files["faiss"],
                     lambda f: faiss.write_index(backend.index, faiss.PyCallbackIOWriter(f.write)))
        return backend

    @classmethod
    def open(cls, folder: Path, files: dict, params: dict, vectors: np.ndarray) -> FaissBackend:
        backend = cls.read(Path(folder) / files["faiss"])
        backend.files = {"faiss": files["faiss"]}
        if params.get("kind") in QUANTISED and int(params.get("rescore", FAISS_DEFAULTS["rescore"])) > 0:
            backend.rescore_rows = vectors
            backend.rescore = int(params.get("rescore", FAISS_DEFAULTS["rescore"]))
        backend.set_search(params.get("nprobe"), params.get("ef_search"))  # as the manifest says (tuned or given)
        return backend

    def search_knob(self) -> str | None:
        """The search-time parameter that trades recall for speed: "nprobe" (IVF), "ef_search" (HNSW), or None."""
        return "nprobe" if hasattr(self.index, "nprobe") else "ef_search" if hasattr(self.index, "hnsw") else None

    def set_search(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        if nprobe is not None and hasattr(self.index, "nprobe"):
            self.index.nprobe = max(1, min(int(nprobe), self.index.nlist))
            _coarse_ef(self.index)
        if ef_search is not None and hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = max(1, int(ef_search))

    def retire(self, folder: Path, params: dict) -> None:
        for old in Path(folder).glob("faiss-*.index"):
            if old.name not in self.files.values():
                old.unlink(missing_ok=True)

    @classmethod
    def read(cls, path) -> FaissBackend:
        """A backend over an index saved with `faiss.write_index` (or serialised bytes written to a file)."""
        import faiss

        backend = cls.__new__(cls)
        VectorBackend.__init__(backend)
        backend.index = faiss.read_index(str(path))
        backend.dim, backend.kind, backend.params = backend.index.d, "saved", {}
        backend.rescore_rows, backend.rescore = None, 0
        return backend

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int, rows: np.ndarray | None = None) -> tuple:
        """With `rows`, FAISS's own id selector restricts each search (IVF probes its `nprobe` cells and HNSW walks
        its graph as usual, so either can return fewer than k: the index store then falls back to exact search)."""
        import faiss

        k = min(k, len(self) if rows is None else len(rows))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        x = np.ascontiguousarray(queries, dtype=np.float32)
        if self.rescore_rows is not None:
            fetch = min(k * self.rescore, len(self) if rows is None else len(rows))
            return self._rescored(x, k, *self._search(faiss, x, fetch, rows))
        return self._search(faiss, x, k, rows)

    def _rescored(self, x: np.ndarray, k: int, _scores: np.ndarray, found: np.ndarray) -> tuple:
        """The candidates `found` (B, R*k) rescored exactly from the float rows; the best k of each query."""
        out_s = np.full((len(x), k), -np.inf, np.float32)
        out_r = np.full((len(x), k), -1, np.int64)
        for b, cand in enumerate(found):
            cand = cand[cand >= 0]
            if not len(cand):
                continue
            order = np.argsort(cand)  # rows read in file order
            exact = np.asarray(self.rescore_rows[cand[order]], np.float32) @ x[b]
            best = np.argsort(-exact, kind="stable")[:k]
            out_s[b, :len(best)], out_r[b, :len(best)] = exact[best], cand[order][best]
        return out_s, out_r

    def _search(self, faiss, x: np.ndarray, k: int, rows: np.ndarray | None) -> tuple:
        if hasattr(self.index, "parallel_mode"):
            # IVF: FAISS shares its threads out over the queries (mode 0), which leaves all but one idle for a
            # single query; over the probed cells instead (mode 1) one query at 1M x 256, nprobe 26, took 0.31-0.42
            # ms on 2 threads against 0.55-0.59 (bench/search.py)
            self.index.parallel_mode = 1 if len(x) == 1 else 0
        if rows is None:
            return self.index.search(x, k)  # rows of -1 (IVF with too few probed cells) are dropped by the caller
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(rows, dtype=np.int64))
        if hasattr(self.index, "nprobe"):  # by the index itself: one read back from its file knows its type
            params = faiss.SearchParametersIVF(sel=sel, nprobe=self.index.nprobe)
        elif hasattr(self.index, "hnsw"):
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=self.index.hnsw.efSearch)
        else:
            params = faiss.SearchParameters(sel=sel)
        return self.index.search(x, k, params=params)


class MilvusBackend(VectorBackend):
    """A Milvus collection (pymilvus; a local milvus-lite file when `uri` is a path, a Milvus server when it is a
    URL), for galleries larger than one machine. Rows are stored with their row number as primary key, scored by
    inner product. `index_type`: FLAT (exact; the only one milvus-lite offers), or IVF_FLAT / HNSW on a server.

    A collection is written once and never changed: the persistent index (`store.py`) writes each generation to
    a collection of its own, names it in the manifest, and drops the older ones after the commit, so a kill
    leaves the manifest's collection whole."""

    name = "milvus"
    BATCH = 5000  # rows per insert call

    def __init__(self, client, collection: str):
        super().__init__()
        self.client, self.collection = client, collection
        self.count = int(client.get_collection_stats(collection)["row_count"])
        self.files = {"milvus_collection": collection}

    @classmethod
    def settings(cls, folder: Path, params: dict) -> dict:
        """A local milvus-lite file inside the index unless a `uri` is given; collections named `collection`_g<g>."""
        params = {"uri": str(Path(folder).resolve() / "milvus.db"), "collection": "cirlab",
                  "index_type": "FLAT"} | dict(params)
        cls.connect(params["uri"])  # fail early
        return params

    @classmethod
    def check(cls, params: dict) -> None:
        """Nothing to check without connecting: `settings` connects when the index is created."""

    @classmethod
    def build(cls, vectors: np.ndarray, folder: Path, generation: int, params: dict) -> MilvusBackend:
        backend = cls.create(vectors, params["uri"], f"{params['collection']}_g{generation}",
                             params.get("index_type", "FLAT"))
        backend.actual = {"index_type": params.get("index_type", "FLAT"), "metric_type": "IP"}
        return backend

    @classmethod
    def open(cls, folder: Path, files: dict, params: dict, vectors: np.ndarray) -> MilvusBackend:
        return cls.load(params["uri"], files["milvus_collection"])

    def retire(self, folder: Path, params: dict) -> None:
        stale = re.compile(re.escape(params["collection"]) + r"_g\d+$")
        for name in self.client.list_collections():
            if stale.match(name) and name != self.collection:
                self.client.drop_collection(name)

    @staticmethod
    def connect(uri: str):
        try:
            from pymilvus import MilvusClient
        except ImportError as e:
            raise CirlabError("the milvus backend needs pymilvus (and milvus-lite for a local file): "
                              "pip install 'cirlab[milvus]'") from e
        try:
            return MilvusClient(uri)
        except Exception as e:  # noqa: BLE001 - pymilvus raises its own and plain errors alike
            busy = " (a milvus-lite file is opened by one process at a time: stop the `cirlab serve` that holds " \
                   "it, or point --milvus-uri at a Milvus server)" if not uri.startswith(("http:", "https:")) else ""
            raise CirlabError(f"cannot open Milvus at {uri}: {type(e).__name__}: {str(e)[:300]}{busy}") from None

    @classmethod
    def create(cls, vectors: np.ndarray, uri: str, collection: str, index_type: str = "FLAT") -> MilvusBackend:
        client = cls.connect(uri)
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if client.has_collection(collection):
            client.drop_collection(collection)  # left by a writer killed before its commit
        index = client.prepare_index_params()
        index.add_index(field_name="vector", index_type=index_type, metric_type="IP")
        client.create_collection(collection, dimension=x.shape[1], metric_type="IP", id_type="int",
                                 auto_id=False, index_params=index)
        for lo in range(0, len(x), cls.BATCH):
            rows = [{"id": lo + i, "vector": v.tolist()} for i, v in enumerate(x[lo:lo + cls.BATCH])]
            client.insert(collection, rows)
        client.flush(collection)
        return cls(client, collection)

    @classmethod
    def load(cls, uri: str, collection: str) -> MilvusBackend:
        client = cls.connect(uri)
        if not client.has_collection(collection):
            raise CirlabError(f"Milvus at {uri} has no collection {collection!r}; rebuild the index")
        client.load_collection(collection)
        return cls(client, collection)

    def __len__(self) -> int:
        return self.count

    def search(self, queries: np.ndarray, k: int, rows: np.ndarray | None = None) -> tuple:
        """With `rows`, Milvus's boolean expression on the primary key (`id in [...]`) restricts the search."""
        allowed = rows
        k = min(k, len(self) if allowed is None else len(allowed))
        scores = np.full((len(queries), k), -np.inf, np.float32)
        rows = np.full((len(queries), k), -1, np.int64)
        if k == 0:
            return scores, rows
        expr = "" if allowed is None else f"id in [{', '.join(str(int(r)) for r in allowed)}]"
        found = self.client.search(self.collection, data=np.asarray(queries, np.float32).tolist(), limit=k,
                                   search_params={"metric_type": "IP"}, filter=expr)
        for b, hits in enumerate(found):
            for j, hit in enumerate(hits[:k]):
                scores[b, j], rows[b, j] = hit["distance"], hit["id"]
        return scores, rows


REGISTRY = {cls.name: cls for cls in (ExactBackend, FaissBackend, MilvusBackend)}


def _check_kind_params(kind: str, params: dict) -> None:
    """Refuses a parameter the faiss `kind` would ignore (say --coarse hnsw with kind hnsw), naming the kinds it
    acts on."""
    graph = kind in IVF_KINDS and params.get("coarse") == "hnsw"
    for name in params:
        kinds = FAISS_PARAM_KINDS[name] + (IVF_KINDS if graph and name in ("hnsw_m", "ef_construction") else ())
        if kind not in kinds:
            extra = " (and an IVF kind with coarse hnsw)" if name in ("hnsw_m", "ef_construction") else ""
            raise CirlabError(f"faiss parameter {name} does not apply to kind {kind!r}: it acts on "
                              f"{', '.join(FAISS_PARAM_KINDS[name])}{extra}")


def _exact_cells(faiss, index):
    """A flat index over the IVF index's centroids: rows are assigned to cells through it, so an HNSW coarse
    quantizer serves searches only. Assigning through the graph was approximate and, at 10M rows on 2 cores,
    slower than this one matrix product a block (720 s against 482 s for the flat quantizer's build)."""
    flat = faiss.IndexFlatIP(index.d)
    flat.add(index.quantizer.reconstruct_n(0, index.nlist))
    return flat


def _coarse_ef(index) -> None:
    """An IVF index whose coarse quantizer is an HNSW graph searches it with efSearch max(64, 2 nprobe)."""
    import faiss

    quantizer = faiss.downcast_index(index.quantizer)
    if hasattr(quantizer, "hnsw"):
        quantizer.hnsw.efSearch = max(64, 2 * int(index.nprobe))


def backend_class(name: str) -> type:
    if name not in REGISTRY:
        raise CirlabError(f"unknown index backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return REGISTRY[name]


def check_settings(name: str, params: dict | None) -> None:
    """Refuses an unknown backend or bad parameters before anything is embedded or written (`VectorBackend.check`)."""
    backend_class(name).check(dict(params or {}))


def make_backend(name: str, vectors: np.ndarray, kind: str = "flat", **params):
    """An in-process backend over `vectors`, kept in memory (Milvus collections are built by the index store,
    which names them)."""
    if name == "milvus":
        raise CirlabError("a milvus backend lives in a named collection: build it through ImageIndex")
    cls = backend_class(name)
    return cls(vectors, kind, **params) if cls is FaissBackend else cls(vectors, **params)


def calibrate(backend: FaissBackend, queries: np.ndarray, truth: list, target: float, k: int = 10,
              tokens: int = 1) -> dict:
    """The smallest search knob (IVF's nprobe, HNSW's efSearch) whose recall@k of `queries` against `truth` (each
    query's true top-k items) reaches `target`: doubled from 1 (IVF) or 8 (HNSW) until it does, then bisected
    between the last value that fell short and the first that reached it. The backend is left set to the value
    found (the largest tried, when none reaches the target). Returns {knob, value, recall, reached}."""
    knob = backend.search_knob()
    if knob is None:
        raise CirlabError("nothing to calibrate: only FAISS IVF and HNSW indexes have a search knob")
    limit = backend.index.nlist if knob == "nprobe" else 4096

    def recall_at(value: int) -> float:
        backend.set_search(**{knob: value})
        _, got = fold_tokens(*backend.search(queries, k * tokens), tokens, k)
        return float(np.mean([len(set(g) & set(t)) / max(len(t), 1) for g, t in zip(got, truth)]))
    low, value = 0, 1 if knob == "nprobe" else 8
    recall = recall_at(value)
    while recall < target and value < limit:
        low, value = value, min(value * 2, limit)
        recall = recall_at(value)
    if recall >= target:
        high, high_recall = value, recall
        while high - low > 1:  # recall rises with the knob: the smallest value that reaches the target
            mid = (low + high) // 2
            r = recall_at(mid)
            if r >= target:
                high, high_recall = mid, r
            else:
                low = mid
        value, recall = high, high_recall
    backend.set_search(**{knob: value})
    return {"knob": knob, "value": value, "recall": recall, "reached": recall >= target}


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
