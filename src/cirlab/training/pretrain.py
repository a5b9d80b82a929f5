"""Contrastive image-text pretraining of a backbone on synthetic (scene, caption) pairs.

CLIP: the symmetric InfoNCE of CLIP on pooled features. BLIP-2: the image-text contrastive loss of BLIP-2 stage 1,
where an image-text similarity is the maximum over the query tokens. The result is saved with `save_pretrained`
and loads back with `from_pretrained` like any checkpoint.

`init_from` (BLIP-2 only) starts from a pretrained CLIP folder as BLIP-2 does: its ViT is copied in and frozen
(backbones/convert.py), the ViT's outputs are computed once per image, and only the Q-Former side trains.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.backbones import tiny_backbone
from cirlab.data.images import PixelStore
from cirlab.data.readers import read_split
from cirlab.errors import CirlabError
from cirlab.losses import info_nce
from cirlab.training.data import FrozenFeatureStore, PairSource
from cirlab.training.loop import TrainConfig, fit
from cirlab.types import Batch, LossOutput

DONE_FILE = "pretrain.json"


class ContrastivePretrainer(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def loss(self, batch: Batch) -> LossOutput:
        bb = self.backbone
        if batch.ref_pixels.dim() == 3:  # cached outputs of a frozen ViT (B, 1+P, Dv)
            img = F.normalize(bb.query_features(batch.ref_pixels), dim=-1)  # (B, Q, D)
        else:
            img = F.normalize(bb.encode_image(batch.ref_pixels), dim=-1)  # (B, D) or (B, Q, D)
        txt = F.normalize(bb.encode_text(bb.tokenize(batch.texts, batch.ref_pixels.device)), dim=-1)  # (B, D)
        if img.dim() == 3:
            sim = torch.einsum("iqd,jd->ijq", img, txt).amax(-1)  # (B, B): image i vs text j
        else:
            sim = img @ txt.t()
        logits = bb.logit_scale.exp().clamp(max=100) * sim
        loss = 0.5 * (info_nce(logits) + info_nce(logits.t()))
        return LossOutput(loss, {"itc": loss.item()})


def _blip2_from_clip(clip, store: PixelStore, names: list, overrides: dict):
    from cirlab.backbones.convert import blip2_from_clip, fold_error

    calib = store.pixels(names[:256])
    backbone = blip2_from_clip(clip, calib, **overrides)
    backbone.model.vision_model.requires_grad_(False)
    return backbone, fold_error(clip, backbone, calib)


def backbone_and_pairs(kind: str, split, backbone_overrides: dict | None = None, init_from=None) -> tuple:
    """(a fresh tiny backbone of `kind`, or BLIP-2 from the CLIP in `init_from`; the split's (image, caption)
    PairSource, frozen ViT outputs in place of pixels for the latter; info to record)."""
    names = sorted(split.gallery)
    info = {}
    if init_from is not None:
        if kind != "blip2":
            raise CirlabError(f"init_from is for the blip2 backbone (a CLIP ViT inside BLIP-2), not {kind!r}")
        from cirlab.backbones.clip import ClipBackbone

        clip = ClipBackbone.from_pretrained(init_from).eval()
        store = PixelStore(split.gallery, clip.preprocess)
        backbone, info["vit_fold"] = _blip2_from_clip(clip, store, names, backbone_overrides or {})
        vit = backbone.model.vision_model.eval()
        store = FrozenFeatureStore(store, lambda px: vit(pixel_values=px.to(vit.device)).last_hidden_state)
    else:
        backbone = tiny_backbone(kind, **(backbone_overrides or {}))
        store = PixelStore(split.gallery, backbone.preprocess)
    source = PairSource(names, split.captions, store)
    return backbone, source, info


def pretrain(kind: str, data_root, out, cfg: TrainConfig, backbone_overrides: dict | None = None,
             resume: bool = False, init_from=None) -> Path:
    """Build a tiny backbone of `kind`, pretrain it on the train split's images and captions, save it in `out`."""
    out = Path(out)
    split = read_split("synth", data_root, "train")
    if not split.captions:
        raise CirlabError(f"no captions for the train images of {data_root}: pretraining reads "
                          "synth/captions.jsonl, which `cirlab synth` writes")
    torch.manual_seed(cfg.seed)
    backbone, source, info = backbone_and_pairs(kind, split, backbone_overrides, init_from)
    trainer = ContrastivePretrainer(backbone)
    work = out.with_name(out.name + ".work")
    result = fit(trainer, source, cfg, work, resume=resume, desc=f"pretrain {kind}")
    backbone.save_pretrained(out)
    (out / DONE_FILE).write_text(json.dumps({"kind": kind, "train": vars(cfg), "overrides": backbone_overrides or {},
                                             "init_from": None if init_from is None else str(init_from), **info,
                                             "epoch_losses": result.losses, "seconds": result.seconds}, indent=1))
    return out
