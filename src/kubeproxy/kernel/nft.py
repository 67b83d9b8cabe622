"""nftables kernel boundary: run one transaction, read a table back, delete a table.

``NftCli`` pipes text to ``nft -f -`` (one atomic transaction: the kernel applies all of it or
nothing) and reads state with ``nft -j list table``; DESIGN.md section 3 has the measurements. With
``netns`` set, every call runs inside that network namespace (``ip netns exec``), which is how the
lab and the benchmarks program a namespace other than the caller's.

``FakeNft`` models the kernel's table state (chains, rules, sets, map elements) for the command
subset our renderer emits, applies transactions atomically, rejects what the kernel rejects
(unknown chain or set, deleting a chain still referenced, deleting a missing element) and can dump
itself as text. Both raise ``NftError`` (a ``KernelError``) and nothing else.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubeproxy.kernel.binaries import netns_exec, path_of
from kubeproxy.kernel.errors import KernelError


class NftError(KernelError):
    pass


class Nft(Protocol):
    def run(self, script: str) -> None:
        """Apply ``script`` as one atomic transaction."""

    def list_table(self, family: str, table: str) -> bytes | None:
        """The table as nft's JSON document (``nft -j list table``, undecoded: callers decode only
        what they need), or None if it does not exist."""

    def delete_table(self, family: str, table: str) -> bool:
        """Delete the table if present; True if it existed."""

    def has_table(self, family: str, table: str) -> bool:
        """Whether the table exists (cheap: lists table names only)."""


class NftCli:
    def __init__(self, *, netns: str | None = None, binary: str | None = None, timeout: float = 300) -> None:
        self.netns = netns
        self._prefix = netns_exec(netns)
        self._binary = binary or path_of("nft")
        self._timeout = timeout

    def _exec_bytes(self, args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        argv = [*self._prefix, self._binary, *args]
        try:
            return subprocess.run(argv, input=stdin, capture_output=True, timeout=self._timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NftError(f"cannot run {' '.join(argv)}: {exc}") from exc

    def _exec(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = self._exec_bytes(args, None if stdin is None else stdin.encode())
        return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())

    def run(self, script: str) -> None:
        proc = self._exec(["-f", "-"], stdin=script)
        if proc.returncode != 0:
            raise NftError(f"nft -f - failed (exit {proc.returncode}): {proc.stderr.strip()[:4000]}")

    def list_table(self, family: str, table: str) -> bytes | None:
        proc = self._exec_bytes(["-j", "list", "table", family, table])
        if proc.returncode != 0:
            stderr = proc.stderr.decode(errors="replace")
            if "No such file or directory" in stderr:
                return None
            raise NftError(f"nft list table {family} {table} failed: {stderr.strip()[:2000]}")
        return proc.stdout

    def delete_table(self, family: str, table: str) -> bool:
        proc = self._exec(["delete", "table", family, table])
        if proc.returncode == 0:
            return True
        if "No such file or directory" in proc.stderr:
            return False
        raise NftError(f"nft delete table {family} {table} failed: {proc.stderr.strip()}")

    def has_table(self, family: str, table: str) -> bool:
        proc = self._exec(["list", "tables", family])
        if proc.returncode != 0:
            raise NftError(f"nft list tables {family} failed: {proc.stderr.strip()[:2000]}")
        return f"table {family} {table}" in proc.stdout.splitlines()

    def version(self) -> str:
        return self._exec(["--version"]).stdout.strip()


# --------------------------------------------------------------------------------------------
# Fake


@dataclass
class _Table:
    comment: str = ""
    sets: dict[str, str] = field(default_factory=dict)  # name -> declaration body
    kinds: dict[str, str] = field(default_factory=dict)  # name -> "set" | "map"
    elements: dict[str, dict[str, str | None]] = field(default_factory=dict)
    chains: dict[str, list[str]] = field(default_factory=dict)
    chain_specs: dict[str, str] = field(default_factory=dict)


_CMD = re.compile(
    r"^(?P<verb>add|flush|delete)\s+(?P<obj>table|chain|rule|set|map|element)\s+(?P<family>ip6?|inet)\s+(?P<table>\S+)"
    r"(?:\s+(?P<name>[^\s{]+))?\s*(?P<rest>.*)$"
)
_REF = re.compile(r"\b(?:goto|jump)\s+(\S+)")


def _misread_by_nft(declaration: str) -> bool:
    """nft 1.0.6 reads a map typeof'd ``... : ip daddr . th dport`` back from the kernel as "conflicting
    protocols specified: ip vs. th" and then refuses every new rule that uses the map."""
    return declaration.startswith("typeof ") and " th dport" in declaration.partition(" : ")[2]


_LB_RULE = re.compile(r"dnat to (ip6?) daddr \. meta l4proto \. th dport \. numgen random mod (\d+) map @(\S+)")


def _rule_json(family: str, table: str, chain: str, rule: str) -> dict[str, Any]:
    """A rule as ``nft -j`` lists it: the load-balancing shape in nft's own JSON, others as text."""
    expr: list[dict[str, Any]] = [{"fake": rule}]
    if m := _LB_RULE.fullmatch(rule):
        key = [
            {"payload": {"protocol": m[1], "field": "daddr"}},
            {"meta": {"key": "l4proto"}},
            {"payload": {"protocol": "th", "field": "dport"}},
            {"numgen": {"mode": "random", "mod": int(m[2]), "offset": 0}},
        ]
        expr = [{"dnat": {"family": m[1], "addr": {"map": {"key": {"concat": key}, "data": f"@{m[3]}"}}}}]
    return {"rule": {"family": family, "table": table, "chain": chain, "expr": expr}}


def _body(rest: str) -> str:
    rest = rest.strip()
    if not (rest.startswith("{") and rest.endswith("}")):
        raise NftError(f"expected {{ ... }} in {rest!r}")
    return rest[1:-1].strip()


class FakeNft:
    """In-memory model of nftables tables for the commands our renderer emits."""

    def __init__(self) -> None:
        self.tables: dict[tuple[str, str], _Table] = {}
        self.transactions: list[str] = []
        self._misread: set[tuple[tuple[str, str], str]] = set()

    def has_table(self, family: str, table: str) -> bool:
        return (family, table) in self.tables

    def run(self, script: str) -> None:
        work = copy.deepcopy(self.tables)
        self._misread = {
            (key, name) for key, t in self.tables.items() for name, decl in t.sets.items() if _misread_by_nft(decl)
        }
        for lineno, raw in enumerate(script.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                self._apply(work, line)
            except NftError as exc:
                raise NftError(f"line {lineno}: {exc}: {line}") from exc
        self.tables = work
        self.transactions.append(script)

    def _apply(self, tables: dict[tuple[str, str], _Table], line: str) -> None:
        m = _CMD.match(line)
        if m is None:
            raise NftError("unsupported command")
        verb, obj, key = m["verb"], m["obj"], (m["family"], m["table"])
        name, rest = m["name"], m["rest"]
        if obj == "table":
            if verb == "add":
                table = tables.setdefault(key, _Table())
                if name is not None and name.startswith("{"):
                    rest = name + " " + rest
                cm = re.search(r'comment "([^"]*)"', rest)
                if cm:
                    table.comment = cm[1]
            elif verb == "delete":
                if tables.pop(key, None) is None:
                    raise NftError("No such file or directory (table)")
                # Sets created after this in the same transaction are nft's own: read right.
                self._misread = {m for m in self._misread if m[0] != key}
            else:
                flushed = tables.get(key)
                if flushed is None:
                    raise NftError("No such file or directory (table)")
                for chain in flushed.chains:
                    flushed.chains[chain] = []
            return
        found = tables.get(key)
        if found is None:
            raise NftError("No such file or directory (table)")
        table = found
        if name is None:
            raise NftError("missing name")
        if obj in ("set", "map"):
            if verb == "add":
                body = _body(rest)
                if name in table.sets and table.sets[name] != body:
                    raise NftError(f"set {name} exists with a different definition")
                table.sets[name] = body
                table.kinds[name] = obj
                table.elements.setdefault(name, {})
            elif verb == "flush":
                self._need_set(table, name)
                table.elements[name] = {}
            else:
                self._need_set(table, name)
                for chain, rules in table.chains.items():
                    if any(f"@{name} " in r + " " for r in rules):
                        raise NftError(f"Device or resource busy: set {name} is referenced from {chain}")
                del table.sets[name], table.kinds[name], table.elements[name]
            return
        if obj == "chain":
            if verb == "add":
                table.chains.setdefault(name, [])
                if rest:
                    table.chain_specs[name] = _body(rest)
            elif verb == "flush":
                self._need_chain(table, name)
                table.chains[name] = []
            else:
                self._need_chain(table, name)
                if table.chains[name]:
                    raise NftError(f"Device or resource busy: chain {name} is not empty")
                for other, rules in table.chains.items():
                    if other != name and any(name in _REF.findall(r) for r in rules):
                        raise NftError(f"Device or resource busy: chain {name} is referenced from {other}")
                for elems in table.elements.values():
                    if any(v is not None and name in _REF.findall(v) for v in elems.values()):
                        raise NftError(f"Device or resource busy: chain {name} is referenced by a map")
                del table.chains[name]
                table.chain_specs.pop(name, None)
            return
        if obj == "rule":
            if verb != "add":
                raise NftError("only 'add rule' is modelled")
            self._need_chain(table, name)
            for target in _REF.findall(rest):
                self._need_chain(table, target)
            for ref in re.findall(r"@(\S+)", rest):
                self._need_set(table, ref)
                if (key, ref) in self._misread:
                    raise NftError("conflicting protocols specified: ip vs. th")
            table.chains[name].append(rest.strip())
            return
        # element
        self._need_set(table, name)
        elems = table.elements[name]
        for item in (i.strip() for i in _body(rest).split(",")):
            if not item:
                continue
            k, _, v = item.partition(" : ")
            k, value = k.strip(), (v.strip() or None)
            if verb == "add":
                if value is not None:
                    for target in _REF.findall(value):
                        self._need_chain(table, target)
                if k in elems and elems[k] != value:
                    raise NftError(f"File exists: element {k} in {name}")
                elems[k] = value
            elif verb == "delete":
                if k not in elems:
                    raise NftError(f"No such file or directory: element {k} in {name}")
                del elems[k]
            else:
                raise NftError("unsupported element verb")

    @staticmethod
    def _need_chain(table: _Table, name: str) -> None:
        if name not in table.chains:
            raise NftError(f"No such file or directory: chain {name}")

    @staticmethod
    def _need_set(table: _Table, name: str) -> None:
        if name not in table.sets:
            raise NftError(f"No such file or directory: set {name}")

    def list_table(self, family: str, table: str) -> bytes | None:
        t = self.tables.get((family, table))
        if t is None:
            return None
        items: list[dict[str, Any]] = [{"table": {"family": family, "name": table, "comment": t.comment}}]
        for chain in t.chains:
            items.append({"chain": {"family": family, "table": table, "name": chain}})
        for chain, rules in t.chains.items():
            items.extend(_rule_json(family, table, chain, rule) for rule in rules)
        for name, kind in t.kinds.items():
            entry: dict[str, Any] = {"family": family, "table": table, "name": name}
            if tm := re.search(r"\btimeout (\d+)s\b", t.sets[name]):
                entry["timeout"] = int(tm[1])
            elems = t.elements[name]
            if elems:
                entry["elem"] = [_elem_json(k, v) for k, v in elems.items()]
            items.append({kind: entry})
        return json.dumps({"nftables": items}).encode()

    def delete_table(self, family: str, table: str) -> bool:
        return self.tables.pop((family, table), None) is not None

    def dump(self) -> str:
        """The modelled state as sorted text lines (stable for assertions)."""
        out: list[str] = []
        for (family, table), t in sorted(self.tables.items()):
            out.append(f"table {family} {table}")
            out.extend(f"{t.kinds[name]} {name} {{ {t.sets[name]} }}" for name in sorted(t.sets))
            for name in sorted(t.chains):
                out.append(f"chain {name}")
                out.extend(f"  {r}" for r in t.chains[name])
            for name in sorted(t.elements):
                for k in sorted(t.elements[name]):
                    v = t.elements[name][k]
                    out.append(f"element {name} {k}" + (f" : {v}" if v is not None else ""))
        return "\n".join(out) + "\n"


def _elem_json(key: str, value: str | None) -> Any:
    parts: list[Any] = [int(p) if p.isdigit() else p for p in key.split(" . ")]
    k: Any = {"concat": parts} if len(parts) > 1 else parts[0]
    if value is None:
        return k
    if value.startswith(("goto ", "jump ")):
        verb, target = value.split(" ", 1)
        return [k, {verb: {"target": target}}]
    return [k, {value: None}]
