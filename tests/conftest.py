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
# processes, the longest file) first, so that the other worker's files run beside it, and the Ray tests last, long
# after it: Ray gives its raylet a fixed 30 s to register, which it missed once while the demo's lanes held both
# cores.
FIRST, LAST = ("test_demo.py",), ("test_ray.py",)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: 0 if item.path.name in FIRST else 2 if item.path.name in LAST else 1)


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


@pytest.fixture(scope="session")
def clip_dir(world, tmp_path_factory):
    """A tiny CLIP pretrained for one epoch on the small world's train images."""
    from cirlab.training.loop import TrainConfig
    from cirlab.training.pretrain import pretrain

    cfg = TrainConfig(epochs=1, batch_size=128, lr=1e-3, warmup_steps=10, progress=False)
    return _built_once(tmp_path_factory, "clip", lambda d: pretrain(
        "clip", world, d / "clip", cfg, {"patch_size": 16, "width": 64, "layers": 2, "dim": 64}))


@pytest.fixture(scope="session")
def qformer_dir(world, clip_dir, tmp_path_factory):
    """A tiny BLIP-2 as the demo builds one: the pretrained CLIP's ViT, frozen, under a Q-Former pretrained
    briefly on the small world's (scene, caption) pairs."""
    from cirlab.training.loop import TrainConfig
    from cirlab.training.pretrain import pretrain

    cfg = TrainConfig(epochs=2, batch_size=64, steps_per_epoch=15, lr=1e-3, warmup_steps=5, progress=False)
    return _built_once(tmp_path_factory, "blip2-on-clip", lambda d: pretrain(
        "blip2", world, d / "blip2", cfg, {"num_query_tokens": 4, "qformer_layers": 1}, init_from=clip_dir))
