"""Multi-turn chains: `cirlab synth --chains` adds them without changing the world's other files, and
`cirlab eval --split chains` scores each turn, with the previous turn's true target or its top result as the next
reference, as the standard protocol scores the same queries."""
from __future__ import annotations

import json
from pathlib import Path

from cirlab.data.synth.generate import SIZES, generate_chains
from cirlab.data.synth.world import graph_to_scene, scene_key
from helpers.cli import run_cli


def test_chains_are_seeded_and_each_turn_edits_the_previous_target():
    a, pool = generate_chains(5, 12, SIZES["small"])
    b, _ = generate_chains(5, 12, SIZES["small"])
    assert a == b and [len(c["turns"]) for c in a] == [2, 3] * 6
    for c in a:
        seen = [c["reference"]] + [t["target"] for t in c["turns"]]
        assert len(set(seen)) == len(seen)  # every turn changes the scene
        for t in c["turns"]:
            assert t["target"] not in t["members"] and len(t["members"]) == 4
            assert all(m in pool.scenes for m in t["members"])


def test_synth_chains_keep_the_world_and_eval_scores_every_turn(world, clip_dir, tmp_path):
    done = run_cli("synth", "--out", tmp_path / "w", "--seed", 3, "--size", "small", "--chains", 20, "--no-progress")
    assert done.returncode == 0, done.stderr
    new, old = tmp_path / "w", Path(world)
    changed = {"synth/scenes.json", "synth/captions.jsonl"}
    for p in sorted(old.rglob("*")):
        rel = str(p.relative_to(old))
        if p.is_file() and rel not in changed and not rel.startswith("."):
            assert (new / rel).read_bytes() == p.read_bytes(), rel  # the world without chains, byte for byte
    scenes = json.loads((new / "synth" / "scenes.json").read_text())
    chains = json.loads((new / "synth" / "chains.json").read_text())
    assert len(chains) == 20 and all(n in scenes for c in chains for n in [c["reference"]]
                                     + [t["target"] for t in c["turns"]])
    for c in chains:  # each target is one operation away from the scene before it
        prev = graph_to_scene(scenes[c["reference"]])
        for t in c["turns"]:
            nxt = graph_to_scene(scenes[t["target"]])
            assert scene_key(nxt) != scene_key(prev) and len(nxt) in (len(prev) - 1, len(prev), len(prev) + 1)
            prev = nxt

    ckpt = tmp_path / "sum"
    assert run_cli("init", "--method", "sum", "--backbone", clip_dir, "--out", ckpt).returncode == 0
    done = run_cli("eval", "--checkpoint", ckpt, "--data-root", new, "--split", "chains", "--json",
                   tmp_path / "turns.json", "--no-progress")
    assert done.returncode == 0, done.stderr
    turns = json.loads((tmp_path / "turns.json").read_text())["turns"]
    assert list(turns["true"]) == ["turn 1", "turn 2", "turn 3"]
    assert turns["true"]["turn 1"] == turns["predicted"]["turn 1"] and turns["true"]["turn 3"]["queries"] == 10

    # the predicted mode through the standard protocol: turn 1's top results as turn 2's references
    import cirlab
    from cirlab.data.readers import read_chains
    from cirlab.evaluation.protocols import evaluate
    from cirlab.types import Query

    model = cirlab.load(ckpt)
    split, chains = read_chains(new)
    split.queries = [Query(c["id"], c["reference"], c["turns"][0]["text"], (c["turns"][0]["target"],))
                     for c in chains]
    first, ranking = evaluate(model, split, progress=False, remove_reference=True)
    assert first["R@1"] == turns["true"]["turn 1"]["R@1"]
    split.queries = [Query(c["id"], top[0], c["turns"][1]["text"], (c["turns"][1]["target"],))
                     for c, top in zip(chains, ranking.ranked)]
    second, _ = evaluate(model, split, progress=False, remove_reference=True)
    assert (second["R@1"], second["R@10"]) == (turns["predicted"]["turn 2"]["R@1"],
                                               turns["predicted"]["turn 2"]["R@10"])
