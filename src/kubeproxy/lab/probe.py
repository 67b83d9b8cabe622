"""Traffic probes: connect to an address from inside a lab namespace and classify what happened.

Job: turn one TCP connection or UDP exchange into a :class:`ProbeResult` -- which pod answered
(the podserver's ``"<name> <peer_ip>"`` line), which client address it saw, or why nothing answered.

Invariants:
- Probes always run inside a named lab namespace (via :func:`call_in_netns`); there is no way to
  probe from the host's namespace, so no probe can send traffic outside the lab.
- Every probe uses a new socket, hence a new source port and a new conntrack entry: repeated probes
  exercise the kernel's load balancing instead of reusing one flow.
- Classification follows the kernel's errors: ECONNREFUSED (TCP RST, or ICMP port unreachable on a
  connected UDP socket) is REFUSED; EHOSTUNREACH/ENETUNREACH (no route, ICMP host/net unreachable,
  REJECT with those types) is UNREACHABLE; silence until the deadline is TIMEOUT; anything else,
  including an answer we cannot parse, is ERROR.
"""

from __future__ import annotations

import collections
import enum
import errno
import ipaddress
import socket
import time
from dataclasses import dataclass

from kubeproxy.lab.netns import call_in_netns

__all__ = ["Outcome", "ProbeResult", "spread", "tcp_probe", "udp_probe"]

_UNREACHABLE_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH})
_MAX_ANSWER = 4096


class Outcome(enum.Enum):
    OK = "OK"
    REFUSED = "REFUSED"
    TIMEOUT = "TIMEOUT"
    UNREACHABLE = "UNREACHABLE"
    ERROR = "ERROR"


@dataclass(frozen=True)
class ProbeResult:
    outcome: Outcome
    answer: str | None  # name of the pod (podserver) that answered
    seen_client_ip: str | None  # the peer address that pod saw: tells whether we were masqueraded
    detail: str = ""


class _Transport(enum.Enum):
    TCP = "tcp"
    UDP = "udp"


def _family(ip: str) -> socket.AddressFamily:
    try:
        version = ipaddress.ip_address(ip).version
    except ValueError as exc:
        raise ValueError(f"not an IP address: {ip!r}") from exc
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def _parse(raw: bytes) -> ProbeResult:
    text = raw.decode(errors="replace").strip()
    parts = text.split()
    if len(parts) != 2:
        return ProbeResult(Outcome.ERROR, None, None, f"unexpected answer {text!r}")
    return ProbeResult(Outcome.OK, parts[0], parts[1])


def _from_oserror(exc: OSError, stage: str) -> ProbeResult:
    # TimeoutError and ConnectionRefusedError are OSError subclasses; classify on errno where possible.
    if isinstance(exc, TimeoutError):
        return ProbeResult(Outcome.TIMEOUT, None, None, f"no answer ({stage})")
    if exc.errno == errno.ECONNREFUSED:
        return ProbeResult(Outcome.REFUSED, None, None, f"connection refused ({stage})")
    if exc.errno in _UNREACHABLE_ERRNOS:
        return ProbeResult(Outcome.UNREACHABLE, None, None, f"{exc.strerror} ({stage})")
    return ProbeResult(Outcome.ERROR, None, None, f"{exc} ({stage})")


def _tcp_here(ip: str, port: int, timeout: float, source_ip: str | None) -> ProbeResult:
    """One TCP probe from the calling thread's namespace."""
    deadline = time.monotonic() + timeout
    with socket.socket(_family(ip), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        stage = "connect"
        chunks: list[bytes] = []
        try:
            if source_ip is not None:
                sock.bind((source_ip, 0))
            sock.connect((ip, port))
            stage = "read"
            size = 0
            while size < _MAX_ANSWER:
                # One deadline for the whole probe: connect + read never exceed `timeout`.
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(_MAX_ANSWER)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if b"\n" in chunk:
                    break
        except OSError as exc:
            return _from_oserror(exc, stage)
    return _parse(b"".join(chunks))


def _udp_here(ip: str, port: int, timeout: float, source_ip: str | None) -> ProbeResult:
    """One UDP probe from the calling thread's namespace."""
    with socket.socket(_family(ip), socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        stage = "send"
        try:
            if source_ip is not None:
                sock.bind((source_ip, 0))
            # A connected UDP socket is what makes the kernel report ICMP errors (port unreachable ->
            # ECONNREFUSED) to us, and filters out datagrams from anyone but the probed address.
            sock.connect((ip, port))
            sock.send(b"probe\n")
            stage = "receive"
            raw = sock.recv(_MAX_ANSWER)
        except OSError as exc:
            return _from_oserror(exc, stage)
    return _parse(raw)


def tcp_probe(netns: str, ip: str, port: int, *, timeout: float = 1.0, source_ip: str | None = None) -> ProbeResult:
    """Connect to ``ip:port`` over TCP from namespace ``netns`` and read the answer line."""
    return call_in_netns(netns, _tcp_here, ip, port, timeout, source_ip)


def udp_probe(netns: str, ip: str, port: int, *, timeout: float = 1.0, source_ip: str | None = None) -> ProbeResult:
    """Send one datagram to ``ip:port`` from namespace ``netns`` and read the answer datagram."""
    return call_in_netns(netns, _udp_here, ip, port, timeout, source_ip)


def _spread_here(ip: str, port: int, count: int, protocol: _Transport, timeout: float) -> collections.Counter[str]:
    probe = _tcp_here if protocol is _Transport.TCP else _udp_here
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(count):
        result = probe(ip, port, timeout, None)
        key = result.answer if result.outcome is Outcome.OK and result.answer else result.outcome.value
        counts[key] += 1
    return counts


def spread(
    netns: str, ip: str, port: int, count: int, *, protocol: str = "tcp", timeout: float = 1.0
) -> collections.Counter[str]:
    """Probe ``ip:port`` ``count`` times from ``netns``; count answers by pod name.

    Failed probes count under their outcome's name ("REFUSED", "TIMEOUT", "UNREACHABLE", "ERROR").
    All probes run in one namespace-switched thread, so a large count costs no thread per probe.
    """
    try:
        proto = _Transport(protocol.lower())
    except ValueError as exc:
        raise ValueError(f"protocol must be 'tcp' or 'udp', not {protocol!r}") from exc
    if count < 0:
        raise ValueError(f"count must be >= 0, not {count}")
    _family(ip)  # reject a bad address here, not once per probe inside the thread
    return call_in_netns(netns, _spread_here, ip, port, count, proto, timeout)
