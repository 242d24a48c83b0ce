"""A coalescing, retrying work queue of reconciles (client-go's workqueue, in asyncio).

Level-based design: a watch event only *schedules* the keys it affects; the reconcile reads the current state
itself. So a burst of events for one key runs one reconcile, and a key that changes while its reconcile runs
runs once more afterwards (it always ends on the newest state). Failures retry with capped, jittered
exponential backoff; one failing key never stops the others.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Counter, Histogram

from loraplane.kube.client import ApiError
from loraplane.kube.informer import Key

log = logging.getLogger("loraplane.operator")

RECONCILES = Counter("loraplane_operator_reconciles_total", "Reconciles by kind and result", ["kind", "result"])
RECONCILE_SECONDS = Histogram("loraplane_operator_reconcile_duration_seconds", "Reconcile duration", ["kind"],
                              buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))


class WorkQueue:
    """One pending run per key, at most `concurrency` running (default 32); a key scheduled while it runs
    runs once more afterwards; a failure retries after 0.5 s * 2^n (capped at 300 s, jitter +-20%).
    `delay` (seconds) is how long a newly scheduled key waits for more events before it runs."""

    def __init__(self, kind: str, fn: Callable[[Key], Awaitable[None]], delay: float, concurrency: int = 32):
        self.kind = kind
        self._fn = fn
        self._delay = delay
        self._pending: set[Key] = set()
        self._running: set[Key] = set()
        self._again: set[Key] = set()
        self._failures: dict[Key, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self._gate = asyncio.Semaphore(concurrency)
        self.idle = asyncio.Event()
        self.idle.set()

    def schedule(self, key: Key, delay: float | None = None) -> None:
        """Run the reconcile of `key` after `delay` seconds (default: the queue's), unless it is pending."""
        if key in self._running:
            self._again.add(key)
            return
        if key in self._pending:
            return
        self._pending.add(key)
        self.idle.clear()
        task = asyncio.get_running_loop().create_task(self._run(key, self._delay if delay is None else delay))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self.idle.set()

    async def _run(self, key: Key, delay: float) -> None:
        await asyncio.sleep(delay)
        async with self._gate:
            self._pending.discard(key)
            self._running.add(key)
            started = time.perf_counter()
            retry = None
            try:
                await self._fn(key)
                RECONCILES.labels(self.kind, "success").inc()
                self._failures.pop(key, None)
            except Exception as exc:  # a reconcile error must never stop the operator
                n = self._failures[key] = self._failures.get(key, 0) + 1
                retry = min(300.0, 0.5 * 2 ** min(n, 10)) * (0.8 + 0.4 * random.random())
                RECONCILES.labels(self.kind, "error").inc()
                level = logging.WARNING if isinstance(exc, ApiError) else logging.ERROR
                log.log(level, "%s %s/%s: reconcile failed (retry in %.1fs): %s", self.kind, *key, retry, exc,
                        exc_info=not isinstance(exc, ApiError))
            finally:
                RECONCILE_SECONDS.labels(self.kind).observe(time.perf_counter() - started)
                self._running.discard(key)
        if key in self._again:
            self._again.discard(key)
            self.schedule(key)
        elif retry is not None:
            self.schedule(key, retry)

    async def stop(self) -> None:
        """Cancel every pending and running reconcile."""
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


__all__ = ["RECONCILES", "RECONCILE_SECONDS", "WorkQueue"]
