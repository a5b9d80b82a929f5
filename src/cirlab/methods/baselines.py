"""Baselines the seed papers compare against, on CLIP features.

- `image_only`: the reference image's feature is the query (zero-shot).
- `text_only`: the modification text's feature is the query (zero-shot).
- `sum`: the normalised sum of both (zero-shot).
- `combiner`: CLIP4Cir (Baldrati et al. 2022), a Combiner network trained contrastively on triplets; the CLIP
  towers are fine-tuned too (`finetune`, default "both"), as in CLIP4Cir's two-stage training, done here in one
  stage with a lower backbone learning rate set by the training config. With `finetune` "text" (CLIP4Cir's
  second stage trains on frozen image features) the image tower is a frozen stage: training reads each image's
  pooled feature from the feature cache instead of running the tower again (`frozen_image_stage`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cirlab.layers.combiner import Combiner
from cirlab.losses import global_info_nce
from cirlab.methods.base import CIRModel, Finetune, MethodConfig, TrainingKind, register
from cirlab.types import Batch, LossOutput


class ClipFeatures(CIRModel):
    """Pooled CLIP features; targets are images."""

    def image_feature(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.dim() == 3:  # cached by frozen_image_stage: (B, 1, D)
            return self.normalise(images[:, 0].to(self.backbone.device))
        return self.normalise(self.backbone.encode_image(self.pixels(images)))  # (B, D)

    def image_tower_frozen(self) -> bool:
        return not any(p.requires_grad for p in self._tower(text=False).parameters())

    def frozen_image_stage(self):
        """Pooled image features (B, 1, D), not normalised, when no image-tower parameter trains."""
        if not self.image_tower_frozen():
            return None
        return self._eval_stage(self.backbone.model.vision_model, lambda px: self.backbone.encode_image(px)[:, None])

    def text_feature(self, texts) -> torch.Tensor:
        tokens = self.backbone.tokenize(texts, self.backbone.device)
        return self.normalise(self.backbone.encode_text(tokens))  # (B, D)

    def _encode_target(self, images, captions) -> torch.Tensor:
        return self.image_feature(images)


@register
class ImageOnly(ClipFeatures):
    name = "image_only"

    def encode_query(self, images, texts) -> torch.Tensor:
        return self.image_feature(images)


@register
class TextOnly(ClipFeatures):
    name = "text_only"

    def encode_query(self, images, texts) -> torch.Tensor:
        return self.text_feature(texts)


@register
class Sum(ClipFeatures):
    name = "sum"

    def encode_query(self, images, texts) -> torch.Tensor:
        return self.normalise(self.image_feature(images) + self.text_feature(texts))


@dataclass
class CombinerConfig(MethodConfig):
    finetune: Finetune = Finetune.BOTH
    proj_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.1
    logit_scale: float = 100.0  # CLIP4Cir's fixed temperature


@register
class CombinerModel(ClipFeatures):
    name = "combiner"
    config_class = CombinerConfig
    training = TrainingKind.TRIPLETS

    def __init__(self, config: CombinerConfig, backbone):
        super().__init__(config, backbone)
        self.combiner = Combiner(backbone.dim, config.proj_dim, config.hidden_dim, config.dropout)

    def encode_query(self, images, texts) -> torch.Tensor:
        return self.normalise(self.combiner(self.image_feature(images), self.text_feature(texts)))

    def loss(self, batch: Batch) -> LossOutput:
        q = self.encode_query(batch.ref_pixels, batch.texts)  # (B, D)
        t = self.encode_target(batch.tgt_pixels)  # (B, D)
        loss = global_info_nce(q, t, self.config.logit_scale, batch.rank)  # against every rank's targets
        return LossOutput(loss, {"nce": loss.item()})
