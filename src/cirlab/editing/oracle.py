"""The synthetic world's editor: renders the edited scene, with a controllable imperfection.

It stands in for an instruction-driven diffusion editor. `imperfection` is the probability that each attribute
the modification text does not mention (colour, shape or size of any object; positions are left alone) is changed
to another value before the edit is applied, the kind of collateral change diffusion editors make. At 0 the
pseudo-target is exactly the true target scene. A disturbed scene that the edit cannot apply to, or whose result
holds one of the world's held-out (shape, colour) pairs, falls back to the true target, so pseudo-targets leak
nothing of the compositional test split.

`failures` adds the failure modes of real instruction editors, each with a rate (the probability per
pseudo-target, drawn independently in this order): "no_edit" (the edit is not applied: the pseudo-target is the
reference, disturbed as above), "wrong_object" (the edit's operations land on another object of the scene, when it
has one), "shift" (one object moves to a free neighbouring cell after the edit) and "colour_cast" (the rendered
image is blended 25% toward a random colour). A failure whose result is not a valid training scene is skipped and
counted as not happened. `REALISTIC_FAILURES` is cirlab's guess at an InstructPix2Pix-like editor on this world
(no paper gives such rates): a fifth of edits not applied, a tenth on the wrong object, a fifth shifted, a fifth
with a colour cast.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from cirlab.data.synth.world import (COLOURS, SHAPES, SIZES, Op, apply_ops, graph_to_scene, make_scene,
                                     pair_allowed, render, scene_allowed)
from cirlab.errors import CirlabError

FAILURES = ("no_edit", "wrong_object", "shift", "colour_cast")
REALISTIC_FAILURES = {"no_edit": 0.2, "wrong_object": 0.1, "shift": 0.2, "colour_cast": 0.2}
CAST_STRENGTH = 0.25
ATTRIBUTE_OF_OP = {"recolour": "colour", "reshape": "shape", "resize": "size"}
VALUES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES}


def _stable_int(key: str) -> int:
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16)


class OracleEditor:
    name = "oracle"

    def __init__(self, data_root, split: str = "train", imperfection: float = 0.0, seed: int = 0,
                 latency_s: float = 0.0, failures: dict | None = None):
        if not 0.0 <= imperfection <= 1.0:
            raise CirlabError(f"imperfection must be in [0, 1], got {imperfection}")
        failures = dict(failures or {})
        for name, rate in failures.items():
            if name not in FAILURES:
                raise CirlabError(f"unknown editor failure {name!r}; known: {', '.join(FAILURES)}")
            if not 0.0 <= float(rate) <= 1.0:
                raise CirlabError(f"editor failure {name} rate must be in [0, 1], got {rate}")
        self.failures = {k: float(failures[k]) for k in FAILURES if failures.get(k)}
        root = Path(data_root)
        scenes, edits = root / "synth" / "scenes.json", root / "synth" / f"edits.{split}.json"
        for p in (scenes, edits):
            if not p.exists():
                raise CirlabError(f"the oracle editor needs the synthetic world's {p.name}, not found: {p}")
        self.graphs = json.loads(scenes.read_text())
        self.edits = json.loads(edits.read_text())
        world = json.loads((root / "synth" / "world.json").read_text())
        self.image_size = int(world["image_size"])
        self.imperfection, self.seed, self.latency_s = imperfection, seed, latency_s
        self.model_id = f"cirlab-oracle/imperfection={imperfection:g}" + "".join(
            f",{k}={v:g}" for k, v in self.failures.items())

    def options(self) -> dict:
        return {"imperfection": self.imperfection} | ({"failures": self.failures} if self.failures else {})

    def _disturb(self, scene, ops, rng) -> tuple:
        """Change unmentioned attributes with probability `imperfection`; returns (scene, [changes])."""
        protected = {(op.index, ATTRIBUTE_OF_OP[op.kind]) for op in ops if op.kind in ATTRIBUTE_OF_OP}
        objs, changes = list(scene), []
        for i, o in enumerate(objs):
            for attr in ("colour", "shape", "size"):
                if (i, attr) in protected or rng.random() >= self.imperfection:
                    continue
                choices = [v for v in VALUES[attr] if v != getattr(o, attr)]
                if attr != "size":  # never create a held-out (shape, colour) pair
                    choices = [v for v in choices if pair_allowed(v if attr == "shape" else o.shape,
                                                                  v if attr == "colour" else o.colour, True)]
                if choices:
                    new = choices[int(rng.integers(len(choices)))]
                    changes.append(f"{i}.{attr}: {getattr(o, attr)} -> {new}")
                    o = dataclasses.replace(o, **{attr: new})
                    objs[i] = o
        return make_scene(objs), changes

    def edit_batch(self, items: list, _split=None) -> list:
        """[(query, sample)] -> [(image, info)]; waits `latency_s` per batch (for tests that kill a run)."""
        if self.latency_s:
            import time

            time.sleep(self.latency_s)
        return [self.edit(q.key, q.reference, k) for q, k in items]

    def pseudo_target(self, key: str, reference: str, sample: int, train_only: bool = True) -> tuple:
        """(scene, [changes], colour cast or None) for query `key` on image `reference`; `sample` indexes the N
        pseudo-targets. `train_only=False` keeps a disturbed result that holds a held-out pair (the composer of
        test queries, which must not fall back to the true target more often there)."""
        if reference not in self.graphs:
            raise CirlabError(f"image {reference!r} has no scene graph in synth/scenes.json")
        if key not in self.edits:
            raise CirlabError(f"query {key!r} has no edit in synth/edits.*.json")
        ref = graph_to_scene(self.graphs[reference])
        ops = [Op.from_json(o) for o in self.edits[key]["ops"]]
        rng = np.random.default_rng([self.seed, _stable_int(key), sample])
        disturbed, changes = self._disturb(ref, ops, rng)
        target = apply_ops(disturbed, ops)  # cells are not disturbed, so op indices still name the same objects
        if target is None or (train_only and not scene_allowed(target, train=True)):  # a new shape, then the colour
            target, changes = apply_ops(ref, ops), []
        if target is None:
            raise CirlabError(f"query {key!r}: its edit does not apply to {reference!r}")
        target, failed, cast = self._fail(disturbed, ops, target, rng)
        return target, changes + failed, cast

    def _fail(self, disturbed, ops, target, rng) -> tuple:
        """Apply the failure modes drawn for this pseudo-target: (scene, [what failed], colour cast or None)."""
        if not self.failures:
            return target, [], None
        draws = {k: rng.random() < self.failures.get(k, 0.0) for k in FAILURES}
        failed, cast = [], None
        if draws["no_edit"]:
            target = disturbed
            failed.append("failure: edit not applied")
        elif draws["wrong_object"]:
            moved = _on_other_objects(disturbed, ops, rng)
            if moved is not None and scene_allowed(moved, train=True):
                target = moved
                failed.append("failure: edit applied to another object")
        if draws["shift"]:
            shifted = _shift_one(target, rng)
            if shifted is not None:
                target = shifted
                failed.append("failure: an object shifted")
        if draws["colour_cast"]:
            cast = tuple(int(x) for x in rng.integers(0, 256, 3))
            failed.append(f"failure: colour cast {cast}")
        return target, failed, cast

    def edit(self, key: str, reference: str, sample: int):
        """(PIL image, info) of one pseudo-target."""
        scene, changes, cast = self.pseudo_target(key, reference, sample)
        image = render(scene, self.image_size)
        if cast is not None:
            from PIL import Image

            image = Image.blend(image, Image.new("RGB", image.size, cast), CAST_STRENGTH)
        return image, {"changes": changes}


def _on_other_objects(scene, ops, rng):
    """The edit with each operation that names an object moved to another object of the scene (None when the
    scene has one object, or the result is not a valid scene)."""
    if len(scene) < 2 or not any(op.index >= 0 and op.kind != "add" for op in ops):
        return None
    moved = []
    for op in ops:
        if op.index >= 0 and op.kind != "add":
            others = [i for i in range(len(scene)) if i != op.index]
            op = dataclasses.replace(op, index=others[int(rng.integers(len(others)))])
        moved.append(op)
    return apply_ops(scene, moved)


def _shift_one(scene, rng):
    """One object moved to a free cell next to its own (None when none is free)."""
    if not scene:
        return None
    i = int(rng.integers(len(scene)))
    o = scene[i]
    used = {x.cell for x in scene}
    row, col = divmod(o.cell, 3)
    free = [r * 3 + c for r, c in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1))
            if 0 <= r < 3 and 0 <= c < 3 and r * 3 + c not in used]
    if not free:
        return None
    objs = list(scene)
    objs[i] = dataclasses.replace(o, cell=free[int(rng.integers(len(free)))])
    return make_scene(objs)
