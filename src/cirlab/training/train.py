"""Train a registered method on a dataset's train split with the generic loop; export a loadable checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from cirlab.backbones import load_backbone
from cirlab.data.images import PixelStore
from cirlab.data.readers import read_split
from cirlab.errors import CirlabError
from cirlab.methods import build_model, method_class
from cirlab.training.data import TripletSource
from cirlab.training.loop import TrainConfig, TrainResult, fit


def train_method(method: str, data_root, backbone, out, cfg: TrainConfig, method_config: dict | None = None,
                 dataset: str = "synth", split: str = "train", resume: bool = False, join: str = "and") -> TrainResult:
    """Train `method` on top of `backbone` (HF id or folder) and write a checkpoint folder to `out`.

    The loop's resumable state and metrics log live beside it in `<out>.train/`; the checkpoint folder is
    replaced whole after each epoch, so it always holds one complete epoch.
    """
    cls = method_class(method)
    if not cls.trainable:
        raise CirlabError(f"method {method!r} is zero-shot and has nothing to train; save_zero_shot() (or "
                          f"`cirlab train --method {method}`) writes its checkpoint")
    out = Path(out)
    data = read_split(dataset, data_root, split, join=join)
    torch.manual_seed(cfg.seed)
    model = build_model(method, load_backbone(cls.backbone_kind, backbone), method_config)
    source = TripletSource(data, PixelStore(data.gallery, model.backbone.preprocess), model.needs_captions,
                           cfg.group_by_reference)
    return fit(model, source, cfg, out.with_name(out.name + ".train"), resume=resume, export=lambda _: model.save(out),
               desc=f"train {method}")


def save_zero_shot(method: str, backbone, out, method_config: dict | None = None) -> Path:
    """Write a checkpoint for a method with nothing to train (it records the backbone it uses)."""
    cls = method_class(method)
    model = build_model(method, load_backbone(cls.backbone_kind, backbone), method_config)
    model.save(out)
    return Path(out)
