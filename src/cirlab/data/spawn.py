"""The process pools cirlab starts its workers in (world rendering, pixel decoding, the demo's lanes)."""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def spawn_pool(workers: int, **kwargs) -> ProcessPoolExecutor:
    """A pool of `workers` processes, spawned, not forked: the caller may hold torch's thread pools, which a forked
    child must not inherit. A script that starts one runs it under `if __name__ == "__main__":`."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), **kwargs)
