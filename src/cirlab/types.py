"""Typed records shared by every layer: queries, gallery items, batches, scores, search hits, loss outputs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Query:
    """One composed query. `targets` holds every ground truth (one for CIRR, several for CIRCO)."""
    key: str
    reference: str
    text: str
    targets: tuple = ()
    subset: tuple = ()  # CIRR img_set members (reference included), empty when the benchmark has none
    alt_texts: tuple = ()  # other phrasings scored with `text` and averaged (FashionIQ's "both orders")


@dataclass(frozen=True)
class Reference:
    """A query's reference image as a method that reads its description sees it (`CIRModel.query_captions`)."""
    image: str  # its id: a split's image name, an index item's id, "" for an upload
    caption: str  # its description at the method's caption level


@dataclass(frozen=True)
class Rank:
    """This process's place in a data-parallel group of `world` processes: a batch it trains on is slice `rank` of
    the global batch (training/distributed.py)."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class GalleryItem:
    name: str
    path: str


@dataclass
class Batch:
    """A training batch: reference pixels, modification texts, target pixels and optional target captions."""
    ref_pixels: torch.Tensor  # (B, 3, H, W)
    texts: list
    tgt_pixels: torch.Tensor  # (B, 3, H, W)
    tgt_captions: list | None = None
    target_names: list = field(default_factory=list)
    also_targets: list = field(default_factory=list)  # per row, other images that also fit (never negatives)
    reference_names: list = field(default_factory=list)  # per row, the reference image's name (when known)
    rank: Rank = Rank()  # which slice of the global batch this is; the trainer sets it, the losses read it

    def to(self, device) -> "Batch":
        return Batch(self.ref_pixels.to(device), self.texts, self.tgt_pixels.to(device), self.tgt_captions,
                     self.target_names, self.also_targets, self.reference_names, self.rank)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class LossOutput:
    loss: torch.Tensor
    parts: dict = field(default_factory=dict)  # name -> float, for logging


@dataclass
class Scores:
    """Similarities of queries against a gallery: `values[i, j]` scores query i against `names[j]`."""
    values: torch.Tensor  # (Q, N)
    names: list


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float
