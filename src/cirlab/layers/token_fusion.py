"""Adaptive token fusion (TMCIR): merge visual and textual tokens that say the same thing, keep the rest.

Given visual tokens V (B, Nv, D) and text tokens T (B, Nt, D) with a text mask, the cosine similarities S (B, Nv,
Nt) decide which pairs merge: a pair (i, j) merges when S_ij exceeds `threshold` and is a match under `matching`:
- "best_visual": j is visual token i's most similar text token (a text token may merge into several visual ones);
- "mutual": additionally i is text token j's most similar visual token (one-to-one).
A merged token is the similarity-weighted average of its parts, (V_i + sum_j w_ij T_j) / (1 + sum_j w_ij) with
w_ij = S_ij on matched pairs, and it stays at visual token i's position: `position` adds a learned embedding of
the visual position to every visual-slot token (position-aware merging; initialised at zero). Merged text tokens
leave the set; unmatched tokens of both kinds are kept. The fused set is pooled by `pool`: "mean" over kept tokens,
or "attention" (one learned query, softmax over kept tokens).

`threshold_mode="relative"` reads the threshold as a quantile of each query's own candidate pairs (the matched pairs
before the threshold): a candidate merges when its similarity is at or above that quantile, so 0.0 merges every
candidate, 0.5 about half of them, and 1.0 none (an absolute cosine threshold of 0.5 merged about 0.003 text tokens
a query on the default world: the sweep could not test fusion).

The threshold gate is a hard decision; gradients reach the encoders through the similarity weights and the tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdaptiveTokenFusion(nn.Module):
    def __init__(self, dim: int, num_visual: int, threshold: float = 0.5, matching: str = "best_visual",
                 pool: str = "mean", position: bool = True, threshold_mode: str = "absolute"):
        super().__init__()
        if threshold_mode not in ("absolute", "relative"):
            raise ValueError(f"threshold_mode must be absolute or relative, got {threshold_mode!r}")
        if threshold_mode == "relative" and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"a relative threshold is a quantile in [0, 1], got {threshold}")
        self.threshold_mode = threshold_mode
        if matching not in ("best_visual", "mutual"):
            raise ValueError(f"matching must be best_visual or mutual, got {matching!r}")
        if pool not in ("mean", "attention"):
            raise ValueError(f"pool must be mean or attention, got {pool!r}")
        self.threshold, self.matching, self.pool_mode = threshold, matching, pool
        self.visual_proj = nn.Linear(dim, dim)
        self.text_proj = nn.Linear(dim, dim)
        for lin in (self.visual_proj, self.text_proj):  # start as the identity: the encoders' own joint space
            nn.init.eye_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.position = nn.Parameter(torch.zeros(num_visual, dim)) if position else None
        self.query = nn.Parameter(torch.randn(dim) * dim ** -0.5) if pool == "attention" else None

    def match(self, sim: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Boolean (B, Nv, Nt): the pairs that merge."""
        sim = sim.masked_fill(~text_mask[:, None, :], float("-inf"))
        best_t = sim.argmax(-1, keepdim=True)  # (B, Nv, 1)
        m = torch.zeros_like(sim, dtype=torch.bool).scatter_(-1, best_t, True)
        if self.matching == "mutual":
            best_v = sim.argmax(1, keepdim=True)  # (B, 1, Nt)
            m &= torch.zeros_like(sim, dtype=torch.bool).scatter_(1, best_v, True)
        m &= text_mask[:, None, :]
        if self.threshold_mode == "absolute":
            return m & (sim > self.threshold)
        if self.threshold >= 1.0:
            return torch.zeros_like(m)
        cand = sim.masked_fill(~m, float("nan")).flatten(1)  # (B, Nv*Nt): each query's candidate similarities
        cut = torch.nanquantile(cand, self.threshold, dim=1)  # (B,); nan for a query without candidates
        return m & (sim >= cut[:, None, None])

    def forward(self, visual: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> dict:
        """visual (B, Nv, D), text (B, Nt, D), text_mask (B, Nt) -> {"pooled": (B, D), "merged": (B, Nv, Nt)}."""
        v, t = self.visual_proj(visual), self.text_proj(text)
        mask = text_mask.bool()
        sim = F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).transpose(1, 2)  # (B, Nv, Nt)
        merged = self.match(sim.detach(), mask)
        w = torch.where(merged, sim, torch.zeros_like(sim))  # (B, Nv, Nt)
        v_slots = (v + w @ t) / (1 + w.sum(-1, keepdim=True))  # (B, Nv, D)
        if self.position is not None:
            v_slots = v_slots + self.position[: v_slots.shape[1]]
        keep_text = mask & ~merged.any(1)  # (B, Nt)
        tokens = torch.cat([v_slots, t], dim=1)  # (B, Nv + Nt, D)
        keep = torch.cat([torch.ones(v.shape[:2], dtype=torch.bool, device=v.device), keep_text], dim=1)
        if self.pool_mode == "mean":
            k = keep[..., None].to(tokens.dtype)
            pooled = (tokens * k).sum(1) / k.sum(1)
        else:
            logits = (tokens @ self.query).masked_fill(~keep, float("-inf"))  # (B, N)
            pooled = (logits.softmax(-1)[..., None] * tokens).sum(1)
        return {"pooled": pooled, "merged": merged, "similarity": sim}
