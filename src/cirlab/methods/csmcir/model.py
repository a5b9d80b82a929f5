"""CSMCIR (seed 000): one shared Q-Former encodes both the composed query and the captioned target.

Query: the BLIP-2 Q-Former runs its query tokens together with the modification text, cross-attending to the
reference image's ViT patches; the hidden state at the first text position, projected and normalised, is the query.
Target (`target_tower="symmetric"`): the same Q-Former, same parameters, runs on the target image's patches with
that image's caption (the MCoT `final_caption`). Loss: InfoNCE over the batch plus, when it is on, negatives from
the memory bank (layers/memory_bank.py; off by default since no reading of it helped over 3 seeds, see
BANK_DEFAULTS and docs/seed-claims.md). The ViT is frozen; the Q-Former, its embeddings, query tokens and projections
train.

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
  without the bank reached R@1 4.3. `memory_bank` holds changes to BANK_DEFAULTS (a change of one key keeps the
  others, so an ablation row changes one thing).
- Bank negatives enter the loss (`memory_bank.term`) appended to the in-batch softmax ("joint"), or as a second
  InfoNCE of the positive against the bank negatives alone, weighted by `memory_bank.weight` ("separate"), which
  leaves the in-batch term, whose same-reference negatives teach the edit, its whole gradient.
- `memory_bank.consistency="ema"` fills the bank from a momentum copy of the trainable parameters (MoCo): the
  stored features then come from a slowly moving encoder instead of the one of their step.
- Logged each step (LossOutput parts): the softmax mass of the joint logits on the positive, the other in-batch
  targets and the bank negatives (whatever `term` is), the mean age of the chosen negatives; with
  `memory_bank.diagnose_every` > 0, the cosine of stored entries to their re-encoding by the current model, for
  the younger and the older half of a sample.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.errors import Choice
from cirlab.layers.memory_bank import MemoryBank, MemoryBankConfig
from cirlab.losses import gather, global_labels
from cirlab.methods.base import CIRModel, Finetune, MethodConfig, TrainingKind, register
from cirlab.types import Batch, LossOutput


class TargetTower(Choice):
    SYMMETRIC = "symmetric"  # the query's Q-Former reads the target image and its caption
    IMAGE_ONLY = "image_only"  # the target image alone (as SPRC-like methods)


class TargetTokens(Choice):
    MULTI = "multi"
    POOLED = "pooled"


class Captions(Choice):
    MCOT = "mcot"
    SINGLE_LEVEL = "single_level"
    NONE = "none"


class QueryPool(Choice):
    AUTO = "auto"  # all when the backbone mean-pools text, else first
    FIRST = "first"
    MEAN = "mean"
    ALL = "all"


@dataclass
class CsmcirConfig(MethodConfig):
    finetune: Finetune = Finetune.TEXT  # for blip2: the Q-Former side trains, the ViT stays frozen
    target_tower: TargetTower = TargetTower.SYMMETRIC
    target_tokens: TargetTokens = TargetTokens.MULTI
    captions: Captions = Captions.MCOT
    single_level: str = "objects"  # the caption level `captions="single_level"` reads
    query_pool: QueryPool = QueryPool.AUTO
    memory_bank: dict = field(default_factory=lambda: dict(BANK_DEFAULTS))  # changes to BANK_DEFAULTS


# the bank is off by default: measured over 3 seeds on the default world (docs/seed-claims.md), no reading of it
# beat training without it, and the entropy reading (the one the abstract suggests) lost about half of R@1;
# `{"mode": "entropy"}` turns it on with the other settings below
BANK_DEFAULTS = {"mode": "off", "warmup_steps": 100, "num_negatives": 64}


def image_id(name: str) -> int:
    """A stable integer id for an image name (the memory bank's false-negative key)."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:15], 16)


@register
class Csmcir(CIRModel):
    name = "csmcir"
    config_class = CsmcirConfig
    backbone_kind = "blip2"
    training = TrainingKind.TRIPLETS

    def __init__(self, config: CsmcirConfig, backbone):
        super().__init__(config, backbone)
        m = backbone.model
        m.query_tokens.requires_grad_(True)
        m.text_projection.requires_grad_(True)
        m.vision_projection.requires_grad_(config.target_tower == "image_only")  # used by that tower only
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # the checkpoint records the bank's settings whole, so a later change of BANK_DEFAULTS leaves it as trained
        config.memory_bank = BANK_DEFAULTS | config.memory_bank
        try:
            bank = MemoryBankConfig(**config.memory_bank)
        except TypeError as e:
            from cirlab.errors import CirlabError
            raise CirlabError(f"csmcir memory_bank: {e}") from None
        self.bank = MemoryBank(bank, self._target_width())
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._ema_params = []
        if bank.consistency == "ema" and bank.mode != "off":  # a momentum copy of every trained parameter
            self._ema_params = [p for p in self.parameters() if p.requires_grad]
            for i, p in enumerate(self._ema_params):
                self.register_buffer(f"ema_{i}", p.detach().clone())
        self._inputs = {}  # bank slot -> (frozen-stage target input, caption), for re-encoding diagnostics

    def set_schedule(self, steps_per_epoch: int, total_steps: int) -> None:
        self.bank.set_schedule(steps_per_epoch)

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

    @property
    def target_captions(self) -> str | None:
        if self.config.target_tower != "symmetric" or self.config.captions == "none":
            return None
        return self.config.single_level if self.config.captions == "single_level" else "final_caption"

    def _encode_target(self, images, captions) -> torch.Tensor:
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
        self._update_ema()
        q = self.encode_query(batch.ref_pixels, batch.texts)  # (B, D)
        t = self.encode_target(batch.tgt_pixels, batch.tgt_captions)  # (B, D) or (B, K, D)
        scale = self.logit_scale.exp().clamp(max=100)
        # (B, W*B): every rank's targets; the bank stays local
        logits = scale * self.similarity(q, gather(t, batch.rank))
        labels = global_labels(q.shape[0], batch.rank, q.device)
        step, cfg = int(self.step), self.bank.config
        ids, (negs, valid, slots) = self._bank_draw(q, t, batch.target_names)  # (B, n, K*D), (B, n)
        parts = {"bank_negatives": float(valid.sum(1).min()) if negs.shape[1] else 0.0}
        loss = F.cross_entropy(logits, labels)
        joint = logits
        if negs.shape[1]:
            neg = negs.view(q.shape[0], negs.shape[1], -1, q.shape[-1])  # (B, n, K, D)
            neg_logits = scale * torch.einsum("bd,bnkd->bnk", q, neg).amax(-1)  # (B, n)
            # empty slots get a large finite negative, not -inf: -inf times the temperature's gradient is NaN
            neg_logits = torch.where(valid, neg_logits, torch.full_like(neg_logits, -1e4))
            joint = torch.cat([logits, neg_logits], dim=1)  # (B, W*B + n)
            if cfg.term == "joint":
                loss = F.cross_entropy(joint, labels)
            else:  # the positive against the bank negatives alone, in a term of its own
                own = torch.cat([logits.gather(1, labels[:, None]), neg_logits], dim=1)  # (B, 1 + n)
                bank_term = F.cross_entropy(own, torch.zeros_like(labels))
                parts["nce_batch"], parts["nce_bank"] = loss.item(), bank_term.item()
                loss = loss + cfg.weight * bank_term
            age = (step - self.bank.steps[slots]).float()  # (B, n)
            parts["bank_age"] = float(age[valid].mean()) if bool(valid.any()) else 0.0
        parts |= self._softmax_mass(joint.detach(), labels, logits.shape[1])
        if cfg.diagnose_every and (step + 1) % cfg.diagnose_every == 0:
            parts |= self._staleness(step)
        stored = self._ema_targets(batch) if self._ema_params else t.detach()
        written = self.bank.push(stored.reshape(t.shape[0], -1), ids, step)
        if cfg.diagnose_every and len(written):
            keep = batch.tgt_pixels[-len(written):].detach()
            caps = (batch.tgt_captions or [None] * len(batch))[-len(written):]
            for slot, x, c in zip(written.tolist(), keep, caps):
                self._inputs[slot] = (x, c)
        self.step += 1
        return LossOutput(loss, {"nce": loss.item(), **parts})

    def _bank_draw(self, q: torch.Tensor, t: torch.Tensor, target_names: list) -> tuple:
        """(the targets' image ids, the bank's negatives for these queries at the current step), each query's
        similarity to its own target (as `similarity` scores it) given for the semi-hard margin."""
        ids = torch.tensor([image_id(n) for n in target_names], device=q.device)
        pos = (q[:, None, :] * t.view(t.shape[0], -1, q.shape[-1])).sum(-1).amax(-1)  # (B,)
        return ids, self.bank.negatives(q, ids, int(self.step), self._bank_similarity, pos)

    @torch.no_grad()
    def bank_negatives(self, batch: Batch, names: list) -> list:
        """For each row of `batch`, the names (among `names`) of the negatives the bank hands it now, chosen as
        in training; an entry whose image is not among `names` comes back as None. Empty lists when the bank is
        off or not yet active."""
        q = self.encode_query(batch.ref_pixels, batch.texts)
        t = self.encode_target(batch.tgt_pixels, batch.tgt_captions)
        _, (_, valid, slots) = self._bank_draw(q, t, batch.target_names)
        by_id = {image_id(n): n for n in names}
        entry = self.bank.ids[slots].tolist() if slots.numel() else [[] for _ in range(len(batch))]
        return [[by_id.get(e) for e, ok in zip(row, mask) if ok] for row, mask in zip(entry, valid.tolist())]

    @staticmethod
    def _softmax_mass(joint: torch.Tensor, labels: torch.Tensor, width: int) -> dict:
        """Mean softmax mass of the joint logits (B, W*B + n) on the positive, the other in-batch columns and the
        bank columns."""
        p = joint.float().softmax(-1)
        positive = p.gather(1, labels[:, None]).mean()
        batch = p[:, :width].sum(1).mean() - positive
        return {"mass_positive": float(positive), "mass_batch": float(batch),
                "mass_bank": float(p[:, width:].sum(1).mean()) if p.shape[1] > width else 0.0}

    @torch.no_grad()
    def _update_ema(self) -> None:
        if not self._ema_params or not self.training:
            return
        m = self.bank.config.ema_momentum
        for i, p in enumerate(self._ema_params):
            getattr(self, f"ema_{i}").mul_(m).add_(p.detach(), alpha=1 - m)

    @torch.no_grad()
    def _ema_targets(self, batch: Batch) -> torch.Tensor:
        """The batch's targets encoded with the momentum copy of the parameters (swapped in, then back), in eval
        mode: stored features carry no dropout noise."""
        saved, was = [p.data for p in self._ema_params], self.training
        try:
            for i, p in enumerate(self._ema_params):
                p.data = getattr(self, f"ema_{i}")
            self.eval()
            return self.encode_target(batch.tgt_pixels, batch.tgt_captions).detach()
        finally:
            self.train(was)
            for p, d in zip(self._ema_params, saved):
                p.data = d

    @torch.no_grad()
    def _staleness(self, step: int, sample: int = 64) -> dict:
        """Cosine of stored bank entries to the current model's encoding of the same inputs, for the younger and
        the older half of up to `sample` entries (how far stored negatives lag the model)."""
        slots = [s for s in self._inputs if bool(self.bank.valid[s])][-sample:]
        if len(slots) < 2:
            return {}
        x = torch.stack([self._inputs[s][0] for s in slots])
        caps = [self._inputs[s][1] for s in slots]
        now = self._encode_target(x, None if caps[0] is None else caps).reshape(len(slots), -1)
        stored = self.bank.features[slots]
        k = max(1, now.shape[1] // self.backbone.dim)  # tokens per entry
        cos = F.cosine_similarity(now.view(len(slots), k, -1), stored.view(len(slots), k, -1), dim=-1).mean(1)
        age = (step - self.bank.steps[slots]).float()
        order = age.argsort()
        half = len(slots) // 2
        young, old = order[:half], order[half:]
        return {"reencode_cos_young": float(cos[young].mean()), "reencode_cos_old": float(cos[old].mean()),
                "reencode_age_young": float(age[young].mean()), "reencode_age_old": float(age[old].mean())}
