"""SCTP probes without an SCTP stack: hand-made INIT chunks over raw sockets.

This machine's kernel cannot open SCTP sockets (no sctp module), yet netfilter tracks and NATs SCTP
(``nf_conntrack_proto_sctp`` is built in). So a probe writes the first packet of an association,
an INIT chunk with a correct CRC32c, to a raw IP socket in the source namespace, and every
candidate pod listens with a raw socket for protocol 132. Whichever pod sees the INIT is where the
proxy sent it, and the source address in that packet tells whether it was masqueraded. Nothing
answers the INIT; the probe proves the forwarding decision only (which is what kube-proxy makes).

Like the other probes, everything runs inside lab namespaces (``call_in_netns``).
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass

from kubeproxy.lab.netns import call_in_netns

__all__ = ["SctpArrival", "crc32c", "init_chunk", "sctp_probe"]

IPPROTO_SCTP = 132
_INIT = 1


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def init_chunk(sport: int, dport: int, tag: int) -> bytes:
    """An SCTP packet holding one INIT chunk (RFC 9260 3.3.2), checksum included."""
    chunk = struct.pack("!BBHIIHHI", _INIT, 0, 20, tag, 65535, 1, 1, tag)
    header = struct.pack("!HHII", sport, dport, 0, 0)  # verification tag 0 in an INIT
    packet = header + chunk
    # The CRC32c goes in little-endian byte order (RFC 9260 appendix A).
    return packet[:8] + struct.pack("<I", crc32c(packet)) + packet[12:]


@dataclass(frozen=True)
class SctpArrival:
    pod: str | None  # the listener that saw the INIT, None if none did before the deadline
    source: str | None  # the INIT's source address as that pod saw it


def _listen() -> socket.socket:
    # Created in the pod's namespace (this thread's), the socket stays bound to it.
    return socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_SCTP)


def _listen6() -> socket.socket:
    return socket.socket(socket.AF_INET6, socket.SOCK_RAW, IPPROTO_SCTP)


def _send(ip: str, packet: bytes) -> None:
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_RAW, IPPROTO_SCTP) as sock:
        sock.sendto(packet, (ip, 0))


def _parse(data: bytes, peer: str, v6: bool) -> tuple[str, int, int, int] | None:
    """(source, destination port, chunk type, initiate tag) of a received SCTP packet."""
    if not v6:
        ihl = (data[0] & 0x0F) * 4
        peer, data = socket.inet_ntoa(data[12:16]), data[ihl:]
    if len(data) < 20:
        return None
    _sport, dport = struct.unpack("!HH", data[:4])
    chunk_type = data[12]
    (tag,) = struct.unpack("!I", data[16:20])
    return peer, dport, chunk_type, tag


def sctp_probe(
    netns: str, ip: str, port: int, listeners: Mapping[str, str], *, target_port: int, timeout: float = 1.0
) -> SctpArrival:
    """Send one INIT to ``ip:port`` from ``netns``; report which listener (pod name -> netns) got it.

    ``target_port`` is the port the INIT must arrive on (the endpoint's port after DNAT).
    """
    v6 = ipaddress.ip_address(ip).version == 6
    socks = {name: call_in_netns(ns, _listen6 if v6 else _listen) for name, ns in listeners.items()}
    try:
        tag = int.from_bytes(os.urandom(4), "big") | 1
        sport = 40000 + tag % 20000
        call_in_netns(netns, _send, ip, init_chunk(sport, port, tag))
        deadline = time.monotonic() + timeout
        by_fd = {s.fileno(): name for name, s in socks.items()}
        while (remaining := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(socks.values()), [], [], remaining)
            for sock in ready:
                data, addr = sock.recvfrom(65535)
                parsed = _parse(data, addr[0], v6)
                if parsed and parsed[1] == target_port and parsed[2] == _INIT and parsed[3] == tag:
                    return SctpArrival(by_fd[sock.fileno()], parsed[0])
        return SctpArrival(None, None)
    finally:
        for s in socks.values():
            s.close()
