"""iptables kernel boundary: feed ``iptables-restore --noflush``, read a table back with ``iptables-save``.

``IptablesCli`` pipes text to ``{ip,ip6}tables-<mode>-restore --noflush`` (how upstream kube-proxy
programs the kernel) and reads state with ``{ip,ip6}tables-<mode>-save -t TABLE``; the binary names
the backend explicitly (``-nft`` or ``-legacy``, DESIGN.md section 3) and :func:`detect_mode` picks it
the way upstream's iptables-wrappers do. With ``netns`` set, every call runs inside that network
namespace (``ip netns exec``); netfilter state is per namespace, so the lab never touches the host's.

``FakeIptables`` models the tables (chains, their rules and the built-in chains' policies) for the
restore subset our renderer emits and rejects what the kernel rejects. Everything here raises
``IptablesError`` (a ``KernelError``) and nothing else.

Kernel behaviour both implementations keep (measured with iptables 1.8.9, both backends, in a
namespace; kernel 6.18):

- Each ``*table ... COMMIT`` block is one transaction: an error anywhere in a block applies nothing
  of that block, but blocks committed earlier in the same input STAY applied. A restore of filter
  then nat that fails in nat has changed filter; the caller must treat a failed restore as "kernel
  state unknown" (upstream forces a full resync) and never assume the whole input was refused.
- ``:CHAIN - [0:0]`` creates a user chain or FLUSHES it if it exists; ``:BUILTIN POLICY [0:0]``
  only sets the policy (with ``--noflush`` a built-in chain keeps its rules).
- A ``-j``/``-g`` target must be a standard target or a user chain that exists when the rule line
  is read: a chain declared further down the block does not count (both backends refuse it).
- ``-X`` refuses a built-in chain, a missing chain, a chain still referenced by a rule, and a chain
  that still has rules.

Where the fake is deliberately simpler than the kernel:

- It stores rule text exactly as given. ``*-save`` prints rules normalised: ``-s``/``-d`` first with
  a prefix length (``-d 10.0.0.1`` -> ``-d 10.0.0.1/32``, ``/128`` for IPv6), then ``-p``, then the
  matches in the order given; a comment is double-quoted unless it is only ``[A-Za-z0-9._-]``;
  ``--probability 0.5000000000`` -> ``0.50000000000``; ``recent`` options reordered with
  ``--mask 255.255.255.255`` added; ``MARK --or-mark 0x4000`` -> ``--set-xmark 0x4000/0x4000``;
  ``REJECT`` gains ``--reject-with icmp-port-unreachable``. Code that compares against save output
  must not rely on exact text.
- ``-D CHAIN rule`` matches the stored text literally (the kernel compares the parsed rule).
- It accepts ``-I CHAIN N`` and ``-D`` on rules added earlier in the same input; iptables-nft 1.8.9
  refuses both ("RULE_INSERT/RULE_DELETE failed (No such file or directory)"), legacy accepts them.
  Renderers must not emit them for rules they add in the same restore.
- A table exists once a restore has named it; ``iptables-save -t`` on a real host prints the
  built-in chains of a known table even when nothing was ever written to it.
"""

from __future__ import annotations

import copy
import enum
import logging
import math
import os
import re
import resource
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from kubeproxy.kernel.binaries import find, netns_exec
from kubeproxy.kernel.errors import KernelError
from kubeproxy.model.service import IPFamily

log = logging.getLogger("kubeproxy.iptables")

__all__ = [
    "BUILTIN_CHAINS",
    "MODE_ENV",
    "STANDARD_TARGETS",
    "TABLES",
    "FakeIptables",
    "Iptables",
    "IptablesCli",
    "IptablesError",
    "IptablesMode",
    "available_modes",
    "decide_mode",
    "detect_mode",
    "parse_save",
    "tool_name",
]


class IptablesError(KernelError):
    """An iptables call failed; ``returncode``/``stderr`` are set when a binary ran and refused."""

    def __init__(self, message: str, *, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


class IptablesMode(enum.Enum):
    """Which iptables backend the host uses: nf_tables (``iptables-nft``) or x_tables (``-legacy``)."""

    NFT = "nft"
    LEGACY = "legacy"


TABLES = ("filter", "nat", "mangle")  # not exhaustive; the ones kube-proxy writes or reads

BUILTIN_CHAINS: Mapping[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}

# Targets the fake accepts without a chain of that name (the kernel has many more extensions).
STANDARD_TARGETS = frozenset(
    {"ACCEPT", "DROP", "REJECT", "RETURN", "MARK", "MASQUERADE", "DNAT", "SNAT", "LOG", "CONNMARK"}
)

# Override of the detected backend, for hosts where the heuristic guesses wrong.
MODE_ENV = "KUBE_PROXY_IPTABLES_MODE"

# Chains kubelet (>= 1.17) creates in mangle; their presence names the backend the host uses
# (kubernetes-sigs/iptables-wrappers pkg/xtables/detect.go).
_HINT = re.compile(r"^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY)\b", re.MULTILINE)


class Iptables(Protocol):
    mode: IptablesMode

    def restore(self, family: IPFamily, text: str) -> None:
        """``{ip,ip6}tables-<mode>-restore --noflush`` with ``text`` on stdin.

        One call; the kernel applies each table's COMMIT block atomically. Raises ``IptablesError``
        with the exit code and stderr (first 4000 characters) on failure.
        """

    def save(self, family: IPFamily, table: str) -> str:
        """``{ip,ip6}tables-<mode>-save -t <table>`` output; "" when the table does not exist."""

    def chains(self, family: IPFamily, table: str) -> dict[str, list[str]]:
        """Every chain (built-in and user) -> its rules, each the text after ``-A CHAIN`` as save
        printed it. Empty when the table does not exist."""


def tool_name(family: IPFamily, mode: IptablesMode, tool: str = "") -> str:
    """``iptables-nft-restore`` and friends: the binary name for ``tool`` ("", "save", "restore")."""
    base = f"{'ip' if family is IPFamily.V4 else 'ip6'}tables-{mode.value}"
    return f"{base}-{tool}" if tool else base


def parse_save(text: str, table: str | None = None) -> dict[str, list[str]]:
    """Chains and rules of ``iptables-save`` output: chain -> rule texts (after ``-A CHAIN``).

    With ``table``, only that ``*table`` block is read; chains appear in the order save declared
    them (built-ins first, then user chains sorted by name).
    """
    chains: dict[str, list[str]] = {}
    current: str | None = None
    for raw in text.splitlines():
        line = raw.rstrip("\n")
        if line.startswith("*"):
            current = line[1:].strip()
            continue
        if line == "COMMIT":
            current = None
            continue
        if table is not None and current != table:
            continue
        if line.startswith(":"):
            chains.setdefault(line[1:].split(maxsplit=1)[0], [])
        elif line.startswith("-A "):
            name, _, rule = line[3:].partition(" ")
            chains.setdefault(name, []).append(rule)
    return chains


def raise_stack_limit_for_children() -> None:
    """Let the save/restore children use as much stack as the hard limit allows.

    ``iptables-nft-save -t nat`` recurses while it prints a big table: at 10k Services x 10 endpoints
    (~323k rules, ~111k chains) it overflows the default 8 MiB stack and dies of SIGSEGV after ~90 s,
    printing nothing (measured here with iptables 1.8.9; Azure NPM hit the same at ~20k rules). With
    the stack unlimited it completes. Children inherit our soft limit, so raise it to the hard limit
    once (no privilege needed; root's hard limit is unlimited). glibc sized this process's thread
    stacks at startup, so our own threads are unaffected.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the stack limit for iptables-save error=%r", str(exc))


class IptablesCli:
    """The real backend: ``{ip,ip6}tables-<mode>-{restore,save}``, optionally inside a namespace."""

    def __init__(self, mode: IptablesMode, *, netns: str | None = None, timeout: float = 300, wait: float = 5) -> None:
        raise_stack_limit_for_children()
        self.mode = mode
        self.netns = netns
        self._prefix = netns_exec(netns)
        self._timeout = timeout
        self._wait = wait

    def binary(self, family: IPFamily, tool: str = "") -> str:
        """Path of ``{ip,ip6}tables-<mode>[-tool]`` (its bare name when not installed: running it fails)."""
        name = tool_name(family, self.mode, tool)
        return find(name) or name

    def _exec(self, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        full = [*self._prefix, *argv]
        try:
            return subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=self._timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise IptablesError(f"cannot run {' '.join(full)}: {exc}") from exc

    def restore(self, family: IPFamily, text: str) -> None:
        argv = [self.binary(family, "restore"), "--noflush"]
        if self.mode is IptablesMode.LEGACY and self._wait > 0:
            # Legacy restore takes the xtables lock (/run/xtables.lock) and fails at once when another
            # writer holds it, unless told to wait. iptables-nft has no lock (1.8.9 accepts and ignores -w).
            argv += ["-w", str(math.ceil(self._wait))]
        proc = self._exec(argv, stdin=text)
        if proc.returncode != 0:
            stderr = proc.stderr.strip()[:4000]
            raise IptablesError(
                f"{tool_name(family, self.mode, 'restore')} --noflush failed (exit {proc.returncode}): {stderr}",
                returncode=proc.returncode,
                stderr=stderr,
            )

    def save(self, family: IPFamily, table: str) -> str:
        if self.mode is IptablesMode.LEGACY and table not in self._legacy_tables(family):
            # iptables-legacy-save -t TABLE would make the kernel instantiate TABLE in this namespace
            # (a cleanup or a check must not create what it looks for).
            return ""
        proc = self._exec([self.binary(family, "save"), "-t", table])
        if proc.returncode != 0:
            # nft: "Table `x' does not exist"; legacy: "Cannot initialize: Table does not exist ...".
            if "does not exist" in proc.stderr:
                return ""
            stderr = proc.stderr.strip()[:4000]
            raise IptablesError(
                f"{tool_name(family, self.mode, 'save')} -t {table} failed (exit {proc.returncode}): {stderr}",
                returncode=proc.returncode,
                stderr=stderr,
            )
        return proc.stdout

    def chains(self, family: IPFamily, table: str) -> dict[str, list[str]]:
        return parse_save(self.save(family, table), table)

    def _legacy_tables(self, family: IPFamily) -> set[str]:
        """The legacy (x_tables) tables the kernel has instantiated in this namespace."""
        names = "/proc/net/ip6_tables_names" if family is IPFamily.V6 else "/proc/net/ip_tables_names"
        proc = self._exec(["cat", names])
        return set(proc.stdout.split()) if proc.returncode == 0 else set()


# --------------------------------------------------------------------------------------------
# Backend detection


def available_modes() -> list[IptablesMode]:
    """Backends whose IPv4 restore and save binaries are installed (NFT first)."""
    return [
        mode
        for mode in IptablesMode
        if find(tool_name(IPFamily.V4, mode, "restore")) and find(tool_name(IPFamily.V4, mode, "save"))
    ]


def _probe(netns: str | None, name: str, args: list[str]) -> str:
    """stdout of one save used for detection; "" when the binary is missing or fails (best effort)."""
    path = find(name)
    if path is None:
        return ""
    argv = [*(netns_exec(netns)), path, *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("iptables backend probe failed command=%r error=%r", " ".join(argv), str(exc))
        return ""
    return proc.stdout if proc.returncode == 0 else ""


def _has_hint(outputs: list[str]) -> bool:
    return any(_HINT.search(text) for text in outputs)


def _rule_lines(outputs: list[str]) -> int:
    return sum(1 for text in outputs for line in text.splitlines() if line.startswith("-"))


def decide_mode(*, nft_mangle: list[str], legacy_saves: list[str], nft_saves: list[str]) -> tuple[IptablesMode, str]:
    """The wrapper's decision over save outputs (pure): the mode and a reason for the log.

    ``nft_mangle``: ``{ip,ip6}tables-nft-save -t mangle``; ``legacy_saves``: ``{ip,ip6}tables-legacy-save``
    (all tables: ``-t mangle`` would create the legacy table); ``nft_saves``: ``{ip,ip6}tables-nft-save``.
    """
    if _has_hint(nft_mangle):
        return IptablesMode.NFT, "kubelet-hint-chain-in-nft"
    if _has_hint(legacy_saves):
        return IptablesMode.LEGACY, "kubelet-hint-chain-in-legacy"
    legacy, nft = _rule_lines(legacy_saves), _rule_lines(nft_saves)
    if legacy > nft:
        return IptablesMode.LEGACY, f"more-legacy-rules legacy_rules={legacy} nft_rules={nft}"
    return IptablesMode.NFT, f"default legacy_rules={legacy} nft_rules={nft}"


def detect_mode(*, netns: str | None = None, env: Mapping[str, str] | None = None) -> IptablesMode:
    """The backend this host (or ``netns``) uses, decided like upstream's iptables-wrappers.

    1. ``KUBE_PROXY_IPTABLES_MODE`` = ``nft`` | ``legacy`` wins (empty counts as unset; anything
       else raises); 2. kubelet's hint chain in nft mangle -> NFT, else in legacy -> LEGACY;
    3. more rule lines in the legacy saves than in the nft saves -> LEGACY, else NFT. A backend whose
    binaries are missing counts as empty; neither installed raises ``IptablesError``.
    """
    environ = os.environ if env is None else env
    override = environ.get(MODE_ENV, "").strip()
    if override:
        try:
            mode = IptablesMode(override.lower())
        except ValueError:
            raise IptablesError(f"{MODE_ENV}={override!r} is not one of 'nft', 'legacy'") from None
        log.info("iptables backend detected mode=%s reason=%s", mode.value, f"env-{MODE_ENV}")
        return mode
    families = (IPFamily.V4, IPFamily.V6)
    save_names = {m: [tool_name(f, m, "save") for f in families] for m in IptablesMode}
    if not any(find(name) for names in save_names.values() for name in names):
        raise IptablesError("no iptables backend installed: neither iptables-nft-save nor iptables-legacy-save found")

    # Probe lazily, in the wrapper's order: each later step runs only when the earlier found nothing.
    nft_mangle = [_probe(netns, name, ["-t", "mangle"]) for name in save_names[IptablesMode.NFT]]
    legacy_saves: list[str] = []
    nft_saves: list[str] = []
    if not _has_hint(nft_mangle):
        legacy_saves = [_probe(netns, name, []) for name in save_names[IptablesMode.LEGACY]]
        if not _has_hint(legacy_saves):
            nft_saves = [_probe(netns, name, []) for name in save_names[IptablesMode.NFT]]
    mode, reason = decide_mode(nft_mangle=nft_mangle, legacy_saves=legacy_saves, nft_saves=nft_saves)
    log.info("iptables backend detected mode=%s reason=%s netns=%s", mode.value, reason, netns or "-")
    return mode


# --------------------------------------------------------------------------------------------
# Fake


@dataclass
class _Table:
    name: str
    chains: dict[str, list[str]] = field(default_factory=dict)  # insertion order; built-ins first
    policies: dict[str, str] = field(default_factory=dict)  # built-in chain -> ACCEPT | DROP

    @classmethod
    def fresh(cls, name: str) -> _Table:
        builtins = BUILTIN_CHAINS[name]
        return cls(name, {c: [] for c in builtins}, dict.fromkeys(builtins, "ACCEPT"))

    def is_builtin(self, chain: str) -> bool:
        return chain in self.policies

    def save(self) -> str:
        builtins = [c for c in self.chains if self.is_builtin(c)]
        users = sorted(c for c in self.chains if not self.is_builtin(c))
        out = [f"*{self.name}"]
        out += [f":{c} {self.policies[c]} [0:0]" for c in builtins]
        out += [f":{c} - [0:0]" for c in users]
        for chain in [*builtins, *users]:
            out += [f"-A {chain} {rule}".rstrip() for rule in self.chains[chain]]
        out.append("COMMIT")
        return "\n".join(out) + "\n"


_POLICY_LINE = re.compile(r"^:(?P<chain>\S+)\s+(?P<policy>\S+)(?:\s+\[\d+:\d+\])?$")
_COMMAND = re.compile(r"^(?P<opt>-[A-Za-z]|--[a-z-]+)(?:\s+(?P<chain>\S+))?(?:\s+(?P<rest>.*))?$")
_LONG = {
    "--append": "-A",
    "--insert": "-I",
    "--delete": "-D",
    "--flush": "-F",
    "--delete-chain": "-X",
    "--new-chain": "-N",
    "--policy": "-P",
}


def _targets(rule: str) -> list[tuple[str, str]]:
    """``(option, target)`` for every ``-j``/``-g`` in ``rule`` (shell-like quoting, as restore parses)."""
    try:
        words = shlex.split(rule)
    except ValueError as exc:
        raise IptablesError(f"bad quoting ({exc})") from exc
    found: list[tuple[str, str]] = []
    for i, word in enumerate(words[:-1]):
        if word in ("-j", "--jump"):
            found.append(("-j", words[i + 1]))
        elif word in ("-g", "--goto"):
            found.append(("-g", words[i + 1]))
    return found


class FakeIptables:
    """In-memory model of iptables tables per family, fed by restore text (``--noflush`` semantics)."""

    def __init__(self, mode: IptablesMode = IptablesMode.NFT) -> None:
        self.mode = mode
        self.tables: dict[tuple[IPFamily, str], _Table] = {}
        # Every restore input, in call order, including refused ones (the caller's attempts).
        self.restores: list[tuple[IPFamily, str]] = []
        # When set, the next restore raises IptablesError with this message and changes nothing.
        self.fail_next: str | None = None

    def restore(self, family: IPFamily, text: str) -> None:
        self.restores.append((family, text))
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            raise IptablesError(message, returncode=1, stderr=message)
        work: _Table | None = None
        lineno = 0
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                if line.startswith("*"):
                    if work is not None:
                        raise IptablesError(f"COMMIT expected before {line}")
                    name = line[1:].strip()
                    if name not in BUILTIN_CHAINS:
                        raise IptablesError(f"table {name!r} does not exist")
                    existing = self.tables.get((family, name))
                    work = copy.deepcopy(existing) if existing is not None else _Table.fresh(name)
                elif work is None:
                    raise IptablesError("not inside a *table block")
                elif line == "COMMIT":
                    # Each block is its own transaction, as in the kernel: earlier blocks stay applied.
                    self.tables[(family, work.name)] = work
                    work = None
                elif line.startswith(":"):
                    self._declare(work, line)
                elif line.startswith("-"):
                    self._command(work, line)
                else:
                    raise IptablesError("unknown command")
            except IptablesError as exc:
                raise IptablesError(f"line {lineno}: {exc}: {raw}", returncode=1, stderr=str(exc)) from exc
        if work is not None:
            raise IptablesError(f"line {lineno + 1}: COMMIT expected: *{work.name} block not committed", returncode=1)

    @staticmethod
    def _declare(table: _Table, line: str) -> None:
        m = _POLICY_LINE.match(line)
        if m is None:
            raise IptablesError("bad chain declaration")
        chain, policy = m["chain"], m["policy"]
        if table.is_builtin(chain):
            if policy not in ("ACCEPT", "DROP"):
                raise IptablesError(f"bad policy {policy!r} for built-in chain {chain}")
            table.policies[chain] = policy  # --noflush: a built-in chain keeps its rules
        elif policy != "-":
            raise IptablesError(f"cannot set policy {policy!r} on user chain {chain}")
        else:
            table.chains[chain] = []  # create, or flush an existing chain (keeps its position)

    def _command(self, table: _Table, line: str) -> None:
        m = _COMMAND.match(line)
        if m is None:
            raise IptablesError("cannot parse command")
        opt = _LONG.get(m["opt"], m["opt"])
        chain, rest = m["chain"], (m["rest"] or "").strip()
        if opt == "-F" and chain is None:
            for name in table.chains:
                table.chains[name] = []
            return
        if chain is None:
            raise IptablesError(f"{opt} needs a chain name")
        if opt == "-N":
            if chain in table.chains:
                raise IptablesError(f"chain {chain} already exists")
            table.chains[chain] = []
            return
        if opt == "-P":
            self._declare(table, f":{chain} {rest}")
            return
        if chain not in table.chains:
            raise IptablesError(f"no chain {chain} in table {table.name}")
        rules = table.chains[chain]
        if opt == "-A":
            self._check_targets(table, rest)
            rules.append(rest)
        elif opt == "-I":
            pos_text, _, spec = rest.partition(" ")
            pos, rule = (int(pos_text), spec.strip()) if pos_text.isdigit() else (1, rest)
            if not 1 <= pos <= len(rules) + 1:
                raise IptablesError(f"index {pos} out of range for chain {chain} ({len(rules)} rules)")
            self._check_targets(table, rule)
            rules.insert(pos - 1, rule)
        elif opt == "-D":
            if rest.isdigit():
                if not 1 <= int(rest) <= len(rules):
                    raise IptablesError(f"no rule number {rest} in chain {chain}")
                del rules[int(rest) - 1]
            elif rest in rules:
                rules.remove(rest)
            else:
                raise IptablesError(f"no such rule in chain {chain} (does a matching rule exist?)")
        elif opt == "-F":
            table.chains[chain] = []
        elif opt == "-X":
            if table.is_builtin(chain):
                raise IptablesError(f"cannot delete built-in chain {chain}")
            if rules:
                raise IptablesError(f"chain {chain} is not empty (Device or resource busy)")
            for other, other_rules in table.chains.items():
                if any(target == chain for r in other_rules for _, target in _targets(r)):
                    raise IptablesError(f"chain {chain} is referenced from {other} (Device or resource busy)")
            del table.chains[chain]
        else:
            raise IptablesError(f"unsupported command {m['opt']}")

    @staticmethod
    def _check_targets(table: _Table, rule: str) -> None:
        # The kernel resolves a jump when the rule is read: the chain must exist by then.
        for opt, target in _targets(rule):
            if opt == "-j" and target in STANDARD_TARGETS:
                continue
            if target not in table.chains or table.is_builtin(target):
                what = "goto" if opt == "-g" else "jump"
                raise IptablesError(f"{what} target {target!r} is not a chain in table {table.name}")

    def save(self, family: IPFamily, table: str) -> str:
        t = self.tables.get((family, table))
        return "" if t is None else t.save()

    def chains(self, family: IPFamily, table: str) -> dict[str, list[str]]:
        return parse_save(self.save(family, table), table)

    def dump(self, family: IPFamily) -> str:
        """Every table of ``family`` in save format, tables sorted by name (stable for assertions)."""
        return "".join(
            t.save() for (fam, _), t in sorted(self.tables.items(), key=lambda kv: kv[0][1]) if fam is family
        )
