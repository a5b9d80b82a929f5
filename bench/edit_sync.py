"""What TMCIR's stage 1 spends writing the demo's oracle pseudo-targets (src/cirlab/editing/run.py): the default
world's first N train triplets edited with the oracle (imperfection 0.1, seed 0, as the demo does), once with an
fsync of each image and of the folder (how images were written before), once with the images of a group made durable
together (one syncfs) before their manifest records, alternating, `--repeats` times each.

    python bench/edit_sync.py [--world /tmp/edit_sync/world] [--n 16000] [--repeats 3] [--json docs/results/x.json]

The two write the same manifest and the same image files (checked here, byte for byte). Prints and writes seconds
and the machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def _edit(world: Path, out: Path, n: int, per_image_fsync: bool) -> float:
    import cirlab.editing.run as run
    from cirlab.atomic import write_atomic
    from cirlab.editing.oracle import OracleEditor

    saved = run._save_png, run.SYNC_EVERY
    if per_image_fsync:  # as before: write_atomic's fsyncs for each image, the manifest appended every batch
        run._save_png = lambda img, path: write_atomic(path, lambda f: img.save(f, format="PNG"))
        run.SYNC_EVERY = 1
    try:
        shutil.rmtree(out, ignore_errors=True)
        editor = OracleEditor(world, imperfection=0.1, seed=0)
        t = time.perf_counter()
        run.edit_split("synth", world, "train", editor, out, n=1, progress=False, limit=n)
        return round(time.perf_counter() - t, 2)
    finally:
        run._save_png, run.SYNC_EVERY = saved


def _same(a: Path, b: Path) -> bool:
    if (a / "manifest.jsonl").read_bytes() != (b / "manifest.jsonl").read_bytes():
        return False
    return all((b / "images" / f.name).read_bytes() == f.read_bytes() for f in (a / "images").iterdir())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default="/tmp/edit_sync/world")
    ap.add_argument("--n", type=int, default=16000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()

    from cirlab.data.synth.generate import write_world
    from cirlab.experiments import machine

    world = Path(args.world)
    if not (world / "synth" / "world.json").exists():
        write_world(world, seed=0, size="default", progress=False, workers=machine.cores())
    runs = {"per_image_fsync_s": [], "grouped_syncfs_s": []}
    for _ in range(args.repeats):
        runs["per_image_fsync_s"].append(_edit(world, world.parent / "fsync", args.n, True))
        runs["grouped_syncfs_s"].append(_edit(world, world.parent / "grouped", args.n, False))
    doc = {"pseudo_targets": args.n, **runs, "same_files": _same(world.parent / "fsync", world.parent / "grouped"),
           "machine": machine.describe()}
    print(json.dumps(doc, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
