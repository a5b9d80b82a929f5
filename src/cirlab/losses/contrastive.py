"""Contrastive losses over a batch (row i of the queries matches row i of the targets)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row against its diagonal entry; `logits` (B, N) with N >= B."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels)


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric image-text contrastive loss on L2-normalised features (B, D), scale = exp(logit_scale)."""
    logits = logit_scale.exp().clamp(max=100) * a @ b.t()  # (B, B)
    return 0.5 * (info_nce(logits) + info_nce(logits.t()))
