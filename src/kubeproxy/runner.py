"""Bounded-frequency sync runner (upstream pkg/proxy/runner, on asyncio).

- ``request()`` never blocks and coalesces: any number of requests while a sync runs or waits
  becomes one more sync.
- At least ``min_interval`` passes between the end of one sync and the start of the next
  (upstream's current end-to-start semantics, --iptables-min-sync-period, default 1 s).
- A sync that raises is logged and retried after ``retry_interval`` (syncPeriod, default 30 s);
  the sync function itself forces a full sync after a failure.
- With no requests, a sync still runs every ``max_interval`` (upstream FullSyncPeriod, 1 h).
- A sync may ask to run again after N seconds (returning N), e.g. to delete stale chains later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("kubeproxy.runner")

SyncFn = Callable[[], Awaitable[float | None]]


class SyncRunner:
    def __init__(self, fn: SyncFn, *, min_interval: float, retry_interval: float, max_interval: float = 3600.0) -> None:
        self._fn = fn
        self.min_interval = min_interval
        self.retry_interval = retry_interval
        self.max_interval = max_interval
        self._wake = asyncio.Event()
        self.runs = 0
        self.failures = 0

    def request(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        next_forced = time.monotonic() + self.max_interval
        last_end = float("-inf")
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                waiter = asyncio.ensure_future(self._wake.wait())
                timeout = max(0.0, next_forced - time.monotonic())
                await asyncio.wait({waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if stop.is_set():
                    return
                # Respect the minimum interval, measured from the end of the previous sync.
                delay = last_end + self.min_interval - time.monotonic()
                if delay > 0:
                    await asyncio.wait({stopper}, timeout=delay)
                    if stop.is_set():
                        return
                self._wake.clear()
                self.runs += 1
                try:
                    followup = await self._fn()
                except Exception:
                    self.failures += 1
                    log.exception("sync failed; retrying in %.1fs with a full sync", self.retry_interval)
                    next_forced = time.monotonic() + self.retry_interval
                else:
                    next_forced = time.monotonic() + (followup if followup is not None else self.max_interval)
                last_end = time.monotonic()
        finally:
            stopper.cancel()
