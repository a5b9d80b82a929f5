"""Shared fixtures: one small synthetic world and one briefly pretrained tiny CLIP per test session."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

SEED = 3


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    from cirlab.data.synth.generate import write_world

    return write_world(tmp_path_factory.mktemp("world") / "data", seed=SEED, size="small")


@pytest.fixture(scope="session")
def clip_dir(world, tmp_path_factory):
    """A tiny CLIP pretrained for one epoch on the small world's train images."""
    from cirlab.training.loop import TrainConfig
    from cirlab.training.pretrain import pretrain

    out = tmp_path_factory.mktemp("backbones") / "clip"
    cfg = TrainConfig(epochs=1, batch_size=128, lr=1e-3, warmup_steps=10, progress=False)
    return pretrain("clip", world, out, cfg, {"patch_size": 16, "width": 64, "layers": 2, "dim": 64})
