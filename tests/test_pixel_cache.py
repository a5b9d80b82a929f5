"""The decoded-pixel cache (data/pixel_cache.py): the same pixels as decoding, never stale, written whole."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from cirlab.atomic import remove_stale_temps
from cirlab.data import pixel_cache
from cirlab.data.decode import decode_uint8
from cirlab.data.images import PixelStore, Preprocess
from cirlab.data.readers import read_split
from cirlab.errors import CirlabError


@pytest.fixture()
def gallery(world, tmp_path):
    """The session world's test1 gallery, copied (so that a test may change a file)."""
    src = read_split("synth", world, "test1").gallery
    names = sorted(src)[:40]
    paths = {}
    for n in names:
        paths[n] = tmp_path / "images" / f"{n}.png"
        paths[n].parent.mkdir(exist_ok=True)
        shutil.copy2(src[n], paths[n])
    return paths


def test_cached_store_reads_the_decoded_pixels(gallery, tmp_path, monkeypatch):
    """Built with two processes, the cache holds exactly what PixelStore decodes, at the world's size and at
    another (resized and cropped); a store reads it (decoding nothing) only where CIRLAB_PIXEL_CACHE points."""
    root = tmp_path / "cache"
    names = sorted(gallery)[::-1]  # an order other than the cache's rows
    monkeypatch.setattr(pixel_cache, "CHUNK", 16)  # three chunks, shared out to the two processes
    for size in (64, 48):
        pixel_cache.build(gallery, size, root, decode_uint8, workers=2)
        monkeypatch.delenv(pixel_cache.ENV, raising=False)
        decoded = PixelStore(gallery, Preprocess(size))
        assert decoded._cache is None
        monkeypatch.setenv(pixel_cache.ENV, str(root))
        cached = PixelStore(gallery, Preprocess(size))
        assert cached._cache is not None
        assert torch.equal(cached.uint8(names), decoded.uint8(names))
        assert torch.equal(cached.pixels(names[:5]), decoded.pixels(names[:5]))
        assert cached._rows == []  # nothing decoded
        with pytest.raises(CirlabError, match="'nope' is not in the split's image list"):
            cached.uint8(["nope"])
    assert len([p for p in root.iterdir()]) == 2  # one folder per size, no temporary left


def test_changed_file_or_size_misses_the_cache(gallery, tmp_path):
    """A file rewritten (another size and mtime), an image added, or another size: another key, so the cache
    is not used, and a rebuild decodes the new pixels."""
    root = tmp_path / "cache"
    pixel_cache.build(gallery, 64, root, decode_uint8)
    assert pixel_cache.lookup(gallery, 64, root) is not None
    assert pixel_cache.lookup(gallery, 32, root) is None
    fewer = dict(list(gallery.items())[1:])
    assert pixel_cache.lookup(fewer, 64, root) is None
    first, second = sorted(gallery)[:2]
    shutil.copy(gallery[second], gallery[first])  # the first image now shows the second's scene
    st = os.stat(gallery[first])
    os.utime(gallery[first], ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert pixel_cache.lookup(gallery, 64, root) is None
    rows, pixels = pixel_cache.lookup(gallery, 64, pixel_cache.build(gallery, 64, root, decode_uint8).parent)
    assert np.array_equal(pixels[rows[first]], pixels[rows[second]])


def test_killed_build_leaves_no_cache(gallery, tmp_path, monkeypatch):
    """A build that dies while decoding leaves only its temporary folder: lookup finds no cache, and the next
    build writes the whole one."""
    root = tmp_path / "cache"
    real = pixel_cache._decode_rows
    calls = []

    def dying(out, size, jobs, decode):
        calls.append(len(jobs))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(out, size, jobs, decode)

    monkeypatch.setattr(pixel_cache, "CHUNK", 16)
    monkeypatch.setattr(pixel_cache, "_decode_rows", dying)
    with pytest.raises(KeyboardInterrupt):
        pixel_cache.build(gallery, 64, root, decode_uint8)
    assert pixel_cache.lookup(gallery, 64, root) is None
    monkeypatch.setattr(pixel_cache, "_decode_rows", real)
    folder = pixel_cache.build(gallery, 64, root, decode_uint8)
    rows, pixels = pixel_cache.lookup(gallery, 64, root)
    assert folder.is_dir() and len(rows) == len(gallery) and pixels.shape == (len(gallery), 3, 64, 64)


def test_a_build_deletes_what_dead_builds_left_only(gallery, tmp_path):
    """Temporary folders of processes that are gone (killed mid-build) are deleted by the next build; one of a
    process still running (a build under way) is kept."""
    import subprocess
    import sys

    root = tmp_path / "cache"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_tmp = root / f".abc.tmp-{int(gone.stdout)}"
        live_tmp = root / f".def.tmp-{alive.pid}"
        for tmp in (dead_tmp, live_tmp):
            tmp.mkdir(parents=True)
            (tmp / "pixels.npy").write_bytes(b"torn")
        pixel_cache.build(gallery, 64, root, decode_uint8)
        assert not dead_tmp.exists() and live_tmp.is_dir()
        assert pixel_cache.lookup(gallery, 64, root) is not None
    finally:
        alive.kill()
        alive.wait()
    assert remove_stale_temps(root) == [live_tmp]
    assert sorted(p.name for p in root.iterdir()) == [pixel_cache.cache_key(gallery, 64)]
