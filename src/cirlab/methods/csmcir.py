"""CSMCIR (seed 000): one shared Q-Former encodes both the composed query and the captioned target.

Query: the BLIP-2 Q-Former runs its query tokens together with the modification text, cross-attending to the
reference image's ViT patches; the hidden state at the first text position, projected and normalised, is the query.
Target (`target_tower="symmetric"`): the same Q-Former, same parameters, runs on the target image's patches with
that image's caption (the MCoT `final_caption`). Loss: InfoNCE over the batch plus negatives from the memory bank
(layers/memory_bank.py). The ViT is frozen; the Q-Former, its embeddings, query tokens and projections train.

Interpretation (the full paper is not available), each a config field:
- `target_tokens="multi"`: the target is its Q query-token outputs (N, Q, D) and the similarity is the maximum over
  them (BLIP-2's ITC convention); "pooled" pools the target's positions exactly as the query is pooled.
- Both sides go through one projection (the Q-Former's text projection) so that the two towers are symmetric in
  every parameter.
- `target_tower="image_only"` is the asymmetric design of BLIP-2-based methods such as SPRC: the target is the
  Q-Former's image-only query features (no caption) through the vision projection.
- `captions="single_level"` gives the target tower one level of the MCoT record instead of its final caption
  (`single_level`, default "objects": the salient objects and their attributes, without layout or the telling
  details), standing in for a caption from a plain one-step prompt; `captions="none"` keeps the symmetric tower
  but gives it an empty caption.
- The temperature is learnable, initialised at 0.07 as in BLIP-2.
- `query_pool`: the paper's query is the first text position. A tiny Q-Former trained from scratch cannot use that
  position (it barely depends on the text, see Blip2Backbone.text_pool; measured: csmcir's loss stayed at chance,
  5.1 for 64 + 128 candidates, over 2 epochs on the default world). "mean" averages the text positions, "all"
  averages the query-token and text positions. In a 2-layer Q-Former the text positions see the image only
  through one self-attention hop to the query tokens; measured on the default world (4 epochs, reference-grouped
  batches, bank off): "mean" test1 R@1 4.8 / R@10 39.0, "all" 9.5 / 49.0. So "auto" means "first" for real
  BLIP-2 checkpoints (CLS text pooling, a 12-layer Q-Former) and "all" for tiny mean-pooling ones.
- The memory bank (layers/memory_bank.py) hands out negatives only after its `warmup_steps`: with bank negatives
  from the first step, the loss climbed back to chance within two epochs (test1 R@1 0.7) while the same run
  without the bank reached R@1 4.3.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.layers.memory_bank import MemoryBank, MemoryBankConfig
from cirlab.losses import gather, global_labels
from cirlab.methods.base import CIRModel, MethodConfig, register
from cirlab.types import Batch, LossOutput


@dataclass
class CsmcirConfig(MethodConfig):
    finetune: str = "text"  # for blip2: the Q-Former side trains, the ViT stays frozen
    target_tower: str = "symmetric"  # symmetric | image_only
    target_tokens: str = "multi"  # multi | pooled
    captions: str = "mcot"  # mcot | single_level | none
    single_level: str = "objects"  # the caption level `captions="single_level"` reads
    query_pool: str = "auto"  # first | mean | all | auto (all when the backbone mean-pools text, else first)
    memory_bank: dict = field(default_factory=lambda: {"mode": "entropy", "warmup_steps": 100, "num_negatives": 64})


def image_id(name: str) -> int:
    """A stable integer id for an image name (the memory bank's false-negative key)."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:15], 16)


@register
class Csmcir(CIRModel):
    name = "csmcir"
    config_class = CsmcirConfig
    backbone_kind = "blip2"
    trainable = True

    def __init__(self, config: CsmcirConfig, backbone):
        for value, allowed, what in ((config.query_pool, ("auto", "first", "mean", "all"), "query_pool"),
                                     (config.target_tower, ("symmetric", "image_only"), "target_tower"),
                                     (config.target_tokens, ("multi", "pooled"), "target_tokens"),
                                     (config.captions, ("mcot", "single_level", "none"), "captions")):
            if value not in allowed:
                from cirlab.errors import CirlabError
                raise CirlabError(f"csmcir {what} must be one of {', '.join(allowed)}, got {value!r}")
        super().__init__(config, backbone)
        m = backbone.model
        m.query_tokens.requires_grad_(True)
        m.text_projection.requires_grad_(True)
        m.vision_projection.requires_grad_(config.target_tower == "image_only")  # used by that tower only
        self.needs_captions = config.target_tower == "symmetric" and config.captions != "none"
        self.caption_level = config.single_level if config.captions == "single_level" else "final_caption"
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.bank = MemoryBank(MemoryBankConfig(**config.memory_bank), self._target_width())
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def _pool_text(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, Q+L, Dq) joint hidden states -> (B, Dq) at the text positions, per `query_pool`."""
        q = self.backbone.num_query_tokens
        pool = self.config.query_pool
        if pool == "auto":
            pool = "all" if getattr(self.backbone, "text_pool", "cls") == "mean" else "first"
        if pool == "first":
            return hidden[:, q]
        m = mask[..., None].to(hidden.dtype)  # (B, L, 1)
        if pool == "all":  # the query tokens and the text positions
            m = torch.cat([m.new_ones(m.shape[0], q, 1), m], dim=1)
            return (hidden * m).sum(1) / m.sum(1)
        return (hidden[:, q:] * m).sum(1) / m.sum(1)

    def _target_width(self) -> int:
        k = self.backbone.num_query_tokens if self.config.target_tokens == "multi" else 1
        return k * self.backbone.dim

    def frozen_image_stage(self):
        vit = self.backbone.model.vision_model
        if any(p.requires_grad for p in vit.parameters()):
            return None
        return self._eval_stage(vit, self.backbone.image_patches)

    def _patches(self, images) -> torch.Tensor:
        """ViT patches (B, 1+P, Dv) of pixels, PIL images, or already computed patches (a 3-D tensor)."""
        return self._cached_or(images, self.backbone.image_patches)

    # ----------------------------------------------------------------- the interface
    def encode_query(self, images, texts) -> torch.Tensor:
        bb = self.backbone
        patches = self._patches(images)  # (B, 1+P, Dv)
        tokens = bb.tokenize(texts, bb.device)
        hidden = bb.joint(patches, tokens)  # (B, Q+L, Dq)
        return self.normalise(bb.model.text_projection(self._pool_text(hidden, tokens["attention_mask"])))

    def encode_target(self, images, captions=None) -> torch.Tensor:
        bb = self.backbone
        patches = self._patches(images)
        if self.config.target_tower == "image_only":
            feats = bb.query_features(patches)  # (N, Q, D)
            return self.normalise(feats if self.config.target_tokens == "multi" else feats.mean(1))
        if captions is None or self.config.captions == "none":
            captions = [""] * patches.shape[0]
        tokens = bb.tokenize(captions, bb.device)
        hidden = bb.joint(patches, tokens)  # (N, Q+L, Dq)
        if self.config.target_tokens == "multi":
            return self.normalise(bb.model.text_projection(hidden[:, :bb.num_query_tokens]))  # (N, Q, D)
        return self.normalise(bb.model.text_projection(self._pool_text(hidden, tokens["attention_mask"])))

    def _bank_similarity(self, queries: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """(B, D) x (C, K*D) -> (B, C), the same scoring as `similarity`."""
        return self.similarity(queries, flat.view(flat.shape[0], -1, queries.shape[-1]))

    def loss(self, batch: Batch) -> LossOutput:
        q = self.encode_query(batch.ref_pixels, batch.texts)  # (B, D)
        t = self.encode_target(batch.tgt_pixels, batch.tgt_captions)  # (B, D) or (B, K, D)
        scale = self.logit_scale.exp().clamp(max=100)
        logits = scale * self.similarity(q, gather(t))  # (B, W*B): every rank's targets; the bank stays local
        ids = torch.tensor([image_id(n) for n in batch.target_names], device=q.device)
        step = int(self.step)
        negs, valid = self.bank.negatives(q, ids, step, self._bank_similarity)  # (B, n, K*D), (B, n)
        n_neg = int(valid.sum(1).min()) if negs.shape[1] else 0
        if negs.shape[1]:
            neg = negs.view(q.shape[0], negs.shape[1], -1, q.shape[-1])  # (B, n, K, D)
            neg_logits = scale * torch.einsum("bd,bnkd->bnk", q, neg).amax(-1)  # (B, n)
            # empty slots get a large finite negative, not -inf: -inf times the temperature's gradient is NaN
            neg_logits = torch.where(valid, neg_logits, torch.full_like(neg_logits, -1e4))
            logits = torch.cat([logits, neg_logits], dim=1)  # (B, B + n)
        loss = F.cross_entropy(logits, global_labels(q.shape[0], q.device))
        self.bank.push(t.detach().reshape(t.shape[0], -1), ids, step)
        self.step += 1
        return LossOutput(loss, {"nce": loss.item(), "bank_negatives": float(n_neg)})
