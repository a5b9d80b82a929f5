"""Batch sources for the training loop: CIR triplets of a split, and (image, caption) pairs for pretraining."""
from __future__ import annotations

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

    def __init__(self, split: Split, store: PixelStore, with_captions: bool = False,
                 group_by_reference: bool = False):
        rows = [q for q in split.queries if q.targets]
        if not rows:
            raise CirlabError(f"split {split.dataset}/{split.name} has no queries with targets to train on")
        groups: dict = {}
        for q in rows:
            groups.setdefault(q.reference if group_by_reference else q.key, []).append(q)
        self.groups = list(groups.values())
        self.store, self.captions, self.with_captions = store, split.captions, with_captions
        if with_captions:
            missing = [q.targets[0] for q in rows if q.targets[0] not in self.captions]
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
                     [self.captions[t] for t in targets] if self.with_captions else None, targets)


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
