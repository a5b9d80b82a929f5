"""The on-disk frozen-feature cache: the same loss as the uncached path, no recomputation on reopening, a new key
when the backbone or the preprocessing changes, and a kill-safe manifest."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from cirlab.backbones import tiny_backbone
from cirlab.data.images import PixelStore
from cirlab.data.readers import read_split
from cirlab.methods import build_model
from cirlab.training.data import FrozenFeatureStore, TripletSource, frozen_feature_cache
from cirlab.training.feature_cache import FeatureCache


class Counting:
    def __init__(self, fn):
        self.fn, self.images = fn, 0

    def __call__(self, pixels):
        self.images += len(pixels)
        return self.fn(pixels)


@pytest.fixture(scope="module")
def csmcir():
    torch.manual_seed(0)
    bb = tiny_backbone("blip2", vision_width=64, vision_layers=1, qformer_width=64, qformer_layers=1,
                       num_query_tokens=4, dim=32)
    bb.model.vision_model.requires_grad_(False)  # the frozen ViT of csmcir's default
    return build_model("csmcir", bb, {"memory_bank": {"mode": "off"}})


def test_cached_features_give_the_uncached_loss_and_are_not_recomputed(csmcir, world, tmp_path):
    split = read_split("synth", world, "train")
    split = dataclasses.replace(split, queries=split.queries[:24])
    pixels = PixelStore(split.gallery, csmcir.preprocess)
    plain = TripletSource(split, pixels, csmcir.target_captions)
    encoder = Counting(csmcir.frozen_image_stage())
    cached = TripletSource(split, FrozenFeatureStore(pixels, encoder, cache=frozen_feature_cache(csmcir, tmp_path)),
                           csmcir.target_captions)
    csmcir.eval()
    with torch.no_grad():
        for idx in ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]):
            a, b = csmcir.loss(plain.batch(idx)).loss, csmcir.loss(cached.batch(idx)).loss
            assert torch.allclose(a, b, atol=1e-5), (a, b)
    computed = encoder.images
    assert computed > 0
    again = Counting(csmcir.frozen_image_stage())
    reopened = FrozenFeatureStore(pixels, again, cache=frozen_feature_cache(csmcir, tmp_path))
    names = [q.reference for q in split.queries[:16]]
    assert torch.equal(reopened.pixels(names), cached.store.pixels(names)) and again.images == 0  # read, not computed
    key = frozen_feature_cache(csmcir, tmp_path).key
    bb = csmcir.backbone  # the backbone's preprocessing changed: the model's follows it
    bb.preprocess, saved = dataclasses.replace(bb.preprocess, size=bb.preprocess.size + 16), bb.preprocess
    try:
        assert csmcir.preprocess.size == saved.size + 16
        assert frozen_feature_cache(csmcir, tmp_path).key != key  # another preprocessing: another folder
    finally:
        bb.preprocess = saved
    with torch.no_grad():
        csmcir.backbone.model.vision_model.embeddings.patch_embedding.weight.add_(0.01)
    assert frozen_feature_cache(csmcir, tmp_path).key != key  # other weights: another folder


def test_a_torn_write_leaves_the_last_manifest(tmp_path):
    cache = FeatureCache(tmp_path, {"k": 1})
    cache.add(["a", "b"], torch.ones(2, 3))
    (cache.folder / "shard-00001.npy").write_bytes(b"half a shard")  # a writer killed before its manifest
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = cache.folder / f".shard-00002.npy.tmp-{int(gone.stdout)}"  # one killed inside write_atomic
    killed.write_bytes(b"a quarter")
    reopened = FeatureCache(tmp_path, {"k": 1})
    assert len(reopened) == 2 and "c" not in reopened
    assert not killed.exists()  # its temporary file is deleted on opening
    reopened.add(["c"], torch.zeros(1, 3))  # overwrites the torn shard, then names it
    assert torch.equal(FeatureCache(tmp_path, {"k": 1}).get(["c", "a"]), torch.tensor([[0.0] * 3, [1.0] * 3]))
    with pytest.raises(KeyError):
        reopened.get(["zz"])
