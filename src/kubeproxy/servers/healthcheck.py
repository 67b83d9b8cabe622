"""Service health-check node ports (upstream pkg/proxy/healthcheck ``ServiceHealthServer``).

A LoadBalancer Service with ``externalTrafficPolicy: Local`` carries ``spec.healthCheckNodePort``;
cloud load balancers probe that port on every node to learn whether the node has local endpoints
(ETP=Local traffic sent to a node without one is dropped). This module serves those probes.

Behaviour (upstream):
- one HTTP listener per distinct health-check port, answering any method and any path with
  ``{"service": {"namespace", "name"}, "localEndpoints": N, "serviceProxyHealthy": bool}``,
  ``Content-Type: application/json``, ``X-Content-Type-Options: nosniff`` and
  ``X-Load-Balancing-Endpoint-Weight: N``; status 200 only if N > 0 and the proxy is healthy, else 503;
- N is the number of distinct IPs of this node's endpoints (``nodeName`` equal to ours) whose
  ``ready`` condition is true, across all ports of the Service (upstream
  ``EndpointsMap.LocalReadyEndpoints``). Terminating endpoints are not ready (API contract), so they
  do not count: load balancers drain the node while traffic still flows to terminating pods. (As
  upstream, an endpoint the API reports ready -- publishNotReadyAddresses -- counts even if terminating.)
- N is per IP family, like upstream's one server per family proxier: a probe that arrives on an IPv4
  listener is answered with the IPv4 count, on IPv6 with the IPv6 count.
- listeners follow the Services: opened when a Service gains a health-check port, closed when it
  loses it or is deleted, moved when the port changes. A port that cannot be bound is logged with the
  Service and the port (again only if the error changes) and retried on every later update and every
  ``retry_interval`` seconds; it is never fatal. Two Services claiming one port (only manifests can do
  that; the API server allocates unique ports): the one already serving keeps it, else the first by
  namespace/name; the other is logged.

Bind addresses: upstream listens on the node IPs matching ``nodePortAddresses`` (all addresses when
that is unset or ``all``). We do not resolve ``nodePortAddresses`` yet and listen on all addresses:
``0.0.0.0`` and ``::`` (IPV6_V6ONLY, so the two never collide and each knows its family); a host
without IPv6 just skips ``::``. ``addresses`` overrides this (tests bind loopback only).

Threading: the server runs its own event loop on its own thread (DESIGN.md section 3). Everything
about listeners happens on that thread; the public methods may be called from any thread.
``sync_services(state)`` reads the state on the CALLER's thread (the daemon's loop, the only one that
mutates it), turns it into immutable ``ServiceHealth`` values and hands those over.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from aiohttp import web

from kubeproxy.model.service import IPFamily, NamespacedName, family_of
from kubeproxy.servers.threaded import LoopThread, listening_socket, serve_until
from kubeproxy.state.snapshot import ProxyState

__all__ = ["ALL_ADDRESSES", "ServiceHealth", "ServiceHealthServer", "service_health"]

log = logging.getLogger("kubeproxy.servers.healthcheck")

ALL_ADDRESSES = ("0.0.0.0", "::")
WEIGHT_HEADER = "X-Load-Balancing-Endpoint-Weight"
_KEEPALIVE = 15.0  # seconds; probes are cheap, idle connections should not pile up
_SHUTDOWN_GRACE = 1.0  # seconds an in-flight answer may take when its listener closes
_STOP_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class ServiceHealth:
    """What one Service's health-check port answers: the port and its local ready endpoints."""

    service: NamespacedName
    port: int  # spec.healthCheckNodePort (validated when the listener opens)
    local_v4: int = 0  # distinct ready IPv4 endpoint IPs on this node
    local_v6: int = 0

    def local_endpoints(self, family: IPFamily) -> int:
        return self.local_v4 if family is IPFamily.V4 else self.local_v6


def service_health(state: ProxyState, node_name: str) -> dict[NamespacedName, ServiceHealth]:
    """Every Service that needs a health-check port, with its local ready endpoint counts (pure).

    Upstream sets ``healthCheckNodePort`` only for type LoadBalancer with externalTrafficPolicy Local
    (``NeedsHealthCheck``); the API server rejects the field on any other Service, and our model does
    not keep the type, so the policy is what we check here.
    """
    out: dict[NamespacedName, ServiceHealth] = {}
    for key, ports in state.services.items():
        port = next((p.health_check_node_port for p in ports.values() if p.external_policy_local), 0)
        if not port:
            continue
        ips: dict[IPFamily, set[str]] = {IPFamily.V4: set(), IPFamily.V6: set()}
        for endpoints in state.endpoints.get(key, {}).values():
            for ep in endpoints:
                if ep.ready and ep.node_name == node_name:
                    ips[family_of(ep.ip)].add(ep.ip)
        out[key] = ServiceHealth(key, port, local_v4=len(ips[IPFamily.V4]), local_v6=len(ips[IPFamily.V6]))
    return out


def _listening_socket(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if family_of(address) is IPFamily.V6 else socket.AF_INET
    return listening_socket(family, address, port)


class _Listener:
    """The sockets of one health-check port (one per bind address), each with its aiohttp server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.runners: list[web.ServerRunner] = []

    async def close(self) -> None:
        for runner in self.runners:
            try:
                await runner.cleanup()  # stops accepting, then closes idle keep-alive connections too
            except Exception:
                log.exception("closing health check listener failed port=%d", self.port)
        self.runners.clear()


class ServiceHealthServer:
    """HTTP listeners for Services' health-check node ports, on a thread and event loop of their own.

    ``start()``/``stop()`` run the thread; ``sync_services(state)`` (or ``update(health)``) says what to
    serve and may be called before ``start()`` (applied when it starts). ``proxy_healthy`` is called
    on the server thread for every probe; it must be cheap and thread-safe.
    """

    def __init__(
        self,
        node_name: str,
        proxy_healthy: Callable[[], bool],
        *,
        addresses: Sequence[str] = ALL_ADDRESSES,
        retry_interval: float = 15.0,
    ) -> None:
        if not addresses:
            raise ValueError("ServiceHealthServer needs at least one bind address")
        self.node_name = node_name
        self._proxy_healthy = proxy_healthy
        self._addresses = tuple(addresses)
        self._retry_interval = retry_interval
        # Guarded by _lock (touched by callers' threads and the server thread).
        self._lock = threading.Lock()
        self._desired: Mapping[NamespacedName, ServiceHealth] = MappingProxyType({})
        self._loop: asyncio.AbstractEventLoop | None = None
        # Serializes start() and stop() (the daemon may stop while a start is still running).
        self._lifecycle = threading.Lock()
        self._thread: LoopThread | None = None
        # Server thread only.
        self._listeners: dict[int, _Listener] = {}
        self._serving: dict[int, ServiceHealth] = {}  # port -> what it answers; only ports with a listener
        self._failed: dict[int, tuple[NamespacedName, str]] = {}  # port -> (Service, error) awaiting retry
        self._warned: set[tuple[str, NamespacedName, int]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reconciling: asyncio.Lock | None = None
        self._closed = False
        # Immutable snapshots for any thread.
        self._open_ports: frozenset[int] = frozenset()
        self._failures: Mapping[int, str] = MappingProxyType({})

    # -- any thread ------------------------------------------------------------------------------
    @property
    def listening(self) -> frozenset[int]:
        """Ports with an open listener right now."""
        return self._open_ports

    @property
    def failures(self) -> Mapping[int, str]:
        """Ports that could not be opened (waiting for a retry) -> the error."""
        return self._failures

    def start(self) -> None:
        """Start the server thread and open the listeners wanted so far. Idempotent."""
        with self._lifecycle:
            if self._thread is not None:
                return
            thread = LoopThread("service-health")
            thread.start()
            thread.call(self._begin())
            self._thread = thread
            with self._lock:
                self._loop = thread.loop
            thread.call(self._reconcile())

    def stop(self) -> None:
        """Close every listener and end the thread. Idempotent; ``start()`` may be called again."""
        with self._lifecycle:
            with self._lock:
                self._loop = None
            thread, self._thread = self._thread, None
            if thread is None:
                return
            try:
                thread.call(self._close_all(), timeout=_STOP_TIMEOUT)
            except Exception:
                log.exception("closing health check listeners failed")
            thread.stop(_STOP_TIMEOUT)

    def sync_services(self, state: ProxyState) -> concurrent.futures.Future[None]:
        """Serve what ``state`` says; call on the thread that owns ``state``. The future is done once
        the listeners match (immediately when not started)."""
        return self.update(service_health(state, self.node_name).values())

    def update(self, health: Iterable[ServiceHealth]) -> concurrent.futures.Future[None]:
        """Serve exactly these Services (replacing the previous set)."""
        desired = MappingProxyType({h.service: h for h in health})
        with self._lock:
            self._desired = desired
            loop = self._loop
        if loop is None:
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            done.set_result(None)
            return done
        return asyncio.run_coroutine_threadsafe(self._reconcile(), loop)

    # -- asyncio glue for the daemon ---------------------------------------------------------------
    async def serve(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (or this task is cancelled), then close every listener."""
        await serve_until(self.start, self.stop, stop)

    async def after_sync(self, state: ProxyState, _result: object, _full: bool) -> None:
        """A daemon post-sync hook: follow the state that was just programmed."""
        await asyncio.wrap_future(self.sync_services(state))

    # -- server thread ---------------------------------------------------------------------------
    async def _begin(self) -> None:
        # Loop-bound state is made on the loop that will use it (a fresh one for every start()).
        self._reconciling = asyncio.Lock()
        self._closed = False

    def _schedule_retry(self) -> None:
        self._retry = None
        if not self._closed:
            task = asyncio.get_running_loop().create_task(self._reconcile())
            self._tasks.add(task)  # the loop only keeps a weak reference to a task
            task.add_done_callback(self._tasks.discard)

    async def _reconcile(self) -> None:
        assert self._reconciling is not None
        async with self._reconciling:
            if self._closed:
                return
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            with self._lock:
                desired = self._desired
            warnings: set[tuple[str, NamespacedName, int]] = set()
            owners = self._assign_ports(desired, warnings)
            self._warned = warnings  # a problem that went away is logged again if it comes back

            for port in [p for p in self._listeners if p not in owners]:
                gone = self._serving.pop(port)
                log.info("closing health check service=%s port=%d", gone.service, port)
                await self._listeners.pop(port).close()

            failed: dict[int, tuple[NamespacedName, str]] = {}
            for port, health in sorted(owners.items()):
                if port in self._listeners:
                    if self._serving[port].service != health.service:
                        log.info("health check port changes owner port=%d service=%s", port, health.service)
                    self._serving[port] = health
                    continue
                try:
                    self._listeners[port] = await self._open(port)
                except Exception as exc:
                    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
                    failed[port] = (health.service, reason)
                    if self._failed.get(port) != failed[port]:
                        log.error(
                            "failed to start health check node=%s service=%s port=%d error=%r (retrying)",
                            self.node_name,
                            health.service,
                            port,
                            reason,
                        )
                    continue
                self._serving[port] = health
                log.info(
                    "opened health check service=%s port=%d%s",
                    health.service,
                    port,
                    " after failing" if port in self._failed else "",
                )
            self._failed = failed
            self._open_ports = frozenset(self._listeners)
            self._failures = MappingProxyType({port: reason for port, (_svc, reason) in failed.items()})
            if failed:
                self._retry = asyncio.get_running_loop().call_later(self._retry_interval, self._schedule_retry)

    def _assign_ports(
        self, desired: Mapping[NamespacedName, ServiceHealth], warnings: set[tuple[str, NamespacedName, int]]
    ) -> dict[int, ServiceHealth]:
        """port -> the Service it answers for; invalid ports and losers of a port conflict are logged."""
        owners: dict[int, ServiceHealth] = {}
        for key in sorted(desired):
            health = desired[key]
            if not 1 <= health.port <= 65535:
                self._warn(warnings, ("invalid", key, health.port), "healthCheckNodePort out of range 1-65535")
                continue
            held = owners.get(health.port)
            if held is None:
                owners[health.port] = health
                continue
            serving = self._serving.get(health.port)
            if serving is not None and serving.service == key:
                owners[health.port], loser = health, held  # the Service already serving keeps its port
            else:
                loser = health
            self._warn(
                warnings,
                ("conflict", loser.service, health.port),
                f"port is already the health check of {owners[health.port].service}",
            )
        return owners

    def _warn(
        self, warnings: set[tuple[str, NamespacedName, int]], key: tuple[str, NamespacedName, int], why: str
    ) -> None:
        warnings.add(key)
        if key not in self._warned:
            log.warning("ignoring health check service=%s port=%d reason=%r", key[1], key[2], why)

    async def _open(self, port: int) -> _Listener:
        listener = _Listener(port)
        try:
            for address in self._addresses:
                try:
                    sock = _listening_socket(address, port)
                except OSError as exc:
                    if exc.errno == errno.EAFNOSUPPORT:  # no IPv6 (or IPv4) on this host: nothing to serve there
                        log.debug("health check skips address=%s: %s", address, exc.strerror)
                        continue
                    raise
                try:
                    server = web.Server(
                        self._handler(port, family_of(address)), access_log=None, keepalive_timeout=_KEEPALIVE
                    )
                    runner = web.ServerRunner(server, shutdown_timeout=_SHUTDOWN_GRACE)
                    await runner.setup()
                    listener.runners.append(runner)
                    await web.SockSite(runner, sock).start()
                except BaseException:
                    sock.close()
                    raise
            if not listener.runners:
                raise OSError(errno.EAFNOSUPPORT, f"no usable address among {', '.join(self._addresses)}")
        except BaseException:
            # Upstream closes whatever it opened, so a retry (or another owner) starts from nothing.
            await listener.close()
            raise
        return listener

    def _handler(self, port: int, family: IPFamily) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        # Any method, any path (upstream serves every request on the port the same way).
        async def handle(_request: web.BaseRequest) -> web.StreamResponse:
            return self._answer(port, family)

        return handle

    def _answer(self, port: int, family: IPFamily) -> web.Response:
        health = self._serving.get(port)
        if health is None:
            # A keep-alive connection outlived its listener (being closed right now): no answer is right.
            response = web.Response(status=503, text="health check closed\n")
            response.force_close()
            return response
        count = health.local_endpoints(family)
        try:
            healthy = bool(self._proxy_healthy())
        except Exception:
            log.exception("proxy health check raised; answering unhealthy")
            healthy = False
        body = {
            "service": {"namespace": health.service.namespace, "name": health.service.name},
            "localEndpoints": count,
            "serviceProxyHealthy": healthy,
        }
        return web.Response(
            status=200 if count > 0 and healthy else 503,
            body=json.dumps(body).encode(),
            content_type="application/json",
            headers={"X-Content-Type-Options": "nosniff", WEIGHT_HEADER: str(count)},
        )

    async def _close_all(self) -> None:
        assert self._reconciling is not None
        async with self._reconciling:
            self._closed = True
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            for port, listener in sorted(self._listeners.items()):
                log.info("closing health check service=%s port=%d", self._serving[port].service, port)
                await listener.close()
            self._listeners.clear()
            self._serving.clear()
            self._failed.clear()
            self._warned.clear()
            self._open_ports = frozenset()
            self._failures = MappingProxyType({})
