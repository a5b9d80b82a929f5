"""Losses: tensors in, scalar out."""
from cirlab.losses.contrastive import clip_loss, info_nce

__all__ = ["clip_loss", "info_nce"]
