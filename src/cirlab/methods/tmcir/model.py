"""TMCIR (seed 001): intent-aware alignment on pseudo-targets, then adaptive token fusion.

Stage 1 (training/intent_align.py) fine-tunes CLIP's two encoders so that a modification text's feature lands on
the image an editor made from (reference, text). Stage 2 is this model: CLIP's projected image tokens of the
reference (class token and patches, after the post-LayerNorm and the visual projection) and projected text tokens
of the modification text are fused by `AdaptiveTokenFusion` (layers/token_fusion.py) and pooled into the composed
query; the target is CLIP's pooled image feature; InfoNCE over the batch trains the fusion and both encoders.

Interpretation (the full paper is not available), each a config field:
- `threshold` (0.5): merge when the cosine of a visual and a text token exceeds it (`threshold_mode="absolute"`),
  or when it is at or above that quantile of the query's candidate pairs ("relative", layers/token_fusion.py);
  `matching` "best_visual" (each visual token takes its most similar text token) or "mutual" (one-to-one); `pool`
  "mean" or "attention";
  `position`: a learned embedding of the visual position added to merged and unmerged visual-slot tokens.
- Similarities are computed after a linear map per side that starts as the identity, i.e. in CLIP's joint space,
  which stage 1 has aligned.
- The temperature is learnable, initialised at 0.01 (CLIP4Cir's fixed scale of 100).
- `finetune` "both" trains both encoders in stage 2, as the abstract says. With "text" (or "none") the image
  encoder stays as stage 1 left it; its token outputs are then computed once per image (`frozen_image_stage`),
  which makes a stage-2 epoch several times cheaper.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cirlab.errors import Choice, CirlabError
from cirlab.layers.token_fusion import AdaptiveTokenFusion
from cirlab.losses import global_info_nce
from cirlab.methods.baselines import ClipFeatures
from cirlab.methods.base import Finetune, MethodConfig, TrainingKind, register
from cirlab.types import Batch, LossOutput


class ThresholdMode(Choice):
    ABSOLUTE = "absolute"  # a cosine
    RELATIVE = "relative"  # a quantile of each query's candidate pairs


class Matching(Choice):
    BEST_VISUAL = "best_visual"
    MUTUAL = "mutual"


class Pool(Choice):
    MEAN = "mean"
    ATTENTION = "attention"


@dataclass
class TmcirConfig(MethodConfig):
    finetune: Finetune = Finetune.BOTH
    threshold: float = 0.5
    threshold_mode: ThresholdMode = ThresholdMode.ABSOLUTE
    matching: Matching = Matching.BEST_VISUAL
    pool: Pool = Pool.MEAN
    position: bool = True
    init_temperature: float = 0.01


@register
class Tmcir(ClipFeatures):
    name = "tmcir"
    config_class = TmcirConfig
    training = TrainingKind.TRIPLETS

    def __init__(self, config: TmcirConfig, backbone):
        super().__init__(config, backbone)
        vc = backbone.model.config.vision_config
        num_visual = 1 + (vc.image_size // vc.patch_size) ** 2
        if config.threshold_mode == "relative" and not 0.0 <= config.threshold <= 1.0:
            raise CirlabError(f"tmcir: a relative threshold is a quantile in [0, 1], got {config.threshold}")
        self.fusion = AdaptiveTokenFusion(backbone.dim, num_visual, config.threshold, config.matching,
                                          config.pool, config.position, config.threshold_mode)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))

    def frozen_image_stage(self):
        if not self.image_tower_frozen():
            return None
        return self._eval_stage(self.backbone.model.vision_model, self.backbone.image_tokens)

    def _visual(self, images) -> torch.Tensor:
        """Projected image tokens (B, 1+P, D) of pixels, PIL images, or already computed tokens (3-D)."""
        return self._cached_or(images, self.backbone.image_tokens)

    def _encode_target(self, images, captions) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.dim() == 3:  # cached tokens: the class token is pooled
            return self.normalise(images[:, 0].to(self.backbone.device))
        return self.image_feature(images)

    def fuse(self, images, texts) -> dict:
        bb = self.backbone
        visual = self._visual(images)  # (B, 1+P, D)
        tokens = bb.tokenize(texts, bb.device)
        text, _ = bb.text_tokens(tokens)  # (B, L, D)
        return self.fusion(visual, text, tokens["attention_mask"])

    def encode_query(self, images, texts) -> torch.Tensor:
        return self.normalise(self.fuse(images, texts)["pooled"])

    def loss(self, batch: Batch) -> LossOutput:
        out = self.fuse(batch.ref_pixels, batch.texts)
        q = self.normalise(out["pooled"])
        t = self.encode_target(batch.tgt_pixels)
        loss = global_info_nce(q, t, self.logit_scale.exp().clamp(max=100), batch.rank)
        merged_per_query = out["merged"].any(1).sum(1).float().mean().item()
        return LossOutput(loss, {"nce": loss.item(), "merged_text_tokens": merged_per_query})
