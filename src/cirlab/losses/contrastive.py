"""Contrastive losses over a batch (row i of the queries matches row i of the targets).

In a process group (multi-process training) the batch is the global one: each rank's rows are scored against
every rank's columns, gathered with gradients, and labelled by their global position; gradients averaged across
ranks then equal those of one process with the whole batch. The losses learn their place in the group from the
`Rank` they are passed (the trainer sets it on each batch: `batch.rank`), never from torch.distributed's globals;
the collectives run on the default process group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cirlab.types import Rank


class _AllGather(torch.autograd.Function):
    """all_gather with a backward that sums the gradient over ranks and keeps this rank's rows.

    torch.distributed.nn.functional.all_gather was not used: its backward reduce-scatters the incoming gradients
    as they come, and a non-contiguous one (the gradient of csmcir's max over target tokens, an einsum followed by
    amax) came back wrong under gloo (measured: two processes gave Q-Former gradients 180 times those of one
    process with the same global batch; tests/test_distributed.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        ctx.rank, ctx.rows = rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss depends on this rank's rows
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None


def gather(x: torch.Tensor, rank: Rank) -> torch.Tensor:
    """Every rank's `x` concatenated in rank order, (W*B, ...); gradients flow back to each rank's own part, summed
    over the ranks whose losses used it. Every rank must pass the same number of rows."""
    if rank.world == 1:
        return x
    return _AllGather.apply(x, rank.rank, rank.world)


def global_labels(b: int, rank: Rank, device=None) -> torch.Tensor:
    """The columns of this rank's b rows among the gathered targets: rank * b + (0..b-1)."""
    return torch.arange(b, device=device) + rank.rank * b


def global_info_nce(q: torch.Tensor, t: torch.Tensor, scale, rank: Rank) -> torch.Tensor:
    """InfoNCE of this rank's queries (B, D) against the targets of the whole global batch."""
    logits = scale * q @ gather(t, rank).t()  # (B, W*B)
    return F.cross_entropy(logits, global_labels(q.shape[0], rank, q.device))


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row against its diagonal entry; `logits` (B, N) with N >= B."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels)


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, rank: Rank) -> torch.Tensor:
    """Symmetric image-text contrastive loss on L2-normalised features (B, D), scale = exp(logit_scale), over the
    global batch."""
    scale = logit_scale.exp().clamp(max=100)
    if rank.world == 1:  # one (B, B) product and its transpose: the single-process figures stay bit for bit
        logits = scale * a @ b.t()  # (B, B)
        return 0.5 * (info_nce(logits) + info_nce(logits.t()))
    return 0.5 * (global_info_nce(a, b, scale, rank) + global_info_nce(b, a, scale, rank))
