"""Training really lowers the loss and raises recall; resume continues to the same result; pretraining works
for both backbones and saves a folder that from_pretrained loads back."""
from __future__ import annotations

import json
import math

import torch

import cirlab
from cirlab.backbones import load_backbone
from cirlab.data.readers import read_split
from cirlab.evaluation.protocols import evaluate
from cirlab.training.loop import TrainConfig
from cirlab.training.pretrain import pretrain
from cirlab.training.train import save_zero_shot, train_method


def _cfg(**kw):
    base = dict(epochs=2, batch_size=64, lr=1e-3, backbone_lr=1e-4, warmup_steps=10, progress=False, log_every=5)
    return TrainConfig(**(base | kw))


def test_combiner_training_lowers_loss_and_raises_recall(world, clip_dir, tmp_path):
    val = read_split("synth", world, "val")
    untrained = save_zero_shot("combiner", clip_dir, tmp_path / "untrained")
    before, _ = evaluate(cirlab.load(untrained), val, progress=False)
    result = train_method("combiner", world, clip_dir, tmp_path / "combiner", _cfg(epochs=3, steps_per_epoch=30))
    after, _ = evaluate(cirlab.load(tmp_path / "combiner"), val, progress=False)
    assert result.losses[-1] < 0.7 * result.losses[0]
    assert after["R@10"] > before["R@10"] + 10, (before, after)
    assert after["Rsubset@1"] > before["Rsubset@1"]
    log = [json.loads(line) for line in (tmp_path / "combiner.train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "epoch_loss" in r] == [1, 2, 3]


def test_resume_continues_to_the_same_result(world, clip_dir, tmp_path, monkeypatch):
    import pytest

    from cirlab.training import loop

    cfg = _cfg(epochs=2, steps_per_epoch=6, batch_size=16)
    train_method("combiner", world, clip_dir, tmp_path / "straight", cfg)
    save = loop._atomic_save

    def save_then_die(obj, path):  # the run dies right after saving its state after epoch 1
        save(obj, path)
        raise RuntimeError("killed")
    monkeypatch.setattr(loop, "_atomic_save", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        train_method("combiner", world, clip_dir, tmp_path / "resumed", cfg)
    monkeypatch.setattr(loop, "_atomic_save", save)
    # the second run picks up the state after epoch 1 and runs epoch 2 only
    train_method("combiner", world, clip_dir, tmp_path / "resumed", cfg, resume=True)
    a = torch.load(tmp_path / "straight.train" / "train_state.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed.train" / "train_state.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    assert a["losses"] == b["losses"] or all(abs(x - y) < 1e-5 for x, y in zip(a["losses"], b["losses"]))


def test_pretrain_blip2_lowers_loss_below_chance_and_loads_back(world, tmp_path):
    cfg = _cfg(epochs=3, steps_per_epoch=40, batch_size=64, lr=1e-3)
    out = pretrain("blip2", world, tmp_path / "blip2", cfg,
                   {"vision_width": 64, "vision_layers": 1, "qformer_width": 64, "qformer_layers": 1,
                    "num_query_tokens": 4, "dim": 32})
    info = json.loads((out / "pretrain.json").read_text())
    losses = info["epoch_losses"]
    # chance is ln(batch size); with the first-position text feature it stayed there (see Blip2Backbone.text_pool)
    assert losses[0] > losses[1] > losses[2] and losses[2] < math.log(64) - 0.2, losses
    from transformers import Blip2ForImageTextRetrieval

    assert isinstance(Blip2ForImageTextRetrieval.from_pretrained(out), Blip2ForImageTextRetrieval)
    bb = load_backbone("blip2", out)
    assert bb.text_pool == "mean"
    assert bb.encode_image(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 32)
    # the ViT must see the image (BLIP-2's default initializer_range of 1e-10 would make it silent)
    assert bb.image_patches(torch.randn(2, 3, 64, 64)).std() > 0.1


def test_pretrained_clip_beats_chance_at_image_text_matching(world, clip_dir):
    """After one epoch, a scene's caption retrieves its own image among 64 far better than chance (1/64)."""
    from cirlab.data.images import PixelStore

    split = read_split("synth", world, "val")
    bb = load_backbone("clip", clip_dir).eval()
    names = sorted(split.gallery)[:64]
    px = PixelStore(split.gallery, bb.preprocess).pixels(names)
    with torch.no_grad():
        img = torch.nn.functional.normalize(bb.encode_image(px), dim=-1)
        txt = torch.nn.functional.normalize(bb.encode_text(bb.tokenize([split.captions[n] for n in names])), dim=-1)
    top1 = (txt @ img.t()).argmax(1) == torch.arange(64)
    assert top1.float().mean() > 0.2


def test_combiner_with_a_frozen_image_tower_trains_from_cached_features_with_the_same_loss(world, clip_dir):
    """finetune="text": pooled image features come from the frozen-stage cache; loss and targets equal the pixel
    path's, and a combiner that fine-tunes its image tower has no frozen stage."""
    from cirlab.data.images import PixelStore
    from cirlab.methods import build_model
    from cirlab.training.data import FrozenFeatureStore, TripletSource

    model = build_model("combiner", load_backbone("clip", clip_dir), {"finetune": "text"})
    frozen = model.frozen_image_stage()
    assert frozen is not None and build_model("combiner", load_backbone("clip", clip_dir)).frozen_image_stage() is None
    split = read_split("synth", world, "train")
    store = PixelStore(split.gallery, model.preprocess)
    pixel_batch = TripletSource(split, store).batch(list(range(8)))
    cached_batch = TripletSource(split, FrozenFeatureStore(store, frozen)).batch(list(range(8)))
    assert cached_batch.ref_pixels.shape == (8, 1, model.backbone.dim)
    model.eval()
    with torch.no_grad():
        a, b = model.loss(pixel_batch).loss, model.loss(cached_batch).loss
        ta, tb = model.encode_target(pixel_batch.tgt_pixels), model.encode_target(cached_batch.tgt_pixels)
    assert torch.allclose(ta, tb, atol=1e-5) and abs(a.item() - b.item()) < 1e-4
