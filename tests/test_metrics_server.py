"""The metrics server over real HTTP on 127.0.0.1 (ephemeral ports): /metrics, /metrics/slis, the
generic /healthz ping, /proxyMode, /configz; and both servers answering while the main thread burns
CPU. Asserts answers, never wall-clock time."""

from __future__ import annotations

import gzip
import http.client
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from exposition import Exposition
from kubeproxy.model.service import IPFamily
from kubeproxy.observe.health import ProxyHealthTracker
from kubeproxy.observe.metrics import ProxyMetrics
from kubeproxy.servers.metrics import MetricsServer
from kubeproxy.servers.proxyhealth import ProxyHealthServer

LOOPBACK = "127.0.0.1"
CONFIG: dict[str, Any] = {
    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
    "kind": "KubeProxyConfiguration",
    "mode": "nftables",
    "metricsBindAddress": "127.0.0.1:10249",
    "nodePortAddresses": ["primary"],
    "conntrack": {"maxPerCore": 32768, "tcpEstablishedTimeout": "24h0m0s"},
}


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode()


def get(
    port: int, path: str, *, method: str = "GET", headers: dict[str, str] | None = None, timeout: float = 5.0
) -> Answer:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


@pytest.fixture
def served() -> Iterator[tuple[MetricsServer, int]]:
    metrics = ProxyMetrics([IPFamily.V4])
    server = MetricsServer(f"{LOOPBACK}:0", metrics, proxy_mode="nftables", configz=CONFIG)
    server.start()
    try:
        assert server.bound_port
        yield server, server.bound_port
    finally:
        server.stop()


def test_metrics_serves_the_live_registry(served: tuple[MetricsServer, int]) -> None:
    server, port = served
    answer = get(port, "/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    before = Exposition(answer.text)
    assert before.value("kubeproxy_sync_proxy_rules_service_changes_total") == 0
    assert "process_cpu_seconds_total" in before.types
    server.metrics.add_changes(services=3)
    server.metrics.sync_failed(IPFamily.V4)
    after = Exposition(get(port, "/metrics").text)
    assert after.value("kubeproxy_sync_proxy_rules_service_changes_total") == 3
    assert after.value("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", ip_family="IPv4") == 1


def test_metrics_are_gzipped_when_the_scraper_accepts_it(served: tuple[MetricsServer, int]) -> None:
    _server, port = served
    answer = get(port, "/metrics", headers={"Accept-Encoding": "gzip"})
    assert answer.status == 200
    assert answer.headers.get("content-encoding") == "gzip"
    Exposition(gzip.decompress(answer.body).decode())
    assert "content-encoding" not in get(port, "/metrics").headers


def test_healthz_is_the_generic_ping(served: tuple[MetricsServer, int]) -> None:
    _server, port = served
    answer = get(port, "/healthz")
    assert (answer.status, answer.body) == (200, b"ok")
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert get(port, "/healthz?verbose").text == "[+]ping ok\nhealthz check passed\n"
    assert get(port, "/healthz?verbose&exclude=ping").text == "[+]ping excluded: ok\nhealthz check passed\n"
    assert get(port, "/healthz?verbose&exclude=nope").text == (
        '[+]ping ok\nwarn: some health checks cannot be excluded: no matches for "nope"\nhealthz check passed\n'
    )
    assert get(port, "/healthz?exclude=nope").body == b"ok"
    assert get(port, "/healthz/ping").body == b"ok"


def test_slis_count_healthz_checks_and_delete_resets_them(served: tuple[MetricsServer, int]) -> None:
    _server, port = served
    assert get(port, "/metrics/slis").body == b""
    get(port, "/healthz")
    get(port, "/healthz?verbose")
    get(port, "/healthz?exclude=ping")  # an excluded check is not run, so not recorded
    answer = get(port, "/metrics/slis")
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    slis = Exposition(answer.text)
    assert slis.value("kubernetes_healthcheck", name="ping", type="healthz") == 1
    assert slis.value("kubernetes_healthchecks_total", name="ping", status="success", type="healthz") == 2
    reset = get(port, "/metrics/slis", method="DELETE")
    assert (reset.status, reset.body) == (200, b"metrics reset\n")
    assert get(port, "/metrics/slis").body == b""


def test_proxy_mode(served: tuple[MetricsServer, int]) -> None:
    _server, port = served
    answer = get(port, "/proxyMode")
    assert (answer.status, answer.body) == (200, b"nftables")
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert answer.headers["x-content-type-options"] == "nosniff"


def test_configz_is_keyed_by_the_registered_name(served: tuple[MetricsServer, int]) -> None:
    _server, port = served
    answer = get(port, "/configz")
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert json.loads(answer.body) == {"kubeproxy.config.k8s.io": CONFIG}
    assert b" " not in answer.body  # compact, as Go's json.Marshal


def test_configz_that_json_cannot_hold_fails_at_construction() -> None:
    metrics = ProxyMetrics([IPFamily.V4], process_collectors=False)
    with pytest.raises(TypeError):
        MetricsServer(f"{LOOPBACK}:0", metrics, proxy_mode="nftables", configz={"when": object()})
    with pytest.raises(ValueError):
        MetricsServer(f"{LOOPBACK}:0", metrics, proxy_mode="nftables", configz={"x": float("nan")})


def test_unknown_paths_are_404(served: tuple[MetricsServer, int]) -> None:
    _server, port = served
    for path in ("/", "/livez", "/debug/pprof/", "/metrics/", "/configz/x"):
        answer = get(port, path)
        assert (answer.status, answer.body) == (404, b"404 page not found\n"), path


def burn(seconds: float) -> int:
    """Pure-Python CPU work on the calling thread (holds the GIL except at switch points)."""
    deadline = time.monotonic() + seconds
    spins = 0
    while time.monotonic() < deadline:
        for i in range(1000):
            spins += i % 7
    return spins


def test_both_servers_answer_while_the_main_thread_burns_cpu() -> None:
    metrics = ProxyMetrics([IPFamily.V4])
    tracker = ProxyHealthTracker([IPFamily.V4], timeout=60)
    tracker.updated(IPFamily.V4)
    health = ProxyHealthServer(f"{LOOPBACK}:0", tracker, lambda: True, metrics)
    scrape = MetricsServer(f"{LOOPBACK}:0", metrics, proxy_mode="nftables", configz=CONFIG)
    health.start()
    scrape.start()
    answers: dict[str, list[int]] = {"/healthz": [], "/livez": [], "/metrics": []}
    errors: list[BaseException] = []
    done = threading.Event()
    burning = threading.Event()

    def client() -> None:
        assert health.bound_port
        assert scrape.bound_port
        targets = [(health.bound_port, "/healthz"), (health.bound_port, "/livez"), (scrape.bound_port, "/metrics")]
        burning.wait()
        while not done.is_set():
            for port, path in targets:
                try:
                    # Each answer must come within 2 s although the main thread never yields.
                    answers[path].append(get(port, path, timeout=2.0).status)
                except BaseException as exc:
                    errors.append(exc)
                    return

    thread = threading.Thread(target=client, name="probe-client")
    thread.start()
    try:
        burning.set()
        burn(3.0)
        during = {path: len(statuses) for path, statuses in answers.items()}
    finally:
        done.set()
        thread.join(timeout=10)
        health.stop()
        scrape.stop()
    assert not errors, errors
    # The probes were answered while the burn ran (a server on the main thread's loop answers none).
    assert all(count >= 3 for count in during.values()), during
    assert all(status == 200 for statuses in answers.values() for status in statuses), answers
