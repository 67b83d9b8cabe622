"""Change tracking: coalesce (previous, current) per object key and drop no-op changes.

Upstream's ServiceChangeTracker and EndpointsChangeTracker keep, per NamespacedName, the OLDEST
previous value and the NEWEST current value seen since the last sync; if they end up equal the
change vanishes (an add followed by a delete, or a resync that changed nothing, costs no sync).
Here ``previous`` is read from the applied state the first time a key changes, so callers only say
what an object is now.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class PendingChanges(Generic[K, V]):
    """Pending changes against an applied mapping (which this class never mutates)."""

    __slots__ = ("_applied", "_pending")

    def __init__(self, applied: Mapping[K, V]) -> None:
        self._applied = applied
        self._pending: dict[K, tuple[V | None, V | None]] = {}

    def set(self, key: K, current: V | None) -> bool:
        """Record that ``key`` is now ``current`` (None: gone). Returns True if anything is pending."""
        previous = self._pending[key][0] if key in self._pending else self._applied.get(key)
        if previous == current:
            self._pending.pop(key, None)
        else:
            self._pending[key] = (previous, current)
        return bool(self._pending)

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, key: object) -> bool:
        return key in self._pending

    def drain(self) -> dict[K, tuple[V | None, V | None]]:
        """Hand over everything pending and start afresh."""
        pending, self._pending = self._pending, {}
        return pending
