"""Multi-process training: two gloo processes with batch B follow one process with batch 2B."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from cirlab.training.distributed import launch
from cirlab.training.loop import TrainConfig
from cirlab.training.train import train_method

TOLERANCE = 1e-4  # on each epoch's mean loss and on every weight: float sums in another order, nothing more


def epoch_losses(out) -> list:
    lines = (out.parent / (out.name + ".train") / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["epoch_loss"] for x in lines if "epoch_loss" in x]


def test_two_gloo_processes_match_one_process_with_the_doubled_batch(world, clip_dir, tmp_path):
    def cfg(batch: int) -> TrainConfig:
        return TrainConfig(epochs=2, batch_size=batch, lr=1e-3, backbone_lr=1e-4, warmup_steps=2, steps_per_epoch=4,
                           log_every=1, progress=False)
    config = {"dropout": 0.0}  # dropout masks would differ between the runs
    one = train_method("combiner", world, clip_dir, tmp_path / "one", cfg(32), config)
    launch(train_method, 2, "cpu", threads=1, method="combiner", data_root=world, backbone=clip_dir,
           out=tmp_path / "two", cfg=cfg(16), method_config=config)
    two = epoch_losses(tmp_path / "two")
    assert len(two) == 2 and one.losses[1] < one.losses[0]
    assert all(abs(a - b) < TOLERANCE for a, b in zip(one.losses, two)), (one.losses, two)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < TOLERANCE
    assert not (tmp_path / "two.train" / "train_state.pt.tmp").exists()  # one writer, no leftovers
    # the tolerance tells the global batch from the per-process one: without gathering, each process would see
    # only its 16 columns, as this run does
    half = train_method("combiner", world, clip_dir, tmp_path / "half", cfg(16), config)
    assert abs(half.losses[0] - one.losses[0]) > 10 * TOLERANCE
