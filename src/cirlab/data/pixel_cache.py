"""An on-disk cache of a gallery's decoded pixels, shared by every process that reads the same images.

`PixelStore` decodes an image (PNG or JPEG, then resize and centre crop) the first time a process asks for it. The
demo's lanes each decoded the same 24,282 training images again: about 6 s a process on one core (240 us an
image), some 40 core-seconds a demo. `build(paths, size, root, decode)` decodes a gallery once, in parallel, into
`root/<key>/pixels.npy` (uint8, (N, 3, size, size), rows in the order of `names.json`; this module decodes
nothing itself: `build` is handed `decode.decode_uint8`, torch-free, so its workers start quickly); a `PixelStore`
whose `CIRLAB_PIXEL_CACHE` environment variable names `root` then memory-maps it and decodes nothing.

The key hashes the pixel size, the decoding's version and every image's name, path, byte size and modification
time, so a changed, added or removed file (or another size) gives another key: a cache is never stale, only
unused. `decode.to_uint8` depends on the size alone (normalisation comes later), so the CLIP and the BLIP-2 of
one size share a cache. A cache folder is written under a temporary name (`.<key>.tmp-<pid>`), synced, and
renamed into place whole: a kill, or a crash of the machine, leaves no cache or a complete one. A later build
deletes the temporary folders of processes that are no longer running.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from cirlab.atomic import remove_stale_temps, sync_written
from cirlab.data.spawn import spawn_pool

ENV = "CIRLAB_PIXEL_CACHE"
VERSION = "pixels-v1"  # bump when decode.to_uint8 changes
CHUNK = 512  # images a decoding worker takes at a time


def cache_key(paths: dict, size: int) -> str:
    """A hash of the size, the decoding's version and each image's name, path, byte size and mtime."""
    h = hashlib.sha1(f"{VERSION}|{size}".encode())
    for name in sorted(paths):
        st = os.stat(paths[name])
        h.update(f"\n{name}|{paths[name]}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _decode_rows(out: str, size: int, jobs: list, decode) -> int:
    """Decode (row, path) jobs into the memory-mapped array `out` (a worker's unit of work)."""
    arr = np.load(out, mmap_mode="r+")
    for row, path in jobs:
        arr[row] = decode(path, size)
    arr.flush()
    return len(jobs)


def build(paths: dict, size: int, root, decode, workers: int = 1, pool=None) -> Path:
    """Decode every image of `paths` (name -> file) at `size` with `decode(path, size)` (a module-level function,
    `decode.decode_uint8`, which worker processes import without torch) into `root/<key>/` with `workers`
    processes (or in `pool`, a process pool the caller keeps for several galleries), unless that folder exists;
    returns it."""
    folder = Path(root) / cache_key(paths, size)
    if (folder / "names.json").exists():
        return folder
    names = sorted(paths)
    remove_stale_temps(root)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    out = str(tmp / "pixels.npy")
    np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(len(names), 3, size, size)).flush()
    jobs = [(i, str(paths[n])) for i, n in enumerate(names)]
    chunks = [jobs[i:i + CHUNK] for i in range(0, len(jobs), CHUNK)]
    n = len(chunks)
    if pool is not None:
        list(pool.map(_decode_rows, [out] * n, [size] * n, chunks, [decode] * n))
    elif workers <= 1 or n == 1:
        for chunk in chunks:
            _decode_rows(out, size, chunk, decode)
    else:
        with spawn_pool(workers) as pool:
            list(pool.map(_decode_rows, [out] * n, [size] * n, chunks, [decode] * n))
    (tmp / "names.json").write_text(json.dumps(names))
    sync_written([out, tmp / "names.json"], tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process put the same cache in place first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def lookup(paths: dict, size: int, root=None):
    """(names -> row, memory-mapped uint8 array) of the cache of exactly these files at `size` under `root`
    (default: the `CIRLAB_PIXEL_CACHE` folder), or None when there is none."""
    root = root or os.environ.get(ENV)
    if not root or not paths:
        return None
    folder = Path(root) / cache_key(paths, size)
    if not (folder / "names.json").exists():
        return None
    names = json.loads((folder / "names.json").read_text())
    return {n: i for i, n in enumerate(names)}, np.load(folder / "pixels.npy", mmap_mode="r")
