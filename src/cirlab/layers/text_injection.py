"""Modules that change what a frozen text encoder computes, each starting as the identity.

- `TokenLearner`: an image's patch tokens -> one pseudo-word embedding in the text encoder's word space (a learned
  query attends over the layer-normed patches; an MLP maps the result to the word width).
- `GatedCrossAttention`: visual semantic injection, Flamingo-style: the text stream attends to the image's patches
  and adds the result through tanh(gate), then a gated feed-forward; both gates start at zero, so an injected
  encoder computes exactly what the frozen one did until the gates open.
- `BottleneckAdapter`: h + up(gelu(down(h))) with `up` zero-initialised (Houlsby-style), the composing stage's
  trainable part.
"""
from __future__ import annotations

import torch
from torch import nn


class TokenLearner(nn.Module):
    def __init__(self, vision_width: int, word_width: int, heads: int = 4, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 2 * max(vision_width, word_width)
        self.ln = nn.LayerNorm(vision_width)
        self.query = nn.Parameter(torch.randn(1, 1, vision_width) * vision_width ** -0.5)
        self.attn = nn.MultiheadAttention(vision_width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(vision_width, hidden), nn.GELU(), nn.Linear(hidden, word_width))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (B, N, Dv) -> pseudo-word (B, Dt)."""
        kv = self.ln(patches)
        pooled, _ = self.attn(self.query.expand(patches.shape[0], -1, -1), kv, kv, need_weights=False)
        return self.mlp(pooled[:, 0])


class GatedCrossAttention(nn.Module):
    def __init__(self, width: int, kv_width: int, heads: int = 4, ffn_mult: int = 2):
        super().__init__()
        self.ln_q, self.ln_kv, self.ln_ff = nn.LayerNorm(width), nn.LayerNorm(kv_width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, kdim=kv_width, vdim=kv_width, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(width, width * ffn_mult), nn.GELU(), nn.Linear(width * ffn_mult, width))
        self.gate_attn = nn.Parameter(torch.zeros(()))
        self.gate_ff = nn.Parameter(torch.zeros(()))

    def forward(self, hidden: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, D) text stream, visual (B, N, Dv) patches -> (B, L, D)."""
        kv = self.ln_kv(visual)
        attended, _ = self.attn(self.ln_q(hidden), kv, kv, need_weights=False)
        hidden = hidden + torch.tanh(self.gate_attn) * attended
        return hidden + torch.tanh(self.gate_ff) * self.ff(self.ln_ff(hidden))


class BottleneckAdapter(nn.Module):
    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(nn.functional.gelu(self.down(hidden)))
