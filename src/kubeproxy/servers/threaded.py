"""An event loop on a thread of its own, and a small HTTP server that lives on one.

Why a thread: the proxy's own loop can be busy for seconds (a full sync of a large cluster renders
in pure Python), and health probes must still be answered quickly -- a kubelet liveness probe that
times out restarts the proxy. A server on its own thread and loop only needs the GIL, which Python
hands over every few milliseconds however busy the other thread is (DESIGN.md section 3).

``LoopThread`` owns the thread and loop: ``start()``, ``call(coro)`` from any thread, ``stop()``
(which cancels whatever still runs on the loop, then closes it).

``ThreadedHTTPServer`` serves a fixed set of paths on one bind address, upstream style:
- the address is ``IP:port`` or ``[IPv6]:port``; an unspecified IP (``0.0.0.0``, ``::``, or empty)
  listens on every address of both families when the host has IPv6, as Go's ``net.Listen("tcp",
  "0.0.0.0:port")`` does (one dual-stack socket), and on all IPv4 addresses otherwise;
- a bind failure (port taken, address not on this host) is logged and retried every
  ``retry_interval`` seconds (upstream: 5 s) until it succeeds; with ``hard_fail`` (upstream
  ``bindAddressHardFail``) ``start()`` raises ``ServerBindError`` instead;
- paths match exactly (Go's ``ServeMux``); anything else is Go's ``404 page not found``; every
  method is served the same way, as upstream's handlers ignore the method.
``start()``/``stop()`` are idempotent and thread-safe; ``serve(stop)`` is the daemon's task.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from aiohttp import web

__all__ = [
    "NOSNIFF",
    "TEXT_PLAIN",
    "Handler",
    "LoopThread",
    "ServerBindError",
    "ThreadedHTTPServer",
    "go_not_found",
    "parse_bind_address",
]

log = logging.getLogger("kubeproxy.servers")

T = TypeVar("T")
Handler = Callable[[web.BaseRequest], web.StreamResponse]

NOSNIFF = {"X-Content-Type-Options": "nosniff"}
TEXT_PLAIN = "text/plain"
_BACKLOG = 128
_KEEPALIVE = 15.0  # seconds an idle keep-alive connection is kept
_SHUTDOWN_GRACE = 1.0  # seconds an in-flight answer may take when the server stops
_STOP_TIMEOUT = 10.0


class ServerBindError(RuntimeError):
    """A server could not listen on its bind address (raised only with ``hard_fail``)."""

    def __init__(self, name: str, address: str, reason: str) -> None:
        super().__init__(f"{name} server cannot listen on {address}: {reason}")
        self.address = address
        self.reason = reason


async def serve_until(start: Callable[[], None], close: Callable[[], None], stop: asyncio.Event) -> None:
    """The daemon's way of running a threaded server: start it (off the event loop), wait for
    ``stop`` (or cancellation), then close it."""
    try:
        await asyncio.to_thread(start)
        await stop.wait()
    finally:
        await asyncio.to_thread(close)


def parse_bind_address(address: str) -> tuple[str, int]:
    """``"IP:port"`` / ``"[IPv6]:port"`` -> (normalized IP, port); ValueError if it is neither.

    An empty IP (``":10256"``) means every address, as in Go. Port 0 picks a free port (tests).
    """
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise ValueError(f"bind address {address!r} is not IP:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(f"bind address {address!r}: brackets are for IPv6 addresses")
    elif ":" in host:
        raise ValueError(f"bind address {address!r}: an IPv6 address needs brackets, [{host}]:port")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"bind address {address!r}: port must be 0-65535")
    if host == "":
        return "0.0.0.0", int(port_text)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bind address {address!r}: {host!r} is not an IP address") from None
    return str(ip), int(port_text)


def _listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for (host, port); OSError when the address is unusable."""
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        try:
            # One dual-stack socket, like Go's listener for an unspecified address.
            return [listening_socket(socket.AF_INET6, "::", port, v6only=False)]
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
            if ip.version == 6:
                raise
            # No IPv6 on this host: IPv4 only.
            return [listening_socket(socket.AF_INET, "0.0.0.0", port)]
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return [listening_socket(family, host, port, v6only=True)]


def listening_socket(family: socket.AddressFamily, host: str, port: int, *, v6only: bool = True) -> socket.socket:
    """A bound, listening, non-blocking TCP socket; OSError (e.g. EADDRINUSE) if the port is taken."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As Go's listeners: a port whose old connections sit in TIME_WAIT can be reused at once. It
        # does not let us share a port another process listens on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
        sock.bind((host, port))
        # listen() here, not later in aiohttp: with SO_REUSEADDR on both sides Linux reports a conflict
        # with a bound-but-not-yet-listening socket only at listen().
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def go_not_found() -> web.Response:
    """What Go's ``http.NotFound`` answers."""
    return web.Response(
        status=404, text="404 page not found\n", content_type=TEXT_PLAIN, charset="utf-8", headers=NOSNIFF
    )


class LoopThread:
    """An asyncio event loop running on a daemon thread of its own."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError(f"{self.name}: loop not running")
        return self._loop

    def start(self) -> None:
        """Start the thread and its loop; returns once the loop runs."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        thread = threading.Thread(target=self._run, args=(loop, ready), name=self.name, daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread = loop, thread

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Stop the loop (tasks still on it are cancelled and awaited) and join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            # A retry that was about to run, or an answer still being written: end them before the loop.
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


class ThreadedHTTPServer:
    """Serves ``routes()`` (exact path -> handler) on ``bind_address`` from a thread of its own.

    Handlers run on the server thread and must be quick and thread-safe in what they read.
    """

    name = "http"

    def __init__(self, bind_address: str, *, hard_fail: bool = False, retry_interval: float = 5.0) -> None:
        self.bind_address = bind_address
        self._host, self._port = parse_bind_address(bind_address)
        self._hard_fail = hard_fail
        self._retry_interval = retry_interval
        self._lifecycle = threading.Lock()  # serializes start() and stop()
        self._thread: LoopThread | None = None
        self._routes: Mapping[str, Handler] = {}
        # Server thread only.
        self._runners: list[web.ServerRunner] = []
        self._retry: asyncio.TimerHandle | None = None
        self._opening: asyncio.Task[str | None] | None = None
        self._closed = False
        # Immutable snapshots for any thread.
        self._bound: tuple[tuple[str, int], ...] = ()
        self._last_error: str | None = None

    # -- for subclasses ----------------------------------------------------------------------------
    def routes(self) -> Mapping[str, Handler]:
        raise NotImplementedError

    # -- any thread --------------------------------------------------------------------------------
    @property
    def bound_port(self) -> int | None:
        """The port listened on (useful when bound to port 0); None while not listening."""
        return self._bound[0][1] if self._bound else None

    @property
    def last_error(self) -> str | None:
        """Why the last bind attempt failed; None once listening."""
        return self._last_error

    def start(self) -> None:
        """Start the thread and try to listen. Idempotent. Without ``hard_fail`` a failed bind is
        retried in the background; with it, ``ServerBindError`` is raised (and nothing keeps running)."""
        with self._lifecycle:
            if self._thread is not None:
                return
            self._routes = dict(self.routes())
            self._closed = False  # no server thread runs now: nothing else touches it
            thread = LoopThread(f"{self.name}-server")
            thread.start()
            self._thread = thread
            try:
                error = thread.call(self._open())
            except BaseException:
                self._stop_locked()
                raise
            if error is not None and self._hard_fail:
                self._stop_locked()
                raise ServerBindError(self.name, self.bind_address, error)

    def stop(self) -> None:
        """Close the listener and end the thread. Idempotent; ``start()`` may be called again."""
        with self._lifecycle:
            self._stop_locked()

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (or this task is cancelled), then stop."""
        await serve_until(self.start, self.stop, stop)

    def _stop_locked(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            thread.call(self._close(), timeout=_STOP_TIMEOUT)
        except Exception:
            log.exception("closing %s server failed address=%s", self.name, self.bind_address)
        thread.stop()

    # -- server thread -----------------------------------------------------------------------------
    async def _open(self) -> str | None:
        """Listen; None on success, else the reason (a retry is scheduled unless hard_fail)."""
        self._retry = None
        if self._closed or self._runners:
            return None
        sockets: list[socket.socket] = []
        try:
            sockets = _listening_sockets(self._host, self._port)
            for sock in sockets:
                server = web.Server(self._dispatch, access_log=None, keepalive_timeout=_KEEPALIVE)
                runner = web.ServerRunner(server, shutdown_timeout=_SHUTDOWN_GRACE)
                await runner.setup()
                self._runners.append(runner)
                await web.SockSite(runner, sock).start()
        except BaseException as exc:
            for sock in sockets:
                sock.close()
            await self._cleanup_runners()
            if not isinstance(exc, OSError):
                raise
            reason = exc.strerror or repr(exc)
        else:
            self._bound = tuple((str(s.getsockname()[0]), int(s.getsockname()[1])) for s in sockets)
            self._last_error = None
            log.info("serving %s address=%s port=%d", self.name, self.bind_address, self._bound[0][1])
            return None
        self._last_error = reason
        if self._hard_fail:
            log.error("failed to start %s server address=%s error=%r", self.name, self.bind_address, reason)
        else:
            log.error(
                "failed to start %s server address=%s error=%r (retrying in %gs)",
                self.name,
                self.bind_address,
                reason,
                self._retry_interval,
            )
            self._retry = asyncio.get_running_loop().call_later(self._retry_interval, self._schedule_open)
        return reason

    def _schedule_open(self) -> None:
        self._retry = None
        if not self._closed:
            self._opening = asyncio.get_running_loop().create_task(self._open())

    async def _close(self) -> None:
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
        await self._cleanup_runners()
        self._bound = ()

    async def _cleanup_runners(self) -> None:
        for runner in self._runners:
            try:
                await runner.cleanup()  # stops accepting, then closes idle keep-alive connections
            except Exception:
                log.exception("closing %s listener failed", self.name)
        self._runners.clear()

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        handler = self._routes.get(request.path)
        if handler is None:
            return go_not_found()
        return handler(request)
