"""Multi-process training: two gloo processes with batch B follow one process with batch 2B, for the combiner,
csmcir and tmcir. The two processes are started once (`two_processes`) and train all three, one after another."""
from __future__ import annotations

import json

import pytest
import torch
from helpers.distributed import train_each
from safetensors.torch import load_file

from cirlab.training.distributed import launch
from cirlab.training.loop import TrainConfig
from cirlab.training.train import train_method

TOLERANCE = 1e-4  # on each epoch's mean loss and on every weight: float sums in another order, nothing more


def epoch_losses(out) -> list:
    lines = (out.parent / (out.name + ".train") / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["epoch_loss"] for x in lines if "epoch_loss" in x]


def _combiner_cfg(batch: int) -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=batch, lr=1e-3, backbone_lr=1e-4, warmup_steps=2, steps_per_epoch=4,
                       log_every=1, progress=False)


def _gathered_cfg(batch: int) -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=batch, lr=1e-3, backbone_lr=1e-4, warmup_steps=1, steps_per_epoch=3,
                       log_every=1, progress=False)


@pytest.fixture(scope="module")
def blip2_no_dropout(tmp_path_factory):
    """A tiny BLIP-2 whose Q-Former has no dropout: dropout masks would differ between the runs."""
    from cirlab.backbones import tiny_backbone

    torch.manual_seed(0)
    bb = tiny_backbone("blip2", vision_width=32, vision_layers=1, qformer_width=32, qformer_layers=1,
                       num_query_tokens=4, dim=32)
    qcfg = bb.model.config.qformer_config
    qcfg.hidden_dropout_prob = qcfg.attention_probs_dropout_prob = 0.0
    out = tmp_path_factory.mktemp("backbones") / "blip2-no-dropout"
    bb.save_pretrained(out)
    return out


# method -> (backbone fixture, method config, TrainConfig for a batch size); dropout off: masks would differ
RUNS = {"combiner": ("clip_dir", {"dropout": 0.0}, _combiner_cfg),
        # bank off, since it stays per process
        "csmcir": ("blip2_no_dropout", {"memory_bank": {"mode": "off"}}, _gathered_cfg),
        "tmcir": ("clip_dir", {}, _gathered_cfg)}


@pytest.fixture(scope="module")
def two_processes(request, world, tmp_path_factory):
    """Each method trained by two gloo processes with batch 16, in one process group: method -> its output."""
    out = tmp_path_factory.mktemp("two")
    runs = [dict(method=m, data_root=world, backbone=request.getfixturevalue(fixture), out=out / m, cfg=cfg(16),
                 method_config=config) for m, (fixture, config, cfg) in RUNS.items()]
    launch(train_each, 2, "cpu", threads=1, runs=runs)
    return {m: out / m for m in RUNS}


def test_two_gloo_processes_match_one_process_with_the_doubled_batch(world, clip_dir, two_processes, tmp_path):
    _, config, cfg = RUNS["combiner"]
    one = train_method("combiner", world, clip_dir, tmp_path / "one", cfg(32), config)
    two = epoch_losses(two_processes["combiner"])
    assert len(two) == 2 and one.losses[1] < one.losses[0]
    assert all(abs(a - b) < TOLERANCE for a, b in zip(one.losses, two)), (one.losses, two)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(two_processes["combiner"] / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < TOLERANCE
    assert not (two_processes["combiner"].parent / "combiner.train" / "train_state.pt.tmp").exists()  # one writer
    # the tolerance tells the global batch from the per-process one: without gathering, each process would see
    # only its 16 columns, as this run does
    half = train_method("combiner", world, clip_dir, tmp_path / "half", cfg(16), config)
    assert abs(half.losses[0] - one.losses[0]) > 10 * TOLERANCE


def _weights(out) -> dict:
    """The method's own weights and, where it fine-tunes them, the backbone's (saved under backbone/)."""
    w = {f"own/{k}": v for k, v in load_file(out / "model.safetensors").items()}
    if (out / "backbone" / "model.safetensors").exists():
        w |= {f"backbone/{k}": v for k, v in load_file(out / "backbone" / "model.safetensors").items()}
    return w


@pytest.mark.parametrize("method", ["csmcir", "tmcir"])
def test_gathered_losses_of_csmcir_and_tmcir_match_one_process_towers_included(method, request, world,
                                                                                two_processes, tmp_path):
    """csmcir (InfoNCE over gathered multi-token targets; bank off, since it stays per process) and tmcir
    (gathered InfoNCE after token fusion): two processes with batch 16 end with the same losses and the same
    weights, the fine-tuned towers (Q-Former; both CLIP encoders) included, as one process with batch 32."""
    fixture, config, cfg = RUNS[method]
    backbone = request.getfixturevalue(fixture)
    one = train_method(method, world, backbone, tmp_path / "one", cfg(32), config)
    two = epoch_losses(two_processes[method])
    assert abs(one.losses[0] - two[0]) < TOLERANCE, (one.losses, two)
    a, b = _weights(tmp_path / "one"), _weights(two_processes[method])
    assert a.keys() == b.keys() and any(k.startswith("backbone/") for k in a)  # the towers were fine-tuned
    start = _weights_of_backbone(backbone)
    moved = [k for k in a if k.startswith("backbone/") and k[9:] in start
             and a[k].is_floating_point() and not torch.allclose(a[k], start[k[9:]])]
    assert moved, "no backbone weight changed: the towers did not train"
    # attention key biases add q.b to every logit of a query's row, which softmax ignores: their gradient is zero
    # in exact arithmetic, float noise in practice, and AdamW turns noise of either sign into steps of a full lr
    diffs = sorted(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a if not k.endswith("k_proj.bias"))
    assert diffs[-1][0] < TOLERANCE, diffs[-5:]


def _weights_of_backbone(folder) -> dict:
    return load_file(folder / "model.safetensors")
