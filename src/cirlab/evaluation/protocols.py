"""Benchmark protocols over the `CIRModel` interface only.

CIRR: the gallery is every image of the split, the reference is removed from its own ranking, R@{1,5,10,50};
Recall_subset@{1,2,3} ranks only the img_set members other than the reference. CIRCO: mAP@{5,10,25,50} over
gt_img_ids and R@K against the first ground truth (target_img_id); the reference stays in the ranking by default
(`remove_reference` switches it off). Gallery features are cached on disk per (checkpoint, gallery).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cirlab.data.images import PixelStore
from cirlab.data.readers import Split
from cirlab.errors import CirlabError
from cirlab.evaluation.metrics import map_at_k, recall_at_k, subset_recall_at_k

CIRR_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)
CIRCO_KS = (5, 10, 25, 50)


@dataclass
class Ranking:
    """Top-`depth` ranked gallery names per query, and each query's subset ranking (empty when none)."""
    ranked: list
    subset_ranked: list


def checkpoint_identity(folder) -> str:
    """Changes whenever a file of the checkpoint changes (name, size, modification time)."""
    folder = Path(folder)
    parts = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and "cache" not in p.relative_to(folder).parts:
            st = p.stat()
            parts.append(f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


@torch.no_grad()
def encode_gallery(model, split: Split, store: PixelStore, batch_size: int = 256, cache_dir=None,
                   model_id: str = "", progress: bool = True) -> tuple:
    """(names, features) for every gallery image, read from or written to the on-disk cache."""
    names = sorted(split.gallery)
    captions = None
    if model.needs_captions:
        missing = [n for n in names if n not in split.captions]
        if missing:
            raise CirlabError(f"{len(missing)} gallery images of {split.dataset}/{split.name} have no caption "
                              f"(first: {missing[0]}); caption the gallery first")
        captions = [split.captions[n] for n in names]
    cache = None
    if cache_dir is not None:
        key = hashlib.sha1(json.dumps([model_id, split.dataset, split.name, names, store.preprocess.key(),
                                       captions is not None]).encode()).hexdigest()[:16]
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
        tmp = cache.with_name(cache.name + ".tmp")
        torch.save(features, tmp)
        os.replace(tmp, cache)
    return names, features


@torch.no_grad()
def encode_queries(model, queries: list, store: PixelStore, batch_size: int = 256) -> torch.Tensor:
    feats = []
    for lo in range(0, len(queries), batch_size):
        chunk = queries[lo:lo + batch_size]
        feats.append(model.encode_query(store.pixels([q.reference for q in chunk]),
                                        [q.text for q in chunk]).float().cpu())
    return torch.cat(feats)


@torch.no_grad()
def rank(model, queries: list, qfeat: torch.Tensor, names: list, gfeat: torch.Tensor, remove_reference: bool,
         depth: int = 50, batch_size: int = 256) -> Ranking:
    index = {n: i for i, n in enumerate(names)}
    ranked, subset_ranked = [], []
    for lo in range(0, len(queries), batch_size):
        chunk = queries[lo:lo + batch_size]
        scores = model.similarity(qfeat[lo:lo + batch_size], gfeat)  # (b, N)
        if remove_reference:
            for i, q in enumerate(chunk):
                if q.reference in index:
                    scores[i, index[q.reference]] = float("-inf")
        top = scores.topk(min(depth, scores.shape[1]), dim=1).indices
        for i, q in enumerate(chunk):
            ranked.append([names[j] for j in top[i].tolist()])
            members = [m for m in q.subset if m != q.reference]
            if members:
                cols = torch.tensor([index[m] for m in members])
                order = scores[i, cols].argsort(descending=True).tolist()
                subset_ranked.append([members[j] for j in order])
            else:
                subset_ranked.append([])
    return Ranking(ranked, subset_ranked)


def cirr_metrics(queries: list, ranking: Ranking) -> dict:
    targets = [q.targets[0] for q in queries]
    out = {f"R@{k}": recall_at_k(ranking.ranked, targets, k) for k in CIRR_KS}
    if any(ranking.subset_ranked):
        for k in SUBSET_KS:
            out[f"Rsubset@{k}"] = subset_recall_at_k(ranking.subset_ranked, [q.subset for q in queries], targets, k)
    return out


def circo_metrics(queries: list, ranking: Ranking) -> dict:
    gts = [q.targets for q in queries]
    out = {f"mAP@{k}": map_at_k(ranking.ranked, gts, k) for k in CIRCO_KS}
    out.update({f"R@{k}": recall_at_k(ranking.ranked, [g[0] for g in gts], k) for k in CIRCO_KS})
    return out


def evaluate(model, split: Split, cache_dir=None, model_id: str = "", remove_reference: bool | None = None,
             batch_size: int = 256, progress: bool = True) -> tuple:
    """Run the split's protocol; returns (metrics in percent, ranking)."""
    queries = [q for q in split.queries if q.targets]
    if not queries:
        raise CirlabError(f"split {split.dataset}/{split.name} has no ground truth to evaluate against")
    circo = split.dataset in ("circo", "synth-circo")
    if remove_reference is None:
        remove_reference = not circo
    store = PixelStore(split.gallery, model.backbone.preprocess)
    model.eval()
    names, gfeat = encode_gallery(model, split, store, batch_size, cache_dir, model_id, progress)
    qfeat = encode_queries(model, queries, store, batch_size)
    ranking = rank(model, queries, qfeat, names, gfeat, remove_reference, depth=50)
    metrics = circo_metrics(queries, ranking) if circo else cirr_metrics(queries, ranking)
    return metrics, ranking
