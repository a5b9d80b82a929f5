"""Write the synthetic world to disk in the official layouts.

CIRR layout at the root (captions/cap.rc2.{split}.json, image_splits/split.rc2.{split}.json, images under
train/, dev/, test1/), a CIRCO layout under circo/ (annotations/{val,test}.json with gt_img_ids, images under
unlabeled2017/ listed by image_info_unlabeled2017.json), and the world's own side files under synth/ (scene graphs,
oracle multi-level captions, the edit behind each query). Unlike the real CIRR test1 split, every split keeps its
targets. Interpretation: CIRR's reference_rank/target_rank are written as the indices of the reference and the
target in `members`.

Each query's gallery holds hard negatives: the same operation with the wrong value or on the wrong object, the
partial edit of a compound, the right edit plus an unrelated change, and near-reference scenes (one unrelated
operation), so that neither the reference image nor the text alone finds the target.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cirlab.data.spawn import spawn_pool
from cirlab.data.synth.world import (CELLS, COLOURS, HELD_OUT_PAIRS, HELD_OUT_TEMPLATES, OPS, SHAPES, TEMPLATES,
                                     Op, apply_ops, candidate_ops, describe, edit_text, oracle_captions,
                                     random_scene, render, scene_allowed, scene_key, scene_to_graph)

WORLD_VERSION = "synth-v1"
RENDER_CHUNK = 256  # scenes a render worker takes at a time
ORACLE_MODEL = "cirlab-oracle"
ORACLE_PROMPT_VERSION = "oracle-v1"


@dataclass(frozen=True)
class WorldSize:
    image_size: int
    queries: dict  # split -> number of queries
    circo_queries: dict
    p_compound: float = 0.3
    extra_distractors: int = 2
    p_held_out: float = 0.25  # chance that an op of a val/test query uses a held-out paraphrase template
    train_siblings: int = 3  # extra training queries per img_set (see generate_cirr_split)


SIZES = {
    "small": WorldSize(64, {"train": 1200, "val": 200, "test1": 200}, {"val": 40, "test": 60}),
    "default": WorldSize(64, {"train": 4000, "val": 400, "test1": 600}, {"val": 100, "test": 200}),
}
SPLIT_PREFIX = {"train": "train", "val": "dev", "test1": "test1"}


class ImagePool:
    """Unique scenes of one split: one name and one PNG per scene graph."""

    def __init__(self, prefix: str, image_size: int):
        self.prefix, self.image_size = prefix, image_size
        self.names: dict = {}  # scene key -> name
        self.scenes: dict = {}  # name -> scene

    def add(self, scene) -> str:
        key = scene_key(scene)
        if key not in self.names:
            name = f"{self.prefix}-{len(self.names):05d}"
            self.names[key] = name
            self.scenes[name] = scene
        return self.names[key]


def _write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a killed run never leaves a half-written file (no fsync: a world
    is rewritten whole when its info file is missing)."""
    from cirlab.atomic import write_atomic

    write_atomic(path, lambda f: f.write(data), sync=False)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _png_bytes(scene, size: int) -> bytes:
    buf = io.BytesIO()
    render(scene, size).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _sample_edit(rng, ref, train: bool, p_compound: float):
    """One or two ops on `ref` (two ops touch different objects)."""
    n_ops = 2 if rng.random() < p_compound else 1
    kinds = [OPS[i] for i in rng.choice(len(OPS), size=n_ops, replace=False)]
    ops = []
    for kind in kinds:
        cands = [o for o in candidate_ops(ref, rng, kind, train)
                 if kind == "add" or all(o.index != p.index for p in ops if p.kind != "add")]
        if not cands:
            return None
        ops.append(cands[rng.integers(len(cands))])
    return ops


def _random_single(rng, scene, train: bool):
    kind = OPS[rng.integers(len(OPS))]
    cands = candidate_ops(scene, rng, kind, train)
    return cands[rng.integers(len(cands))] if cands else None


def _distractors(rng, ref, ops, target, train: bool, n_members: int, n_extra: int):
    """Hard negatives for the img_set (n_members) and extra gallery-only near-reference scenes (n_extra).

    Each is returned as (scene, ops that make it from `ref`).
    """
    seen = {scene_key(ref), scene_key(target)}
    groups = {"wrong": [], "partial": [], "plus": [], "near": []}

    def offer(group, edit):
        scene = apply_ops(ref, edit)
        if scene is not None and scene_allowed(scene, train) and scene_key(scene) not in seen:
            seen.add(scene_key(scene))
            groups[group].append((scene, list(edit)))

    if len(ops) == 2:
        offer("partial", [ops[0]])
        offer("partial", [ops[1]])
    wrong = []
    for i, op in enumerate(ops):
        for alt in candidate_ops(ref, rng, op.kind, train):
            if alt != op:
                wrong.append(ops[:i] + [alt] + ops[i + 1:])
    for j in rng.permutation(len(wrong)):
        offer("wrong", wrong[j])
    touched = {op.index for op in ops}
    for _ in range(12):
        extra = _random_single(rng, ref, train)
        if extra is not None and extra.kind != "add" and extra.index not in touched:
            offer("plus", list(ops) + [extra])
        near = _random_single(rng, ref, train)
        if near is not None:
            offer("near", [near])
    # img_set: two wrong-value/wrong-object, a partial edit (compounds), the edit plus a change, then fill.
    members = groups["wrong"][:2] + groups["partial"][:1] + groups["plus"][:1]
    rest = groups["wrong"][2:] + groups["partial"][1:] + groups["near"] + groups["plus"][1:]
    members += rest[: max(0, n_members - len(members))]
    extras = [s for s in groups["near"] if s not in members][:n_extra]
    return members[:n_members], extras


def _templates(rng, n_ops: int, train: bool, p_held_out: float) -> list:
    """Template indices for each op and the compound join; held-out ones only outside train."""
    n_all = len(TEMPLATES["recolour"])
    n_train = n_all - HELD_OUT_TEMPLATES
    out = []
    for _ in range(n_ops + (n_ops == 2)):
        if not train and rng.random() < p_held_out:
            out.append(int(rng.integers(n_train, n_all)))
        else:
            out.append(int(rng.integers(n_train)))
    return out


def _make_query(rng, train: bool, size: WorldSize):
    while True:
        ref = random_scene(rng, train)
        ops = _sample_edit(rng, ref, train, size.p_compound)
        if ops is None:
            continue
        target = apply_ops(ref, ops)
        if target is None or not scene_allowed(target, train):
            continue
        members, extras = _distractors(rng, ref, ops, target, train, 4, size.extra_distractors)
        if len(members) < 4:
            continue
        return ref, ops, target, members, extras, _templates(rng, len(ops), train, size.p_held_out)


def generate_cirr_split(split: str, seed: int, size: WorldSize, first_pairid: int):
    """Queries and the image pool of one split (nothing written yet).

    In train, distractors made by at most two operations are also the targets of sibling queries on the same
    reference and img_set (as CIRR forms several pairs per img_set), so one image set yields several triplets.
    """
    train = split == "train"
    rng = np.random.default_rng([seed, list(SPLIT_PREFIX).index(split)])
    pool = ImagePool(SPLIT_PREFIX[split], size.image_size)
    rows, edits = [], {}
    pairid = first_pairid
    for q in range(size.queries[split]):
        ref, ops, target, members, extras, templates = _make_query(rng, train, size)
        names = [pool.add(s) for s in [ref, target] + [m for m, _ in members]]
        for s, _ in extras:
            pool.add(s)
        order = [int(i) for i in rng.permutation(len(names))]
        member_names = [names[i] for i in order]
        pairs = [(1, ops, templates)]
        if train:
            pairs += [(2 + j, m_ops, _templates(rng, len(m_ops), True, 0.0))
                      for j, (_, m_ops) in enumerate(members) if len(m_ops) <= 2][:size.train_siblings]
        for slot, p_ops, p_templates in pairs:
            rows.append({
                "pairid": pairid, "reference": names[0], "target_hard": names[slot],
                "target_soft": {names[slot]: 1.0}, "caption": edit_text(ref, p_ops, p_templates),
                "img_set": {"id": first_pairid + q, "members": member_names, "reference_rank": order.index(0),
                            "target_rank": order.index(slot)},
            })
            edits[str(pairid)] = {"ops": [op.to_json() for op in p_ops], "templates": p_templates,
                                  "objects": [describe(ref, op.index) for op in p_ops if op.kind != "add"]}
            pairid += 1
    return rows, edits, pool


def generate_chains(seed: int, n: int, size: WorldSize, max_turns: int = 3) -> tuple:
    """Multi-turn chains (nothing written yet): `n` chains alternating 2 and `max_turns` turns, each turn one
    operation on the previous turn's target, with its text, its target and the turn's hard negatives (as a test1
    query's: wrong value or object, the edit plus a change, near-previous scenes), every image in one pool "chains".
    Returns (chains, pool); a chain is {"id", "reference", "turns": [{"text", "target", "members"}]}."""
    rng = np.random.default_rng([seed, 101])  # a stream of its own: the world's other files do not change
    pool = ImagePool("chains", size.image_size)
    chains = []
    while len(chains) < n:
        n_turns = 2 + (len(chains) % (max_turns - 1))
        ref = random_scene(rng, False)
        scene, turns, keys = ref, [], {scene_key(ref)}
        for _ in range(n_turns):
            op = _random_single(rng, scene, False)
            target = apply_ops(scene, [op]) if op is not None else None
            if target is None or not scene_allowed(target, False) or scene_key(target) in keys:
                break
            members, extras = _distractors(rng, scene, [op], target, False, 4, size.extra_distractors)
            if len(members) < 4:
                break
            keys.add(scene_key(target))
            turns.append((scene, op, target, members, extras, _templates(rng, 1, False, size.p_held_out)))
            scene = target
        if len(turns) < n_turns:
            continue
        chain = {"id": f"chain-{len(chains):04d}", "reference": pool.add(ref), "turns": []}
        for prev, op, target, members, extras, templates in turns:
            chain["turns"].append({"text": edit_text(prev, [op], templates), "target": pool.add(target),
                                   "members": [pool.add(m) for m, _ in members]})
            for x, _ in extras:
                pool.add(x)
        chains.append(chain)
    return chains, pool


def _render_chunk(jobs: list, image_size: int) -> int:
    """Render and write (target path, scene) jobs; a worker process's unit of work."""
    for target, scene in jobs:
        _write_bytes(target, _png_bytes(scene, image_size))
    return len(jobs)


def _write_pool(root: Path, folder: str, pool: ImagePool, desc: str, name_to_file=None,
                progress: bool = True, renders: Renders | None = None) -> dict:
    """Render every scene of the pool to PNG; returns name -> relative path. With `renders` (a `Renders`) the
    scenes are handed to its worker processes and rendered while the caller goes on; each image is a function of
    its scene alone, so the files are the same."""
    paths, jobs = {}, []
    (root / folder).mkdir(parents=True, exist_ok=True)
    for name, scene in sorted(pool.scenes.items()):
        fname = name_to_file(name) if name_to_file else f"{name}.png"
        jobs.append((root / folder / fname, scene))
        paths[name] = f"./{folder}/{fname}"
    if renders is not None:
        renders.submit(jobs, pool.image_size)
        return paths
    for job in tqdm(jobs, desc=desc, leave=False, mininterval=1.0, disable=not progress):
        _render_chunk([job], pool.image_size)
    return paths


class Renders:
    """Images rendered by worker processes while the world's next split is generated; `wait` blocks until every
    submitted image is on disk (and re-raises a worker's error)."""

    def __init__(self, executor, progress: bool):
        self.executor, self.progress, self.futures = executor, progress, []

    def submit(self, jobs: list, image_size: int) -> None:
        for i in range(0, len(jobs), RENDER_CHUNK):
            self.futures.append(self.executor.submit(_render_chunk, jobs[i:i + RENDER_CHUNK], image_size))

    def wait(self) -> None:
        from concurrent.futures import as_completed

        for f in tqdm(as_completed(self.futures), total=len(self.futures), desc="render", leave=False,
                      mininterval=1.0, disable=not self.progress):
            f.result()
        self.futures = []


def _oracle_record(name: str, scene) -> dict:
    caps = oracle_captions(scene)
    return {"image": name, "levels": {k: v for k, v in caps.items() if k != "final_caption"},
            "final_caption": caps["final_caption"], "model": ORACLE_MODEL, "prompt_version": ORACLE_PROMPT_VERSION}


def write_world(out: str | Path, seed: int = 0, size: str = "default", progress: bool = True,
                chains: int = 0, workers: int = 1) -> Path:
    """Generate and write the whole world; the same seed and size give byte-identical files, whatever `workers`
    (processes that render the images while this one generates the next split; they are spawned, so a script that
    asks for more than one calls this under `if __name__ == "__main__":`). `chains` > 0 adds that many multi-turn
    chains (`generate_chains`): their images under chains/, listed by image_splits/split.rc2.chains.json, the chains
    in synth/chains.json, their scenes and oracle captions with the others'; every other file stays as it is without
    them."""
    if size not in SIZES:
        from cirlab.errors import CirlabError
        raise CirlabError(f"unknown world size {size!r}; choose one of {', '.join(SIZES)}")
    cfg = SIZES[size]
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if workers <= 1:
        return _write_world(root, seed, cfg, size, progress, chains, None)
    with spawn_pool(workers) as executor:
        return _write_world(root, seed, cfg, size, progress, chains, Renders(executor, progress))


def _write_world(root: Path, seed: int, cfg: WorldSize, size: str, progress: bool, chains: int,
                 renders: Renders | None) -> Path:
    graphs, oracle = {}, []
    pairid = 0
    for split in ("train", "val", "test1"):
        rows, edits, pool = generate_cirr_split(split, seed, cfg, pairid)
        pairid += len(rows)
        paths = _write_pool(root, SPLIT_PREFIX[split], pool, f"render {split}", progress=progress,
                            renders=renders)
        _write_json(root / "image_splits" / f"split.rc2.{split}.json", paths)
        _write_json(root / "captions" / f"cap.rc2.{split}.json", rows)
        _write_json(root / "synth" / f"edits.{split}.json", edits)
        for name, scene in pool.scenes.items():
            graphs[name] = scene_to_graph(scene)
            oracle.append(_oracle_record(name, scene))
    if chains:
        chain_list, pool = generate_chains(seed, chains, cfg)
        paths = _write_pool(root, "chains", pool, "render chains", progress=progress, renders=renders)
        _write_json(root / "image_splits" / "split.rc2.chains.json", paths)
        _write_json(root / "synth" / "chains.json", chain_list)
        for name, scene in pool.scenes.items():
            graphs[name] = scene_to_graph(scene)
            oracle.append(_oracle_record(name, scene))
    circo_graphs = write_circo(root / "circo", seed, cfg, progress, renders)
    _write_json(root / "synth" / "scenes.json", graphs)
    _write_json(root / "circo" / "synth_scenes.json", circo_graphs)
    oracle.sort(key=lambda r: r["image"])
    if renders is not None:
        renders.wait()  # every image on disk before the files that mark the world complete
    _write_bytes(root / "synth" / "captions.jsonl",
                 "".join(json.dumps(r, sort_keys=True) + "\n" for r in oracle).encode())
    _write_json(root / "synth" / "world.json", {
        "version": WORLD_VERSION, "seed": seed, "size": size, "image_size": cfg.image_size,
        "queries": cfg.queries, "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS],
        "held_out_templates": {k: v[-HELD_OUT_TEMPLATES:] for k, v in TEMPLATES.items()},
        "shapes": list(SHAPES), "colours": list(COLOURS), "cells": list(CELLS)})
    return root


# ---------------------------------------------------------------- CIRCO layout: multi-target queries
CIRCO_TEMPLATES = {
    "recolour": "change the colour of the {obj}",
    "move": "move the {obj} somewhere else",
    "add": "add a {value}",
}


def _circo_query(rng):
    """An under-specified edit: every image that satisfies it is a ground truth."""
    while True:
        ref = random_scene(rng, train=False)
        kind = ("recolour", "move", "add")[rng.integers(3)]
        if kind == "add":
            free = [c for c in range(len(CELLS)) if c not in {o.cell for o in ref}]
            if len(ref) >= 3 or len(free) < 3:
                continue
            base = candidate_ops(ref, rng, "add", False)[0].obj
            gts = [apply_ops(ref, [Op("add", obj=type(base)(int(c), base.shape, base.colour, base.size))])
                   for c in rng.choice(free, size=3, replace=False)]
            text = CIRCO_TEMPLATES["add"].format(value=base.phrase())
            wrong = [o for o in candidate_ops(ref, rng, "add", False) if o.obj.phrase() != base.phrase()]
        else:
            index = int(rng.integers(len(ref)))
            cands = [o for o in candidate_ops(ref, rng, kind, False) if o.index == index]
            if len(cands) < 3:
                continue
            gts = [apply_ops(ref, [cands[i]]) for i in rng.choice(len(cands), size=3, replace=False)]
            text = CIRCO_TEMPLATES[kind].format(obj=describe(ref, index))
            other = "reshape" if kind == "recolour" else "resize"
            wrong = [o for o in candidate_ops(ref, rng, kind, False) if o.index != index]
            wrong += [o for o in candidate_ops(ref, rng, other, False) if o.index == index]
        negs = [apply_ops(ref, [wrong[i]]) for i in rng.permutation(len(wrong))[:3]]
        if any(g is None for g in gts) or len(negs) < 2:
            continue
        return ref, text, gts, [n for n in negs if n is not None]


def write_circo(root: Path, seed: int, cfg: WorldSize, progress: bool = True,
                renders: Renders | None = None) -> dict:
    rng = np.random.default_rng([seed, 99])
    pool = ImagePool("circo", cfg.image_size)
    ann = {}
    for split in ("val", "test"):
        rows = []
        for q in range(cfg.circo_queries[split]):
            ref, text, gts, negs = _circo_query(rng)
            ref_name = pool.add(ref)
            gt_names = [pool.add(g) for g in gts]
            for n in negs:
                pool.add(n)
            rows.append({"id": q, "reference_img_id": int(ref_name.split("-")[1]),
                         "target_img_id": int(gt_names[0].split("-")[1]),
                         "gt_img_ids": [int(n.split("-")[1]) for n in gt_names],
                         "relative_caption": text, "shared_concept": oracle_captions(ref)["global"]})
        ann[split] = rows
    paths = _write_pool(root, "unlabeled2017", pool, "render circo",
                        name_to_file=lambda n: f"{int(n.split('-')[1]):012d}.png", progress=progress,
                        renders=renders)
    for split, rows in ann.items():
        _write_json(root / "annotations" / f"{split}.json", rows)
    images = [{"id": int(n.split("-")[1]), "file_name": Path(p).name} for n, p in sorted(paths.items())]
    _write_json(root / "image_info_unlabeled2017.json", {"images": images})
    return {f"{int(n.split('-')[1]):012d}": scene_to_graph(s) for n, s in pool.scenes.items()}
