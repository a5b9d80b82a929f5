"""Multi-process data-parallel training: one process per rank, gloo on CPU, nccl on CUDA.

`launch(fn, nproc, device, **kwargs)` starts `nproc` processes on this machine (torch.multiprocessing), joins them
into a process group over a free local TCP port and runs `fn(**kwargs)` in each (`cirlab train --nproc N` does
this with `train_method`). Under `torchrun`, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT,
`init_from_torchrun()` joins the group instead.

What each rank does (training/loop.py): every rank draws the same epoch order; global step s covers
`batch_size * world` items and rank r trains on its r-th slice; contrastive losses gather the other ranks' features
with gradients (losses/contrastive.py: `gather`), so each row still sees the whole global batch's negatives; after
the backward pass gradients are averaged across ranks. The result follows a single process with the global batch
(tests/test_distributed.py compares the loss curves). Memory banks stay per process. Only rank 0 writes logs, the
loop state and checkpoints.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from cirlab.types import Rank


def current() -> Rank:
    if dist.is_available() and dist.is_initialized():
        return Rank(dist.get_rank(), dist.get_world_size())
    return Rank()


def average_gradients(module: torch.nn.Module) -> None:
    """Average every gradient across ranks in one all-reduce of one flat buffer per dtype and device: on 2 CPU
    cores a gloo collective per parameter (a tiny CLIP has ~140) made a two-process pretraining step nearly twice
    as slow as the same step on one process with two threads; one buffer made them equal."""
    world = current().world
    if world == 1:
        return
    groups: dict = {}
    for p in module.parameters():
        if p.grad is not None:
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def mean_across_ranks(value: float) -> float:
    world = current().world
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / world


def barrier() -> None:
    if current().world > 1:
        dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn, nproc: int, port: int, device: str, threads: int, kwargs: dict) -> None:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nproc)
    try:
        fn(**kwargs)
    finally:
        dist.destroy_process_group()


def launch(fn, nproc: int, device: str = "cpu", threads: int | None = None, **kwargs) -> None:
    """Run `fn(**kwargs)` in `nproc` processes joined into one group (CPU: gloo, `threads` torch threads each,
    default the cores shared out; CUDA: nccl, one GPU per rank)."""
    import torch.multiprocessing as mp

    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    mp.spawn(_worker, args=(fn, nproc, _free_port(), device, threads, kwargs), nprocs=nproc, join=True)


def init_from_torchrun(device: str = "cpu") -> Rank:
    """Join the group torchrun describes in the environment (no-op when it is absent)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return current()
