"""The Ray engine on a local Ray started here (2 CPUs): captioning, editing and index building give the same
output as the in-process engine."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from cirlab.captioning.backends import make_backend
from cirlab.captioning.cache import CaptionCache
from cirlab.captioning.run import caption_images
from cirlab.data.readers import read_split
from cirlab.editing.oracle import OracleEditor
from cirlab.editing.run import edit_split


@pytest.fixture(scope="module")
def local_ray():
    import ray

    for attempt in range(3):  # the raylet has a fixed 30 s to register; a loaded machine can miss it
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield
    ray.shutdown()


def records(path: Path) -> dict:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return {(r.get("image") or r["query"], r.get("sample")): r for r in rows}


def test_ray_engine_matches_the_in_process_engine(local_ray, world, clip_dir, tmp_path):
    items = sorted(read_split("synth", world, "test1").gallery.items())[:24]
    factory = partial(make_backend, "oracle", "synth", world)
    for name, engine in (("local", "local"), ("ray", "ray")):
        stats = caption_images(items, factory(), CaptionCache(tmp_path / f"{name}.jsonl"), 5, progress=False,
                               engine=engine, backend_factory=factory, concurrency=2)
        assert stats.captioned == 24
    assert records(tmp_path / "local.jsonl") == records(tmp_path / "ray.jsonl")

    editor = partial(OracleEditor, world, "train", 0.3, 0)
    for name, engine in (("local", "local"), ("ray", "ray")):
        edit_split("synth", world, "train", editor(), tmp_path / f"edit-{name}", n=2, batch_size=4, progress=False,
                   limit=6, engine=engine, editor_factory=editor, concurrency=2)
    local, remote = (records(tmp_path / f"edit-{name}" / "manifest.jsonl") for name in ("local", "ray"))
    assert local == remote and len(local) == 12
    for r in local.values():  # the same pixels, written by this process from the actors' images
        assert (tmp_path / "edit-local" / r["file"]).read_bytes() == (tmp_path / "edit-ray" / r["file"]).read_bytes()

    from cirlab.index import ImageIndex
    from cirlab.serving.engine import build_index
    from cirlab.training.train import save_zero_shot

    ckpt = save_zero_shot("sum", clip_dir, tmp_path / "sum")
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for _, p in items:
        (gallery / Path(p).name).symlink_to(p)
    build_index(ckpt, gallery, tmp_path / "ix-local", batch_size=5, progress=False)
    build_index(ckpt, gallery, tmp_path / "ix-ray", batch_size=5, progress=False, engine="ray", concurrency=2)
    a, b = ImageIndex(tmp_path / "ix-local"), ImageIndex(tmp_path / "ix-ray")
    assert a.ids == b.ids and len(a) == 24
    assert np.allclose(a.snapshot.vectors, b.snapshot.vectors, atol=1e-5)
    # captions at ingest, made by the actors: caption_compose's index holds each image's oracle caption
    cc = save_zero_shot("caption_compose", clip_dir, tmp_path / "cc", {"composer": "oracle", "oracle_root": str(world)})
    build_index(cc, gallery, tmp_path / "ix-cc", batch_size=5, progress=False, engine="ray", concurrency=2,
                captioner=factory(), captioner_factory=factory)
    captioned = ImageIndex(tmp_path / "ix-cc")
    expected = {r["image"]: r["final_caption"] for r in records(tmp_path / "local.jsonl").values()}
    assert {i: captioned.item(i)["caption"] for i in captioned.ids} == expected
