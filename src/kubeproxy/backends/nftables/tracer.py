"""Packet tracer: interprets exactly the rule shapes our renderer emits, over a ``Ruleset``.

``trace(ruleset, packet, node_ips)`` walks a NEW connection's first packet the way netfilter
would: nat prerouting (or nat output for host-originated packets) -> DNAT -> filter forward/input
(or output) -> nat postrouting, and answers which endpoints it may reach (every branch of a
random choice is followed), or REJECT/DROP, and whether it is masqueraded. Any rule text it does
not recognise is an error, never silently skipped: a tracer that guesses proves nothing.

Used by the packet-flow tables in tests (the same tables run against real packets in the lab),
and later by ``explain``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kubeproxy.backends.nftables.render import Ruleset
from kubeproxy.backends.trace import DROP, REJECT, Packet, TraceError, TraceResult, target_text

__all__ = ["DROP", "REJECT", "Packet", "TraceError", "TraceResult", "trace"]


@dataclass
class _Ctx:
    packet: Packet
    node_ips: frozenset[str]
    ruleset: Ruleset
    daddr: str
    dport: int
    mark: int = 0
    dnatted: bool = False
    targets: list[tuple[str, int]] = field(default_factory=list)
    matched: list[str] = field(default_factory=list)

    def key(self, *parts: str | int) -> str:
        return " . ".join(str(p) for p in parts)

    def elems(self, name: str) -> Mapping[str, str | None]:
        if name not in self.ruleset.elements:
            raise TraceError(f"unknown set or map @{name}")
        return self.ruleset.elements[name]


def _in_cidrs(ip: str, spec: str) -> bool:
    cidrs = [c.strip() for c in spec.strip("{} ").split(",")] if spec.startswith("{") else [spec]
    addr = ipaddress.ip_address(ip)
    return any(addr in ipaddress.ip_network(c, strict=False) for c in cidrs)


def _iif_matches(ctx: _Ctx, name: str, prefix: bool) -> bool:
    iif = "" if ctx.packet.source in ctx.node_ips else ctx.packet.iif
    if iif is None:
        raise TraceError(f"the rules match the input interface ({name}); the packet does not say it (Packet.iif)")
    return iif.startswith(name) if prefix else iif == name


# Matchers: (regex, predicate). Each consumes a prefix of the rule.
_Match = Callable[[_Ctx, re.Match[str]], bool]
_MATCHERS: list[tuple[re.Pattern[str], _Match]] = [
    (re.compile(r"ct state new "), lambda c, m: True),
    (re.compile(r"ct status dnat "), lambda c, m: c.dnatted),
    (re.compile(r"ip6? daddr @(\S+) "), lambda c, m: c.daddr in c.elems(m[1])),
    # Dynamic (affinity) sets: the tracer follows a client's FIRST connection, so they hold what the
    # ruleset says (nothing, for sets the kernel fills itself).
    (re.compile(r"ip6? saddr @(\S+) "), lambda c, m: c.packet.source in c.elems(m[1])),
    (
        re.compile(r"ip6? saddr (!= )?(\{[^}]*\}|[0-9a-f:][0-9a-f.:/]*) "),
        lambda c, m: _in_cidrs(c.packet.source, m[2]) != bool(m[1]),
    ),
    (
        re.compile(r"ip6? daddr (!= )?(\{[^}]*\}|[0-9a-f:][0-9a-f.:/]*) "),
        lambda c, m: _in_cidrs(c.daddr, m[2]) != bool(m[1]),
    ),
    (re.compile(r"fib saddr type local "), lambda c, m: c.packet.source in c.node_ips),
    (re.compile(r"fib daddr type local "), lambda c, m: c.daddr in c.node_ips),
    (
        re.compile(r'iifname (!= )?"([A-Za-z0-9._-]+)(\*?)" '),
        lambda c, m: _iif_matches(c, m[2], bool(m[3])) != bool(m[1]),
    ),
    (re.compile(r"meta mark & (0x[0-9a-f]+) != 0 "), lambda c, m: bool(c.mark & int(m[1], 16))),
]
_NUMGEN = re.compile(r"numgen random mod (\d+) == 0 ")


def _run_chain(ctx: _Ctx, chain: str, depth: int = 0) -> str | None:
    """Evaluate a chain; returns a terminal verdict ("accept", "drop", "reject") or None (fell through)."""
    if depth > 32:
        raise TraceError("jump depth exceeded (loop?)")
    if chain not in ctx.ruleset.chains:
        raise TraceError(f"jump to unknown chain {chain}")
    for rule in ctx.ruleset.chains[chain]:
        rest, ok, branch = rule + " ", True, False
        while ok:
            for rx, pred in _MATCHERS:
                m = rx.match(rest)
                if m:
                    ok = pred(ctx, m)
                    rest = rest[m.end() :]
                    break
            else:
                m = _NUMGEN.match(rest)
                if m is None:
                    break
                # A random branch: record its outcome, then continue as if it had not fired.
                branch, rest = True, rest[m.end() :]
        if not ok:
            continue
        stmt = rest.strip()
        ctx.matched.append(f"{chain}: {rule}")
        verdict = _statement(ctx, stmt, depth)
        if branch:
            continue
        if verdict == "return":
            return None
        if verdict is not None:
            return verdict
    return None


def _statement(ctx: _Ctx, stmt: str, depth: int) -> str | None:
    p = ctx.packet
    if m := re.fullmatch(r"(jump|goto) (\S+)", stmt):
        verdict = _run_chain(ctx, m[2], depth + 1)
        if m[1] == "goto":
            return verdict or "return"
        return verdict
    if m := re.fullmatch(r"ip6? daddr \. meta l4proto \. th dport vmap @(\S+)", stmt):
        return _vmap(ctx, ctx.elems(m[1]).get(ctx.key(ctx.daddr, p.protocol, ctx.dport)), depth)
    if m := re.fullmatch(r"meta l4proto \. th dport vmap @(\S+)", stmt):
        return _vmap(ctx, ctx.elems(m[1]).get(ctx.key(p.protocol, ctx.dport)), depth)
    if m := re.fullmatch(r"meta mark set meta mark \| (0x[0-9a-f]+)", stmt):
        ctx.mark |= int(m[1], 16)
        return None
    if m := re.fullmatch(r"meta mark set meta mark \^ (0x[0-9a-f]+) masquerade fully-random", stmt):
        ctx.mark ^= int(m[1], 16)
        return "masquerade"
    if m := re.fullmatch(r"ip6? saddr \. ip6? daddr \. meta l4proto \. th dport @(\S+) masquerade fully-random", stmt):
        return "masquerade" if ctx.key(p.source, ctx.daddr, p.protocol, ctx.dport) in ctx.elems(m[1]) else None
    if m := re.fullmatch(r"meta l4proto (\w+) dnat to \[?([0-9a-f.:]+?)\]?:(\d+)", stmt):
        if m[1] == p.protocol:
            ctx.targets.append((m[2], int(m[3])))
            return "accept"
        return None
    if m := re.fullmatch(r"dnat to ip6? daddr \. meta l4proto \. th dport \. numgen random mod (\d+) map @(\S+)", stmt):
        return _mapped_dnat(ctx, int(m[1]), ctx.elems(m[2]))
    if re.fullmatch(r"update @\S+ \{ ip6? saddr \}", stmt):
        return None  # remembers the client for next time; no effect on this packet
    if stmt in ("reject", "drop", "return"):
        return stmt
    raise TraceError(f"unrecognised rule shape: {stmt!r}")


def _mapped_dnat(ctx: _Ctx, slots: int, endpoints: Mapping[str, str | None]) -> str | None:
    """``dnat to daddr . proto . port . numgen random mod n map @m``: any of the n slots may be drawn.
    No slot at all: the lookup fails, the rule does not match. Only some: an inconsistent table."""
    found = [endpoints.get(ctx.key(ctx.daddr, ctx.packet.protocol, ctx.dport, slot)) for slot in range(slots)]
    if not any(found):
        return None
    if not all(found):
        raise TraceError(f"slots missing in the endpoint map for {ctx.daddr} {ctx.packet.protocol}/{ctx.dport}")
    for value in found:
        ip, _, port = str(value).rpartition(" . ")
        ctx.targets.append((ip, int(port)))
    return "accept"


def _vmap(ctx: _Ctx, verdict: str | None, depth: int) -> str | None:
    if verdict is None:
        return None
    return _statement(ctx, verdict, depth)


def trace(ruleset: Ruleset, packet: Packet, node_ips: Sequence[str]) -> TraceResult:
    local = frozenset(node_ips)
    host_originated = packet.source in local
    ctx = _Ctx(packet=packet, node_ips=local, ruleset=ruleset, daddr=packet.destination, dport=packet.port)

    # Filter before DNAT (loadBalancerSourceRanges), on the original destination.
    if _run_chain(ctx, "filter-output-pre-dnat" if host_originated else "filter-prerouting-pre-dnat") == "drop":
        return TraceResult(DROP, False, tuple(ctx.matched))
    _run_chain(ctx, "nat-output" if host_originated else "nat-prerouting")
    targets = sorted(set(ctx.targets), key=lambda t: (ipaddress.ip_address(t[0]), t[1]))
    if targets:
        ctx.dnatted = True
    # Filter runs on the (possibly translated) packet; check one representative destination per
    # target, since all targets of one dispatch share their filter outcome (none is a local IP).
    dests = targets or [(packet.destination, packet.port)]
    masq = False
    for ip, port in dests:
        ctx.daddr, ctx.dport = ip, port
        hooks = ["filter-output"] if host_originated else []
        hooks.append("filter-input" if ip in local else ("filter-forward" if not host_originated else ""))
        for hook in filter(None, hooks):
            verdict = _run_chain(ctx, hook)
            if verdict in ("reject", "drop"):
                return TraceResult(REJECT if verdict == "reject" else DROP, False, tuple(ctx.matched))
        saved_mark = ctx.mark
        if _run_chain(ctx, "nat-postrouting") == "masquerade":
            masq = True
        ctx.mark = saved_mark
    output = ", ".join(target_text(ip, port) for ip, port in targets)
    return TraceResult(output, masq, tuple(ctx.matched))
