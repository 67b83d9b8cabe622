"""Conntrack kernel boundary: list the connection-tracking table of one family, delete entries.

``ConntrackCli`` drives the conntrack-tools CLI (DESIGN.md section 3: CLIs for bulk work); with
``netns`` set every call runs inside that network namespace (``ip netns exec``), which is how the lab
reaches a node's table. ``FakeConntrack`` models a table of flows with the same semantics. Both raise
``ConntrackError`` (a ``KernelError``) and nothing else.

Deletion semantics (the contract both implementations keep): ``delete(flows)`` removes every entry
that has the same protocol, ORIGINAL destination address and port, and REPLY source address as one
of ``flows``. That is exactly the key the UDP cleanup decides on (backends/conntrack.py: an entry is
stale because of where it was sent and which endpoint answers, never because of its client), so
deleting by that key removes the listed flows and any flow opened since the listing that is just as
stale -- and nothing else.

Why filters rather than one precise delete per flow (measured in a namespace on this machine: kernel
6.18, conntrack-tools 1.4.7, 262144 hash buckets, 2 CPUs): the CLI resolves every ``-D`` by dumping
the table, so a precise per-flow delete costs about one dump whatever its tuple -- 12 ms per entry
with 2000 entries in the table, 31 ms with 10000 (1000 deletes: 31.6 s in one ``conntrack -R``
batch; 34 ms each as separate processes). A filter costs the same one dump but removes all of its
matches: 10.5 ms per filter at 1000 entries, 25 ms at 10000, 96 ms at 50000 (one filter removed 12500
of 50000 entries in 0.32 s). Stale flows share few keys (one per dead endpoint and Service address,
one per Service address for never-DNATed entries), so the cost is a few dumps per sync. All filters
go to one ``conntrack -R -`` process (conntrack-tools >= 1.4.6; older versions get one process per
filter). Listing one family's UDP entries, parse included: 27 ms for 1000, 155 ms for 10000, 0.74 s
for 50000 (about 15 us per entry, mostly parsing).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from kubeproxy.kernel.binaries import netns_exec, path_of
from kubeproxy.kernel.errors import KernelError
from kubeproxy.model.service import IPFamily

__all__ = [
    "Conntrack",
    "ConntrackCli",
    "ConntrackError",
    "FakeConntrack",
    "Flow",
    "delete_args",
    "parse_flow",
    "parse_flows",
]


class ConntrackError(KernelError):
    pass


@dataclass(frozen=True, slots=True, order=True)
class Flow:
    """One conntrack entry: its original-direction tuple and its reply-direction tuple.

    Addresses are normalized (``ipaddress`` spelling) so they compare equal to the model's. Ports
    are 0 for protocols without ports.
    """

    protocol: str  # lower-case, as conntrack prints it: "udp", "tcp", ...
    orig_src: str
    orig_dst: str
    orig_sport: int
    orig_dport: int
    reply_src: str
    reply_dst: str
    reply_sport: int
    reply_dport: int

    @property
    def family(self) -> IPFamily:
        return IPFamily.V6 if ":" in self.orig_src else IPFamily.V4

    @property
    def delete_key(self) -> tuple[str, str, int, str]:
        """What a delete matches on: protocol, original destination and port, reply source."""
        return (self.protocol, self.orig_dst, self.orig_dport, self.reply_src)

    def __str__(self) -> str:
        return (
            f"{self.protocol} src={self.orig_src} dst={self.orig_dst} sport={self.orig_sport} dport={self.orig_dport}"
            f" src={self.reply_src} dst={self.reply_dst} sport={self.reply_sport} dport={self.reply_dport}"
        )


class Conntrack(Protocol):
    def list_flows(self, family: IPFamily, protocol: str = "udp") -> list[Flow]:
        """Every entry of ``family`` and ``protocol`` in the table."""

    def delete(self, flows: Iterable[Flow]) -> int:
        """Delete every entry with the ``delete_key`` of one of ``flows``; returns how many went."""


# --------------------------------------------------------------------------------------------
# Parsing ``conntrack -L`` output

_TUPLE_WORD = re.compile(r"(?<!\S)(src|dst|sport|dport)=(\S+)")


@functools.lru_cache(maxsize=65536)
def _address(text: str) -> str | None:
    # Cached: a table holds few distinct Service, endpoint and client addresses, many times over.
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def parse_flow(line: str) -> Flow | None:
    """One line of ``conntrack -L`` (default or ``-o extended`` format); None if it is not an entry.

    The line is ``[ipv4 2] udp 17 <timeout> [state] src= dst= sport= dport= [packets= bytes=]
    [UNREPLIED] src= dst= sport= dport= [packets= bytes=] [ASSURED] mark= [zone=] use=``: the first
    ``src=`` opens the original tuple, the second the reply tuple; every other word is ignored, so
    accounting, zones, labels and security contexts do not disturb the parse.
    """
    head = line.split(None, 4)
    if head and head[0] in ("ipv4", "ipv6"):  # -o extended: layer-3 name and number first
        head = head[2:]
    if len(head) < 3 or not head[1].isdigit():
        return None
    tuples: list[dict[str, str]] = []
    for key, value in _TUPLE_WORD.findall(line):
        if key == "src":
            if len(tuples) == 2:
                break
            tuples.append({})
        if tuples:
            tuples[-1].setdefault(key, value)
    if len(tuples) != 2:
        return None
    orig, reply = tuples
    addrs = [_address(t.get(k, "")) for t in (orig, reply) for k in ("src", "dst")]
    ports = [t.get(k, "0") for t in (orig, reply) for k in ("sport", "dport")]
    if None in addrs or not all(p.isdigit() for p in ports):
        return None
    o_src, o_dst, r_src, r_dst = (a or "" for a in addrs)
    o_sport, o_dport, r_sport, r_dport = (int(p) for p in ports)
    return Flow(head[0].lower(), o_src, o_dst, o_sport, o_dport, r_src, r_dst, r_sport, r_dport)


def parse_flows(text: str) -> list[Flow]:
    """Every entry in ``conntrack -L`` output; lines that are not entries are skipped."""
    return [flow for flow in map(parse_flow, text.splitlines()) if flow is not None]


def delete_args(key: tuple[str, str, int, str]) -> list[str]:
    """The ``conntrack -D`` filter for one ``Flow.delete_key``."""
    protocol, orig_dst, orig_dport, reply_src = key
    args = ["-D", "-p", protocol, "--orig-dst", orig_dst]
    if orig_dport:
        args += ["--orig-port-dst", str(orig_dport)]
    return [*args, "--reply-src", reply_src]


# --------------------------------------------------------------------------------------------
# The CLI

_BATCH_VERSION = (1, 4, 6)  # conntrack -R / --load-file appeared in conntrack-tools 1.4.6


class ConntrackCli:
    def __init__(self, *, netns: str | None = None, binary: str | None = None, timeout: float = 60) -> None:
        self._prefix = netns_exec(netns)
        self._binary = binary or path_of("conntrack")
        self._timeout = timeout
        self._batch: bool | None = None

    def _exec(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [*self._prefix, self._binary, *args]
        try:
            return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=self._timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConntrackError(f"cannot run {' '.join(argv)}: {exc}") from exc

    def version(self) -> tuple[int, ...] | None:
        proc = self._exec(["--version"])
        m = re.search(r"v(\d+)\.(\d+)\.(\d+)", proc.stdout + proc.stderr)
        return tuple(int(g) for g in m.groups()) if m else None

    def list_flows(self, family: IPFamily, protocol: str = "udp") -> list[Flow]:
        name = "ipv4" if family is IPFamily.V4 else "ipv6"
        proc = self._exec(["-L", "-f", name, "-p", protocol])
        if proc.returncode != 0:
            raise ConntrackError(f"conntrack -L -f {name} -p {protocol} failed: {proc.stderr.strip()[:2000]}")
        return [f for f in parse_flows(proc.stdout) if f.family is family and f.protocol == protocol]

    def delete(self, flows: Iterable[Flow]) -> int:
        filters = [delete_args(key) for key in sorted({f.delete_key for f in flows})]
        if not filters:
            return 0
        if self._batch is None:
            version = self.version()
            self._batch = version is not None and version >= _BATCH_VERSION
        if self._batch:
            # One process, one table walk per filter; every deleted entry is printed on stdout.
            proc = self._exec(["-R", "-"], stdin="".join(" ".join(f) + "\n" for f in filters))
            if proc.returncode != 0:
                raise ConntrackError(f"conntrack -R - failed (exit {proc.returncode}): {proc.stderr.strip()[:2000]}")
            return len(parse_flows(proc.stdout))
        deleted = 0
        for args in filters:
            proc = self._exec(args)
            # Exit status 1 with "0 flow entries have been deleted": nothing matched (already gone).
            if proc.returncode == 1 and "0 flow entries" in proc.stderr:
                continue
            if proc.returncode != 0:
                raise ConntrackError(f"conntrack {' '.join(args)} failed: {proc.stderr.strip()[:2000]}")
            deleted += len(parse_flows(proc.stdout))
        return deleted


# --------------------------------------------------------------------------------------------
# Fake


@dataclass
class FakeConntrack:
    """A conntrack table as a list of flows, with the real adapter's listing and delete semantics."""

    flows: list[Flow] = field(default_factory=list)
    lists: list[tuple[IPFamily, str]] = field(default_factory=list)  # every list_flows call
    deletes: list[list[tuple[str, str, int, str]]] = field(default_factory=list)  # keys of every delete call
    fail: ConntrackError | None = None  # raised (once) by the next call

    def _maybe_fail(self) -> None:
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc

    def add(self, *flows: Flow) -> None:
        self.flows.extend(flows)

    def list_flows(self, family: IPFamily, protocol: str = "udp") -> list[Flow]:
        self._maybe_fail()
        self.lists.append((family, protocol))
        return [f for f in self.flows if f.family is family and f.protocol == protocol]

    def delete(self, flows: Iterable[Flow]) -> int:
        self._maybe_fail()
        keys = {f.delete_key for f in flows}
        if not keys:
            return 0
        self.deletes.append(sorted(keys))
        kept = [f for f in self.flows if f.delete_key not in keys]
        deleted = len(self.flows) - len(kept)
        self.flows = kept
        return deleted

    def dump(self) -> str:
        return "".join(f"{flow}\n" for flow in sorted(self.flows))
