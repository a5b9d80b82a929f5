"""Train a registered method by the kind it declares (`CIRModel.training`) and export a loadable checkpoint:
`train` dispatches; `train_method` runs the generic loop on a dataset's train triplets; zero-shot methods go to
training/zero_shot.py; methods with nothing to learn only save their checkpoint (`save_zero_shot`)."""
from __future__ import annotations

from pathlib import Path

import torch

from cirlab.backbones import load_backbone
from cirlab.data.images import PixelStore
from cirlab.data.readers import attach_captions, read_split
from cirlab.errors import CirlabError
from cirlab.methods import TrainingKind, build_model, method_class
from cirlab.training.data import FrozenFeatureStore, TripletSource, frozen_feature_cache
from cirlab.training.distributed import barrier, current
from cirlab.training.loop import TrainConfig, TrainResult, fit


def train(method: str, data_root, backbone, out, cfg: TrainConfig, method_config: dict | None = None,
          zero_shot: dict | None = None, **kwargs):
    """Train `method` as its declared kind asks, from `backbone` (HF id or folder) into the checkpoint folder `out`:
    - none: its checkpoint is saved (returns the folder);
    - triplets: `train_method` on `data_root`'s train triplets, `kwargs` passed on (returns its TrainResult);
    - zero-shot: `train_zero_shot` with `cfg` for stage I and `zero_shot` for the rest (`stage2`, a TrainConfig;
      `triplets`, `min_match`, `seed`, `log`, `stage1_from`, `on_epoch`; returns its summary)."""
    kind = method_class(method).training
    if kind is TrainingKind.NONE:
        return save_zero_shot(method, backbone, out, method_config)
    if kind is TrainingKind.ZERO_SHOT:
        from cirlab.training.zero_shot import train_zero_shot

        return train_zero_shot(method, data_root, backbone, out, cfg, method_config=method_config,
                               **(zero_shot or {}), **kwargs)
    return train_method(method, data_root, backbone, out, cfg, method_config, **kwargs)


def train_method(method: str, data_root, backbone, out, cfg: TrainConfig, method_config: dict | None = None,
                 dataset: str = "synth", split: str = "train", resume: bool = False, join: str = "and",
                 captions=None, on_epoch=None, feature_cache=None) -> TrainResult:
    """Train `method` on top of `backbone` (HF id or folder) and write a checkpoint folder to `out`.

    The loop's resumable state and metrics log live beside it in `<out>.train/`; the checkpoint folder is
    replaced whole after each epoch, so it always holds one complete epoch. `captions` is a caption cache (JSONL)
    for the split's images; `on_epoch(model, out)` runs after each epoch's checkpoint is written;
    `feature_cache`, a folder, keeps a frozen image stage's outputs on disk across runs (training/feature_cache.py).
    """
    cls = method_class(method)
    if cls.training is TrainingKind.NONE:
        raise CirlabError(f"method {method!r} is zero-shot and has nothing to train; save_zero_shot() (or "
                          f"`cirlab train --method {method}`) writes its checkpoint")
    if cls.training is TrainingKind.ZERO_SHOT:
        raise CirlabError(f"method {method!r} is zero-shot: it never trains on a benchmark's triplets; "
                          "train it with training.zero_shot.train_zero_shot (train() and `cirlab train` do)")
    out = Path(out)
    data = read_split(dataset, data_root, split, join=join)
    if captions is not None:
        attach_captions(data, captions)
    torch.manual_seed(cfg.seed)
    model = build_model(method, load_backbone(cls.backbone_kind, backbone), method_config)
    store = PixelStore(data.gallery, model.preprocess)
    frozen = model.frozen_image_stage() if cfg.cache_frozen else None
    if frozen is not None:
        cache = None
        if feature_cache is not None:  # rank 0 fills the cache; the other ranks then open and only read it
            if current().main:
                cache = frozen_feature_cache(model, feature_cache)
                names = sorted({n for q in data.queries if q.targets for n in (q.reference, q.targets[0])})
                FrozenFeatureStore(store, frozen, cache=cache).fill(names)
            barrier()
            cache = cache or frozen_feature_cache(model, feature_cache)
        store = FrozenFeatureStore(store, frozen, cache=cache)
    source = TripletSource(data, store, model.target_captions, cfg.group_by_reference)
    def export(_):
        model.save(out)
        if on_epoch is not None:
            on_epoch(model, out)

    return fit(model, source, cfg, out.with_name(out.name + ".train"), resume=resume, export=export,
               desc=f"train {method}")


def save_zero_shot(method: str, backbone, out, method_config: dict | None = None) -> Path:
    """Write a checkpoint for a method with nothing to train (it records the backbone it uses)."""
    cls = method_class(method)
    model = build_model(method, load_backbone(cls.backbone_kind, backbone), method_config)
    model.save(out)
    return Path(out)
