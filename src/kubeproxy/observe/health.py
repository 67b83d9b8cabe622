"""Proxy health: upstream's per-IP-family healthz rule (pkg/proxy/healthcheck ``ProxyHealthServer``).

For each IP family the proxier of that family calls:
- ``queued_update(family)`` when it receives a change that needs a sync: records the time of the
  oldest change not yet synced (later calls while one is pending keep the older time);
- ``updated(family)`` after a successful sync: records ``lastUpdated`` and clears the pending change.

A family is unhealthy when its oldest pending change has waited ``timeout`` seconds or more
(upstream: ``healthTimeout`` = 2 x syncPeriod); the proxy is healthy when every family is.

As upstream, only families that have been ``updated`` at least once are judged (and reported): a
proxy that is still starting is healthy. Upstream's sync loop calls ``Updated`` once when it starts
("in case Sync() never succeeds"), so from then on a first sync that never succeeds does turn the
proxy unhealthy after the timeout: the daemon should call ``updated(family)`` for every family when
its sync loop starts, for the same behaviour.

Ages use a monotonic clock (a wall-clock step must not make the proxy unhealthy); the timestamps
reported in JSON use the wall clock. Both clocks are injectable for tests. Thread-safe: the daemon's
loop records, the health server's thread reads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kubeproxy.observe.metrics import FamilyLike, family_label

__all__ = ["FamilyHealth", "ProxyHealth", "ProxyHealthTracker"]


@dataclass(frozen=True, slots=True)
class FamilyHealth:
    """One IP family's proxier: when it last synced successfully (Unix seconds) and whether it is healthy."""

    family: str  # "IPv4" | "IPv6"
    last_updated: float
    healthy: bool


@dataclass(frozen=True, slots=True)
class ProxyHealth:
    """A snapshot of the proxy's health at ``current_time`` (Unix seconds).

    ``last_updated`` is the most recent successful sync of any family (None before the first one);
    ``families`` holds the families that have synced at least once, sorted by name.
    """

    healthy: bool
    last_updated: float | None
    current_time: float
    families: tuple[FamilyHealth, ...]


@dataclass(slots=True)
class _Family:
    updated_wall: float | None = None
    updated_mono: float | None = None
    oldest_queued_mono: float | None = None


class ProxyHealthTracker:
    """Per-family ``queued_update``/``updated`` bookkeeping and the health verdict built from it."""

    def __init__(
        self,
        families: Iterable[FamilyLike],
        *,
        timeout: float,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        labels = sorted({family_label(f) for f in families})
        if not labels:
            raise ValueError("ProxyHealthTracker needs at least one IP family")
        if timeout <= 0:
            raise ValueError(f"health timeout must be positive, not {timeout!r}")
        self.families: tuple[str, ...] = tuple(labels)
        self.timeout = timeout
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        self._state = {label: _Family() for label in labels}

    def _targets(self, family: FamilyLike | None) -> tuple[str, ...]:
        if family is None:
            return self.families
        label = family_label(family)
        if label not in self._state:
            raise ValueError(f"IP family {label} is not tracked (tracking {', '.join(self.families)})")
        return (label,)

    def queued_update(self, family: FamilyLike | None = None) -> None:
        """A change for ``family`` (None: every tracked family) waits for a sync."""
        targets = self._targets(family)
        now = self._monotonic()
        with self._lock:
            for label in targets:
                state = self._state[label]
                if state.oldest_queued_mono is None:
                    state.oldest_queued_mono = now

    def updated(self, family: FamilyLike, *, since: float | None = None) -> None:
        """``family``'s rules now reflect every change queued before this sync started.

        ``since``: the (monotonic) start of that sync. A change queued after it is not served yet
        and stays queued (upstream clears it too; then a change that arrived mid-sync followed by
        failing syncs would never turn the proxy unhealthy)."""
        (label,) = self._targets(family)
        mono, wall = self._monotonic(), self._wall()
        with self._lock:
            state = self._state[label]
            if since is None or state.oldest_queued_mono is None or state.oldest_queued_mono <= since:
                state.oldest_queued_mono = None
            state.updated_mono, state.updated_wall = mono, wall

    def status(self) -> ProxyHealth:
        """The health verdict now."""
        mono, wall = self._monotonic(), self._wall()
        healthy = True
        last_updated: float | None = None
        families: list[FamilyHealth] = []
        with self._lock:
            for label in self.families:
                state = self._state[label]
                if state.updated_wall is None:
                    continue  # never synced: still starting, not judged (upstream)
                if last_updated is None or state.updated_wall > last_updated:
                    last_updated = state.updated_wall
                late = state.oldest_queued_mono is not None and mono - state.oldest_queued_mono >= self.timeout
                healthy = healthy and not late
                families.append(FamilyHealth(label, state.updated_wall, not late))
        return ProxyHealth(healthy, last_updated, wall, tuple(families))

    def is_healthy(self) -> bool:
        """``status().healthy`` (upstream ``IsHealthy``: what Service health checks report)."""
        return self.status().healthy

    def pending_since(self, family: FamilyLike) -> float | None:
        """Monotonic time of ``family``'s oldest change not yet synced; None if none."""
        (label,) = self._targets(family)
        with self._lock:
            return self._state[label].oldest_queued_mono
