"""What the demo's first phase costs before CLIP pretraining starts: writing the default world with one render
process and with one per core, decoding its train gallery in one process, building the pixel cache
(src/cirlab/data/pixel_cache.py) with one process per core, and reading the gallery back from that cache.

    python bench/world_pixels.py [--out /tmp/world_pixels] [--json docs/results/x.json]

Every lane of the demo decoded the train gallery once before the cache (the "decode" figure, on one core each);
with it each reads the cache (the "cached read" figure). Prints and writes seconds and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/world_pixels")
    ap.add_argument("--json")
    args = ap.parse_args()

    from cirlab.data import pixel_cache
    from cirlab.data.decode import decode_uint8
    from cirlab.data.images import PixelStore, Preprocess
    from cirlab.data.readers import read_split
    from cirlab.data.synth.generate import write_world
    from cirlab.experiments import machine

    out, cores, doc = Path(args.out), machine.cores(), {}
    shutil.rmtree(out, ignore_errors=True)
    for workers in sorted({1, cores}):
        t = time.perf_counter()
        write_world(out / f"world-{workers}", seed=0, size="default", progress=False, workers=workers)
        doc[f"world_default_render_workers_{workers}_s"] = round(time.perf_counter() - t, 2)
    gallery = read_split("synth", out / f"world-{cores}", "train").gallery
    names = sorted(gallery)
    size = json.loads((out / f"world-{cores}" / "synth" / "world.json").read_text())["image_size"]

    def read_all() -> float:
        t = time.perf_counter()
        store = PixelStore(gallery, Preprocess(size))
        for lo in range(0, len(names), 64):
            store.uint8(names[lo:lo + 64])
        return round(time.perf_counter() - t, 2)

    os.environ.pop(pixel_cache.ENV, None)
    doc["decode_train_one_process_s"] = read_all()
    t = time.perf_counter()
    pixel_cache.build(gallery, size, out / "cache", decode_uint8, workers=cores)
    doc[f"cache_build_train_{cores}_workers_s"] = round(time.perf_counter() - t, 2)
    os.environ[pixel_cache.ENV] = str(out / "cache")
    doc["cached_read_train_s"] = read_all()
    doc |= {"train_images": len(names), "machine": machine.describe()}
    print(json.dumps(doc, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
