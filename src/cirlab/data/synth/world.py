"""The synthetic CIR world: scenes, edits, paraphrases, oracle captions and rendering.

In the spirit of the CSS dataset of TIRG (Vo et al. 2019): a scene is 1-3 objects on a plain background, each with
a shape, a colour, a size and a cell of a 3x3 grid. An edit is a list of atomic operations (recolour, reshape,
resize, move, add, remove); a compound edit has two. Objects are named by their minimal unique description in the
reference scene ("the circle", "the red circle", "the small red circle", "the red circle at the top left").

Everything here is pure and deterministic given a numpy Generator; the writer (`generate.py`) turns it into files.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 205),
    "orange": (250, 140, 20),
    "cyan": (40, 215, 225),
    "white": (245, 245, 245),
}
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUND = (70, 70, 70)
MAX_OBJECTS = 3

# (shape, colour) pairs that never occur in a training image: the compositional hold-out.
HELD_OUT_PAIRS = (("circle", "purple"), ("star", "orange"), ("square", "cyan"), ("triangle", "white"))

# Paraphrase templates per operation; the last `HELD_OUT_TEMPLATES` of each list are used only in val/test.
TEMPLATES = {
    "recolour": ["make the {obj} {value}", "change the colour of the {obj} to {value}", "paint the {obj} {value}",
                 "the {obj} should be {value} instead", "recolour the {obj} in {value}"],
    "reshape": ["turn the {obj} into a {value}", "change the {obj} into a {value}", "replace the {obj} by a {value}",
                "the {obj} should be a {value} instead", "reshape the {obj} as a {value}"],
    "resize": ["make the {obj} {value}", "change the {obj} to a {size} one", "the {obj} gets {value}",
               "the {obj} should be {value}", "resize the {obj} to be {size}"],
    "move": ["move the {obj} to the {value}", "put the {obj} at the {value}", "shift the {obj} to the {value}",
             "the {obj} should sit at the {value}", "relocate the {obj} to the {value}"],
    "add": ["add a {value}", "put a {value} in the picture", "insert a {value}",
            "there should also be a {value}", "include a {value} too"],
    "remove": ["remove the {obj}", "delete the {obj}", "take away the {obj}",
               "the {obj} should be gone", "get rid of the {obj}"],
    "compound": ["{a} and {b}", "{a}, then {b}", "{a} and also {b}", "{a}; besides, {b}", "{a} as well as {b}"],
}
HELD_OUT_TEMPLATES = 2
OPS = ("recolour", "reshape", "resize", "move", "add", "remove")


@dataclass(frozen=True, order=True)
class Obj:
    cell: int
    shape: str
    colour: str
    size: str

    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


Scene = tuple  # tuple[Obj, ...], sorted by cell; cells are unique


def make_scene(objs) -> Scene:
    return tuple(sorted(objs))


def scene_key(scene: Scene) -> str:
    return "|".join(f"{o.cell}:{o.shape}:{o.colour}:{o.size}" for o in scene)


def scene_to_graph(scene: Scene) -> dict:
    """The scene graph kept beside each image: objects with attributes and pairwise spatial relations."""
    objects = [{"shape": o.shape, "colour": o.colour, "size": o.size, "cell": CELLS[o.cell],
                "row": o.cell // 3, "col": o.cell % 3} for o in scene]
    relations = []
    for i, a in enumerate(scene):
        for j, b in enumerate(scene):
            if i != j:
                if a.cell % 3 < b.cell % 3:
                    relations.append([i, "left of", j])
                if a.cell // 3 < b.cell // 3:
                    relations.append([i, "above", j])
    return {"objects": objects, "relations": relations}


def graph_to_scene(graph: dict) -> Scene:
    return make_scene(Obj(CELLS.index(o["cell"]), o["shape"], o["colour"], o["size"]) for o in graph["objects"])


@dataclass(frozen=True)
class Op:
    """One atomic operation. `index` names an object of the reference scene (unused by `add`)."""
    kind: str
    index: int = -1
    value: str = ""
    obj: Obj | None = None  # the object that `add` inserts

    def to_json(self) -> dict:
        d = {"kind": self.kind, "index": self.index, "value": self.value}
        if self.obj is not None:
            d["obj"] = dataclasses.asdict(self.obj)
        return d

    @staticmethod
    def from_json(d: dict) -> "Op":
        return Op(d["kind"], d["index"], d["value"], Obj(**d["obj"]) if "obj" in d else None)


def apply_ops(scene: Scene, ops) -> Scene | None:
    """Apply operations (indices refer to `scene`); None when the result is not a valid scene."""
    objs: list = list(scene)
    for op in ops:
        if op.kind == "add":
            objs.append(op.obj)
            continue
        o = objs[op.index]
        if o is None:
            return None
        if op.kind == "recolour":
            objs[op.index] = dataclasses.replace(o, colour=op.value)
        elif op.kind == "reshape":
            objs[op.index] = dataclasses.replace(o, shape=op.value)
        elif op.kind == "resize":
            objs[op.index] = dataclasses.replace(o, size=op.value)
        elif op.kind == "move":
            objs[op.index] = dataclasses.replace(o, cell=CELLS.index(op.value))
        elif op.kind == "remove":
            objs[op.index] = None
        else:
            raise ValueError(f"unknown op {op.kind}")
    out = [o for o in objs if o is not None]
    cells = [o.cell for o in out]
    if not 1 <= len(out) <= MAX_OBJECTS or len(set(cells)) != len(cells):
        return None
    result = make_scene(out)
    return None if result == scene else result


def describe(scene: Scene, index: int) -> str:
    """Minimal unique description of object `index` within `scene`."""
    o = scene[index]
    others = [x for i, x in enumerate(scene) if i != index]
    for attrs in (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape")):
        if not any(all(getattr(x, a) == getattr(o, a) for a in attrs) for x in others):
            return " ".join(getattr(o, a) for a in attrs)
    return f"{o.colour} {o.shape} at the {CELLS[o.cell]}"


def op_text(scene: Scene, op: Op, template: int) -> str:
    t = TEMPLATES[op.kind][template]
    if op.kind == "add":
        return t.format(value=f"{op.obj.phrase()} at the {CELLS[op.obj.cell]}")
    obj = describe(scene, op.index)
    if op.kind == "resize":
        word = "bigger" if op.value == "large" else "smaller"
        return t.format(obj=obj, value=word, size=op.value)
    return t.format(obj=obj, value=op.value)


def edit_text(scene: Scene, ops, templates) -> str:
    """The modification text; `templates` holds one template index per op, plus one for the compound join."""
    parts = [op_text(scene, op, t) for op, t in zip(ops, templates)]
    if len(parts) == 1:
        return parts[0]
    return TEMPLATES["compound"][templates[-1]].format(a=parts[0], b=parts[1])


def pair_allowed(shape: str, colour: str, train: bool) -> bool:
    return not train or (shape, colour) not in HELD_OUT_PAIRS


def scene_allowed(scene: Scene, train: bool) -> bool:
    return all(pair_allowed(o.shape, o.colour, train) for o in scene)


def random_object(rng: np.random.Generator, cell: int, train: bool) -> Obj:
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        if pair_allowed(shape, colour, train):
            return Obj(cell, shape, colour, SIZES[rng.integers(2)])


def random_scene(rng: np.random.Generator, train: bool) -> Scene:
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(len(CELLS), size=n, replace=False)
    return make_scene(random_object(rng, int(c), train) for c in cells)


def candidate_ops(scene: Scene, rng: np.random.Generator, kind: str, train: bool) -> list:
    """Every valid op of `kind` on `scene` (values enumerated, so distractors can pick a wrong one)."""
    used = {o.cell for o in scene}
    free = [c for c in range(len(CELLS)) if c not in used]
    ops = []
    if kind == "add":
        if len(scene) < MAX_OBJECTS:
            for _ in range(6):
                obj = random_object(rng, int(free[rng.integers(len(free))]), train)
                ops.append(Op("add", obj=obj))
        return ops
    if kind == "remove":
        return [Op("remove", i) for i in range(len(scene))] if len(scene) > 1 else []
    for i, o in enumerate(scene):
        if kind == "recolour":
            ops += [Op(kind, i, c) for c in COLOURS if c != o.colour and pair_allowed(o.shape, c, train)]
        elif kind == "reshape":
            ops += [Op(kind, i, s) for s in SHAPES if s != o.shape and pair_allowed(s, o.colour, train)]
        elif kind == "resize":
            ops.append(Op(kind, i, "large" if o.size == "small" else "small"))
        elif kind == "move":
            ops += [Op(kind, i, CELLS[c]) for c in free]
    return ops


def _obj_color(o: Obj):
    return COLOURS[o.colour]


def _polygon(shape: str, cx: float, cy: float, r: float):
    if shape == "square":
        k = r * 0.85
        return [(cx - k, cy - k), (cx + k, cy - k), (cx + k, cy + k), (cx - k, cy + k)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
        return pts
    if shape == "cross":
        a, b = r, r * 0.35
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(shape)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene; deterministic pixels for a given scene and size."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for o in scene:
        cx, cy = (o.cell % 3 + 0.5) * cell, (o.cell // 3 + 0.5) * cell
        r = cell * (0.44 if o.size == "large" else 0.25)
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_obj_color(o))
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=_obj_color(o))
    return img


def object_sentence(o: Obj) -> str:
    return f"a {o.phrase()} at the {CELLS[o.cell]}"


def oracle_captions(scene: Scene) -> dict:
    """The oracle multi-level captioner, coarse to fine like the MCoT prompt: global (category and layout),
    objects (salient objects and their attributes), details (what tells this scene apart from similar ones: sizes
    and positions), then the final caption."""
    rows = sorted({o.cell // 3 for o in scene})
    layout = {1: "one object", 2: "two objects", 3: "three objects"}[len(scene)]
    where = ", ".join(["upper", "middle", "lower"][r] for r in rows)
    return {
        "global": f"{layout} on a grey background, in the {where} part of the picture",
        "objects": "; ".join(f"a {o.colour} {o.shape}" for o in scene),
        "details": "; ".join(f"the {o.colour} {o.shape} is {o.size} and at the {CELLS[o.cell]}" for o in scene),
        "final_caption": join_phrases([object_sentence(o) for o in scene]),
    }


def join_phrases(parts) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]
