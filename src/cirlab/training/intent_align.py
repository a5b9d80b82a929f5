"""TMCIR stage 1, intent-aware cross-modal alignment: fine-tune CLIP on (modification text, pseudo-target) pairs.

The pseudo-targets come from `cirlab edit` (a manifest of images made from each training triplet's reference and
text). The loss is CLIP's symmetric InfoNCE between the text encoder's feature of the modification text and the
image encoder's feature of a pseudo-target, with CLIP's learnable temperature. `unfreeze` says what trains:
"all" (both encoders), or an integer k: the last k layers of each encoder, their final LayerNorms and the two
projections (k = 0: projections only). With several pseudo-targets per triplet, each epoch draws one per triplet
(seeded by epoch). The result is a CLIP folder (`save_pretrained`) that stage 2 (`tmcir`) starts from.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cirlab.data.images import PixelStore
from cirlab.data.readers import read_split
from cirlab.errors import CirlabError
from cirlab.losses import clip_loss
from cirlab.training.loop import TrainConfig, fit
from cirlab.types import Batch, LossOutput

DONE_FILE = "intent_align.json"


def set_unfrozen(backbone, unfreeze) -> None:
    """Freeze the CLIP backbone, then unfreeze per `unfreeze` ("all" or the number of last layers)."""
    m = backbone.model
    if unfreeze == "all":
        m.requires_grad_(True)
        return
    try:
        k = int(unfreeze)
    except (TypeError, ValueError):
        raise CirlabError(f"unfreeze must be 'all' or a number of last layers, got {unfreeze!r}") from None
    if k < 0:
        raise CirlabError(f"unfreeze must be 'all' or a number of last layers >= 0, got {k}")
    m.requires_grad_(False)
    parts = [m.text_projection, m.visual_projection, m.text_model.final_layer_norm, m.vision_model.post_layernorm]
    if k:
        parts += list(m.text_model.encoder.layers[-k:]) + list(m.vision_model.encoder.layers[-k:])
    for p in parts:
        p.requires_grad_(True)
    m.logit_scale.requires_grad_(True)


class PseudoTargetSource:
    """(reference, modification text, pseudo-target) triplets from an edit manifest; one sample per epoch draw."""

    def __init__(self, split, pseudo_dir, preprocess):
        from cirlab.editing.run import MANIFEST, EditManifest

        path = Path(pseudo_dir) / MANIFEST
        if not path.exists():
            raise CirlabError(f"no pseudo-target manifest at {path}; run `cirlab edit` first")
        files = EditManifest(path).files()
        self.queries = [q for q in split.queries if q.key in files]
        if not self.queries:
            raise CirlabError(f"{path} has no pseudo-targets for the queries of {split.dataset}/{split.name}")
        self.files = files
        self.refs = PixelStore(split.gallery, preprocess)
        paths = {f"{k}#{i}": str(p) for k, ps in files.items() for i, p in enumerate(ps)}
        self.pseudo = PixelStore(paths, preprocess)

    def __len__(self) -> int:
        return len(self.queries)

    def batch(self, indices) -> Batch:
        qs = [self.queries[i] for i in indices]
        # torch's global generator: the loop reseeds it each epoch, so a resumed run draws the same samples
        names = [f"{q.key}#{int(torch.randint(len(self.files[q.key]), ()))}" for q in qs]
        px = self.pseudo.pixels(names)
        return Batch(self.refs.pixels([q.reference for q in qs]), [q.text for q in qs], px, None, names)


class IntentAligner(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def loss(self, batch: Batch) -> LossOutput:
        bb = self.backbone
        img = nn.functional.normalize(bb.encode_image(batch.tgt_pixels), dim=-1)
        txt = nn.functional.normalize(bb.encode_text(bb.tokenize(batch.texts, batch.tgt_pixels.device)), dim=-1)
        loss = clip_loss(txt, img, bb.logit_scale, batch.rank)
        return LossOutput(loss, {"align": loss.item()})


def align_intent(data_root, backbone, pseudo_dir, out, cfg: TrainConfig, unfreeze="all", dataset: str = "synth",
                 split: str = "train", resume: bool = False) -> Path:
    """Fine-tune the CLIP at `backbone` (id or folder) on pseudo-targets; save the result to `out`."""
    from cirlab.backbones import load_backbone

    out = Path(out)
    data = read_split(dataset, data_root, split)
    torch.manual_seed(cfg.seed)
    bb = load_backbone("clip", backbone)
    set_unfrozen(bb, unfreeze)
    source = PseudoTargetSource(data, pseudo_dir, bb.preprocess)
    result = fit(IntentAligner(bb), source, cfg, out.with_name(out.name + ".work"), resume=resume,
                 desc="align intent")
    bb.save_pretrained(out)
    (out / DONE_FILE).write_text(json.dumps({"backbone": str(backbone), "pseudo_targets": str(pseudo_dir),
                                             "unfreeze": unfreeze, "train": vars(cfg),
                                             "epoch_losses": result.losses, "seconds": result.seconds}, indent=1))
    return out
