"""Shared fixtures: one small synthetic world and one briefly pretrained tiny CLIP per test session."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# under pytest-xdist (`make test` runs two workers, one per core) each worker keeps to one thread
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

SEED = 3

# Run order (pytest-xdist keeps it with --no-loadscope-reorder, as `make test` runs it): the quick demo (four lane
# processes, the longest file) first; then the files that use none of the session's built fixtures, which the other
# worker runs while the first builds the world and the backbones; the Ray tests last: Ray gives its raylet a fixed
# 30 s to register, which it missed once while the demo's lanes held both cores, and its two actors need both
# cores: run third (after the demo, beside other tests) or after csmcir's, its test took 128-134 s against 50 s
# alone, and the suite 9-10 minutes against under 8 with Ray last.
FIRST, LAST = ("test_demo.py",), ("test_ray.py",)
NO_FIXTURES = ("test_backbones.py", "test_benchmarks.py", "test_compare.py", "test_layout.py", "test_memory_bank.py",
               "test_metrics.py", "test_tokenizer.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return 0 if name in FIRST else 1 if name in NO_FIXTURES else 3 if name in LAST else 2
    items.sort(key=rank)


def _built_once(tmp_path_factory, name: str, build):
    """`build(folder)` run once per test session, whatever the worker: under pytest-xdist the workers share one
    folder, the first builds it under a file lock and the others wait, then use it (these fixtures are read-only
    to the tests). A folder is marked done only when its build finished."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder above each worker's own
    folder = root / "built-once" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            result = build(folder)
            (folder / ".built").write_text(str(result.relative_to(folder)))
    return folder / (folder / ".built").read_text()


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    from cirlab.data.synth.generate import write_world

    return _built_once(tmp_path_factory, "world", lambda d: write_world(d / "data", seed=SEED, size="small"))


@pytest.fixture(scope="session")
def blip2_dir(tmp_path_factory):
    """A tiny BLIP-2 retrieval model, built from a config and saved (untrained)."""
    from cirlab.backbones import tiny_backbone

    def build(folder):
        torch.manual_seed(0)
        tiny_backbone("blip2", vision_width=64, vision_layers=1, qformer_width=64, qformer_layers=1,
                      num_query_tokens=4, dim=32).save_pretrained(folder / "blip2")
        return folder / "blip2"
    return _built_once(tmp_path_factory, "blip2", build)


@pytest.fixture(scope="session")
def backbone_dirs(clip_dir, blip2_dir):
    return {"clip": clip_dir, "blip2": blip2_dir}


def _quick_backbone(kind: str, world, tmp_path_factory, start=None):
    """The quick demo's tiny `kind` backbone on the session's world, built as `cirlab demo --quick --seed 3` builds
    it (test_demo.py starts the demo from it); `start`, the backbone it is built on (blip2 on the clip), is copied
    in first and reused."""
    from cirlab.experiments.demo import PROFILES, ensure_backbone

    def build(folder):
        if start is not None:
            shutil.copytree(start, folder / "checkpoints" / start.name)
        return ensure_backbone(kind, folder / "checkpoints", world, PROFILES["quick"], SEED, False, lambda _: None)
    return _built_once(tmp_path_factory, f"quick-{kind}", build)


@pytest.fixture(scope="session")
def clip_dir(world, tmp_path_factory):
    """A tiny CLIP pretrained for two epochs on the small world's (scene, caption) pairs (the quick demo's)."""
    return _quick_backbone("clip", world, tmp_path_factory)


@pytest.fixture(scope="session")
def qformer_dir(world, clip_dir, tmp_path_factory):
    """A tiny BLIP-2 as the demo builds one: the pretrained CLIP's ViT, frozen, under a Q-Former pretrained
    briefly on the small world's (scene, caption) pairs (the quick demo's)."""
    return _quick_backbone("blip2", world, tmp_path_factory, start=clip_dir)
