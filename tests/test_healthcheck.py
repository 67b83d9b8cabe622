"""Service health-check node ports over real HTTP on 127.0.0.1 (ephemeral ports), plus the daemon's
wiring and the runner's health rule. Asserts answers and listener state, never wall-clock time."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builders import endpoint_slice, node, service, state_with
from kubeproxy import daemon
from kubeproxy.config import ProxyConfig
from kubeproxy.kernel.nft import FakeNft
from kubeproxy.model import objects
from kubeproxy.model.service import NamespacedName
from kubeproxy.servers.healthcheck import ServiceHealthServer, service_health
from kubeproxy.state.snapshot import ProxyState
from waiting import eventually, wait_until

LOOPBACK = "127.0.0.1"
WEB = NamespacedName("ns1", "web")


def free_port(host: str = LOOPBACK, family: socket.AddressFamily = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@functools.cache
def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def get(port: int, path: str = "/", host: str = LOOPBACK, method: str = "GET") -> Answer:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return Answer(resp.status, dict(resp.getheaders()), resp.read())
    finally:
        conn.close()


def refused(port: int, host: str = LOOPBACK) -> bool:
    try:
        get(port, host=host)
    except ConnectionRefusedError:
        return True
    return False


def lb_local(name: str, hc_port: int, *, ports: list[dict[str, Any]] | None = None, **spec: Any) -> objects.Service:
    spec.setdefault("externalTrafficPolicy", "Local")
    return service(
        name,
        "10.96.0.50",
        type="LoadBalancer",
        healthCheckNodePort=hc_port,
        ports=ports or [{"name": "p80", "port": 80, "nodePort": 30080}],
        **spec,
    )


class Health:
    """A switchable "proxy healthy" callable."""

    def __init__(self) -> None:
        self.ok = True
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.ok


@pytest.fixture
def healthy() -> Health:
    return Health()


@pytest.fixture
def server(healthy: Health) -> Iterator[ServiceHealthServer]:
    srv = ServiceHealthServer("node1", healthy, addresses=(LOOPBACK,))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def sync(srv: ServiceHealthServer, st: ProxyState) -> None:
    srv.sync_services(st).result(timeout=10)


def set_service(st: ProxyState, svc: objects.Service | None, key: NamespacedName = WEB) -> None:
    st.on_service(key, svc)
    st.commit()


def set_slice(st: ProxyState, name: str, es: objects.EndpointSlice | None, namespace: str = "ns1") -> None:
    st.on_endpoint_slice((namespace, name), es)
    st.commit()


# --- answers ------------------------------------------------------------------------------------------


def test_ready_local_endpoints_answer_200_with_upstream_body_and_weight(server: ServiceHealthServer) -> None:
    port = free_port()
    two_ports = [{"name": "p80", "port": 80, "nodePort": 30080}, {"name": "p443", "port": 443, "nodePort": 30443}]
    st = state_with(
        node(),
        lb_local("web", port, ports=two_ports),
        # Local and ready: .2 and .3 (and .2 again on the second port: one IP counts once).
        endpoint_slice("web-a", "web", ["10.244.1.2", "10.244.1.3"]),
        endpoint_slice("web-b", "web", ["10.244.1.2"], ports=[{"name": "p443", "port": 443}]),
        # Not counted: on another node; local but not ready.
        endpoint_slice("web-c", "web", ["10.244.2.2"], node="node2"),
        endpoint_slice("web-d", "web", ["10.244.1.9"], conditions={"ready": False}),
    )
    sync(server, st)
    for path in ("/", "/healthz", "/any/path?x=1"):
        answer = get(port, path)
        assert answer.status == 200, answer.body
        assert answer.json == {
            "service": {"namespace": "ns1", "name": "web"},
            "localEndpoints": 2,
            "serviceProxyHealthy": True,
        }
        assert answer.headers["X-Load-Balancing-Endpoint-Weight"] == "2"
        assert answer.headers["Content-Type"] == "application/json"
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert get(port, method="POST").status == 200  # any method, as upstream's plain handler


def test_no_local_endpoints_answer_503(server: ServiceHealthServer) -> None:
    port = free_port()
    st = state_with(node(), lb_local("web", port), endpoint_slice("web-a", "web", ["10.244.2.2"], node="node2"))
    sync(server, st)
    answer = get(port)
    assert answer.status == 503
    assert answer.json == {
        "service": {"namespace": "ns1", "name": "web"},
        "localEndpoints": 0,
        "serviceProxyHealthy": True,
    }
    assert answer.headers["X-Load-Balancing-Endpoint-Weight"] == "0"
    # Without any EndpointSlice at all: the same.
    set_slice(st, "web-a", None)
    sync(server, st)
    assert get(port).status == 503


def test_terminating_local_endpoints_do_not_count(server: ServiceHealthServer) -> None:
    port = free_port()
    terminating = {"ready": False, "serving": True, "terminating": True}
    st = state_with(
        node(),
        lb_local("web", port),
        endpoint_slice("web-a", "web", ["10.244.1.2", "10.244.1.3"], conditions=terminating),
        endpoint_slice("web-b", "web", ["10.244.2.2"], node="node2"),
    )
    sync(server, st)
    answer = get(port)
    assert (answer.status, answer.json["localEndpoints"]) == (503, 0)
    # A ready local pod next to the terminating ones: exactly that one counts.
    set_slice(st, "web-c", endpoint_slice("web-c", "web", ["10.244.1.4"]))
    sync(server, st)
    answer = get(port)
    assert (answer.status, answer.json["localEndpoints"]) == (200, 1)


def test_unhealthy_proxy_answers_503_even_with_local_endpoints(server: ServiceHealthServer, healthy: Health) -> None:
    port = free_port()
    st = state_with(node(), lb_local("web", port), endpoint_slice("web-a", "web", ["10.244.1.2"]))
    sync(server, st)
    assert get(port).status == 200
    healthy.ok = False
    answer = get(port)
    assert answer.status == 503
    assert answer.json["serviceProxyHealthy"] is False and answer.json["localEndpoints"] == 1
    assert answer.headers["X-Load-Balancing-Endpoint-Weight"] == "1"
    healthy.ok = True
    assert get(port).status == 200  # asked on every probe, not cached


def test_a_failing_health_callable_answers_unhealthy(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    port = free_port()
    srv = ServiceHealthServer("node1", broken, addresses=(LOOPBACK,))
    srv.start()
    try:
        sync(srv, state_with(node(), lb_local("web", port), endpoint_slice("web-a", "web", ["10.244.1.2"])))
        with caplog.at_level(logging.ERROR, logger="kubeproxy.servers.healthcheck"):
            answer = get(port)
        assert answer.status == 503 and answer.json["serviceProxyHealthy"] is False
        assert "proxy health check raised" in caplog.text
    finally:
        srv.stop()


def test_only_external_policy_local_services_get_a_listener() -> None:
    st = state_with(
        node(),
        lb_local("web", 31000),
        lb_local("cluster", 31001, externalTrafficPolicy="Cluster"),
        service("plain", "10.96.0.51"),
    )
    assert set(service_health(st, "node1")) == {WEB}
    assert service_health(st, "node1")[WEB].port == 31000


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_each_family_answers_with_its_own_endpoints(healthy: Health) -> None:
    port = free_port()
    while not _free_on(port, "::1", socket.AF_INET6):
        port = free_port()
    srv = ServiceHealthServer("node1", healthy, addresses=(LOOPBACK, "::1"))
    srv.start()
    try:
        st = state_with(
            node(),
            lb_local("web", port),
            endpoint_slice("web-4", "web", ["10.244.1.2"]),
            endpoint_slice("web-6", "web", ["fd00:10:244::1:2", "fd00:10:244::1:3"], address_type="IPv6"),
        )
        sync(srv, st)
        assert get(port).json["localEndpoints"] == 1
        assert get(port, host="::1").json["localEndpoints"] == 2
        assert get(port, host="::1").headers["X-Load-Balancing-Endpoint-Weight"] == "2"
    finally:
        srv.stop()


def _free_on(port: int, host: str, family: socket.AddressFamily) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# --- listeners follow the Services ---------------------------------------------------------------


def test_listener_opens_moves_and_closes_with_the_service(server: ServiceHealthServer) -> None:
    first, second = free_port(), free_port()
    st = state_with(node(), endpoint_slice("web-a", "web", ["10.244.1.2"]))
    sync(server, st)
    assert server.listening == frozenset() and refused(first)

    set_service(st, lb_local("web", first))
    sync(server, st)
    assert server.listening == {first} and get(first).status == 200

    # Endpoint changes update the answer on the same listener.
    set_slice(st, "web-a", endpoint_slice("web-a", "web", ["10.244.1.2"], node="node2"))
    sync(server, st)
    assert get(first).status == 503

    set_service(st, lb_local("web", second))
    sync(server, st)
    assert server.listening == {second}
    assert refused(first) and get(second).json["service"]["name"] == "web"

    # Switching to externalTrafficPolicy Cluster drops the health check, like deleting the Service.
    set_service(st, lb_local("web", second, externalTrafficPolicy="Cluster"))
    sync(server, st)
    assert server.listening == frozenset() and refused(second)

    set_service(st, lb_local("web", second))
    sync(server, st)
    assert get(second).status == 503
    set_service(st, None)
    sync(server, st)
    assert server.listening == frozenset() and refused(second)


def test_stop_closes_every_listener_and_an_update_before_start_applies_at_start(healthy: Health) -> None:
    port = free_port()
    srv = ServiceHealthServer("node1", healthy, addresses=(LOOPBACK,))
    st = state_with(node(), lb_local("web", port), endpoint_slice("web-a", "web", ["10.244.1.2"]))
    assert srv.sync_services(st).done()  # not started: remembered
    assert refused(port)
    srv.start()
    try:
        assert srv.listening == {port} and get(port).status == 200
    finally:
        srv.stop()
    assert refused(port) and srv.listening == frozenset()
    srv.stop()  # idempotent


def test_a_port_already_bound_is_logged_and_retried_on_the_next_sync(
    server: ServiceHealthServer, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    st = state_with(node(), lb_local("web", port), endpoint_slice("web-a", "web", ["10.244.1.2"]))
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        squatter.bind((LOOPBACK, port))
        squatter.listen(1)
        with caplog.at_level(logging.INFO, logger="kubeproxy.servers.healthcheck"):
            sync(server, st)
            assert port in server.failures and port not in server.listening
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and "ns1/web" in errors[0] and f"port={port}" in errors[0], errors
            sync(server, st)  # still taken: retried, not logged again
            assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    finally:
        squatter.close()
    sync(server, st)
    assert server.listening == {port} and not server.failures
    assert get(port).status == 200


def test_a_failed_port_is_also_retried_without_a_sync(healthy: Health) -> None:
    port = free_port()
    srv = ServiceHealthServer("node1", healthy, addresses=(LOOPBACK,), retry_interval=0.05)
    srv.start()
    try:
        st = state_with(node(), lb_local("web", port), endpoint_slice("web-a", "web", ["10.244.1.2"]))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
            squatter.bind((LOOPBACK, port))
            squatter.listen(1)
            sync(srv, st)
            assert port in srv.failures
        assert wait_until(lambda: srv.listening == {port}, timeout=10)
        assert get(port).status == 200
    finally:
        srv.stop()


def test_two_services_on_one_port_the_serving_one_keeps_it(
    server: ServiceHealthServer, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    other = NamespacedName("ns1", "aaa")
    st = state_with(node(), lb_local("web", port), endpoint_slice("web-a", "web", ["10.244.1.2"]))
    sync(server, st)
    with caplog.at_level(logging.WARNING, logger="kubeproxy.servers.healthcheck"):
        set_service(st, lb_local("aaa", port), key=other)  # sorts first, but "web" already serves
        sync(server, st)
    assert get(port).json["service"]["name"] == "web"
    assert "ns1/aaa" in caplog.text and f"port={port}" in caplog.text
    set_service(st, None)  # "web" deleted: the port passes to "aaa" without closing
    sync(server, st)
    answer = get(port)
    assert answer.json["service"] == {"namespace": "ns1", "name": "aaa"} and answer.status == 503


def test_an_out_of_range_port_is_skipped_with_a_warning(
    server: ServiceHealthServer, caplog: pytest.LogCaptureFixture
) -> None:
    good = free_port()
    st = state_with(node(), lb_local("web", 70000), lb_local("ok", good))
    with caplog.at_level(logging.WARNING, logger="kubeproxy.servers.healthcheck"):
        sync(server, st)
    assert server.listening == {good}
    assert "ns1/web" in caplog.text and "port=70000" in caplog.text


# --- its own thread: answers while the caller is busy -----------------------------------------------


def test_answers_while_the_callers_event_loop_is_blocked(healthy: Health) -> None:
    port = free_port()
    srv = ServiceHealthServer("node1", healthy, addresses=(LOOPBACK,))
    st = state_with(node(), lb_local("web", port), endpoint_slice("web-a", "web", ["10.244.1.2"]))
    answered: list[tuple[int, float]] = []

    def probe() -> None:
        answered.append((get(port).status, time.monotonic()))

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(srv.serve(stop))  # the daemon's way of running it
        await srv.after_sync(st, None, True)
        await eventually(lambda: srv.listening == {port})
        prober = threading.Thread(target=probe)
        prober.start()
        # The caller's loop is stuck (a sync burning CPU, or a blocking call): nothing on this loop runs.
        time.sleep(2.0)
        blocked_until = time.monotonic()
        prober.join(timeout=10)
        stop.set()
        await task
        assert answered and answered[0][0] == 200
        assert answered[0][1] < blocked_until  # answered during the block, not after it

    asyncio.run(scenario())
    assert srv.listening == frozenset() and refused(port)


# --- the runner's health rule (upstream healthz: pending longer than 2 x syncPeriod) -------------------


# --- the daemon wiring --------------------------------------------------------------------------------

MANIFEST = """\
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: ns1}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.50
  externalTrafficPolicy: Local
  healthCheckNodePort: {port}
  ports: [{{name: http, port: 80, nodePort: 30080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: ns1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: [10.244.1.2]
  nodeName: {node}
"""


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)  # a new inode: the directory source sees the change even within one mtime tick


def test_daemon_serves_health_checks_and_follows_the_endpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    # Loopback only: a test must not listen on the host's real addresses.
    monkeypatch.setattr(daemon, "ServiceHealthServer", functools.partial(ServiceHealthServer, addresses=(LOOPBACK,)))
    manifest = tmp_path / "web.yaml"
    _write(manifest, MANIFEST.format(port=port, node="node1"))
    cfg = ProxyConfig(manifests=tmp_path, hostname_override="node1", min_sync_period=0.01)

    def status() -> int | None:
        with contextlib.suppress(OSError):
            return get(port).status
        return None

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(cfg, nft=FakeNft(), stop=stop))
        try:
            await eventually(lambda: status() == 200)
            assert get(port).json["localEndpoints"] == 1
            _write(manifest, MANIFEST.format(port=port, node="node2"))
            await eventually(lambda: status() == 503)
        finally:
            stop.set()
            assert await task == 0
        assert refused(port)

    asyncio.run(scenario())
