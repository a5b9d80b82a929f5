"""The service's model work, bounded: worker threads, a queue of bounded length, and a time limit per request.

A search (a turn, an addition) runs in one of `workers` threads, so the event loop keeps answering `/health`.
At most `workers + queue` requests hold or wait for a worker; one more is answered 503 at once (with Retry-After),
so a flood of requests cannot pile up memory. A request whose work has not finished after `timeout_s` seconds
is answered 503; Python cannot stop a running thread, so its work runs on to the end, still counted against the
bound until it finishes (a request abandoned while it waited for a worker never starts).
"""
from __future__ import annotations

import threading

import anyio
import anyio.to_thread

from cirlab.serving.service import ServiceError

WORKERS = 2
QUEUE = 16
TIMEOUT_S = 30.0


class Busy(ServiceError):
    """503 with a Retry-After header."""

    retry_after = 1


class BoundedWork:
    def __init__(self, workers: int = WORKERS, queue: int = QUEUE, timeout_s: float = TIMEOUT_S):
        if workers < 1 or queue < 0 or timeout_s <= 0:
            raise ValueError(f"workers >= 1, queue >= 0 and timeout > 0, got {workers}, {queue}, {timeout_s}")
        self.workers, self.queue, self.timeout_s = workers, queue, timeout_s
        self.limiter = anyio.CapacityLimiter(workers)
        self.held = 0  # requests whose work is running or waiting for a worker
        self._lock = threading.Lock()

    async def run(self, fn, *args):
        """`fn(*args)` in a worker thread, within the bounds; its result, or ServiceError 503."""
        with self._lock:
            if self.held >= self.workers + self.queue:
                raise Busy(503, f"the service is busy ({self.held} requests running or waiting); try again shortly")
            self.held += 1
        state = {"started": False, "abandoned": False}

        def job():
            with self._lock:
                if state["abandoned"]:  # the request gave up while it waited: do nothing
                    return None
                state["started"] = True
            try:
                return fn(*args)
            finally:
                with self._lock:
                    self.held -= 1
        try:
            with anyio.fail_after(self.timeout_s):
                return await anyio.to_thread.run_sync(job, limiter=self.limiter, abandon_on_cancel=True)
        except TimeoutError:
            raise Busy(503, f"the request took over {self.timeout_s:g} s and was abandoned; try again, or ask "
                            "for fewer results") from None
        finally:
            with self._lock:
                if not state["started"] and not state["abandoned"]:
                    state["abandoned"] = True
                    self.held -= 1

    def health(self) -> dict:
        return {"workers": self.workers, "queue": self.queue, "timeout_s": self.timeout_s, "held": self.held}
