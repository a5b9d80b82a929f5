"""Batch sources for the training loop: CIR triplets of a split, and (image, caption) pairs for pretraining."""
from __future__ import annotations

import torch

from cirlab.data.images import PixelStore
from cirlab.data.readers import Split
from cirlab.errors import CirlabError
from cirlab.types import Batch


class TripletSource:
    """(reference, modification text, target) triplets; target captions attached when the method needs them.

    With `group_by_reference`, one item is every triplet sharing a reference image (CIRR forms several pairs per
    img_set, and so does the synthetic train split): a batch then holds the different targets of one reference
    side by side, so the in-batch negatives include the reference's own hard negatives. The loop's batch size then
    counts groups.
    """

    def __init__(self, split: Split, store: PixelStore, captions: str | None = None,
                 group_by_reference: bool = False):
        rows = [q for q in split.queries if q.targets]
        if not rows:
            raise CirlabError(f"split {split.dataset}/{split.name} has no queries with targets to train on")
        groups: dict = {}
        for q in rows:
            groups.setdefault(q.reference if group_by_reference else q.key, []).append(q)
        self.groups = list(groups.values())
        self.store, self.split, self.captions = store, split, captions  # the caption level targets read, or None
        if captions is not None:
            missing = [q.targets[0] for q in rows if q.targets[0] not in split.captions]
            if missing:
                raise CirlabError(f"{len(missing)} training targets have no caption (first: {missing[0]}); "
                                  "caption the split first")

    def __len__(self) -> int:
        return len(self.groups)

    def batch(self, indices) -> Batch:
        rows = [q for i in indices for q in self.groups[i]]
        targets = [q.targets[0] for q in rows]
        return Batch(self.store.pixels([q.reference for q in rows]), [q.text for q in rows],
                     self.store.pixels(targets),
                     self.split.caption_texts(targets, self.captions) if self.captions else None, targets,
                     [q.targets[1:] for q in rows], [q.reference for q in rows])


class PairSource:
    """(image, caption) pairs; the Batch carries the image as reference and the caption as text."""

    def __init__(self, names: list, captions: dict, store: PixelStore):
        self.names = [n for n in names if n in captions]
        if not self.names:
            raise CirlabError("no (image, caption) pairs to pretrain on")
        self.captions, self.store = captions, store

    def __len__(self) -> int:
        return len(self.names)

    def batch(self, indices) -> Batch:
        names = [self.names[i] for i in indices]
        px = self.store.pixels(names)
        return Batch(px, [self.captions[n] for n in names], px, None, names)


class FrozenFeatureStore:
    """A PixelStore stand-in that hands out a frozen image encoder's outputs instead of pixels.

    When a method's first image stage does not train (csmcir's ViT), encoding each image once and keeping the
    result makes every later epoch skip that stage. Features are computed on first use, in chunks, under no_grad,
    with the encoder in eval mode, and kept in memory (float32), or, with `cache` (training/feature_cache.py), on
    disk, memory-mapped and shared by every later run on the same backbone and preprocessing.
    """

    def __init__(self, store: PixelStore, encoder, chunk: int = 256, cache=None):
        self.store, self.encoder, self.chunk, self.cache = store, encoder, chunk, cache
        self._feats: dict = {}

    def _have(self, name: str) -> bool:
        return name in self.cache if self.cache is not None else name in self._feats

    def fill(self, names) -> None:
        """Compute and keep the features of `names` that are not kept yet."""
        todo = list(dict.fromkeys(n for n in names if not self._have(n)))
        for lo in range(0, len(todo), self.chunk):
            part = todo[lo:lo + self.chunk]
            with torch.no_grad():
                out = self.encoder(self.store.pixels(part)).float().cpu()
            if self.cache is not None:
                self.cache.add(part, out)
            else:
                self._feats.update(zip(part, out))

    def pixels(self, names) -> torch.Tensor:
        self.fill(names)
        if self.cache is not None:
            return self.cache.get(list(names))
        return torch.stack([self._feats[n] for n in names])


def frozen_feature_cache(model, root, tag: str = "frozen_image_stage", dtype: str = "float32"):
    """The on-disk FeatureCache of `model`'s frozen image stage, keyed by the backbone's weights, the
    preprocessing and `tag`."""
    from cirlab.training.feature_cache import FeatureCache, module_fingerprint

    return FeatureCache(root, {"tag": tag, "method": model.name, "backbone": module_fingerprint(model.backbone.model),
                               "preprocess": model.preprocess.key()}, dtype)
