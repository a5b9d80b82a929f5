"""An on-disk cache of a frozen image stage's outputs: computed once per image, memory-mapped afterwards.

When a method's first image stage never trains (csmcir's ViT under the Q-Former, mapcompose's CLIP vision tower),
its output for an image is the same in every epoch and every run. `FeatureCache` keeps those outputs under
`root/<key>/`, where the key hashes the frozen module's weights, the preprocessing and a tag naming the stage, so a
changed backbone or preprocessing reads from (and writes to) another folder: nothing stale is ever served.

Layout of `root/<key>/`: `manifest.json` (key parts, per-image shape, dtype, and the shards in order, each with the
image names it holds) and `shard-NNNNN.npy` files, one per computed chunk, read with `np.load(mmap_mode="r")`.
A shard is written to a temporary name and renamed, then the manifest is replaced the same way; a kill leaves the
last manifest and the shards it names, and a later run computes only the images no shard holds.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from cirlab.atomic import remove_stale_temps, write_atomic
from cirlab.errors import CirlabError, check_choice

DTYPES = {"float32": np.float32, "float16": np.float16}


def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's parameters and buffers (names, shapes and values)."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class FeatureCache:
    """Features of named images under `root/<key>/`; `key_parts` (a dict) is hashed into the key."""

    def __init__(self, root, key_parts: dict, dtype: str = "float32"):
        check_choice(dtype, DTYPES, "feature cache dtype")
        self.key = hashlib.sha1(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root) / self.key
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.folder)  # shards a killed run was writing
        self.key_parts, self.dtype = key_parts, dtype
        self.manifest = self._read_manifest()
        self._maps: dict = {}
        self._where = {n: (i, r) for i, s in enumerate(self.manifest["shards"]) for r, n in enumerate(s["names"])}

    def _read_manifest(self) -> dict:
        path = self.folder / "manifest.json"
        if not path.exists():
            return {"key": self.key_parts, "dtype": self.dtype, "shape": None, "shards": []}
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CirlabError(f"{path}: not valid JSON ({e}); delete the folder to rebuild the cache") from e
        if manifest.get("dtype") != self.dtype:
            raise CirlabError(f"{path} holds {manifest.get('dtype')} features, not {self.dtype}")
        return manifest

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def add(self, names: list, features: torch.Tensor) -> None:
        """Store the features (N, ...) of `names` (images not yet cached) as one new shard."""
        feats = features.detach().cpu().float().numpy().astype(DTYPES[self.dtype])
        shape = list(feats.shape[1:])
        if self.manifest["shape"] not in (None, shape):
            raise CirlabError(f"feature shape {shape} differs from the cache's {self.manifest['shape']}")
        n = len(self.manifest["shards"])
        shard = f"shard-{n:05d}.npy"
        write_atomic(self.folder / shard, lambda f: np.save(f, feats))
        manifest = self.manifest | {"shape": shape, "shards": self.manifest["shards"] + [
            {"file": shard, "names": list(names)}]}
        write_atomic(self.folder / "manifest.json", lambda f: f.write(json.dumps(manifest).encode()))
        self.manifest = manifest
        self._where.update({name: (n, r) for r, name in enumerate(names)})

    def get(self, names: list) -> torch.Tensor:
        """Features (len(names), ...) as float32, gathered from the memory-mapped shards."""
        missing = [n for n in names if n not in self._where]
        if missing:
            raise KeyError(missing[0])
        out = np.empty((len(names), *self.manifest["shape"]), np.float32)
        for j, name in enumerate(names):
            shard, row = self._where[name]
            if shard not in self._maps:
                self._maps[shard] = np.load(self.folder / self.manifest["shards"][shard]["file"], mmap_mode="r")
            out[j] = self._maps[shard][row]
        return torch.from_numpy(out)
