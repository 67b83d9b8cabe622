"""The API-server test double speaks the real list/watch protocol: proven with plain http.client on loopback."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import trustme

from kubeproxy.lab.apiserver import TOKEN_USER, FakeApiServer

SERVICES = "/api/v1/services"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
NODES = "/api/v1/nodes"


def svc(
    name: str,
    *,
    namespace: str | None = "default",
    labels: Mapping[str, str] | None = None,
    ip: str = "10.96.0.10",
    port: int = 80,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    if labels:
        metadata["labels"] = dict(labels)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {"clusterIP": ip, "ports": [{"port": port, "protocol": "TCP"}]},
    }


def eps(name: str, *, service: str, endpoints: int = 1, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [f"10.244.{i // 250}.{i % 250 + 1}"], "conditions": {"ready": True}} for i in range(endpoints)
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def node(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}}


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


def connect(
    server: FakeApiServer, *, context: ssl.SSLContext | None = None, timeout: float = 5.0
) -> http.client.HTTPConnection:
    if context is not None:
        return http.client.HTTPSConnection("127.0.0.1", server.port, timeout=timeout, context=context)
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)


def target(path: str, query: Mapping[str, Any] | None = None) -> str:
    return f"{path}?{urllib.parse.urlencode(query)}" if query else path


def get(
    server: FakeApiServer,
    path: str,
    query: Mapping[str, Any] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> Response:
    conn = connect(server, context=context)
    try:
        conn.request("GET", target(path, query), headers=dict(headers or {}))
        resp = conn.getresponse()
        return Response(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def names(body: Any) -> list[str]:
    return [f"{i['metadata'].get('namespace', '')}/{i['metadata']['name']}" for i in body["items"]]


class Watch:
    """A watch read line by line with http.client, as a synchronous client would."""

    def __init__(
        self,
        server: FakeApiServer,
        path: str,
        query: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.conn = connect(server, context=context)
        self.conn.request("GET", target(path, {**(query or {}), "watch": "true"}), headers=dict(headers or {}))
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.read()
        assert self.resp.getheader("Content-Type") == "application/json"
        assert self.resp.getheader("Transfer-Encoding") == "chunked"
        self.buffer = b""
        self.ended = False

    def line(self) -> bytes:
        """The next line; b"" at the clean end of the stream (the final chunk), IncompleteRead if the stream
        ended without it. The chunked framing is decoded here: http.client's readline cannot tell them apart."""
        while b"\n" not in self.buffer:
            if self.ended or not self._read_chunk():
                assert not self.buffer, f"partial line at the end: {self.buffer!r}"
                return b""
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def _read_chunk(self) -> bool:
        fp = self.resp.fp
        assert fp is not None
        size_line = fp.readline()
        if not size_line:
            raise http.client.IncompleteRead(self.buffer)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            fp.readline()  # the CRLF after the (empty) trailer
            self.ended = True
            return False
        data = fp.read(size + 2)
        if len(data) < size + 2:
            raise http.client.IncompleteRead(data)
        self.buffer += data[:-2]
        return True

    def next(self) -> dict[str, Any]:
        line = self.line()
        assert line.endswith(b"\n"), f"stream ended: {line!r}"
        event: dict[str, Any] = json.loads(line)
        return event

    def take(self, n: int) -> list[dict[str, Any]]:
        return [self.next() for _ in range(n)]

    def rest(self) -> list[dict[str, Any]]:
        """Every remaining event up to the clean end of the stream (final chunk)."""
        events = []
        while line := self.line():
            events.append(json.loads(line))
        return events

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as srv:
        yield srv


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    opened: list[Watch] = []
    yield opened
    for w in opened:
        w.close()


def open_watch(
    watches: list[Watch], server: FakeApiServer, path: str, query: Mapping[str, Any] | None = None, **kwargs: Any
) -> Watch:
    w = Watch(server, path, query, **kwargs)
    watches.append(w)
    return w


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [
        (e["type"], e["object"]["metadata"].get("name", ""), e["object"]["metadata"]["resourceVersion"]) for e in events
    ]


# ------------------------------------------------------------------------------------------- store


def test_apply_sets_metadata_and_returns_rvs(server: FakeApiServer) -> None:
    rv0 = int(server.resource_version)
    rv1 = server.apply(svc("a", namespace=None))
    rv2 = server.apply(svc("a", ip="10.96.0.11"))
    rv3 = server.apply(node("n1"))
    assert int(rv1) > rv0 and int(rv2) > int(rv1) and int(rv3) > int(rv2)
    assert server.resource_version == rv3
    stored = server.get_object("Service", "default", "a")
    assert stored["metadata"]["namespace"] == "default"
    assert stored["metadata"]["resourceVersion"] == rv2
    assert stored["spec"]["clusterIP"] == "10.96.0.11"
    body = get(server, "/api/v1/namespaces/default/services").json()
    uid = body["items"][0]["metadata"]["uid"]
    server.apply(svc("a", ip="10.96.0.12"))
    assert get(server, SERVICES).json()["items"][0]["metadata"]["uid"] == uid  # stable across updates
    server.delete("Service", "default", "a")
    server.apply(svc("a"))
    assert get(server, SERVICES).json()["items"][0]["metadata"]["uid"] != uid  # a new object
    with pytest.raises(KeyError):
        server.delete("Service", "default", "nope")
    with pytest.raises(ValueError, match="kind"):
        server.apply({"kind": "Pod", "metadata": {"name": "p"}})
    # What is stored is a copy: later changes to the caller's dict do not leak in.
    obj = svc("copy")
    server.apply(obj)
    obj["spec"]["ports"][0]["port"] = 1
    obj["metadata"]["name"] = "changed"
    assert server.get_object("Service", "default", "copy")["spec"]["ports"][0]["port"] == 80
    before = server.resource_version
    with pytest.raises(TypeError):
        server.apply({**svc("bad"), "spec": {"x": object()}})
    assert server.resource_version == before


def test_apply_before_start_and_restart_on_same_port() -> None:
    srv = FakeApiServer()
    rv = srv.apply(svc("early"))
    with srv:
        port = srv.port
        assert get(srv, SERVICES).json()["metadata"]["resourceVersion"] == rv
    srv.stop()  # idempotent
    with srv:
        assert srv.port == port
        assert names(get(srv, SERVICES).json()) == ["default/early"]


# ------------------------------------------------------------------------------------------- list


def test_list_shapes_sorting_and_non_resource_paths(server: FakeApiServer) -> None:
    server.apply(svc("b", namespace="zeta"))
    server.apply(svc("b"))
    server.apply(svc("a"))
    server.apply(eps("a-1", service="a"))
    server.apply(node("n1"))
    resp = get(server, SERVICES)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert body["kind"] == "ServiceList" and body["apiVersion"] == "v1"
    assert body["metadata"] == {"resourceVersion": server.resource_version}
    assert names(body) == ["default/a", "default/b", "zeta/b"]
    assert names(get(server, "/api/v1/namespaces/zeta/services").json()) == ["zeta/b"]
    slices = get(server, SLICES).json()
    assert (slices["kind"], slices["apiVersion"]) == ("EndpointSliceList", "discovery.k8s.io/v1")
    assert names(get(server, "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices").json()) == ["default/a-1"]
    nodes = get(server, NODES).json()
    assert (nodes["kind"], nodes["apiVersion"], names(nodes)) == ("NodeList", "v1", ["/n1"])
    assert get(server, "/api/v1/nodes/n1").json()["metadata"]["name"] == "n1"
    missing = get(server, "/api/v1/nodes/n2")
    assert missing.status == 404
    assert missing.json() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'nodes "n2" not found',
        "reason": "NotFound",
        "details": {"name": "n2", "kind": "nodes"},
        "code": 404,
    }
    assert get(server, "/version").json() == {"major": "1", "minor": "34", "gitVersion": "v1.34.0-fake"}
    assert get(server, "/healthz").body == b"ok"
    for path in ("/api/v1/pods", "/apis/discovery.k8s.io/v1/services", "/api/v1/namespaces/x/nodes", "/nope"):
        resp = get(server, path)
        assert (resp.status, resp.json()["kind"], resp.json()["code"]) == (404, "Status", 404), path


def test_list_pagination_serves_one_snapshot(server: FakeApiServer) -> None:
    for name in "edcba":
        server.apply(svc(name))
    first = get(server, SERVICES, {"limit": 2}).json()
    rv = first["metadata"]["resourceVersion"]
    assert names(first) == ["default/a", "default/b"]
    assert first["metadata"]["remainingItemCount"] == 3
    token = first["metadata"]["continue"]
    # Writes between pages are invisible to the pages of this list.
    server.apply(svc("bb"))
    server.apply(svc("c", ip="10.96.9.9"))
    server.delete("Service", "default", "d")
    second = get(server, SERVICES, {"limit": 2, "continue": token}).json()
    assert names(second) == ["default/c", "default/d"]
    assert second["items"][0]["spec"]["clusterIP"] == "10.96.0.10"
    assert second["metadata"]["resourceVersion"] == rv
    third = get(server, SERVICES, {"limit": 2, "continue": second["metadata"]["continue"]}).json()
    assert names(third) == ["default/e"]
    assert third["metadata"] == {"resourceVersion": rv}  # the last page has no continue
    # A fresh list sees the new state.
    fresh = get(server, SERVICES, {"limit": 10}).json()
    assert names(fresh) == ["default/a", "default/b", "default/bb", "default/c", "default/e"]
    assert "continue" not in fresh["metadata"]
    assert fresh["metadata"]["resourceVersion"] == server.resource_version
    bad = get(server, SERVICES, {"limit": 2, "continue": "garbage!"})
    assert bad.status == 400


def test_selectors_on_lists(server: FakeApiServer) -> None:
    server.apply(svc("plain", ip="10.96.0.1"))
    server.apply(svc("headless", labels={"service.kubernetes.io/headless": ""}, ip="None"))
    server.apply(svc("other", labels={"service.kubernetes.io/service-proxy-name": "x", "tier": "web"}))
    server.apply(svc("web", namespace="prod", labels={"tier": "web"}, ip="10.96.0.4"))

    def listed(**query: str) -> list[str]:
        resp = get(server, SERVICES, query)
        assert resp.status == 200, resp.body
        return names(resp.json())

    kube_proxy = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
    assert listed(labelSelector=kube_proxy) == ["default/plain", "prod/web"]
    assert listed(labelSelector="tier=web") == ["default/other", "prod/web"]
    assert listed(labelSelector="tier==web,service.kubernetes.io/service-proxy-name") == ["default/other"]
    assert listed(labelSelector="tier!=web") == ["default/headless", "default/plain"]  # missing label matches !=
    assert listed(labelSelector="tier in (web,db),tier notin (db)") == ["default/other", "prod/web"]
    assert listed(fieldSelector="metadata.name=web") == ["prod/web"]
    assert listed(fieldSelector="metadata.namespace!=default") == ["prod/web"]
    assert listed(fieldSelector="spec.clusterIP==None") == ["default/headless"]
    assert listed(fieldSelector="spec.nothing=") == ["default/headless", "default/other", "default/plain", "prod/web"]
    assert listed(labelSelector="tier=web", fieldSelector="metadata.namespace=prod") == ["prod/web"]
    # Selectors and pagination compose: pages hold only matching objects.
    first = get(server, SERVICES, {"labelSelector": "tier=web", "limit": 1}).json()
    assert names(first) == ["default/other"] and "remainingItemCount" not in first["metadata"]
    second = get(server, SERVICES, {"labelSelector": "tier=web", "limit": 1, "continue": first["metadata"]["continue"]})
    assert names(second.json()) == ["prod/web"] and "continue" not in second.json()["metadata"]
    assert get(server, SERVICES, {"labelSelector": "a b"}).status == 400


def test_large_slice_lists_and_watches(server: FakeApiServer, watches: list[Watch]) -> None:
    w = open_watch(watches, server, SLICES, {"resourceVersion": server.resource_version})
    server.apply(eps("big", service="big", endpoints=1000))
    event = w.next()
    assert event["type"] == "ADDED" and len(event["object"]["endpoints"]) == 1000
    assert len(get(server, SLICES).json()["items"][0]["endpoints"]) == 1000


# ------------------------------------------------------------------------------------------- watch


def test_watch_replays_history_then_streams_live(server: FakeApiServer, watches: list[Watch]) -> None:
    rv_a = server.apply(svc("a"))
    rv_b = server.apply(svc("b"))
    server.apply(eps("a-1", service="a"))  # another resource: not in a Service watch
    rv_a2 = server.apply(svc("a", port=81))
    w = open_watch(watches, server, SERVICES, {"resourceVersion": rv_a})
    assert summary(w.take(2)) == [("ADDED", "b", rv_b), ("MODIFIED", "a", rv_a2)]
    server.wait_for_watches(1, "services")
    assert server.open_watches("services") == 1 and server.open_watches("nodes") == 0
    rv_c = server.apply(svc("c"))
    rv_c2 = server.apply(svc("c", port=99))
    rv_del = server.delete("Service", "default", "c")
    events = w.take(3)
    assert summary(events) == [("ADDED", "c", rv_c), ("MODIFIED", "c", rv_c2), ("DELETED", "c", rv_del)]
    assert events[2]["object"]["spec"]["ports"][0]["port"] == 99  # the last state, stamped with the delete's RV
    assert events[0]["object"]["kind"] == "Service"


def test_watch_from_zero_or_empty_sends_synthetic_added(server: FakeApiServer, watches: list[Watch]) -> None:
    server.apply(svc("b"))
    server.apply(svc("a", port=1))
    rv_a = server.apply(svc("a", port=2))
    for query in ({"resourceVersion": "0"}, {}):
        w = open_watch(watches, server, SERVICES, query)
        events = w.take(2)
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "a"), ("ADDED", "b")]
        assert events[0]["object"]["metadata"]["resourceVersion"] == rv_a
    server.wait_for_watches(2, "services")
    rv_c = server.apply(svc("c"))
    for w in watches:
        assert summary([w.next()]) == [("ADDED", "c", rv_c)]


def test_watch_selector_transitions(server: FakeApiServer, watches: list[Watch]) -> None:
    server.apply(svc("a", labels={"tier": "web"}))
    w = open_watch(watches, server, SERVICES, {"resourceVersion": "0", "labelSelector": "tier=web"})
    assert summary(w.take(1))[0][:2] == ("ADDED", "a")
    rv_out = server.apply(svc("a", labels={"tier": "db"}, port=8080))
    server.apply(svc("a", labels={"tier": "db"}, port=8081))  # invisible: matched neither before nor after
    rv_in = server.apply(svc("a", labels={"tier": "web"}, port=8082))
    rv_mod = server.apply(svc("a", labels={"tier": "web"}, port=8083))
    gone, back, modified = w.take(3)
    assert summary([gone, back, modified]) == [
        ("DELETED", "a", rv_out),
        ("ADDED", "a", rv_in),
        ("MODIFIED", "a", rv_mod),
    ]
    # The DELETED carries the object as it last matched (port 80), stamped with the new RV, like the watch cache.
    assert gone["object"]["metadata"]["labels"] == {"tier": "web"}
    assert gone["object"]["spec"]["ports"][0]["port"] == 80
    # The same transitions replay from history.
    replay = open_watch(
        watches, server, SERVICES, {"resourceVersion": str(int(rv_out) - 1), "labelSelector": "tier=web"}
    )
    assert [e["type"] for e in replay.take(3)] == ["DELETED", "ADDED", "MODIFIED"]


def test_bookmarks_only_when_asked(server: FakeApiServer, watches: list[Watch]) -> None:
    rv = server.resource_version
    with_bm = open_watch(watches, server, SERVICES, {"resourceVersion": rv, "allowWatchBookmarks": "true"})
    without = open_watch(watches, server, SLICES, {"resourceVersion": rv})
    server.wait_for_watches(2)
    server.apply(node("n1"))  # moves the RV without any event on these watches
    server.bookmark()
    assert with_bm.next() == {
        "type": "BOOKMARK",
        "object": {"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": server.resource_version}},
    }
    rv_s = server.apply(eps("x", service="x"))
    assert summary([without.next()]) == [("ADDED", "x", rv_s)]  # no bookmark came first


def test_timeout_ends_cleanly_with_a_bookmark(server: FakeApiServer, watches: list[Watch]) -> None:
    server.apply(svc("a"))
    started = time.monotonic()
    query = {"resourceVersion": "0", "timeoutSeconds": "0.3", "allowWatchBookmarks": "1"}
    w = open_watch(watches, server, SERVICES, query)
    events = w.rest()
    assert time.monotonic() - started >= 0.25
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["resourceVersion"] == server.resource_version
    plain = open_watch(watches, server, NODES, {"timeoutSeconds": "0.1"})
    assert plain.rest() == []


def test_compact_expires_old_rvs_and_continue_tokens(server: FakeApiServer, watches: list[Watch]) -> None:
    old = server.apply(svc("a"))
    server.apply(svc("b"))
    server.apply(svc("c"))
    token = get(server, SERVICES, {"limit": 1}).json()["metadata"]["continue"]
    server.compact()
    current = server.resource_version
    w = open_watch(watches, server, SERVICES, {"resourceVersion": old})
    assert w.rest() == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: {old} ({current})",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]
    resp = get(server, SERVICES, {"limit": 1, "continue": token})
    assert resp.status == 410
    assert resp.json() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "The provided continue parameter is too old to display a consistent list result. "
        "You can start a new list without the continue parameter.",
        "reason": "Expired",
        "code": 410,
    }
    # From the compaction point on, watching works.
    ok = open_watch(watches, server, SERVICES, {"resourceVersion": current})
    rv_d = server.apply(svc("d"))
    assert summary([ok.next()]) == [("ADDED", "d", rv_d)]


def test_expire_watches(server: FakeApiServer, watches: list[Watch]) -> None:
    last = server.apply(svc("a"))
    w = open_watch(watches, server, SERVICES, {"resourceVersion": last})
    server.wait_for_watches(1)
    server.expire_watches()
    events = w.rest()
    assert [(e["type"], e["object"]["code"], e["object"]["reason"]) for e in events] == [("ERROR", 410, "Expired")]
    assert server.open_watches() == 0
    again = open_watch(watches, server, SERVICES, {"resourceVersion": last}).rest()
    assert again[0]["type"] == "ERROR" and again[0]["object"]["code"] == 410


def test_reset_connections_aborts_without_final_chunk(server: FakeApiServer, watches: list[Watch]) -> None:
    w = open_watch(watches, server, SERVICES, {"resourceVersion": server.resource_version})
    server.wait_for_watches(1)
    server.reset_connections()
    assert server.open_watches() == 0
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        w.line()
    # The server itself is fine.
    assert get(server, SERVICES).status == 200


def test_stall_watches(server: FakeApiServer, watches: list[Watch]) -> None:
    stalled = open_watch(
        watches, server, SERVICES, {"resourceVersion": server.resource_version, "allowWatchBookmarks": "1"}
    )
    server.wait_for_watches(1)
    server.stall_watches()
    assert (server.open_watches(), server.stalled_watches("services")) == (0, 1)
    rv = server.apply(svc("a"))
    server.bookmark()
    fresh = open_watch(watches, server, SERVICES, {"resourceVersion": "0"})
    assert summary([fresh.next()]) == [("ADDED", "a", rv)]
    assert stalled.conn.sock is not None
    stalled.conn.sock.settimeout(1.0)
    with pytest.raises(TimeoutError):
        stalled.line()
    # The connection is still open: the server did not close it (no EOF, no reset).
    assert server.stalled_watches() == 1
    stalled.close()
    deadline = time.monotonic() + 5
    while server.stalled_watches() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stalled_watches() == 0  # the client leaving ends the stalled handler


def test_go_down_and_come_up(server: FakeApiServer, watches: list[Watch]) -> None:
    rv = server.apply(svc("a"))
    port = server.port
    w = open_watch(watches, server, SERVICES, {"resourceVersion": rv})
    server.wait_for_watches(1)
    server.go_down()
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        w.line()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    rv2 = server.apply(svc("b"))  # the store keeps working while down
    server.come_up()
    assert server.port == port and server.resource_version == rv2
    body = get(server, SERVICES).json()
    assert names(body) == ["default/a", "default/b"] and body["metadata"]["resourceVersion"] == rv2
    resumed = open_watch(watches, server, SERVICES, {"resourceVersion": rv})
    assert summary([resumed.next()]) == [("ADDED", "b", rv2)]


def test_wait_for_watches_times_out(server: FakeApiServer) -> None:
    with pytest.raises(TimeoutError):
        server.wait_for_watches(1, "nodes", timeout=0.05)


def test_mutators_are_thread_safe(server: FakeApiServer, watches: list[Watch]) -> None:
    w = open_watch(watches, server, SERVICES, {"resourceVersion": server.resource_version})
    server.wait_for_watches(1)

    def writer(prefix: str) -> None:
        for i in range(25):
            server.apply(svc(f"{prefix}{i}"))

    threads = [threading.Thread(target=writer, args=(p,)) for p in "xyz"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in w.take(75)]
    assert rvs == sorted(rvs) and len(set(rvs)) == 75


# ------------------------------------------------------------------------------------------- malformed objects


def test_put_raw_is_served_like_any_object(server: FakeApiServer, watches: list[Watch]) -> None:
    w = open_watch(watches, server, SERVICES, {"resourceVersion": server.resource_version})
    server.wait_for_watches(1)
    raw = b'{"metadata":{"name":"x","namespace":"d"},"spec":{"ports":"oops"}}'
    rv = server.put_raw("Service", "d", "x", raw)
    item = get(server, SERVICES).json()["items"][0]
    assert item == {"metadata": {"name": "x", "namespace": "d", "resourceVersion": rv}, "spec": {"ports": "oops"}}
    assert w.next() == {"type": "ADDED", "object": item}
    # Missing name/namespace are filled in; an update is a MODIFIED.
    rv2 = server.put_raw("Service", "d", "x", b'{"spec":[]}')
    assert w.next() == {
        "type": "MODIFIED",
        "object": {"spec": [], "metadata": {"name": "x", "namespace": "d", "resourceVersion": rv2}},
    }
    # Bytes that are not a JSON object are served verbatim (and match every selector).
    server.put_raw("Node", "", "broken", b"[1,2")
    resp = get(server, NODES, {"labelSelector": "a=b"})
    assert resp.body.endswith(b'"items":[[1,2]}')


# ------------------------------------------------------------------------------------------- auth


def test_bearer_tokens(watches: list[Watch]) -> None:
    with FakeApiServer(tokens=["s3cret"]) as srv:
        resp = get(srv, SERVICES)
        assert resp.status == 401
        assert resp.json() == {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "Unauthorized",
            "reason": "Unauthorized",
            "code": 401,
        }
        assert get(srv, SERVICES, headers={"Authorization": "Bearer wrong"}).status == 401
        assert get(srv, SERVICES, headers={"Authorization": "Bearer s3cret"}).status == 200
        assert get(srv, "/healthz").status == 200  # public, like system:public-info-viewer
        w = open_watch(watches, srv, SERVICES, headers={"Authorization": "Bearer s3cret"})
        srv.wait_for_watches(1)
        srv.set_tokens(["other"])
        assert get(srv, SERVICES, headers={"Authorization": "Bearer s3cret"}).status == 401
        srv.set_tokens(None)
        assert get(srv, SERVICES).status == 200
        svc_requests = [r for r in srv.requests if r.path == SERVICES]
        assert [(r.status, r.user, r.verb, r.resource) for r in svc_requests] == [
            (401, None, "list", "services"),
            (401, None, "list", "services"),
            (200, TOKEN_USER, "list", "services"),
            (200, TOKEN_USER, "watch", "services"),
            (401, None, "list", "services"),
            (200, None, "list", "services"),
        ]
        assert svc_requests[3].query == {"watch": "true"}
        w.close()


def test_forbidden_with_the_rbac_message(server: FakeApiServer) -> None:
    server.forbid("list", "services")
    server.forbid("watch", "endpointslices")
    resp = get(server, SERVICES, headers={"Authorization": "Bearer t"})
    assert resp.status == 403
    assert resp.json() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'services is forbidden: User "system:serviceaccount:kube-system:kube-proxy" cannot list '
        'resource "services" in API group "" at the cluster scope',
        "reason": "Forbidden",
        "details": {"kind": "services"},
        "code": 403,
    }
    assert get(server, SERVICES, {"watch": "1", "timeoutSeconds": "0.05"}).status == 200  # watch is still allowed
    resp = get(server, "/apis/discovery.k8s.io/v1/namespaces/x/endpointslices", {"watch": "true"})
    assert resp.status == 403
    assert resp.json()["message"] == (
        'endpointslices is forbidden: User "system:anonymous" cannot watch resource "endpointslices" '
        'in API group "discovery.k8s.io" in the namespace "x"'
    )
    assert get(server, SLICES).status == 200
    server.allow("list", "services")
    assert get(server, SERVICES).status == 200
    assert [r.status for r in server.requests if r.resource == "services" and r.verb == "list"] == [403, 200]


def test_tls_with_client_certificates(watches: list[Watch]) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_OPTIONAL
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_ctx)
    cert_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(cert_ctx)
    ca.issue_cert("kube-proxy", common_name="system:kube-proxy").configure_cert(cert_ctx)
    with FakeApiServer(ssl_context=server_ctx, tokens=["tok"]) as srv:
        assert srv.url == f"https://127.0.0.1:{srv.port}"
        rv = srv.apply(svc("a"))
        assert get(srv, SERVICES, context=client_ctx).status == 401
        assert get(srv, SERVICES, context=client_ctx, headers={"Authorization": "Bearer tok"}).status == 200
        assert names(get(srv, SERVICES, context=cert_ctx).json()) == ["default/a"]
        w = open_watch(watches, srv, SERVICES, {"resourceVersion": "0"}, context=cert_ctx)
        assert summary([w.next()]) == [("ADDED", "a", rv)]
        users = [r.user for r in srv.requests]
        assert users == [None, TOKEN_USER, "system:kube-proxy", "system:kube-proxy"]
        srv.reset_connections()  # TLS connections abort as well
        with pytest.raises((http.client.IncompleteRead, ConnectionError, ssl.SSLError)):
            w.line()


# ------------------------------------------------------------------------------------------- extras


def test_namespaced_and_field_selected_watches(server: FakeApiServer, watches: list[Watch]) -> None:
    rv = server.resource_version
    in_ns = open_watch(watches, server, "/api/v1/namespaces/prod/services", {"resourceVersion": rv})
    one_node = open_watch(watches, server, NODES, {"resourceVersion": rv, "fieldSelector": "metadata.name=n2"})
    server.wait_for_watches(2)
    server.apply(svc("a"))
    rv_b = server.apply(svc("b", namespace="prod"))
    server.apply(node("n1"))
    rv_n2 = server.apply(node("n2"))
    assert summary([in_ns.next()]) == [("ADDED", "b", rv_b)]
    assert summary([one_node.next()]) == [("ADDED", "n2", rv_n2)]
    bad = get(server, SERVICES, {"watch": "true", "resourceVersion": "abc"})
    assert bad.status == 400 and bad.json()["reason"] == "BadRequest"


def test_apply_many_and_max_history(watches: list[Watch]) -> None:
    with FakeApiServer(max_history=4) as srv:
        first = srv.apply(svc("first"))
        last = srv.apply_many(svc(f"s{i}") for i in range(10))
        assert int(last) == int(first) + 10 == int(srv.resource_version)
        assert len(get(srv, SERVICES).json()["items"]) == 11
        # Only a window of recent events is retained: an RV from before it is too old, a recent one replays.
        expired = open_watch(watches, srv, SERVICES, {"resourceVersion": first})
        assert expired.rest()[0]["object"]["code"] == 410
        recent = open_watch(watches, srv, SERVICES, {"resourceVersion": str(int(last) - 2)})
        assert [e["object"]["metadata"]["name"] for e in recent.take(2)] == ["s8", "s9"]


def test_socket_factory_and_prompt_stop(watches: list[Watch]) -> None:
    asked: list[int] = []

    def factory(port: int) -> socket.socket:
        asked.append(port)
        return socket.create_server(("127.0.0.1", port))

    srv = FakeApiServer(socket_factory=factory)
    with srv:
        srv.go_down()
        srv.come_up()
        assert asked == [0, srv.port]
        live = open_watch(watches, srv, SERVICES)
        stalled = open_watch(watches, srv, NODES)
        srv.wait_for_watches(2)
        srv.stall_watches()
        started = time.monotonic()
    assert time.monotonic() - started < 5.0  # stop() aborts open and stalled watches instead of waiting
    for w in (live, stalled):
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            w.line()
