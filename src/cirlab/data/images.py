"""Image preprocessing with PIL and numpy (no torchvision; decoding in data/decode.py), plus an in-memory pixel
store."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cirlab.data.decode import open_image, to_uint8  # noqa: F401 (open_image: imported from here too)
from cirlab.errors import CirlabError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `size` (bicubic), centre-crop, scale to [0, 1], normalise."""
    size: int = 224
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def key(self) -> str:
        return f"rs{self.size}-m{','.join(f'{m:.4f}' for m in self.mean)}-s{','.join(f'{s:.4f}' for s in self.std)}"

    def to_uint8(self, img: Image.Image) -> np.ndarray:
        return to_uint8(img, self.size)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> float (B, 3, S, S)."""
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def __call__(self, images) -> torch.Tensor:
        return self.normalise(torch.from_numpy(np.stack([self.to_uint8(i) for i in images])))


class PixelStore:
    """Decoded, resized uint8 pixels of a set of named images, loaded once and kept in memory; or, when the
    `CIRLAB_PIXEL_CACHE` folder holds a cache of exactly these files at this size (data/pixel_cache.py), read from
    it memory-mapped, with nothing decoded."""

    def __init__(self, paths: dict, preprocess: Preprocess):
        from cirlab.data import pixel_cache

        self.paths, self.preprocess = paths, preprocess
        self._index: dict = {}
        self._rows: list = []
        self._cache = pixel_cache.lookup(paths, preprocess.size)

    def _load(self, name: str) -> int:
        if name not in self._index:
            if name not in self.paths:
                raise CirlabError(f"image id {name!r} is not in the split's image list")
            self._index[name] = len(self._rows)
            self._rows.append(torch.from_numpy(self.preprocess.to_uint8(open_image(self.paths[name]))))
        return self._index[name]

    def uint8(self, names) -> torch.Tensor:
        if self._cache is not None:
            rows, pixels = self._cache
            try:
                return torch.from_numpy(pixels[[rows[n] for n in names]])  # (B, 3, S, S), a copy
            except KeyError as e:
                raise CirlabError(f"image id {e.args[0]!r} is not in the split's image list") from None
        return torch.stack([self._rows[self._load(n)] for n in names])  # (B, 3, S, S)

    def pixels(self, names) -> torch.Tensor:
        return self.preprocess.normalise(self.uint8(names))
