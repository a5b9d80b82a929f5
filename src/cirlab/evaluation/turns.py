"""Multi-turn refinement on the synthetic world's chains (`cirlab synth --chains N`, `cirlab eval --split chains`).

Each chain is a reference and 2 or 3 turns, each turn a text that changes the previous turn's target. Turn t is
ranked over the chains' whole gallery with its reference removed (the CIRR protocol), and scored by R@1 and R@10
against the turn's target. The reference of turn t > 1 is, in mode `true`, the previous turn's true target (each
turn measured on its own) and, in mode `predicted`, the previous turn's top-ranked image (a user who takes the
first result and refines it: errors carry over). Turn 1 is the same in both modes.
"""
from __future__ import annotations

from cirlab.data.images import PixelStore
from cirlab.evaluation.metrics import recall_at_k
from cirlab.evaluation.protocols import encode_gallery, encode_queries, rank
from cirlab.types import Query

MODES = ("true", "predicted")


def evaluate_turns(model, split, chains: list, cache_dir=None, model_id: str = "", progress: bool = True) -> dict:
    """{mode: {"turn N": {"R@1", "R@10", "queries"}}} in percent, for both modes."""
    model.eval()
    store = PixelStore(split.gallery, model.preprocess)
    names, gfeat = encode_gallery(model, split, store, 256, cache_dir, model_id, progress)
    out = {}
    for mode in MODES:
        refs = {c["id"]: c["reference"] for c in chains}
        out[mode] = {}
        for t in range(max(len(c["turns"]) for c in chains)):
            active = [c for c in chains if len(c["turns"]) > t]
            queries = [Query(f"{c['id']}/{t + 1}", refs[c["id"]], c["turns"][t]["text"], (c["turns"][t]["target"],))
                       for c in active]
            qfeat = encode_queries(model, queries, store, split=split)
            ranked = rank(model, queries, qfeat, names, gfeat, remove_reference=True, depth=50).ranked
            targets = [q.targets[0] for q in queries]
            out[mode][f"turn {t + 1}"] = {"R@1": recall_at_k(ranked, targets, 1),
                                          "R@10": recall_at_k(ranked, targets, 10), "queries": len(queries)}
            for c, r in zip(active, ranked):
                refs[c["id"]] = c["turns"][t]["target"] if mode == "true" else r[0]
    return out
