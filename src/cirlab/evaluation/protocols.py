"""Benchmark protocols over the `CIRModel` interface only.

CIRR: the gallery is every image of the split, the reference is removed from its own ranking, R@{1,5,10,50};
Recall_subset@{1,2,3} ranks only the img_set members other than the reference. CIRCO: mAP@{5,10,25,50} over
gt_img_ids and R@K against the first ground truth (target_img_id), the reference kept (the maintainers' own example
test submission ranks it in 10 of 800 lists). FashionIQ and Shoes keep the reference by default too.
`remove_reference` overrides each default. Gallery features are cached on disk per (checkpoint, gallery, the
gallery files' paths, sizes and modification times).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from cirlab.data.images import PixelStore
from cirlab.data.readers import Split
from cirlab.errors import CirlabError
from cirlab.evaluation.metrics import map_at_k, recall_at_k
from cirlab.evaluation.per_query import records_from_ranking
from cirlab.types import Reference

CIRR_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)
CIRCO_KS = (5, 10, 25, 50)
MULTI_TARGET = ("circo", "synth-circo")  # per-query records carry every ground truth's rank


@dataclass
class Ranking:
    """Top-`depth` ranked gallery names per query, each query's subset ranking (empty when none), the full
    1-based rank of each query's first ground truth and, when asked for, of every ground truth."""
    ranked: list
    subset_ranked: list
    target_ranks: list = field(default_factory=list)
    gt_ranks: list | None = None

    def records(self, queries: list) -> list:
        """Per-query records (evaluation/per_query.py) of these queries, in the ranking's order."""
        return records_from_ranking(queries, self.target_ranks, self.subset_ranked, self.gt_ranks)


def _files_identity(split: Split, names: list) -> str:
    """A digest of every gallery file's path, size and modification time: images replaced, shuffled or truncated
    since the features were cached (or another data root) miss the cache instead of reusing stale features."""
    import os

    h = hashlib.sha1()
    for n in names:
        path = split.gallery[n]
        try:
            st = os.stat(path)
        except OSError:
            raise CirlabError(f"gallery image {n} of {split.dataset}/{split.name} is missing: {path}") from None
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@torch.no_grad()
def encode_gallery(model, split: Split, store: PixelStore, batch_size: int = 256, cache_dir=None,
                   model_id: str = "", progress: bool = True) -> tuple:
    """(names, features) for every gallery image, read from or written to the on-disk cache."""
    names = sorted(split.gallery)
    captions = None
    if model.target_captions:
        missing = [n for n in names if n not in split.captions]
        if missing:
            raise CirlabError(f"{len(missing)} gallery images of {split.dataset}/{split.name} have no caption "
                              f"(first: {missing[0]}); caption the gallery first")
        captions = split.caption_texts(names, model.target_captions)
    cache = None
    if cache_dir is not None:
        key = hashlib.sha1(json.dumps([model_id, split.dataset, split.name, names, store.preprocess.key(),
                                       captions, _files_identity(split, names)]).encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"gallery-{split.dataset}-{split.name}-{key}.pt"
        if cache.exists():
            return names, torch.load(cache, weights_only=True)
    feats = []
    for lo in tqdm(range(0, len(names), batch_size), desc=f"encode gallery {split.name}", leave=False,
                   disable=not progress, mininterval=1.0):
        chunk = names[lo:lo + batch_size]
        caps = captions[lo:lo + batch_size] if captions is not None else None
        feats.append(model.encode_target(store.pixels(chunk), caps).float().cpu())
    features = torch.cat(feats) if feats else torch.empty(0)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        from cirlab.atomic import write_atomic

        write_atomic(cache, lambda f: torch.save(features, f))
    return names, features


@torch.no_grad()
def encode_queries(model, queries: list, store: PixelStore, batch_size: int = 256,
                   split: Split | None = None) -> torch.Tensor:
    """(V, Q, D): one row per phrasing; V = 1 + the number of alternative phrasings (the same for every query).
    `split`, the queries' benchmark split, lets a method adapt its query encoding to it (`query_context`)."""
    variants = {len(q.alt_texts) for q in queries}
    if len(variants) > 1:
        raise CirlabError("queries of one split must all have the same number of alternative phrasings")
    n_alt = variants.pop() if variants else 0
    references = _references(model, queries, split)
    out = []
    with model.query_context(split.dataset if split else "", split.name if split else ""):
        for v in range(1 + n_alt):
            out.append(_encode_phrasing(model, queries, store, batch_size, v, references))
    return torch.stack(out)


def _references(model, queries: list, split: Split | None) -> list | None:
    """Each query's types.Reference, for a method whose queries read the reference's description."""
    if not model.query_captions:
        return None
    names = [q.reference for q in queries]
    missing = [n for n in names if split is None or n not in split.captions]
    if missing:
        where = f"{split.dataset}/{split.name}" if split else "these queries"
        raise CirlabError(f"method {model.name} reads a description of each reference; {len(set(missing))} "
                          f"reference images of {where} have none (first: {missing[0]}); caption the split first "
                          "(cirlab caption, then --captions)")
    return [Reference(n, c) for n, c in zip(names, split.caption_texts(names, model.query_captions))]


def _encode_phrasing(model, queries: list, store: PixelStore, batch_size: int, v: int,
                     references: list | None = None) -> torch.Tensor:
    feats = []
    for lo in range(0, len(queries), batch_size):
        chunk = queries[lo:lo + batch_size]
        texts = [q.text if v == 0 else q.alt_texts[v - 1] for q in chunk]
        pixels = store.pixels([q.reference for q in chunk])
        extra = {} if references is None else {"references": references[lo:lo + batch_size]}
        feats.append(model.encode_query(pixels, texts, **extra).float().cpu())
    return torch.cat(feats)


def _full_rank(scores: torch.Tensor, col: int | None, top: list, name: str, depth: int) -> int:
    """1-based rank of gallery column `col` in a query's scores (B=1, N): its place in the top list when it is
    there, else one more than the entries scored above it (at least depth + 1); a name outside the gallery ranks
    after every gallery item."""
    if name in top:
        return top.index(name) + 1
    if col is None:
        return scores.shape[0] + 1
    return max(depth + 1, 1 + int((scores > scores[col]).sum()))


@dataclass
class Rerank:
    """A second stage: `model` rescores the first stage's top `k` for each query from its own query features
    `qfeat` (V, Q, D) and gallery features `gfeat` (in the first stage's gallery order)."""
    model: object
    qfeat: torch.Tensor
    gfeat: torch.Tensor
    k: int


def _scores(model, qfeat: torch.Tensor, gfeat: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """(b, N) similarities of queries lo..hi, averaged over their phrasings."""
    if qfeat.dim() == 2:
        qfeat = qfeat.unsqueeze(0)  # (V, Q, D): one phrasing
    return torch.stack([model.similarity(q[lo:hi], gfeat) for q in qfeat]).mean(0)


def cascade_scores(first: torch.Tensor, second: torch.Tensor, k: int) -> torch.Tensor:
    """Scores that rank each row's top `k` of `first` by `second`, then the rest in `first`'s order (rows of
    (b, N); -inf entries, a removed reference, stay last)."""
    k = min(k, first.shape[1])
    top = first.topk(k, dim=1).indices
    finite = torch.cat([first[torch.isfinite(first)].abs(), second[torch.isfinite(second)].abs()])
    off = 1.0 + (float(finite.max()) if finite.numel() else 0.0)  # small: a large offset would round scores away
    out = (first - off).scatter(1, top, off + second.gather(1, top))
    return out.masked_fill(first == float("-inf"), float("-inf"))  # a removed reference stays removed


@torch.no_grad()
def rank(model, queries: list, qfeat: torch.Tensor, names: list, gfeat: torch.Tensor, remove_reference: bool,
         depth: int = 50, batch_size: int = 256, all_targets: bool = False, rerank: Rerank | None = None) -> Ranking:
    """Rank the gallery for each query (similarities averaged over its phrasings); `all_targets` also records
    the full rank of every ground truth (multi-target splits); `rerank` rescores each query's top k with a second
    model (the subset ranking follows the same cascaded scores)."""
    index = {n: i for i, n in enumerate(names)}
    ranked, subset_ranked, target_ranks, gt_ranks = [], [], [], []
    for lo in range(0, len(queries), batch_size):
        chunk = queries[lo:lo + batch_size]
        scores = _scores(model, qfeat, gfeat, lo, lo + batch_size)  # (b, N)
        if remove_reference:
            for i, q in enumerate(chunk):
                if q.reference in index:
                    scores[i, index[q.reference]] = float("-inf")
        if rerank is not None:
            second = _scores(rerank.model, rerank.qfeat, rerank.gfeat, lo, lo + batch_size)
            scores = cascade_scores(scores, second, rerank.k)
        top = scores.topk(min(depth, scores.shape[1]), dim=1).indices
        for i, q in enumerate(chunk):
            ranked.append([names[j] for j in top[i].tolist()])
            ranks = [_full_rank(scores[i], index.get(t), ranked[-1], t, depth) for t in q.targets]
            target_ranks.append(ranks[0] if ranks else len(names) + 1)
            gt_ranks.append(ranks)
            members = [m for m in q.subset if m != q.reference]
            if members:
                cols = torch.tensor([index[m] for m in members])
                order = scores[i, cols].argsort(descending=True).tolist()
                subset_ranked.append([members[j] for j in order])
            else:
                subset_ranked.append([])
    return Ranking(ranked, subset_ranked, target_ranks, gt_ranks if all_targets else None)


def _recalls(queries: list, ranked: list, ks, prefix: str = "") -> dict:
    targets = [q.targets[0] for q in queries]
    return {f"{prefix}R@{k}": recall_at_k(ranked, targets, k) for k in ks}


def benchmark_metrics(dataset: str, queries: list, ranked: list, subset_ranked: list | None = None,
                      cirr_avg: bool = False) -> dict:
    """The official metric set of each benchmark, in percent, from ranked lists taken as given.

    cirr/synth: R@1/5/10/50 and, with subset rankings, Rsubset@1/2/3 (plus Avg = (R@5 + Rsubset@1) / 2 when
    `cirr_avg`); circo: mAP@5/10/25/50 over gt_img_ids and R@5/10/25/50 against target_img_id (the first ground
    truth); fashioniq: R@10/R@50 per category (keys "<category>/<row>"), their averages and the mean of the two;
    shoes: R@1/10/50 and their mean.
    """
    if dataset in MULTI_TARGET:
        out = {f"mAP@{k}": map_at_k(ranked, [q.targets for q in queries], k) for k in CIRCO_KS}
        return out | _recalls(queries, ranked, CIRCO_KS)
    if dataset == "fashioniq":
        out, cats = {}, sorted({q.key.split("/")[0] for q in queries})
        for cat in cats:
            idx = [i for i, q in enumerate(queries) if q.key.split("/")[0] == cat]
            out |= _recalls([queries[i] for i in idx], [ranked[i] for i in idx], (10, 50), f"{cat}/")
        for k in (10, 50):
            out[f"avg/R@{k}"] = sum(out[f"{c}/R@{k}"] for c in cats) / len(cats)
        out["avg"] = (out["avg/R@10"] + out["avg/R@50"]) / 2
        return out
    if dataset == "shoes":
        out = _recalls(queries, ranked, (1, 10, 50))
        return out | {"avg": sum(out.values()) / 3}
    out = _recalls(queries, ranked, CIRR_KS)
    if subset_ranked is not None and any(subset_ranked):
        targets = [q.targets[0] for q in queries]
        for k in SUBSET_KS:  # subset rankings hold only img_set members other than the reference
            out[f"Rsubset@{k}"] = recall_at_k(subset_ranked, targets, k)
        if cirr_avg:
            out["Avg"] = (out["R@5"] + out["Rsubset@1"]) / 2
    return out


# benchmarks whose protocol keeps the reference in the ranking by default
REFERENCE_KEPT = ("circo", "synth-circo", "fashioniq", "shoes")


def evaluate(model, split: Split, cache_dir=None, model_id: str = "", remove_reference: bool | None = None,
             batch_size: int = 256, progress: bool = True, store: PixelStore | None = None,
             rerank: tuple | None = None) -> tuple:
    """Run the split's protocol; returns (metrics in percent, ranking).

    The reference is removed from its own ranking by default for CIRR (and synth); CIRCO, FashionIQ and Shoes
    keep it (`remove_reference` overrides). Queries with alternative phrasings average their similarities.
    `store` reuses decoded images across calls (one evaluation per epoch, say); it must use the model's
    preprocessing. `rerank`, (second model, k, its cache folder, its id), rescores each query's top k with the
    second model (a cascade; the reference is removed before the top k is taken).
    """
    queries = [q for q in split.queries if q.targets]
    if not queries:
        raise CirlabError(f"split {split.dataset}/{split.name} has no ground truth to evaluate against")
    if remove_reference is None:
        remove_reference = split.dataset not in REFERENCE_KEPT
    store = store or PixelStore(split.gallery, model.preprocess)
    model.eval()
    names, gfeat = encode_gallery(model, split, store, batch_size, cache_dir, model_id, progress)
    qfeat = encode_queries(model, queries, store, batch_size, split)
    second = None
    if rerank is not None:
        model2, k, cache2, id2 = rerank
        model2.eval()
        store2 = store if model2.preprocess.key() == model.preprocess.key() else \
            PixelStore(split.gallery, model2.preprocess)
        _, gfeat2 = encode_gallery(model2, split, store2, batch_size, cache2, id2, progress)  # the same names
        second = Rerank(model2, encode_queries(model2, queries, store2, batch_size, split), gfeat2, k)
    ranking = rank(model, queries, qfeat, names, gfeat, remove_reference, depth=50,
                   all_targets=split.dataset in MULTI_TARGET, rerank=second)
    metrics = benchmark_metrics(split.dataset, queries, ranking.ranked, ranking.subset_ranked)
    return metrics, ranking


def read_benchmark(dataset: str, data_root, split: str, join: str = "and") -> list:
    """The splits a benchmark's protocol ranks separately: one per FashionIQ category, otherwise one."""
    from cirlab.data.readers import read_split

    if dataset != "fashioniq":
        return [read_split(dataset, data_root, split)]
    from cirlab.data.fashioniq import CATEGORIES

    return [read_split(dataset, data_root, split, join=join, category=cat) for cat in CATEGORIES]


def evaluate_benchmark(model, dataset: str, splits: list, remove_reference: bool | None = None, cache_dir=None,
                       model_id: str = "", progress: bool = True, rerank: tuple | None = None) -> tuple:
    """The benchmark's protocol on the splits `read_benchmark` gives: (metrics, per-query records). FashionIQ
    ranks each category against its own gallery, then reports R@10/R@50 per category, their averages and the mean
    of the two (keys as `cirlab score` writes them); its records follow the categories in order."""
    queries, ranked, records = [], [], []
    for part in splits:
        metrics, ranking = evaluate(model, part, cache_dir, model_id, remove_reference, progress=progress,
                                    rerank=rerank)
        part_queries = [q for q in part.queries if q.targets]
        queries += part_queries
        ranked += ranking.ranked
        records += ranking.records(part_queries)
    if dataset != "fashioniq":
        return metrics, records
    return benchmark_metrics("fashioniq", queries, ranked), records
