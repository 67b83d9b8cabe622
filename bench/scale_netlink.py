"""Count nf_tables change notifications straight from netlink, for bench/scale.py's restart scenario.

Why not only ``nft monitor``: it listens with a fixed 16 MB receive buffer and formats every event in
userspace, so a transaction that touches a few hundred thousand objects overflows it. Measured here
(nft 1.0.6, kernel 6.18): re-adding 11k chains x 10 rules plus 11k map elements in one transaction
(~250k notifications), ``nft monitor`` printed 59k lines and ``# ERROR: We lost some netlink events!``.
This listener joins the same multicast group (NFNLGRP_NFTABLES) from a socket created inside the lab
namespace, asks for a 512 MB receive buffer (SO_RCVBUFFORCE, root only) and only reads message
headers, so it keeps up; an overflow (ENOBUFS) is still counted and reported, never hidden.

Counts are per kind as ``nft monitor`` names them (``add element ip``, ``delete rule ip6``, ...; a set
and a map are both ``set/map``) and per transaction: the kernel ends each committed transaction with an
NFT_MSG_NEWGEN notification. Elements are counted inside each element message (one message may carry
several), rules, chains, sets and tables one per message.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections import Counter
from typing import Any, Final

from kubeproxy.lab.netns import call_in_netns

__all__ = ["CANARY_PREFIX", "NetlinkCounter"]

# Tables named so are bench.scale's sync points (added and deleted at once): never counted.
CANARY_PREFIX: Final = "kpbench_canary_"

NETLINK_NETFILTER: Final = 12
NFNLGRP_NFTABLES: Final = 7
NFNL_SUBSYS_NFTABLES: Final = 10
SO_RCVBUFFORCE: Final = 33
RCVBUF: Final = 512 * 1024 * 1024
NLA_TYPE_MASK: Final = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

# enum nf_tables_msg_types (include/uapi/linux/netfilter/nf_tables.h) -> nft monitor's words.
_MESSAGES: Final = {
    0: "add table",
    2: "delete table",
    3: "add chain",
    5: "delete chain",
    6: "add rule",
    8: "delete rule",
    9: "add set/map",
    11: "delete set/map",
    12: "add element",
    14: "delete element",
    18: "add object",
    20: "delete object",
    22: "add flowtable",
    24: "delete flowtable",
}
_NEWGEN: Final = 15
_SETELEM_MESSAGES: Final = (12, 14)
_NFTA_SET_ELEM_LIST_ELEMENTS: Final = 3
_NFTA_GEN_ID: Final = 1
_NFTA_GEN_PROC_NAME: Final = 3
_NFTA_TABLE_NAME: Final = 1
_TABLE_MESSAGES: Final = (0, 2)
_FAMILIES: Final = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
_NLMSG: Final = struct.Struct("=IHHII")
_NLA: Final = struct.Struct("=HH")


def _attrs(buf: bytes | memoryview, start: int, end: int) -> list[tuple[int, int, int]]:
    """(type, payload start, payload end) of the netlink attributes in ``buf[start:end]``."""
    out = []
    while start + 4 <= end:
        length, kind = _NLA.unpack_from(buf, start)
        if length < 4:
            break
        out.append((kind & NLA_TYPE_MASK, start + 4, start + length))
        start += (length + 3) & ~3
    return out


class NetlinkCounter:
    """Counts nf_tables notifications in a network namespace until :meth:`stop`."""

    def __init__(self, netns: str) -> None:
        self._sock: socket.socket = call_in_netns(netns, self._open)
        self._lock = threading.Condition()
        self._canaries: set[str] = set()
        self._stop = threading.Event()
        self._totals: Counter[str] = Counter()
        self._elements: Counter[str] = Counter()
        self._current: Counter[str] = Counter()
        self._transactions: list[dict[str, Any]] = []
        self._lost = 0
        self._thread = threading.Thread(target=self._read, name="nft-netlink", daemon=True)
        self._thread.start()

    @staticmethod
    def _open() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
            sock.settimeout(0.2)
        except BaseException:
            sock.close()
            raise
        return sock

    def _read(self) -> None:
        buf = bytearray(1 << 20)
        while not self._stop.is_set():
            try:
                size = self._sock.recv_into(buf)
            except TimeoutError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    with self._lock:
                        self._lost += 1
                    continue
                return
            with self._lock:
                self._parse(memoryview(buf)[:size])
                self._lock.notify_all()

    def _parse(self, buf: memoryview) -> None:
        offset = 0
        while offset + _NLMSG.size <= len(buf):
            length, msg_type, _flags, _seq, _pid = _NLMSG.unpack_from(buf, offset)
            if length < _NLMSG.size:
                return
            end = offset + length
            if msg_type >> 8 == NFNL_SUBSYS_NFTABLES:
                self._message(msg_type & 0xFF, buf, offset + _NLMSG.size, end)
            offset += (length + 3) & ~3

    def _message(self, msg: int, buf: memoryview, start: int, end: int) -> None:
        family = _FAMILIES.get(buf[start], str(buf[start]))  # struct nfgenmsg: family, version, res_id
        attrs_start = start + 4
        if msg in _TABLE_MESSAGES:
            for attr, lo, hi in _attrs(buf, attrs_start, end):
                if attr == _NFTA_TABLE_NAME:
                    table = bytes(buf[lo:hi]).rstrip(b"\0").decode(errors="replace")
                    if table.startswith(CANARY_PREFIX):
                        self._canaries.add(table)
                        return
        if msg == _NEWGEN:
            if not self._current:
                return  # a canary's transaction, or nothing we count
            gen, proc = "?", "?"
            for attr, lo, hi in _attrs(buf, attrs_start, end):
                if attr == _NFTA_GEN_ID and hi - lo >= 4:
                    gen = str(struct.unpack_from("!I", buf, lo)[0])
                elif attr == _NFTA_GEN_PROC_NAME:
                    proc = bytes(buf[lo:hi]).rstrip(b"\0").decode(errors="replace")
            self._transactions.append({"generation": f"{gen} by {proc}", "lines": dict(self._current)})
            self._current = Counter()
            return
        name = _MESSAGES.get(msg)
        if name is None:
            return
        kind = f"{name} {family}"
        self._totals[kind] += 1
        self._current[kind] += 1
        if msg in _SETELEM_MESSAGES:
            for attr, lo, hi in _attrs(buf, attrs_start, end):
                if attr == _NFTA_SET_ELEM_LIST_ELEMENTS:
                    self._elements[kind] += len(_attrs(buf, lo, hi))

    def snapshot(self) -> dict[str, Any]:
        """Counts so far, in the shape of bench.scale.count_monitor_lines."""
        with self._lock:
            transactions = list(self._transactions)
            if self._current:
                transactions.append({"generation": "(not committed yet)", "lines": dict(self._current)})
            return {
                "lines_by_kind": dict(sorted(self._totals.items())),
                "elements_by_kind": dict(sorted(self._elements.items())),
                "transactions": transactions,
                "lost_event_warnings": self._lost,
            }

    def wait_canary(self, table: str, timeout: float) -> bool:
        """True once the notification adding canary ``table`` was read (so was everything before it)."""
        with self._lock:
            return self._lock.wait_for(lambda: table in self._canaries, timeout=timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
