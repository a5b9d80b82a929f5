"""CSMCIR: one shared Q-Former for both towers, the memory bank in the loss, ablation switches."""
from __future__ import annotations

import json

import pytest
import torch

import cirlab
from cirlab.backbones import load_backbone
from cirlab.errors import CirlabError
from cirlab.methods import build_model
from cirlab.training.loop import TrainConfig
from cirlab.training.train import train_method
from cirlab.types import Batch


def _batch(bb, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(n, 3, bb.preprocess.size, bb.preprocess.size, generator=g)
    return Batch(px, [f"make object {i} red" for i in range(n)], torch.randn(n, 3, *px.shape[2:], generator=g),
                 [f"a scene number {i}" for i in range(n)], [f"img{seed}-{i}" for i in range(n)])


def _grad_sets(model, b) -> dict:
    q = model.encode_query(b.ref_pixels, b.texts)
    t = model.encode_target(b.tgt_pixels, b.tgt_captions)
    grads = {}
    for name, out in (("query", q), ("target", t)):
        model.zero_grad()
        out.sum().backward(retain_graph=True)
        grads[name] = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    return grads


def test_query_and_target_share_the_qformer(blip2_dir):
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

    pooled = build_model("csmcir", load_backbone("blip2", blip2_dir), {"target_tokens": "pooled"})
    assert sum(isinstance(m, Blip2QFormerModel) for m in pooled.modules()) == 1
    grads = _grad_sets(pooled, _batch(pooled.backbone))
    # pooled targets read the same position as queries: every Q-Former weight serves both towers
    assert {n for n in grads["query"] if ".qformer." in n} == {n for n in grads["target"] if ".qformer." in n}
    assert not any("vision_model" in n for n in grads["query"] | grads["target"])  # the ViT stays frozen
    multi = build_model("csmcir", load_backbone("blip2", blip2_dir))
    b = _batch(multi.backbone)
    assert multi.encode_target(b.tgt_pixels, b.tgt_captions).shape == (6, multi.backbone.num_query_tokens, 32)
    grads = _grad_sets(multi, b)
    # multi-token targets read the query-token outputs; every layer's attention still serves both towers
    for side in ("query", "target"):
        assert any(".qformer.encoder.layer.0.attention.attention.query.weight" in n for n in grads[side])


def test_memory_bank_negatives_enter_the_loss(blip2_dir):
    model = build_model("csmcir", load_backbone("blip2", blip2_dir),
                        {"memory_bank": {"mode": "entropy", "capacity": 64, "num_negatives": 8}})
    first = model.loss(_batch(model.backbone, seed=0))
    assert first.parts["bank_negatives"] == 0 and len(model.bank) == 6
    second = model.loss(_batch(model.backbone, seed=1))
    assert second.parts["bank_negatives"] == 6 and len(model.bank) == 12  # 8 slots, 6 entries to fill them
    second.loss.backward()  # empty slots must not poison the gradients
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    third = model.loss(_batch(model.backbone, seed=2))
    assert third.parts["bank_negatives"] == 8
    off = build_model("csmcir", load_backbone("blip2", blip2_dir), {"memory_bank": {"mode": "off"}})
    off.loss(_batch(off.backbone, seed=0))
    assert off.loss(_batch(off.backbone, seed=1)).parts["bank_negatives"] == 0


@pytest.mark.parametrize("variant", [{"target_tower": "image_only"}, {"target_tokens": "pooled"},
                                     {"captions": "none"}])
def test_ablation_switches_run(blip2_dir, variant):
    model = build_model("csmcir", load_backbone("blip2", blip2_dir), variant)
    out = model.loss(_batch(model.backbone))
    assert torch.isfinite(out.loss)
    assert model.needs_captions == (variant.get("target_tower", "symmetric") == "symmetric"
                                    and variant.get("captions", "mcot") != "none")


def test_bad_switch_is_a_clear_error(blip2_dir):
    with pytest.raises(CirlabError, match="target_tower must be one of"):
        build_model("csmcir", load_backbone("blip2", blip2_dir), {"target_tower": "both"})


def test_training_keeps_the_bank_in_the_checkpoint(world, blip2_dir, tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-3, backbone_lr=5e-4, warmup_steps=5, steps_per_epoch=10,
                      progress=False)
    train_method("csmcir", world, blip2_dir, tmp_path / "csmcir", cfg,
                 {"memory_bank": {"mode": "entropy", "capacity": 256, "num_negatives": 32}})
    model = cirlab.load(tmp_path / "csmcir")
    assert len(model.bank) == 256 and int(model.step) == 10
    log = [json.loads(x) for x in (tmp_path / "csmcir.train" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["epoch"] == 1 and log[-1]["epoch_loss"] > 0
