"""Polling for tests that watch another process or thread converge (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.1) -> bool:
    """True as soon as ``predicate()`` holds, False if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> None:
    """The same, inside an event loop (the loop keeps running while we wait); AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)
