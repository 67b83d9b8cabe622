"""A tiny server that runs inside a lab pod and answers every TCP connection and UDP datagram with
``"<name> <peer_ip>\\n"``: who answered, and which client address it saw.

Usage: ``python -m kubeproxy.lab.podserver --name NAME [--tcp PORT ...] [--udp PORT ...]``

Invariants:
- Standard library only and a single process/thread (selectors), so it starts fast in many pods.
- Listens on 0.0.0.0 and, when the namespace has IPv6, on :: (v6-only, so each family reports its own
  peer addresses instead of v4-mapped ones).
- Prints exactly one line, ``ready``, to stdout once every port listens; the lab waits for it.
- UDP replies leave from the address the datagram was sent to (IP_PKTINFO / IPV6_PKTINFO): on a node
  with many addresses the answer must come from the address the client talked to.
- SIGTERM and SIGINT end it with exit status 0 after closing its sockets.
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from types import FrameType

# Python 3.11 lacks socket.IP_PKTINFO (added in 3.12); the value is fixed by <linux/in.h>.
IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)

_TCP_SEND_TIMEOUT = 2.0
_ANCILLARY_SIZE = 256


class _Stop(BaseException):
    """Raised from the signal handler to leave the select loop (a BaseException: no handler eats it)."""


def _listeners(protocol: int, port: int) -> list[socket.socket]:
    kind = socket.SOCK_STREAM if protocol == socket.IPPROTO_TCP else socket.SOCK_DGRAM
    socks: list[socket.socket] = []
    sock4 = socket.socket(socket.AF_INET, kind)
    sock4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock4.bind(("0.0.0.0", port))
    socks.append(sock4)
    if socket.has_ipv6:
        try:
            sock6 = socket.socket(socket.AF_INET6, kind)
        except OSError:
            # IPv6 disabled in this kernel or namespace: IPv4 alone is fine.
            return _finish(socks, kind)
        try:
            sock6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock6.bind(("::", port))
        except OSError:
            sock6.close()
        else:
            socks.append(sock6)
    return _finish(socks, kind)


def _finish(socks: list[socket.socket], kind: int) -> list[socket.socket]:
    for sock in socks:
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        elif sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        sock.setblocking(False)
    return socks


def _answer(name: str, peer: str) -> bytes:
    return f"{name} {peer}\n".encode()


def _serve_tcp(listener: socket.socket, name: str) -> None:
    try:
        conn, addr = listener.accept()
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        return
    with conn:
        # Blocking with a short timeout: the line is tiny, and a stuck client must not stall the loop.
        conn.settimeout(_TCP_SEND_TIMEOUT)
        with contextlib.suppress(OSError):
            conn.sendall(_answer(name, str(addr[0])))


def _serve_udp(sock: socket.socket, name: str) -> None:
    try:
        _data, ancdata, _flags, addr = sock.recvmsg(65535, _ANCILLARY_SIZE)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        # e.g. ECONNREFUSED queued from an ICMP error about an earlier reply: nothing to answer.
        return
    reply_from: list[tuple[int, int, bytes]] = []
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr}: reply from `addr`
            # (the datagram's destination), letting routing choose the interface.
            dst = data[8:12]
            reply_from.append((socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=I4s4s", 0, dst, bytes(4))))
        elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            # struct in6_pktinfo {in6_addr addr; unsigned ifindex}. Pin the interface only for a
            # link-local address (meaningless without it); otherwise let routing choose, as for IPv4.
            dst6 = data[:16]
            ifindex = data[16:20] if dst6[0] == 0xFE and dst6[1] & 0xC0 == 0x80 else bytes(4)
            reply_from.append((socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, dst6 + ifindex))
    with contextlib.suppress(OSError):
        sock.sendmsg([_answer(name, str(addr[0]))], reply_from, 0, addr)


def serve(name: str, tcp_ports: Sequence[int], udp_ports: Sequence[int]) -> int:
    """Listen on every port, print ``ready``, answer until SIGTERM/SIGINT; returns the exit status."""

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise _Stop

    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    try:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        for port in tcp_ports:
            for sock in _listeners(socket.IPPROTO_TCP, port):
                socks.append(sock)
                sel.register(sock, selectors.EVENT_READ, _serve_tcp)
        for port in udp_ports:
            for sock in _listeners(socket.IPPROTO_UDP, port):
                socks.append(sock)
                sel.register(sock, selectors.EVENT_READ, _serve_udp)
        print("ready", flush=True)
        while True:
            for key, _events in sel.select():
                key.data(key.fileobj, name)
    except _Stop:
        return 0
    finally:
        sel.close()
        for sock in socks:
            sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeproxy.lab.podserver", description=__doc__)
    parser.add_argument("--name", required=True, help="name to answer with (the pod's name)")
    parser.add_argument("--tcp", type=int, nargs="+", action="extend", default=[], metavar="PORT")
    parser.add_argument("--udp", type=int, nargs="+", action="extend", default=[], metavar="PORT")
    args = parser.parse_args(argv)
    if not args.tcp and not args.udp:
        parser.error("give at least one --tcp or --udp port")
    for port in [*args.tcp, *args.udp]:
        if not 0 < port < 65536:
            parser.error(f"port {port} is out of range 1-65535")
    if any(c.isspace() for c in args.name) or not args.name:
        # The answer is "<name> <peer>": a name with whitespace would make it ambiguous to parse.
        parser.error("--name must be non-empty and contain no whitespace")
    try:
        return serve(args.name, args.tcp, args.udp)
    except OSError as exc:
        print(f"podserver {args.name}: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
