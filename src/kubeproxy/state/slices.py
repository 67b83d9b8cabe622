"""EndpointSlice cache: merge every slice of a Service into one endpoint list per port.

A Service's endpoints may be spread over several slices (and, during controller updates, briefly
listed twice). ``endpoints(service)`` merges them, keyed by (port name, protocol), de-duplicating by
``ip:port``; when an endpoint appears twice the ready copy wins, as upstream's
endpointSliceCache does. Output is sorted by (ip, port) so renders are deterministic.
"""

from __future__ import annotations

import socket

from kubeproxy.model.endpoint import Endpoint, PortKey, SliceContent
from kubeproxy.model.service import NamespacedName

SliceKey = tuple[str, str]  # (namespace, slice name)


def _sort_key(ep: Endpoint) -> tuple[int, bytes, int]:
    # Addresses are canonical (model.parse_ip), so inet_pton takes them; ~20x cheaper than ipaddress.
    family = socket.AF_INET6 if ":" in ep.ip else socket.AF_INET
    return (family == socket.AF_INET6, socket.inet_pton(family, ep.ip), ep.port)


class EndpointSliceCache:
    def __init__(self) -> None:
        self._slices: dict[NamespacedName, dict[str, SliceContent]] = {}
        self._owner: dict[SliceKey, NamespacedName] = {}

    def update(self, key: SliceKey, content: SliceContent | None) -> set[NamespacedName]:
        """Store (or with None, forget) one slice; returns the Services whose endpoints may change."""
        affected: set[NamespacedName] = set()
        old_owner = self._owner.pop(key, None)
        if old_owner is not None:
            per_service = self._slices.get(old_owner, {})
            per_service.pop(key[1], None)
            if not per_service:
                self._slices.pop(old_owner, None)
            affected.add(old_owner)
        if content is not None:
            self._owner[key] = content.service
            self._slices.setdefault(content.service, {})[key[1]] = content
            affected.add(content.service)
        return affected

    def endpoints(self, service: NamespacedName) -> dict[PortKey, tuple[Endpoint, ...]]:
        merged: dict[PortKey, dict[tuple[str, int], Endpoint]] = {}
        for slice_name in sorted(self._slices.get(service, {})):
            content = self._slices[service][slice_name]
            for port_key, eps in content.endpoints.items():
                seen = merged.setdefault(port_key, {})
                for ep in eps:
                    existing = seen.get((ep.ip, ep.port))
                    if existing is None or (ep.ready and not existing.ready):
                        seen[(ep.ip, ep.port)] = ep
        return {pk: tuple(sorted(eps.values(), key=_sort_key)) for pk, eps in merged.items() if eps}
