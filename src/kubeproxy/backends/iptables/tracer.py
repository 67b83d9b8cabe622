"""Packet tracer for iptables mode: interprets exactly the rule shapes our renderer emits.

``trace(ruleset, packet, node_ips)`` walks a NEW connection's first packet through the filter and
nat tables the way netfilter orders iptables' hooks, and answers with the same ``TraceResult`` as
the nftables tracer (which endpoints it may reach, every branch of a random choice followed, or
REJECT/DROP, and whether it is masqueraded), so one packet-flow table proves both backends.

Walk (netfilter's hook order; nat sees only a connection's first packet):
- host-originated (the source is local): nat OUTPUT -> DNAT -> filter OUTPUT -> filter INPUT if
  the translated destination is local, else nat POSTROUTING;
- otherwise: nat PREROUTING -> DNAT -> filter INPUT if the translated destination is local, else
  filter FORWARD -> nat POSTROUTING. A packet delivered locally is never masqueraded.
"Local" is a node IP or a loopback address (the kernel's RTN_LOCAL, which ``addrtype LOCAL`` tests).
Filter chains run on the translated packet, once per DNAT target; a missing built-in chain has no
rules (policy ACCEPT).

Each rule is tokenized (``shlex``, as iptables-restore reads quoted comments) and every option goes
to its handler; an option, module, target or combination not listed here is a ``TraceError`` that
names the rule, never skipped: a tracer that guesses proves nothing. Checks iptables-restore or the
kernel would make are errors too (a ``-m tcp`` without ``-p tcp``, DNAT outside nat
PREROUTING/OUTPUT, an address of the other family), so a renderer bug cannot hide behind a trace.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kubeproxy.backends.trace import DROP, REJECT, Packet, TraceError, TraceResult, target_text
from kubeproxy.model.service import IPFamily

__all__ = ["DROP", "REJECT", "IptRulesetLike", "Packet", "TraceError", "TraceResult", "trace"]

_Addr = ipaddress.IPv4Address | ipaddress.IPv6Address
_Net = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_JUMP_DEPTH = 32
_LOOPBACK: tuple[_Net, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_PROTOCOLS = frozenset({"tcp", "udp", "sctp"})
_BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
NAT, FILTER = "nat", "filter"
# (host-originated, translated destination local) -> the filter hooks the packet meets, in order.
_FILTER_HOOKS: Mapping[tuple[bool, bool], tuple[str, ...]] = {
    (True, True): ("OUTPUT", "INPUT"),
    (True, False): ("OUTPUT",),
    (False, True): ("INPUT",),
    (False, False): ("FORWARD",),
}


class IptRulesetLike(Protocol):
    """What the tracer reads from ``iptables.render.IptRuleset`` (kept structural: no import cycle).

    ``tables``: "filter"/"nat" -> chain name -> rules, each the text after ``-A CHAIN``.
    """

    @property
    def family(self) -> IPFamily: ...

    @property
    def tables(self) -> Mapping[str, Mapping[str, Sequence[str]]]: ...


class _Verdict(enum.Enum):
    ACCEPT = "accept"  # ends the hook's traversal (also DNAT: the nat hook is done)
    DROP = "drop"
    REJECT = "reject"
    RETURN = "return"  # back to the calling chain; in a built-in chain: the policy (ACCEPT)
    MASQUERADE = "masquerade"


class _Kind(enum.Enum):
    JUMP = "jump"
    ACCEPT = "ACCEPT"
    DROP = "DROP"
    REJECT = "REJECT"
    RETURN = "RETURN"
    MARK_OR = "MARK --or-mark"
    MARK_XOR = "MARK --xor-mark"
    DNAT = "DNAT"
    MASQUERADE = "MASQUERADE"


@dataclass(frozen=True, slots=True)
class _Target:
    kind: _Kind
    chain: str = ""  # JUMP
    value: int = 0  # MARK_OR / MARK_XOR
    address: _Addr | None = None  # DNAT
    port: int = 0  # DNAT


@dataclass
class _Ctx:
    """One trace's mutable state: the packet as the current hook sees it."""

    packet: Packet
    family: IPFamily
    tables: Mapping[str, Mapping[str, Sequence[str]]]
    node_ips: frozenset[_Addr]
    saddr: _Addr
    daddr: _Addr
    dport: int
    host_originated: bool
    table: str = NAT
    hook: str = ""
    mark: int = 0
    dnatted: bool = False
    branch_depth: int = 0
    main_path_dnatted: bool = False
    # (address, port, mark at the moment of DNAT): the mark differs per target (hairpin).
    targets: list[tuple[_Addr, int, int]] = field(default_factory=list)
    matched: list[str] = field(default_factory=list)

    def is_local(self, addr: _Addr) -> bool:
        return _is_local(addr, self.node_ips)

    def input_interface(self) -> str:
        # The kernel gives iptables no input device in OUTPUT and POSTROUTING (matched as ""), and
        # a host-originated packet delivered locally enters INPUT through lo.
        if self.hook in ("OUTPUT", "POSTROUTING"):
            return ""
        if self.host_originated:
            return "lo"
        if self.packet.iif is None:
            raise TraceError("the rule matches the input interface; the packet does not say it (Packet.iif)")
        return self.packet.iif


def _is_local(addr: _Addr, node_ips: frozenset[_Addr]) -> bool:
    # The kernel routes all of 127.0.0.0/8 and ::1 locally (RTN_LOCAL), like the node's own IPs.
    return addr in node_ips or any(addr in net for net in _LOOPBACK)


_Pred = Callable[[_Ctx], bool]


@dataclass(frozen=True, slots=True)
class _Rule:
    matches: tuple[_Pred, ...]
    random: bool  # a statistic match with 0 < probability < 1: a branch, followed both ways
    target: _Target | None  # None: no -j (a comment-only rule)


# --- parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _OptSpec:
    takes_value: bool
    negatable: bool = False


_MODULE_OPTIONS: Mapping[str, Mapping[str, _OptSpec]] = {
    "comment": {"--comment": _OptSpec(True)},
    "tcp": {"--dport": _OptSpec(True)},
    "udp": {"--dport": _OptSpec(True)},
    "sctp": {"--dport": _OptSpec(True)},
    "addrtype": {"--dst-type": _OptSpec(True), "--src-type": _OptSpec(True)},
    "statistic": {"--mode": _OptSpec(True), "--probability": _OptSpec(True)},
    "recent": {
        "--name": _OptSpec(True),
        "--rcheck": _OptSpec(False),
        "--seconds": _OptSpec(True),
        "--reap": _OptSpec(False),
        "--set": _OptSpec(False),
    },
    "conntrack": {"--ctstate": _OptSpec(True, negatable=True)},
    "mark": {"--mark": _OptSpec(True, negatable=True)},
}
# Conntrack states the tracer can answer for a NEW connection's first packet (DNAT: after nat).
_CT_STATES = frozenset({"NEW", "ESTABLISHED", "RELATED", "INVALID", "DNAT"})


@dataclass
class _Module:
    name: str
    options: dict[str, tuple[bool, str]] = field(default_factory=dict)  # option -> (negated, value)


def _network(value: str, family: IPFamily) -> _Net:
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise TraceError(f"not an address or CIDR: {value!r}") from exc
    if net.version != family.value:
        raise TraceError(f"{value} is not an IPv{family.value} address (iptables-restore would refuse it)")
    return net


def _number(value: str, what: str, low: int, high: int, base: int = 10) -> int:
    try:
        n = int(value, base)
    except ValueError as exc:
        raise TraceError(f"{what} is not a number: {value!r}") from exc
    if not low <= n <= high:
        raise TraceError(f"{what} out of range: {value!r}")
    return n


class _Parser:
    def __init__(self, rule: str, family: IPFamily, table: str) -> None:
        try:
            self.tokens = shlex.split(rule)
        except ValueError as exc:
            raise TraceError(f"cannot tokenize: {exc}") from exc
        self.family, self.table, self.pos = family, table, 0
        self.matches: list[_Pred] = []
        self.generic: set[str] = set()
        self.modules: list[_Module] = []
        self.protocol: str | None = None

    def take(self, after: str) -> str:
        if self.pos >= len(self.tokens):
            raise TraceError(f"{after} needs a value")
        self.pos += 1
        return self.tokens[self.pos - 1]

    def parse(self) -> _Rule:
        target: _Target | None = None
        while self.pos < len(self.tokens):
            tok = self.take("")
            negated = tok == "!"
            if negated:
                tok = self.take("!")
            if tok == "-j" and not negated:
                target = self.target(self.take("-j"), self.tokens[self.pos :])
                break
            handler = _GENERIC.get(tok)
            if handler is not None:
                if tok in self.generic:
                    raise TraceError(f"{tok} given twice (iptables refuses it)")
                if tok != "-m":
                    self.generic.add(tok)
                handler(self, negated)
            elif tok.startswith("--"):
                self.module_option(tok, negated)
            else:
                raise TraceError(f"unsupported option {'! ' if negated else ''}{tok!r}")
        random = False
        for module in self.modules:
            if module.name == "statistic":
                probability = _statistic(module)
                if probability == 0:
                    self.matches.append(lambda c: False)
                random = random or 0 < probability < 1
            else:
                pred = self.module_match(module)
                if pred is not None:
                    self.matches.append(pred)
        return _Rule(tuple(self.matches), random, target)

    # Generic (ip header) matches -------------------------------------------------------------

    def opt_protocol(self, negated: bool) -> None:
        proto = self.take("-p")
        if negated or proto not in _PROTOCOLS:
            raise TraceError(f"unsupported protocol match {'! ' if negated else ''}-p {proto}")
        self.protocol = proto
        self.matches.append(lambda c: c.packet.protocol == proto)

    def opt_source(self, negated: bool) -> None:
        net = _network(self.take("-s"), self.family)
        self.matches.append(lambda c: (c.saddr in net) != negated)

    def opt_destination(self, negated: bool) -> None:
        net = _network(self.take("-d"), self.family)
        self.matches.append(lambda c: (c.daddr in net) != negated)

    def opt_in_interface(self, negated: bool) -> None:
        name = self.take("-i")
        prefix = name.endswith("+")
        stem = name.removesuffix("+")
        if not stem or "+" in stem:
            raise TraceError(f"bad interface name {name!r}")

        def match(c: _Ctx) -> bool:
            iif = c.input_interface()
            return (iif.startswith(stem) if prefix else iif == stem) != negated

        self.matches.append(match)

    # Extension (-m) matches ------------------------------------------------------------------

    def opt_module(self, negated: bool) -> None:
        name = self.take("-m")
        if negated or name not in _MODULE_OPTIONS:
            raise TraceError(f"unsupported match module {'! ' if negated else ''}-m {name}")
        self.modules.append(_Module(name))

    def module_option(self, option: str, negated: bool) -> None:
        # iptables hands an option to a loaded module that knows it; the latest instance wins.
        module = next((m for m in reversed(self.modules) if option in _MODULE_OPTIONS[m.name]), None)
        if module is None:
            raise TraceError(f"unsupported option {option!r} (or its -m module is not loaded before it)")
        spec = _MODULE_OPTIONS[module.name][option]
        if negated and not spec.negatable:
            raise TraceError(f"unsupported negation ! {option}")
        if option in module.options:
            raise TraceError(f"{option} given twice")
        module.options[option] = (negated, self.take(option) if spec.takes_value else "")

    def module_match(self, module: _Module) -> _Pred | None:
        opts = module.options
        keys = set(opts)

        def value(option: str) -> str:
            return opts[option][1]

        match module.name:
            case "comment":
                if keys != {"--comment"}:
                    raise TraceError("-m comment needs --comment")
                return None
            case "tcp" | "udp" | "sctp":
                # The kernel refuses a tcp/udp/sctp match on any other protocol.
                if self.protocol != module.name:
                    raise TraceError(f"-m {module.name} needs -p {module.name}")
                if not keys:
                    return None
                port = _number(value("--dport"), "--dport", 1, 65535)
                return lambda c: c.dport == port
            case "addrtype":
                if len(keys) != 1 or value(next(iter(keys))) != "LOCAL":
                    raise TraceError("unsupported addrtype match (only --dst-type LOCAL or --src-type LOCAL)")
                if "--dst-type" in keys:
                    return lambda c: c.is_local(c.daddr)
                return lambda c: c.is_local(c.saddr)
            case "recent":
                return _recent(module)
            case "conntrack":
                if keys != {"--ctstate"}:
                    raise TraceError("-m conntrack needs --ctstate")
                negated, text = opts["--ctstate"]
                states = frozenset(text.split(","))
                if not states <= _CT_STATES:
                    raise TraceError(f"unsupported --ctstate {text}")
                # A NEW connection's first packet: NEW, plus DNAT once nat has translated it.
                return lambda c: bool(states & ({"NEW", "DNAT"} if c.dnatted else {"NEW"})) != negated
            case "mark":
                if keys != {"--mark"}:
                    raise TraceError("-m mark needs --mark")
                negated, text = opts["--mark"]
                want_text, _, mask_text = text.partition("/")
                want = _number(want_text, "--mark", 0, 0xFFFFFFFF, base=0)
                mask = _number(mask_text, "--mark mask", 0, 0xFFFFFFFF, base=0) if mask_text else 0xFFFFFFFF
                return lambda c: ((c.mark & mask) == want) != negated
        raise TraceError(f"unsupported match module -m {module.name}")  # pragma: no cover

    # Targets -------------------------------------------------------------------------------

    def target(self, name: str, args: Sequence[str]) -> _Target:
        def arguments(*allowed: tuple[str, ...]) -> None:
            if tuple(args) not in allowed:
                raise TraceError(f"unsupported arguments for -j {name}: {' '.join(args)!r}")

        match name:
            case "ACCEPT" | "RETURN":
                arguments(())
                return _Target(_Kind(name))
            case "DROP" | "REJECT":
                arguments(())
                if self.table != FILTER:
                    raise TraceError(f"-j {name} outside the filter table (iptables refuses it)")
                return _Target(_Kind(name))
            case "MARK":
                if len(args) != 2 or args[0] not in ("--or-mark", "--xor-mark"):
                    raise TraceError(f"unsupported arguments for -j MARK: {' '.join(args)!r}")
                kind = _Kind.MARK_OR if args[0] == "--or-mark" else _Kind.MARK_XOR
                return _Target(kind, value=_number(args[1], args[0], 0, 0xFFFFFFFF, base=0))
            case "MASQUERADE":
                arguments((), ("--random-fully",))
                self.require_table(name)
                return _Target(_Kind.MASQUERADE)
            case "DNAT":
                if len(args) != 2 or args[0] != "--to-destination":
                    raise TraceError(f"unsupported arguments for -j DNAT: {' '.join(args)!r}")
                self.require_table(name)
                if self.protocol is None:
                    raise TraceError("DNAT to a port needs -p tcp|udp|sctp (the kernel refuses it)")
                address, port = self.dnat_destination(args[1])
                return _Target(_Kind.DNAT, address=address, port=port)
        arguments(())
        if name in _BUILTIN_CHAINS:
            raise TraceError(f"-j {name}: cannot jump to a built-in chain")
        return _Target(_Kind.JUMP, chain=name)

    def require_table(self, name: str) -> None:
        if self.table != NAT:
            raise TraceError(f"-j {name} outside the nat table (iptables refuses it)")

    def dnat_destination(self, text: str) -> tuple[_Addr, int]:
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
        else:
            host, sep, port = text.partition(":")
            if ":" in port:
                sep = ""
        if not sep:
            raise TraceError(f"unsupported --to-destination {text!r} (want IP:PORT or [IPv6]:PORT)")
        try:
            address = ipaddress.ip_address(host)
        except ValueError as exc:
            raise TraceError(f"unsupported --to-destination {text!r}") from exc
        if address.version != self.family.value or (address.version == 6) != text.startswith("["):
            raise TraceError(f"--to-destination {text!r} does not fit an IPv{self.family.value} ruleset")
        return address, _number(port, "--to-destination port", 1, 65535)


_GENERIC: Mapping[str, Callable[[_Parser, bool], None]] = {
    "-p": _Parser.opt_protocol,
    "-s": _Parser.opt_source,
    "-d": _Parser.opt_destination,
    "-i": _Parser.opt_in_interface,
    "-m": _Parser.opt_module,
}


def _statistic(module: _Module) -> float:
    opts = module.options
    if set(opts) != {"--mode", "--probability"} or opts["--mode"][1] != "random":
        raise TraceError("unsupported statistic match (only --mode random --probability P)")
    text = opts["--probability"][1]
    try:
        probability = float(text)
    except ValueError as exc:
        raise TraceError(f"--probability is not a number: {text!r}") from exc
    if not 0 <= probability <= 1:
        raise TraceError(f"--probability out of range: {text!r}")
    return probability


def _recent(module: _Module) -> _Pred | None:
    opts = module.options
    if "--name" not in opts:
        raise TraceError("-m recent needs --name")
    rest = set(opts) - {"--name"}
    if rest == {"--set"}:
        return None  # remembers the client for its next connection; no effect on this packet
    if rest in ({"--rcheck", "--seconds"}, {"--rcheck", "--seconds", "--reap"}):
        _number(opts["--seconds"][1], "--seconds", 1, 2**32 - 1)
        return lambda c: False  # a first connection: the list has no entry for this client yet
    raise TraceError(f"unsupported recent match ({' '.join(sorted(rest))})")


@functools.lru_cache(maxsize=16384)
def _parse(rule: str, family: IPFamily, table: str) -> _Rule:
    return _Parser(rule, family, table).parse()


# --- evaluation -------------------------------------------------------------------------------


def _run_chain(ctx: _Ctx, chain: str, rules: Sequence[str], depth: int) -> _Verdict | None:
    """Evaluate one chain: a terminal verdict, or None when it ran off its end or RETURNed."""
    for rule in rules:
        where = f"{ctx.table} {chain}: {rule}"
        try:
            parsed = _parse(rule, ctx.family, ctx.table)
            if not all(match(ctx) for match in parsed.matches):
                continue
        except TraceError as exc:
            raise TraceError(f"{where}: {exc}") from exc
        ctx.matched.append(where)
        if parsed.random:
            _branch(ctx, parsed, depth, where)
            continue
        verdict = _execute(ctx, parsed, depth, where)
        if verdict is _Verdict.RETURN:
            return None
        if verdict is not None:
            return verdict
    return None


def _branch(ctx: _Ctx, rule: _Rule, depth: int, where: str) -> None:
    """A random branch: follow it, keep the targets it reaches, then go on as if it had not fired."""
    mark, reached = ctx.mark, len(ctx.targets)
    ctx.branch_depth += 1
    try:
        verdict = _execute(ctx, rule, depth, where)
    finally:
        ctx.branch_depth -= 1
    mark_changed, ctx.mark = ctx.mark != mark, mark
    if verdict is _Verdict.ACCEPT and len(ctx.targets) > reached:
        return  # DNATed: one more possible target
    if verdict in (None, _Verdict.RETURN) and not mark_changed:
        return  # came back untouched: those packets go on exactly like the others
    # Some packets would end differently (dropped, accepted untranslated, marked and continued):
    # a TraceResult cannot say "sometimes".
    raise TraceError(f"{where}: a random branch whose outcome the tracer cannot express ({verdict})")


def _execute(ctx: _Ctx, rule: _Rule, depth: int, where: str) -> _Verdict | None:
    target = rule.target
    if target is None:
        return None
    match target.kind:
        case _Kind.JUMP:
            if depth + 1 > MAX_JUMP_DEPTH:
                raise TraceError(f"{where}: jump depth exceeds {MAX_JUMP_DEPTH} (a loop?)")
            rules = ctx.tables.get(ctx.table, {}).get(target.chain)
            if rules is None:
                raise TraceError(f"{where}: jump to unknown chain {ctx.table} {target.chain}")
            return _run_chain(ctx, target.chain, rules, depth + 1)
        case _Kind.ACCEPT:
            return _Verdict.ACCEPT
        case _Kind.DROP:
            return _Verdict.DROP
        case _Kind.REJECT:
            return _Verdict.REJECT
        case _Kind.RETURN:
            return _Verdict.RETURN
        case _Kind.MARK_OR:
            ctx.mark |= target.value
            return None
        case _Kind.MARK_XOR:
            ctx.mark ^= target.value
            return None
        case _Kind.DNAT:
            if ctx.hook not in ("PREROUTING", "OUTPUT"):
                raise TraceError(f"{where}: DNAT reached from nat {ctx.hook} (valid in PREROUTING and OUTPUT only)")
            assert target.address is not None
            ctx.targets.append((target.address, target.port, ctx.mark))
            if ctx.branch_depth == 0:
                ctx.main_path_dnatted = True
            return _Verdict.ACCEPT
        case _Kind.MASQUERADE:
            if ctx.hook != "POSTROUTING":
                raise TraceError(f"{where}: MASQUERADE reached from nat {ctx.hook} (valid in POSTROUTING only)")
            return _Verdict.MASQUERADE
    raise TraceError(f"{where}: unsupported target")  # pragma: no cover


def _walk(ctx: _Ctx, table: str, hook: str) -> _Verdict | None:
    """Run a built-in chain; a chain the ruleset does not have holds no rules (policy ACCEPT)."""
    ctx.table, ctx.hook = table, hook
    rules = ctx.tables.get(table, {}).get(hook)
    return None if rules is None else _run_chain(ctx, hook, rules, 0)


def _address(text: str, family: IPFamily, what: str) -> _Addr:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError as exc:
        raise TraceError(f"packet {what} is not an IP address: {text!r}") from exc
    if addr.version != family.value:
        raise TraceError(f"packet {what} {text} is not IPv{family.value}: trace it through the other family's rules")
    return addr


def trace(ruleset: IptRulesetLike, packet: Packet, node_ips: Sequence[str]) -> TraceResult:
    """Follow ``packet`` (a NEW connection's first packet) through ``ruleset``.

    ``node_ips`` are the node's own addresses (any family; only the ruleset's family can match).
    Returns the reachable endpoints "ip:port, ..." sorted by address then port, REJECT or DROP,
    or "" when the packet is not translated (and not dropped); ``masquerade`` is True if any
    target is masqueraded; ``matched`` lists every matching rule as "TABLE CHAIN: rule".
    Raises ``TraceError`` on any rule shape outside the documented set.
    """
    family = ruleset.family
    if packet.protocol not in _PROTOCOLS:
        raise TraceError(f"packet protocol {packet.protocol!r} is not tcp, udp or sctp")
    saddr = _address(packet.source, family, "source")
    daddr = _address(packet.destination, family, "destination")
    nodes = frozenset(ipaddress.ip_address(ip) for ip in node_ips)
    host = _is_local(saddr, nodes)
    ctx = _Ctx(
        packet=packet,
        family=family,
        tables=ruleset.tables,
        node_ips=nodes,
        saddr=saddr,
        daddr=daddr,
        dport=packet.port,
        host_originated=host,
    )

    _walk(ctx, NAT, "OUTPUT" if host else "PREROUTING")
    if ctx.targets and not ctx.main_path_dnatted:
        raise TraceError("some random branches DNAT the packet but the rest leave it untranslated")
    ctx.dnatted = bool(ctx.targets)
    # One pass through filter (and nat POSTROUTING) per translated packet, with the mark it had
    # when it was DNATed: hairpin masquerading differs per target.
    passes = sorted(set(ctx.targets)) or [(daddr, packet.port, ctx.mark)]
    masquerade = False
    for address, port, mark in passes:
        ctx.daddr, ctx.dport, ctx.mark = address, port, mark
        local = ctx.is_local(address)
        for hook in _FILTER_HOOKS[host, local]:
            verdict = _walk(ctx, FILTER, hook)
            if verdict in (_Verdict.DROP, _Verdict.REJECT):
                return TraceResult(REJECT if verdict is _Verdict.REJECT else DROP, False, tuple(ctx.matched))
        if not local and _walk(ctx, NAT, "POSTROUTING") is _Verdict.MASQUERADE:
            masquerade = True
    endpoints = sorted({(address, port) for address, port, _ in ctx.targets})
    output = ", ".join(target_text(str(address), port) for address, port in endpoints)
    return TraceResult(output, masquerade, tuple(ctx.matched))
