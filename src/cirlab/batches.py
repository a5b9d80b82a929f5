"""Batch engines for the long per-image jobs (captioning, editing, gallery embedding): in-process or Ray.

`run_batches(items, factory, batch_size, engine)` yields `(chunk, results)` pairs: `factory()` builds a worker once
per process (a captioner, an editor, a model) and `worker(chunk) -> results` handles one batch. The caller keeps
every write (caches, manifests, the index) in its own process, so resumability and atomic writes are the same for
both engines.

- `local`: one worker in this process, chunks in order.
- `ray`: Ray Data batches the items and runs `concurrency` workers as an actor pool (`map_batches` with a callable
  class), on the cluster at `address` (`ray://...` or `auto`), or on the Ray instance this process already started
  (`ray.init`), or on a new local one. Results come back in any order, each with its chunk. Items and results
  travel pickled, so both must pickle; `factory` too (a top-level function or a `functools.partial`).
"""
from __future__ import annotations

import pickle

import numpy as np

from cirlab.errors import CirlabError

ENGINES = ("local", "ray")


class _RayWorker:
    """One actor of the pool: builds its worker once, then maps batches of pickled items."""

    def __init__(self, factory):
        self.worker = factory()

    def __call__(self, batch: dict) -> dict:
        chunk = [pickle.loads(b) for b in batch["item"]]
        results = self.worker(chunk)
        if len(results) != len(chunk):
            raise CirlabError(f"a batch worker returned {len(results)} results for {len(chunk)} items")
        return {"i": batch["i"], "result": np.array([pickle.dumps(r) for r in results], dtype=object)}


def run_batches(items: list, factory, batch_size: int, engine: str = "local", address: str | None = None,
                concurrency: int = 1):
    if engine not in ENGINES:
        raise CirlabError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if not items:
        return
    if engine == "local":
        worker = factory()
        for lo in range(0, len(items), batch_size):
            chunk = items[lo:lo + batch_size]
            yield chunk, worker(chunk)
        return
    try:
        import ray
    except ImportError as e:
        raise CirlabError("the ray engine needs Ray Data: pip install 'cirlab[ray]'") from e
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    rows = [{"i": i, "item": pickle.dumps(x)} for i, x in enumerate(items)]
    ds = ray.data.from_items(rows).map_batches(_RayWorker, fn_constructor_args=(factory,), batch_size=batch_size,
                                               concurrency=concurrency, batch_format="numpy")
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        idx = [int(i) for i in batch["i"]]
        yield [items[i] for i in idx], [pickle.loads(r) for r in batch["result"]]
