"""A memory bank of past target features that supplies extra negatives to a contrastive loss.

CSMCIR (seed 000) names an "entropy-based, temporally dynamic" bank that keeps negatives consistent with the
evolving model. The abstract gives no formula; cirlab's interpretation, each part a config field:

- Entries are detached target features with the image id they came from and the step they were made at.
- Informativeness (mode "entropy"): for query i, p_ij = softmax_j(s_ij / temperature) over the bank; entry j scores
  h_ij = -p_ij log p_ij, its term in the entropy of that distribution. The term is near 0 for entries the query
  already ignores (easy negatives) and falls again for entries that dominate the distribution (p > 1/e, the likely
  false negatives), so it peaks on hard but not overwhelming negatives.
- Time: the score is multiplied by 0.5 ** (age / half_life), age = current step - the entry's step, so stale
  features from an older model count less.
- An entry carrying the positive's image id is never chosen for that query.
- Mode "fifo" takes the newest entries instead (a MoCo-style queue); "off" gives none.
- Warm-up: for the first `warmup_steps` steps the bank fills but hands out no negatives. Early in training the
  target features change fast and a fresh model's features are nearly all alike; measured on the default world,
  bank negatives from step 0 drove csmcir's loss back up to chance within two epochs.
- Refresh: "oldest" overwrites the oldest entries; "least_informative" overwrites those with the lowest running
  informativeness (an exponential average of their scores).
The bank's buffers are part of the module's state, so checkpoints carry it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

MODES = ("off", "fifo", "entropy")
REFRESH = ("oldest", "least_informative")


@dataclass
class MemoryBankConfig:
    mode: str = "entropy"
    capacity: int = 2048
    num_negatives: int = 128
    half_life: float = 200.0  # steps
    temperature: float = 0.05
    refresh: str = "oldest"
    score_momentum: float = 0.9  # for the running informativeness used by refresh="least_informative"
    warmup_steps: int = 0  # steps during which the bank fills but gives no negatives


class MemoryBank(nn.Module):
    def __init__(self, config: MemoryBankConfig, dim: int):
        super().__init__()
        if config.mode not in MODES:
            raise ValueError(f"memory bank mode must be one of {MODES}, got {config.mode!r}")
        if config.refresh not in REFRESH:
            raise ValueError(f"memory bank refresh must be one of {REFRESH}, got {config.refresh!r}")
        self.config = config
        c = config.capacity
        self.register_buffer("features", torch.zeros(c, dim))
        self.register_buffer("ids", torch.full((c,), -1, dtype=torch.long))
        self.register_buffer("steps", torch.zeros(c, dtype=torch.long))
        self.register_buffer("valid", torch.zeros(c, dtype=torch.bool))
        self.register_buffer("informativeness", torch.zeros(c))
        self.register_buffer("serial", torch.zeros(c, dtype=torch.long))  # insertion order, for "oldest"
        self.register_buffer("pushed", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.valid.sum())

    @torch.no_grad()
    def push(self, features: torch.Tensor, ids: torch.Tensor, step: int) -> None:
        """Store detached features (B, D) with their image ids (B,) made at `step`."""
        if self.config.mode == "off":
            return
        features, ids = features.detach()[-self.config.capacity:], ids[-self.config.capacity:]
        n = features.shape[0]
        free = (~self.valid).nonzero().flatten()
        if len(free) >= n:
            slots = free[:n]
        else:
            used = self.valid.nonzero().flatten()
            if self.config.refresh == "oldest":
                key = self.serial[used].float()
            else:
                key = self.informativeness[used]
            order = used[torch.argsort(key, stable=True)]
            slots = torch.cat([free, order[: n - len(free)]])
        # a new entry starts at the bank's mean informativeness, so it is not the next one replaced
        start = self.informativeness[self.valid].mean() if bool(self.valid.any()) else 0.0
        self.features[slots] = features.to(self.features.dtype)
        self.ids[slots] = ids.to(self.ids.device)
        self.steps[slots] = step
        self.valid[slots] = True
        self.informativeness[slots] = start
        self.serial[slots] = self.pushed + torch.arange(n, device=self.serial.device)
        self.pushed += n

    def scores(self, queries: torch.Tensor, positive_ids: torch.Tensor, step: int, similarity=None) -> torch.Tensor:
        """Selection scores (B, C); -inf where an entry may not be used for that query.

        `similarity(queries, features) -> (B, C)` scores queries against stored features (default: dot product;
        a method with multi-token targets stores them flattened and passes its own)."""
        banned = ~self.valid[None, :] | (self.ids[None, :] == positive_ids[:, None])  # (B, C)
        if self.config.mode == "fifo":
            score = self.serial[None, :].float().expand(queries.shape[0], -1).clone()
        else:
            raw = similarity(queries.detach(), self.features) if similarity else queries.detach() @ self.features.t()
            sim = raw / self.config.temperature  # (B, C)
            p = sim.masked_fill(banned, float("-inf")).softmax(-1)
            score = -(p * p.clamp_min(1e-12).log())  # (B, C): each entry's entropy term
            age = (step - self.steps).clamp_min(0).float()
            score = score * 0.5 ** (age / self.config.half_life)[None, :]
        return score.masked_fill(banned, float("-inf"))

    def negatives(self, queries: torch.Tensor, positive_ids: torch.Tensor, step: int, similarity=None) -> tuple:
        """Per-query negatives (B, n, D) and a mask (B, n) of the slots that hold a real entry."""
        b, n = queries.shape[0], min(self.config.num_negatives, self.config.capacity)
        if self.config.mode == "off" or not bool(self.valid.any()) or step < self.config.warmup_steps:
            return self.features.new_zeros(b, 0, self.features.shape[1]), queries.new_zeros(b, 0, dtype=torch.bool)
        score = self.scores(queries, positive_ids, step, similarity)
        top = score.topk(n, dim=1)  # (B, n)
        if self.config.mode == "entropy":
            with torch.no_grad():
                mean = torch.where(torch.isfinite(score), score, torch.zeros_like(score)).mean(0)
                m = self.config.score_momentum
                self.informativeness.mul_(m).add_((1 - m) * mean)
        return self.features[top.indices], torch.isfinite(top.values)
