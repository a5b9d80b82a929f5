"""The synthetic world's editor: renders the edited scene, with a controllable imperfection.

It stands in for an instruction-driven diffusion editor. `imperfection` is the probability that each attribute
the modification text does not mention (colour, shape or size of any object; positions are left alone) is changed
to another value before the edit is applied, the kind of collateral change diffusion editors make. At 0 the
pseudo-target is exactly the true target scene. A disturbed scene that the edit cannot apply to, or whose result
holds one of the world's held-out (shape, colour) pairs, falls back to the true target, so pseudo-targets leak
nothing of the compositional test split.
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

ATTRIBUTE_OF_OP = {"recolour": "colour", "reshape": "shape", "resize": "size"}
VALUES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES}


def _stable_int(key: str) -> int:
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16)


class OracleEditor:
    name = "oracle"

    def __init__(self, data_root, split: str = "train", imperfection: float = 0.0, seed: int = 0,
                 latency_s: float = 0.0):
        if not 0.0 <= imperfection <= 1.0:
            raise CirlabError(f"imperfection must be in [0, 1], got {imperfection}")
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
        self.model_id = f"cirlab-oracle/imperfection={imperfection:g}"

    def options(self) -> dict:
        return {"imperfection": self.imperfection}

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

    def pseudo_target(self, key: str, reference: str, sample: int) -> tuple:
        """(scene, [changes]) for query `key` on image `reference`; `sample` indexes the N pseudo-targets."""
        if reference not in self.graphs:
            raise CirlabError(f"image {reference!r} has no scene graph in synth/scenes.json")
        if key not in self.edits:
            raise CirlabError(f"query {key!r} has no edit in synth/edits.*.json")
        ref = graph_to_scene(self.graphs[reference])
        ops = [Op.from_json(o) for o in self.edits[key]["ops"]]
        rng = np.random.default_rng([self.seed, _stable_int(key), sample])
        disturbed, changes = self._disturb(ref, ops, rng)
        target = apply_ops(disturbed, ops)  # cells are not disturbed, so op indices still name the same objects
        if target is None or not scene_allowed(target, train=True):  # e.g. a new shape then the text's colour
            target, changes = apply_ops(ref, ops), []
        if target is None:
            raise CirlabError(f"query {key!r}: its edit does not apply to {reference!r}")
        return target, changes

    def edit(self, key: str, reference: str, sample: int):
        """(PIL image, info) of one pseudo-target."""
        scene, changes = self.pseudo_target(key, reference, sample)
        return render(scene, self.image_size), {"changes": changes}
