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
- Mode "fifo" takes the newest entries instead (a MoCo-style queue); "off" gives none. For fair tests of the
  entropy rule (whose -p log p rises with p below 1/e, so it picks nearly the hardest entries): "random" draws
  entries uniformly, "hardest" takes the most similar, and "sampled" draws entries without replacement in
  proportion to p (times the time decay), so that easy entries still appear now and then.
- `semi_hard_margin` (null: off) bans, for a query, every entry more similar to it than its positive is, less
  the margin: the likely false negatives and near-duplicates of the target.
- `warmup_epochs`, when above 0, replaces `warmup_steps` by that many epochs of the schedule the trainer runs
  (`set_schedule`), so the bank's start moves with the schedule instead of sitting right after the learning-rate
  warm-up.
- How the negatives enter the loss (`term`: "joint" appends them to the in-batch softmax, "separate" gives them a
  softmax of their own with the positive, weighted by `weight`) and whether stored features stay consistent with
  the model (`consistency`: "ema" fills the bank from a momentum copy of the target tower) are the method's
  part: the fields live here so one dict configures the bank.
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

from cirlab.errors import Choice, parse_choices


class BankMode(Choice):
    OFF = "off"
    FIFO = "fifo"
    RANDOM = "random"
    HARDEST = "hardest"
    SAMPLED = "sampled"
    ENTROPY = "entropy"


class Refresh(Choice):
    OLDEST = "oldest"
    LEAST_INFORMATIVE = "least_informative"


class BankTerm(Choice):
    JOINT = "joint"  # bank negatives in the method's one softmax
    SEPARATE = "separate"  # the positive against the bank negatives in a weighted term of its own


class Consistency(Choice):
    NONE = "none"
    EMA = "ema"  # the method fills the bank from a momentum copy of its target tower


@dataclass
class MemoryBankConfig:
    mode: BankMode = BankMode.ENTROPY
    capacity: int = 2048
    num_negatives: int = 128
    half_life: float = 200.0  # steps
    temperature: float = 0.05
    refresh: Refresh = Refresh.OLDEST
    score_momentum: float = 0.9  # for the running informativeness used by refresh="least_informative"
    warmup_steps: int = 0  # steps during which the bank fills but gives no negatives
    warmup_epochs: float = 0.0  # when > 0: the warm-up in epochs of the trainer's schedule (overrides the steps)
    semi_hard_margin: float | None = None  # ban entries scored above the positive minus this margin
    term: BankTerm = BankTerm.JOINT
    weight: float = 1.0  # weight of the separate term
    consistency: Consistency = Consistency.NONE
    ema_momentum: float = 0.99
    diagnose_every: int = 0  # every this many steps the method re-encodes a sample of entries (0: never)

    def __post_init__(self):
        parse_choices(self, ValueError)


class MemoryBank(nn.Module):
    def __init__(self, config: MemoryBankConfig, dim: int):
        super().__init__()
        self.config = config
        self.warmup = config.warmup_steps
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

    def set_schedule(self, steps_per_epoch: int) -> None:
        """Tie the warm-up to the trainer's schedule when `warmup_epochs` asks for it."""
        if self.config.warmup_epochs > 0:
            self.warmup = int(round(self.config.warmup_epochs * steps_per_epoch))

    def active(self, step: int) -> bool:
        """True when the bank hands out negatives at `step`."""
        return self.config.mode != "off" and bool(self.valid.any()) and step >= self.warmup

    @torch.no_grad()
    def push(self, features: torch.Tensor, ids: torch.Tensor, step: int) -> torch.Tensor:
        """Store detached features (B, D) with their image ids (B,) made at `step`; returns the slots written
        (for the last `capacity` rows of the batch)."""
        if self.config.mode == "off":
            return torch.zeros(0, dtype=torch.long)
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
        return slots

    def scores(self, queries: torch.Tensor, positive_ids: torch.Tensor, step: int, similarity=None,
               positive_sim: torch.Tensor | None = None) -> torch.Tensor:
        """Selection scores (B, C); -inf where an entry may not be used for that query. The `n` highest are taken
        (for "random" and "sampled" the scores carry Gumbel noise, so the top n are a draw without replacement).

        `similarity(queries, features) -> (B, C)` scores queries against stored features (default: dot product;
        a method with multi-token targets stores them flattened and passes its own). `positive_sim` (B,), each
        query's similarity to its positive, is needed for `semi_hard_margin`."""
        banned = ~self.valid[None, :] | (self.ids[None, :] == positive_ids[:, None])  # (B, C)
        mode, b = self.config.mode, queries.shape[0]
        raw = None
        if mode not in ("fifo", "random") or self.config.semi_hard_margin is not None:
            raw = similarity(queries.detach(), self.features) if similarity else queries.detach() @ self.features.t()
        if self.config.semi_hard_margin is not None:
            if positive_sim is None:
                raise ValueError("semi_hard_margin needs each query's similarity to its positive")
            banned = banned | (raw > positive_sim.detach()[:, None] - self.config.semi_hard_margin)
        age = (step - self.steps).clamp_min(0).float()
        decay = 0.5 ** (age / self.config.half_life)  # (C,)
        if mode == "fifo":
            score = self.serial[None, :].float().expand(b, -1).clone()
        elif mode == "random":
            score = _gumbel(b, self.features.shape[0], queries.device)
        elif mode == "hardest":
            score = raw.clone()
        else:
            p = (raw / self.config.temperature).masked_fill(banned, float("-inf")).softmax(-1)  # (B, C)
            if mode == "sampled":  # log of p times the decay, plus Gumbel noise: a draw in proportion to p
                score = (p * decay[None, :]).clamp_min(1e-30).log() + _gumbel(b, p.shape[1], queries.device)
            else:  # entropy: each entry's term in the entropy of p
                score = -(p * p.clamp_min(1e-12).log()) * decay[None, :]
        return score.masked_fill(banned, float("-inf"))

    def negatives(self, queries: torch.Tensor, positive_ids: torch.Tensor, step: int, similarity=None,
                  positive_sim: torch.Tensor | None = None) -> tuple:
        """Per-query negatives (B, n, D), a mask (B, n) of the slots that hold a real entry, and the chosen
        slots (B, n)."""
        b, n = queries.shape[0], min(self.config.num_negatives, self.config.capacity)
        if not self.active(step):
            empty = queries.new_zeros(b, 0, dtype=torch.long)
            return (self.features.new_zeros(b, 0, self.features.shape[1]), empty.bool(), empty)
        score = self.scores(queries, positive_ids, step, similarity, positive_sim)
        top = score.topk(n, dim=1)  # (B, n)
        if self.config.mode == "entropy":
            with torch.no_grad():
                mean = torch.where(torch.isfinite(score), score, torch.zeros_like(score)).mean(0)
                m = self.config.score_momentum
                self.informativeness.mul_(m).add_((1 - m) * mean)
        return self.features[top.indices], torch.isfinite(top.values), top.indices


def _gumbel(b: int, c: int, device) -> torch.Tensor:
    """(b, c) standard Gumbel noise from torch's global generator (seeded per epoch by the trainer)."""
    u = torch.rand(b, c, device=device).clamp(1e-12, 1 - 1e-7)
    return -(-u.log()).log()
