"""The Combiner of CLIP4Cir (Baldrati et al. 2022): fuses an image and a text feature into a composed query.

Each feature is projected and passed through ReLU; the concatenation feeds (a) a combiner MLP whose output is added
to (b) a learned convex mix of the two input features, lambda * text + (1 - lambda) * image, lambda from a small
sigmoid head. The output is L2-normalised by the caller.
"""
from __future__ import annotations

import torch
from torch import nn


class Combiner(nn.Module):
    def __init__(self, dim: int, proj_dim: int, hidden_dim: int, dropout: float = 0.1):
        super().__init__()
        self.text_proj = nn.Sequential(nn.Linear(dim, proj_dim), nn.ReLU(), nn.Dropout(dropout))
        self.image_proj = nn.Sequential(nn.Linear(dim, proj_dim), nn.ReLU(), nn.Dropout(dropout))
        self.combine = nn.Sequential(nn.Linear(2 * proj_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                     nn.Linear(hidden_dim, dim))
        self.mix = nn.Sequential(nn.Linear(2 * proj_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, 1), nn.Sigmoid())

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        joint = torch.cat([self.image_proj(image), self.text_proj(text)], dim=-1)  # (B, 2P)
        lam = self.mix(joint)  # (B, 1)
        return self.combine(joint) + lam * text + (1 - lam) * image  # (B, D)
