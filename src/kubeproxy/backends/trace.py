"""What a packet tracer asks and answers, the same for every backend.

A tracer (``backends/<mode>/tracer.py``) interprets exactly the rule shapes its renderer emits and
follows a NEW connection's first packet through them. Every mode answers with a ``TraceResult`` for
a ``Packet``, which is what makes the backend-equivalence proof a plain comparison: the same
packet-flow tables run against every mode's tracer and against real packets in the lab.
"""

from __future__ import annotations

from dataclasses import dataclass

REJECT = "REJECT"
DROP = "DROP"


class TraceError(Exception):
    """The ruleset contains a shape the tracer does not model."""


@dataclass(frozen=True, slots=True)
class Packet:
    source: str
    protocol: str  # "tcp" | "udp" | "sctp"
    destination: str
    port: int
    # Input interface, for interface-based local detection; host-originated packets have none.
    # None: unknown (a rule that asks is a TraceError).
    iif: str | None = None


@dataclass(frozen=True, slots=True)
class TraceResult:
    """``output`` is "ip:port, ip:port" (sorted), REJECT, DROP, or "" (not touched by us).

    ``masquerade`` is True if the packet is masqueraded toward ANY of its possible targets (hairpin
    masquerading differs per target: only a pod that lands on itself is masqueraded).
    """

    output: str
    masquerade: bool
    matched: tuple[str, ...] = ()  # "chain: rule" lines that matched, for explain/debugging


def target_text(ip: str, port: int) -> str:
    """``ip:port``, with brackets for IPv6 (the tracers' and flow tables' endpoint spelling)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
