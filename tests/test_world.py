"""The synthetic world keeps its promises, in the official CIRR and CIRCO layouts."""
from __future__ import annotations

import hashlib
import json
import re

import pytest
from helpers.cli import run_cli

from cirlab.data.readers import read_split
from cirlab.data.synth import world as W
from cirlab.data.synth.generate import SIZES, generate_cirr_split

SPLITS = ("train", "val", "test1")


def _load(root, split):
    rows = json.loads((root / "captions" / f"cap.rc2.{split}.json").read_text())
    edits = json.loads((root / "synth" / f"edits.{split}.json").read_text())
    return rows, edits


def _scenes(root):
    graphs = json.loads((root / "synth" / "scenes.json").read_text())
    return {n: W.graph_to_scene(g) for n, g in graphs.items()}


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(world, tmp_path):
    """`cirlab synth` at the session world's seed and size writes the CIRR and CIRCO layouts, byte for byte the
    files `write_world` wrote for the session: rendered there in one process, here by two worker processes while
    the next split was generated."""
    proc = run_cli("synth", "--out", tmp_path / "again", "--seed", "3", "--size", "small", "--no-progress",
                   "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    for rel in ("captions/cap.rc2.test1.json", "image_splits/split.rc2.val.json", "circo/annotations/val.json",
                "circo/image_info_unlabeled2017.json", "synth/scenes.json", "synth/captions.jsonl"):
        assert (tmp_path / "again" / rel).is_file(), rel
    assert _digest(world) == _digest(tmp_path / "again")
    # another seed draws other queries (generated in memory: writing a second world adds nothing to the check)
    rows = json.loads((world / "captions" / "cap.rc2.test1.json").read_text())
    other, _, _ = generate_cirr_split("test1", 4, SIZES["small"], rows[0]["pairid"])
    assert len(other) == len(rows) and [r["caption"] for r in other] != [r["caption"] for r in rows]


def test_cirr_layout_fields(world):
    for split in SPLITS:
        rows, _ = _load(world, split)
        names = json.loads((world / "image_splits" / f"split.rc2.{split}.json").read_text())
        assert rows, split
        for row in rows:
            assert set(row) == {"pairid", "reference", "target_hard", "target_soft", "caption", "img_set"}
            members = row["img_set"]["members"]
            assert len(members) == 6 and len(set(members)) == 6
            assert members[row["img_set"]["reference_rank"]] == row["reference"]
            assert members[row["img_set"]["target_rank"]] == row["target_hard"]
            assert row["target_soft"] == {row["target_hard"]: 1.0}
            for n in members:
                assert (world / names[n]).is_file()


def test_each_target_satisfies_its_edit_and_no_distractor_does(world):
    scenes = _scenes(world)
    for split in SPLITS:
        rows, edits = _load(world, split)
        split_names = json.loads((world / "image_splits" / f"split.rc2.{split}.json").read_text())
        buckets: dict = {}  # the split's images by scene key; equality is still checked within a bucket
        for n in split_names:
            buckets.setdefault(W.scene_key(scenes[n]), []).append(n)
        for row in rows:
            ops = [W.Op.from_json(o) for o in edits[str(row["pairid"])]["ops"]]
            ref = scenes[row["reference"]]
            want = W.apply_ops(ref, ops)
            assert scenes[row["target_hard"]] == want
            satisfying = [n for n in buckets.get(W.scene_key(want), []) if scenes[n] == want]
            assert satisfying == [row["target_hard"]]


def test_texts_name_objects_unambiguously(world):
    scenes = _scenes(world)
    rows, edits = _load(world, "test1")
    for row in rows:
        ref = scenes[row["reference"]]
        for op in (W.Op.from_json(o) for o in edits[str(row["pairid"])]["ops"]):
            if op.kind == "add":
                continue
            desc = W.describe(ref, op.index)
            assert desc in row["caption"]
            words = desc.split(" at the ")[0].split()
            matches = [o for o in ref if all(w in (o.shape, o.colour, o.size) for w in words)]
            if " at the " in desc:
                matches = [o for o in matches if W.CELLS[o.cell] == desc.split(" at the ")[1]]
            assert len(matches) == 1, (desc, ref)


def test_every_query_has_at_least_three_hard_negatives(world):
    """Hard negative: a gallery scene one or two operations away from the reference that is not the target."""
    scenes = _scenes(world)
    for split in SPLITS:
        rows, _ = _load(world, split)
        for row in rows:
            ref, target = scenes[row["reference"]], scenes[row["target_hard"]]
            negatives = [n for n in row["img_set"]["members"] if n not in (row["reference"], row["target_hard"])]
            close = [n for n in negatives if _distance(ref, scenes[n]) <= 3 and scenes[n] != target]
            assert len(close) >= 3, row


def _distance(a, b) -> int:
    """Number of differing attributes between two scenes (objects matched by cell, missing ones count 4)."""
    da, db = {o.cell: o for o in a}, {o.cell: o for o in b}
    d = 0
    for cell in set(da) | set(db):
        if cell in da and cell in db:
            d += sum(getattr(da[cell], f) != getattr(db[cell], f) for f in ("shape", "colour", "size"))
        else:
            d += 1
    return d


def test_held_out_templates_and_pairs_never_occur_in_train(world):
    scenes = _scenes(world)
    rows, edits = _load(world, "train")
    n_train_templates = len(W.TEMPLATES["recolour"]) - W.HELD_OUT_TEMPLATES
    for row in rows:
        assert all(t < n_train_templates for t in edits[str(row["pairid"])]["templates"])
    held_out_regexes = [re.compile("^" + re.escape(t).replace(r"\{obj\}", ".+").replace(r"\{value\}", ".+")
                                   .replace(r"\{size\}", ".+") + "$")
                        for kind, ts in W.TEMPLATES.items() if kind != "compound"
                        for t in ts[-W.HELD_OUT_TEMPLATES:]]
    singles = [r["caption"] for r, e in zip(rows, (edits[str(r["pairid"])] for r in rows)) if len(e["ops"]) == 1]
    assert singles
    for caption in singles:
        assert not any(rx.match(caption) for rx in held_out_regexes), caption
    train_names = json.loads((world / "image_splits" / "split.rc2.train.json").read_text())
    for n in train_names:
        assert all((o.shape, o.colour) not in W.HELD_OUT_PAIRS for o in scenes[n])
    # ...while the evaluation splits do use them
    test_rows, test_edits = _load(world, "test1")
    assert any(t >= n_train_templates for e in test_edits.values() for t in e["templates"])
    test_names = json.loads((world / "image_splits" / "split.rc2.test1.json").read_text())
    assert any((o.shape, o.colour) in W.HELD_OUT_PAIRS for n in test_names for o in scenes[n])


def test_oracle_captions_cover_every_image(world):
    lines = (world / "synth" / "captions.jsonl").read_text().splitlines()
    recs = {json.loads(line)["image"]: json.loads(line) for line in lines}
    for split in SPLITS:
        names = json.loads((world / "image_splits" / f"split.rc2.{split}.json").read_text())
        for n in names:
            rec = recs[n]
            assert set(rec["levels"]) == {"global", "objects", "details"} and rec["final_caption"]


def test_circo_layout_has_multi_target_queries(world):
    graphs = json.loads((world / "circo" / "synth_scenes.json").read_text())
    for split in ("val", "test"):
        s = read_split("synth-circo", world, split)
        assert s.queries
        for q in s.queries:
            assert len(q.targets) >= 2
            assert all(t in s.gallery for t in q.targets) and q.reference in s.gallery
            ref = W.graph_to_scene(graphs[f"{int(q.reference):012d}"])
            for t in q.targets:
                assert W.graph_to_scene(graphs[f"{int(t):012d}"]) != ref


@pytest.mark.parametrize("split", SPLITS)
def test_reader_reads_the_layout(world, split):
    s = read_split("synth", world, split)
    assert len(s.queries) == len(_load(world, split)[0])
    assert all(q.targets and len(q.subset) == 6 for q in s.queries)
    assert set(s.captions) == set(s.gallery)
