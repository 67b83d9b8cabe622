"""Proxy health: the per-family tracker (fake clocks), Go's JSON time format, and the /healthz and
/livez server over real HTTP on 127.0.0.1 (ephemeral ports): status codes, exact JSON keys, headers,
counters, bind retry / hard fail, lifecycle. Asserts answers, never wall-clock time."""

from __future__ import annotations

import asyncio
import datetime
import http.client
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kubeproxy.model.service import IPFamily
from kubeproxy.observe.health import FamilyHealth, ProxyHealth, ProxyHealthTracker
from kubeproxy.observe.metrics import ProxyMetrics
from kubeproxy.servers.proxyhealth import GO_ZERO_TIME, ProxyHealthServer, go_time, health_document
from kubeproxy.servers.threaded import ServerBindError, parse_bind_address
from waiting import wait_until

LOOPBACK = "127.0.0.1"
TIMEOUT = 60.0
WALL0 = 1_795_248_000.0  # 2026-11-21T08:00:00Z

# Upstream's JSON keys (ProxyHealth / ProxierHealth in pkg/proxy/healthcheck/proxy_health.go), in order.
HEALTHZ_KEYS = ["lastUpdated", "currentTime", "nodeEligible", "healthy", "status"]
LIVEZ_KEYS = ["lastUpdated", "currentTime", "healthy", "status"]
FAMILY_KEYS = ["lastUpdated", "healthy"]


class Clocks:
    """A monotonic and a wall clock that move together, by hand."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = WALL0

    def step(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def tracker(self, *families: IPFamily) -> ProxyHealthTracker:
        return ProxyHealthTracker(
            families or (IPFamily.V4,), timeout=TIMEOUT, monotonic=lambda: self.mono, wall=lambda: self.wall
        )


# -- tracker ---------------------------------------------------------------------------------------


def test_healthy_while_starting_even_with_changes_queued() -> None:
    clocks = Clocks()
    tracker = clocks.tracker()
    assert tracker.status() == ProxyHealth(True, None, WALL0, ())
    tracker.queued_update(IPFamily.V4)
    clocks.step(10 * TIMEOUT)
    # Upstream judges only families that synced at least once (its sync loop marks one at start).
    assert tracker.is_healthy()


def test_a_change_pending_for_the_timeout_makes_the_family_unhealthy() -> None:
    clocks = Clocks()
    tracker = clocks.tracker()
    tracker.updated(IPFamily.V4)
    synced_at = clocks.wall
    clocks.step(5 * TIMEOUT)
    assert tracker.is_healthy()  # nothing queued: an idle proxy stays healthy however long
    tracker.queued_update(IPFamily.V4)
    clocks.step(TIMEOUT - 1)
    tracker.queued_update(IPFamily.V4)  # a later change does not reset the age of the oldest
    assert tracker.is_healthy()
    clocks.step(1)
    status = tracker.status()
    assert not status.healthy  # age == timeout is already late (upstream: healthy only if age < timeout)
    assert status.families == (FamilyHealth("IPv4", synced_at, False),)
    assert status.last_updated == synced_at
    assert status.current_time == clocks.wall
    tracker.updated(IPFamily.V4)
    assert tracker.is_healthy()
    assert tracker.pending_since(IPFamily.V4) is None


def test_one_late_family_makes_the_proxy_unhealthy() -> None:
    clocks = Clocks()
    tracker = clocks.tracker(IPFamily.V4, IPFamily.V6)
    tracker.updated(IPFamily.V6)
    clocks.step(1)
    tracker.updated(IPFamily.V4)
    v4_at, v6_at = clocks.wall, clocks.wall - 1
    tracker.queued_update()  # every family
    assert tracker.pending_since(IPFamily.V4) == tracker.pending_since(IPFamily.V6) == clocks.mono
    tracker.updated(IPFamily.V4)
    clocks.step(TIMEOUT)
    status = tracker.status()
    assert not status.healthy
    assert status.families == (FamilyHealth("IPv4", v4_at, True), FamilyHealth("IPv6", v6_at, False))
    assert status.last_updated == v4_at  # the most recent of the families


def test_a_wall_clock_step_does_not_age_a_pending_change() -> None:
    clocks = Clocks()
    tracker = clocks.tracker()
    tracker.updated(IPFamily.V4)
    tracker.queued_update(IPFamily.V4)
    clocks.wall += 10 * TIMEOUT  # NTP jumps; monotonic time does not move
    assert tracker.is_healthy()


def test_tracker_rejects_unknown_families_and_bad_timeouts() -> None:
    tracker = ProxyHealthTracker([IPFamily.V4], timeout=TIMEOUT)
    with pytest.raises(ValueError):
        tracker.updated(IPFamily.V6)
    with pytest.raises(ValueError):
        tracker.queued_update("IPv6")
    with pytest.raises(ValueError):
        ProxyHealthTracker([], timeout=TIMEOUT)
    with pytest.raises(ValueError):
        ProxyHealthTracker([IPFamily.V4], timeout=0)


# -- Go time.Time JSON -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "tz", "text"),
    [
        (WALL0, datetime.UTC, "2026-11-21T08:00:00Z"),
        (WALL0 + 0.5, datetime.UTC, "2026-11-21T08:00:00.5Z"),
        (WALL0 + 0.123456, datetime.UTC, "2026-11-21T08:00:00.123456Z"),
        (WALL0 + 0.1, datetime.UTC, "2026-11-21T08:00:00.1Z"),
        (WALL0, datetime.timezone(datetime.timedelta(hours=5, minutes=30)), "2026-11-21T13:30:00+05:30"),
        (WALL0, datetime.timezone(datetime.timedelta(hours=-3)), "2026-11-21T05:00:00-03:00"),
        (None, datetime.UTC, "0001-01-01T00:00:00Z"),
    ],
)
def test_go_time(ts: float | None, tz: datetime.tzinfo, text: str) -> None:
    assert go_time(ts, tz) == text


def test_health_document_reports_now_only_when_the_answer_is_ok() -> None:
    health = ProxyHealth(False, WALL0, WALL0 + 90, (FamilyHealth("IPv4", WALL0, False),))
    late = health_document(health, node_eligible=True, ok=False, tz=datetime.UTC)
    assert late == {
        "lastUpdated": "2026-11-21T08:00:00Z",
        "currentTime": "2026-11-21T08:01:30Z",
        "nodeEligible": True,
        "healthy": False,
        "status": {"IPv4": {"lastUpdated": "2026-11-21T08:00:00Z", "healthy": False}},
    }
    fine = health_document(ProxyHealth(True, WALL0, WALL0 + 90, ()), node_eligible=None, ok=True, tz=datetime.UTC)
    assert fine == {"lastUpdated": "2026-11-21T08:01:30Z", "currentTime": "2026-11-21T08:01:30Z", "healthy": True}
    never = health_document(ProxyHealth(True, None, WALL0, ()), node_eligible=False, ok=False, tz=datetime.UTC)
    assert never["lastUpdated"] == GO_ZERO_TIME


# -- over HTTP -------------------------------------------------------------------------------------


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    def keys(self) -> list[str]:
        return list(json.loads(self.body))  # dicts keep the document's key order


def get(port: int, path: str, *, method: str = "GET", timeout: float = 5.0) -> Answer:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


class Node:
    def __init__(self) -> None:
        self.eligible = True

    def __call__(self) -> bool:
        return self.eligible


@pytest.fixture
def served() -> Iterator[tuple[ProxyHealthServer, Clocks, Node, ProxyMetrics]]:
    clocks = Clocks()
    tracker = clocks.tracker(IPFamily.V4, IPFamily.V6)
    metrics = ProxyMetrics([IPFamily.V4, IPFamily.V6], process_collectors=False)
    node = Node()
    server = ProxyHealthServer(f"{LOOPBACK}:0", tracker, node, metrics, tz=datetime.UTC)
    server.start()
    try:
        yield server, clocks, node, metrics
    finally:
        server.stop()


def counted(metrics: ProxyMetrics, family: str, code: int) -> float:
    value = metrics.registry.get_sample_value(f"kubeproxy_{family}_total", {"code": str(code)})
    return value or 0.0


def test_healthy_answers(served: tuple[ProxyHealthServer, Clocks, Node, ProxyMetrics]) -> None:
    server, clocks, _node, metrics = served
    assert server.bound_port
    server.tracker.updated(IPFamily.V4)
    server.tracker.updated(IPFamily.V6)
    synced = "2026-11-21T08:00:00Z"
    clocks.step(30)
    now = "2026-11-21T08:00:30Z"
    healthz = get(server.bound_port, "/healthz")
    assert healthz.status == 200
    assert healthz.headers["content-type"] == "application/json"
    assert healthz.headers["x-content-type-options"] == "nosniff"
    assert healthz.keys() == HEALTHZ_KEYS
    assert healthz.json() == {
        "lastUpdated": now,  # "now" when healthy (upstream compatibility)
        "currentTime": now,
        "nodeEligible": True,
        "healthy": True,
        "status": {"IPv4": {"lastUpdated": synced, "healthy": True}, "IPv6": {"lastUpdated": synced, "healthy": True}},
    }
    assert list(healthz.json()["status"]["IPv4"]) == FAMILY_KEYS
    # Compact like Go's json.Marshal.
    assert b" " not in healthz.body
    livez = get(server.bound_port, "/livez")
    assert livez.status == 200
    assert livez.keys() == LIVEZ_KEYS
    assert livez.headers["content-type"] == "application/json"
    assert livez.headers["x-content-type-options"] == "nosniff"
    assert counted(metrics, "proxy_healthz", 200) == 1
    assert counted(metrics, "proxy_livez", 200) == 1


def test_status_is_left_out_before_the_first_sync(served: tuple[ProxyHealthServer, Clocks, Node, ProxyMetrics]) -> None:
    server, *_ = served
    assert server.bound_port
    answer = get(server.bound_port, "/healthz")
    assert answer.status == 200
    assert answer.keys() == ["lastUpdated", "currentTime", "nodeEligible", "healthy"]


def test_late_sync_is_503_on_both(served: tuple[ProxyHealthServer, Clocks, Node, ProxyMetrics]) -> None:
    server, clocks, _node, metrics = served
    assert server.bound_port
    server.tracker.updated(IPFamily.V4)
    server.tracker.updated(IPFamily.V6)
    server.tracker.queued_update(IPFamily.V6)
    clocks.step(TIMEOUT)
    for path in ("/healthz", "/livez"):
        answer = get(server.bound_port, path)
        assert answer.status == 503, path
        body = answer.json()
        assert body["healthy"] is False
        assert body["lastUpdated"] == "2026-11-21T08:00:00Z"  # the real last sync, not now
        assert body["currentTime"] == "2026-11-21T08:01:00Z"
        assert body["status"]["IPv4"]["healthy"] is True
        assert body["status"]["IPv6"]["healthy"] is False
    assert counted(metrics, "proxy_healthz", 503) == 1
    assert counted(metrics, "proxy_livez", 503) == 1
    assert counted(metrics, "proxy_healthz", 200) == 0
    server.tracker.updated(IPFamily.V6)
    assert get(server.bound_port, "/livez").status == 200


def test_ineligible_node_fails_healthz_only(served: tuple[ProxyHealthServer, Clocks, Node, ProxyMetrics]) -> None:
    server, _clocks, node, metrics = served
    assert server.bound_port
    server.tracker.updated(IPFamily.V4)
    node.eligible = False
    healthz = get(server.bound_port, "/healthz")
    assert healthz.status == 503
    body = healthz.json()
    assert body["nodeEligible"] is False
    assert body["healthy"] is True  # the proxy itself is fine: "healthy" is not the node's eligibility
    assert body["lastUpdated"] == "2026-11-21T08:00:00Z"  # not replaced by now on a 503
    livez = get(server.bound_port, "/livez")
    assert livez.status == 200
    assert "nodeEligible" not in livez.json()
    assert counted(metrics, "proxy_healthz", 503) == 1
    assert counted(metrics, "proxy_livez", 200) == 1
    node.eligible = True
    assert get(server.bound_port, "/healthz").status == 200


def test_an_eligibility_check_that_raises_counts_as_not_eligible() -> None:
    def broken() -> bool:
        raise RuntimeError("node informer gone")

    tracker = ProxyHealthTracker([IPFamily.V4], timeout=TIMEOUT)
    server = ProxyHealthServer(f"{LOOPBACK}:0", tracker, broken, None)
    server.start()
    try:
        assert server.bound_port
        answer = get(server.bound_port, "/healthz")
        assert answer.status == 503
        assert answer.json()["nodeEligible"] is False
        assert get(server.bound_port, "/livez").status == 200
    finally:
        server.stop()


def test_other_paths_are_404_and_methods_do_not_matter(
    served: tuple[ProxyHealthServer, Clocks, Node, ProxyMetrics],
) -> None:
    server, *_ = served
    assert server.bound_port
    for path in ("/", "/healthz/", "/metrics", "/readyz"):
        answer = get(server.bound_port, path)
        assert answer.status == 404, path
        assert answer.body == b"404 page not found\n"
    assert get(server.bound_port, "/healthz", method="POST").status == 200
    assert get(server.bound_port, "/livez?verbose=1").status == 200


# -- bind address, retry, hard fail, lifecycle -------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("0.0.0.0:10256", ("0.0.0.0", 10256)),
        ("127.0.0.1:10249", ("127.0.0.1", 10249)),
        ("[::]:10256", ("::", 10256)),
        ("[fd00:50::0001]:0", ("fd00:50::1", 0)),
        (":10256", ("0.0.0.0", 10256)),
    ],
)
def test_bind_addresses(address: str, parsed: tuple[str, int]) -> None:
    assert parse_bind_address(address) == parsed


@pytest.mark.parametrize(
    "address", ["10256", "127.0.0.1", "::1:10256", "[127.0.0.1]:80", "host.example:80", "1.2.3.4:65536", "1.2.3.4:x"]
)
def test_bad_bind_addresses(address: str) -> None:
    with pytest.raises(ValueError):
        parse_bind_address(address)


def occupied_port() -> socket.socket:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind((LOOPBACK, 0))
    holder.listen(1)
    return holder


def make_server(port: int, **kwargs: Any) -> ProxyHealthServer:
    tracker = ProxyHealthTracker([IPFamily.V4], timeout=TIMEOUT)
    return ProxyHealthServer(f"{LOOPBACK}:{port}", tracker, lambda: True, None, **kwargs)


def test_a_taken_port_is_retried_until_free() -> None:
    holder = occupied_port()
    port = holder.getsockname()[1]
    server = make_server(port, retry_interval=0.05)
    try:
        server.start()  # does not raise: upstream logs and retries every 5 s
        assert server.bound_port is None
        assert server.last_error
        holder.close()
        assert wait_until(lambda: server.bound_port == port)
        assert server.last_error is None
        assert get(port, "/livez").status == 200
    finally:
        holder.close()
        server.stop()


def test_hard_fail_raises_and_leaves_nothing_running() -> None:
    holder = occupied_port()
    port = holder.getsockname()[1]
    server = make_server(port, hard_fail=True, retry_interval=0.05)
    try:
        with pytest.raises(ServerBindError) as info:
            server.start()
        assert info.value.address == f"{LOOPBACK}:{port}"
        holder.close()
        # Nothing keeps running behind our back: no server thread, and the port stays free.
        assert not [t for t in threading.enumerate() if t.name == "healthz-server"]
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with probe:
            probe.bind((LOOPBACK, port))
        server.start()
        assert server.bound_port == port
    finally:
        holder.close()
        server.stop()


def test_start_and_stop_are_idempotent() -> None:
    server = make_server(0)
    server.stop()  # before start: nothing to do
    server.start()
    server.start()
    port = server.bound_port
    assert port
    assert get(port, "/livez").status == 200
    server.stop()
    server.stop()
    assert server.bound_port is None
    with pytest.raises(OSError):
        get(port, "/livez", timeout=2.0)
    server.start()  # restartable
    assert server.bound_port
    assert get(server.bound_port, "/livez").status == 200
    server.stop()


def test_serve_runs_until_stop_is_set() -> None:
    server = make_server(0)
    ports: list[int | None] = []

    async def main(probe: Callable[[], None]) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(server.serve(stop))
        for _ in range(500):
            if server.bound_port:
                break
            await asyncio.sleep(0.01)
        await asyncio.to_thread(probe)
        stop.set()
        await task

    def probe() -> None:
        assert server.bound_port
        ports.append(server.bound_port)
        assert get(server.bound_port, "/livez").status == 200

    asyncio.run(main(probe))
    assert ports
    assert server.bound_port is None
