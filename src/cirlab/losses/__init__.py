"""Losses: tensors in, scalar out."""
from cirlab.losses.contrastive import clip_loss, gather, global_info_nce, global_labels, info_nce

__all__ = ["clip_loss", "gather", "global_info_nce", "global_labels", "info_nce"]
