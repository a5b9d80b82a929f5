"""`cirlab viz tsne`: where a checkpoint puts composed queries, target images and target captions.

CSMCIR's motivation is that an asymmetric design leaves query features, target-image features and target-caption
features in separate clusters of the embedding space (fragmentation), and that one shared tower brings them
together. This draws the three (and the method's own target features, when they differ from the image's) for the
queries of a split in 2-D with t-SNE, and writes the figures that back the picture: the mean cosine between each
query and its own target under each view, and the distance between the groups' centroids.

- "target": `encode_target` as the method ranks with it (captioned, for methods that read captions).
- "target image": `encode_target` without a caption (the same as "target" for methods that read none).
- "target caption": the backbone's text tower on the target's caption (CLIP text tower, or the BLIP-2 Q-Former in
  text-only mode), projected as the backbone projects text.
Multi-token features (BLIP-2 query tokens) are averaged into one vector and normalised before plotting.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from cirlab.errors import CirlabError

COLOURS = {"query": "#d62728", "target": "#1f77b4", "target image": "#2ca02c", "target caption": "#ff7f0e"}


def _pooled(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.mean(1) if x.dim() == 3 else x, dim=-1)


@torch.no_grad()
def embed_views(model, split, n: int = 300, batch_size: int = 128) -> dict:
    """name -> (n, D) features of the first n queries that have a target (see the module docstring)."""
    from cirlab.data.images import PixelStore

    queries = [q for q in split.queries if q.targets][:n]
    if not queries:
        raise CirlabError(f"split {split.dataset}/{split.name} has no queries with targets to plot")
    targets = [q.targets[0] for q in queries]
    missing = [t for t in targets if t not in split.captions]
    if missing:
        raise CirlabError(f"{len(missing)} targets have no caption (first: {missing[0]}); the target-caption view "
                          "needs them: pass --captions, a cache from `cirlab caption`")
    store = PixelStore(split.gallery, model.preprocess)
    bb = model.backbone
    names = [k for k in COLOURS if model.target_captions or k != "target image"]  # else "target image" == "target"
    views: dict = {k: [] for k in names}
    for lo in range(0, len(queries), batch_size):
        qs, ts = queries[lo:lo + batch_size], targets[lo:lo + batch_size]
        caps = split.caption_texts(ts, model.target_captions or "final_caption")
        tgt_px = store.pixels(ts)
        views["query"].append(model.encode_query(store.pixels([q.reference for q in qs]), [q.text for q in qs]))
        views["target"].append(_pooled(model.encode_target(tgt_px, caps if model.target_captions else None)))
        if "target image" in views:  # the same tower with empty captions: what the image alone contributes
            views["target image"].append(_pooled(model.encode_target(tgt_px, [""] * len(ts))))
        views["target caption"].append(_pooled(bb.encode_text(bb.tokenize(caps, bb.device))))
    return {k: torch.cat(v).float().cpu() for k, v in views.items()}


def fragmentation(views: dict) -> dict:
    """Mean cosine of each query with its own target under each view, and centroid distances from the queries."""
    q = views["query"]
    stats = {}
    for name, x in views.items():
        if name == "query":
            continue
        stats[f"cos(query, {name})"] = round(float((q * x).sum(-1).mean()), 4)
        stats[f"centroid distance(query, {name})"] = round(float((q.mean(0) - x.mean(0)).norm()), 4)
    return stats


def tsne_plot(views: dict, path, title: str, seed: int = 0, links: int = 25) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    names = list(views)
    x = torch.cat([views[k] for k in names]).numpy()
    n = views["query"].shape[0]
    xy = TSNE(n_components=2, perplexity=min(30, max(5, n // 4)), init="pca", random_state=seed,
              metric="cosine").fit_transform(x)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=120)
    parts = {k: xy[i * n:(i + 1) * n] for i, k in enumerate(names)}
    for i in range(min(links, n)):  # a few query -> own target links
        ax.plot([parts["query"][i, 0], parts["target"][i, 0]], [parts["query"][i, 1], parts["target"][i, 1]],
                color="#999999", lw=0.5, zorder=1)
    for k in names:
        ax.scatter(parts[k][:, 0], parts[k][:, 1], s=7, c=COLOURS[k], label=k, alpha=0.75, zorder=2)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=2, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_tsne(checkpoint, data_root, out, dataset: str = "synth", split: str = "test1", n: int = 300,
             captions=None, seed: int = 0, device: str = "cpu") -> dict:
    import cirlab
    from cirlab.data.readers import attach_captions, read_split

    data = read_split(dataset, data_root, split)
    if captions:
        attach_captions(data, captions)
    model = cirlab.load(checkpoint, device=device)
    views = embed_views(model, data, n)
    stats = fragmentation(views)
    out = Path(out)
    tsne_plot(views, out, f"{model.name} ({Path(checkpoint).name}) on {dataset}/{split}: "
                          f"{views['query'].shape[0]} queries", seed)
    doc = {"checkpoint": str(checkpoint), "method": model.name, "dataset": dataset, "split": split,
           "queries": views["query"].shape[0], "stats": stats}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def scene_edit_distance(a: dict, b: dict) -> int:
    """How many atomic edits (recolour, reshape, resize, move, add, remove) turn scene graph `a` into `b`, counted
    greedily: objects in the same cell differ by their attributes; an object found elsewhere with the same
    attributes moved (1); others left over pair up as a move plus their attribute changes; the rest were added or
    removed (1 each). An upper bound of the true edit distance, exact for the world's one- and two-edit queries."""
    attrs = ("shape", "colour", "size")
    left = {o["cell"]: o for o in a["objects"]}
    right = {o["cell"]: o for o in b["objects"]}
    d = 0
    for cell in set(left) & set(right):
        d += sum(left[cell][k] != right[cell][k] for k in attrs)
    only_a = [left[c] for c in sorted(set(left) - set(right))]
    only_b = [right[c] for c in sorted(set(right) - set(left))]
    for o in list(only_a):
        same = next((x for x in only_b if all(x[k] == o[k] for k in attrs)), None)
        if same is not None:
            d += 1
            only_a.remove(o)
            only_b.remove(same)
    for x, y in zip(only_a, only_b):
        d += 1 + sum(x[k] != y[k] for k in attrs)
    return d + abs(len(only_a) - len(only_b))


@torch.no_grad()
def bank_report(checkpoint, data_root, n: int = 256, split: str = "train", seed: int = 0) -> dict:
    """How far from each query's target (in scene-graph edits) are the negatives a csmcir checkpoint's memory
    bank hands out: for `n` random triplets of the synthetic world's split, the bank's negatives as in training
    (the bank's state as saved), each compared with the triplet's target. Distance 0 is a false negative (the
    same scene as the target); 1 is a negative that differs by one edit, the ones that teach the edit."""
    import random

    from cirlab.data.images import PixelStore
    from cirlab.data.readers import read_split
    from cirlab.methods import load_model
    from cirlab.training.data import TripletSource

    model = load_model(checkpoint)
    if model.name != "csmcir":
        raise CirlabError(f"{checkpoint} holds a {model.name} checkpoint; only csmcir has a memory bank")
    graphs_file = Path(data_root) / "synth" / "scenes.json"
    if not graphs_file.exists():
        raise CirlabError(f"the bank report needs the synthetic world's scene graphs, not found: {graphs_file}")
    graphs = json.loads(graphs_file.read_text())
    data = read_split("synth", data_root, split)
    queries = [q for q in data.queries if q.targets]
    rows = random.Random(seed).sample(range(len(queries)), min(n, len(queries)))
    source = TripletSource(data, PixelStore(data.gallery, model.preprocess), model.target_captions)
    names, distances, unknown = sorted(data.gallery), [], 0
    for lo in range(0, len(rows), 64):
        idx = rows[lo:lo + 64]
        batch = source.batch(idx)
        for target, negs in zip(batch.target_names, model.bank_negatives(batch, names)):
            for neg in negs:
                if neg is None or neg not in graphs:
                    unknown += 1
                    continue
                distances.append(scene_edit_distance(graphs[target], graphs[neg]))
    counts = {str(k): sum(d == k for d in distances) for k in range(4)}
    counts["4+"] = sum(d >= 4 for d in distances)
    total = max(1, len(distances))
    return {"checkpoint": str(checkpoint), "split": split, "queries": len(rows), "negatives": len(distances),
            "not_in_split": unknown, "share_by_edits": {k: round(v / total, 4) for k, v in counts.items()},
            "mean_edits": round(sum(distances) / total, 3)}
