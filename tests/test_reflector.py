"""The reflector and the API source against the API-server test double, over real HTTP(S) on loopback.

Every scenario of issue 3 item 6: paginated initial list, watch add/modify/delete, bookmarks, a 410 with
objects deleted in the gap, connection reset, a stalled stream, a malformed object, 401/403, TLS with a
CA and a client certificate, a token file that changes, and the API server going away and coming back.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from kubeproxy.lab.apiserver import FakeApiServer
from kubeproxy.model.objects import KubeObject
from kubeproxy.sources.api import PROXY_LABEL_SELECTOR, ApiSource
from kubeproxy.sources.apiclient import ApiClient
from kubeproxy.sources.errors import AccessDenied
from kubeproxy.sources.events import Change, ChangeType, ObjectKey
from kubeproxy.sources.kubeconfig import ClientSettings, Credentials, load_kubeconfig
from kubeproxy.sources.reflector import Reflector, ResourceSpec, Tuning
from waiting import eventually

FAST = Tuning(page_size=3, watch_timeout_min=30, idle_timeout=1.0, backoff_initial=0.05, backoff_max=0.2)
SERVICES = ResourceSpec("Service", "services", "/api/v1/services", PROXY_LABEL_SELECTOR, "spec.clusterIP!=None")


def service(name: str, ip: str = "10.96.0.10", ns: str = "default", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }


class View:
    """What a consumer of the changes sees: the current objects, and every change in order."""

    def __init__(self) -> None:
        self.objects: dict[ObjectKey, KubeObject] = {}
        self.changes: list[Change] = []

    def emit(self, change: Change) -> None:
        self.changes.append(change)
        if change.new is None:
            assert change.key in self.objects, f"delete of unknown {change.key}"
            del self.objects[change.key]
        else:
            self.objects[change.key] = change.new

    def names(self) -> set[str]:
        return {k.name for k in self.objects}

    def types(self, name: str) -> list[ChangeType]:
        return [c.type for c in self.changes if c.key.name == name]


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    """Drive the server (blocking, other thread) without blocking the reflector's loop."""
    return await asyncio.to_thread(fn, *args)


Scenario = Callable[[Reflector, View], Awaitable[None]]


def run_reflector(
    settings: ClientSettings, scenario: Scenario, *, spec: ResourceSpec = SERVICES, tuning: Tuning = FAST
) -> View:
    view = View()

    async def main() -> None:
        stop = asyncio.Event()
        async with ApiClient(settings) as client:
            refl = Reflector(client, spec, view.emit, tuning=tuning, rng=random.Random(1))
            task = asyncio.create_task(refl.run(stop))
            script = asyncio.create_task(scenario(refl, view))
            try:
                # Whichever ends first: the scenario, or the reflector (it only ends by raising).
                await asyncio.wait({task, script}, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    task.result()
                script.result()
            finally:
                stop.set()
                for t in (task, script):
                    t.cancel()
                await asyncio.gather(task, script, return_exceptions=True)

    asyncio.run(main())
    return view


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as srv:
        yield srv


def plain(server: FakeApiServer) -> ClientSettings:
    return ClientSettings(server=server.url)


def test_paginated_initial_list_then_watch_add_modify_delete(server: FakeApiServer) -> None:
    for i in range(7):
        server.apply(service(f"s{i}"))
    server.apply(service("other-proxy", **{"service.kubernetes.io/service-proxy-name": "cilium"}))
    server.apply(service("headless", ip="None"))

    async def scenario(refl: Reflector, view: View) -> None:
        await eventually(lambda: refl.synced)
        assert view.names() == {f"s{i}" for i in range(7)}  # selectors: other proxies' and headless never sent
        await call(server.wait_for_watches, 1, "services")
        await call(server.apply, service("new"))
        await call(server.apply, service("s1", ip="10.96.0.11"))
        await call(server.delete, "Service", "default", "s2")
        await eventually(lambda: "s2" not in view.names() and "new" in view.names())
        await eventually(lambda: view.types("s1") == [ChangeType.ADDED, ChangeType.MODIFIED])
        s1 = view.objects[ObjectKey("Service", "default", "s1")]
        assert s1.spec.clusterIP == "10.96.0.11"  # type: ignore[union-attr]
        assert refl.resource_version == server.resource_version

    run_reflector(plain(server), scenario)
    lists = [r for r in server.requests if r.verb == "list"]
    assert len(lists) == 3  # 7 objects in pages of 3
    assert all(r.query["limit"] == "3" for r in lists)
    assert "continue" not in lists[0].query and lists[1].query["continue"] and lists[2].query["continue"]
    assert (
        lists[0].query["labelSelector"] == "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
    )
    assert lists[0].query["fieldSelector"] == "spec.clusterIP!=None"
    watch = next(r for r in server.requests if r.verb == "watch")
    assert watch.query["allowWatchBookmarks"] == "true"
    assert 30 <= int(watch.query["timeoutSeconds"]) < 60


def test_bookmark_advances_the_resume_point(server: FakeApiServer) -> None:
    server.apply(service("a"))

    async def scenario(refl: Reflector, view: View) -> None:
        await eventually(lambda: refl.synced)
        await call(server.wait_for_watches, 1, "services")
        # Changes to other resources move the global RV; only a bookmark tells this watch about it.
        for i in range(3):
            await call(server.apply, {"kind": "Node", "metadata": {"name": f"n{i}"}})
        await call(server.bookmark)
        await eventually(lambda: refl.resource_version == server.resource_version)
        rv = refl.resource_version
        await call(server.reset_connections)
        await eventually(lambda: refl.watches >= 2)
        await call(server.wait_for_watches, 1, "services")
        watches = [r for r in server.requests if r.verb == "watch"]
        assert watches[-1].query["resourceVersion"] == rv

    run_reflector(plain(server), scenario)


def test_expired_watch_relists_and_emits_the_deletes_it_missed(server: FakeApiServer) -> None:
    for name in ("a", "b", "c"):
        server.apply(service(name))

    async def scenario(refl: Reflector, view: View) -> None:
        await eventually(lambda: refl.synced)
        await call(server.wait_for_watches, 1, "services")
        await call(server.go_down)  # the watch breaks; while we are away, objects change and history is compacted
        await call(server.delete, "Service", "default", "b")
        await call(server.apply, service("c", ip="10.96.0.12"))
        await call(server.apply, service("d"))
        await call(server.compact)
        await call(server.come_up)
        await eventually(lambda: view.names() == {"a", "c", "d"})
        assert refl.lists == 2
        assert view.types("b") == [ChangeType.ADDED, ChangeType.DELETED]
        assert view.types("c") == [ChangeType.ADDED, ChangeType.MODIFIED]
        assert view.types("a") == [ChangeType.ADDED]  # unchanged objects are not re-emitted by the relist
        # a 410 ERROR event in the middle of an open watch does the same
        await call(server.wait_for_watches, 1, "services")
        await call(server.expire_watches)
        await eventually(lambda: refl.lists == 3)

    run_reflector(plain(server), scenario)


def test_connection_reset_resumes_without_relisting(server: FakeApiServer) -> None:
    server.apply(service("a"))

    async def scenario(refl: Reflector, view: View) -> None:
        await eventually(lambda: refl.synced)
        await call(server.wait_for_watches, 1, "services")
        await call(server.reset_connections)
        await call(server.apply, service("b"))
        await eventually(lambda: "b" in view.names())
        assert refl.lists == 1

    run_reflector(plain(server), scenario)


def test_stalled_stream_is_dropped_and_resumed(server: FakeApiServer) -> None:
    server.apply(service("a"))

    async def scenario(refl: Reflector, view: View) -> None:
        await eventually(lambda: refl.synced)
        await call(server.wait_for_watches, 1, "services")
        await call(server.stall_watches)
        await call(server.apply, service("b"))
        start = time.monotonic()
        await eventually(lambda: "b" in view.names())
        assert time.monotonic() - start >= 0.5  # only after the idle timeout (1 s) noticed the stall
        assert refl.lists == 1 and refl.watches >= 2

    run_reflector(plain(server), scenario)


def test_malformed_object_is_named_and_skipped(server: FakeApiServer, caplog: pytest.LogCaptureFixture) -> None:
    server.apply(service("good"))
    server.put_raw(
        "Service", "default", "bad-list", b'{"metadata":{"name":"bad-list","namespace":"default"},"spec":{"ports":"x"}}'
    )
    server.apply(service("flaky"))

    async def scenario(refl: Reflector, view: View) -> None:
        await eventually(lambda: refl.synced)
        assert view.names() == {"good", "flaky"}
        await call(server.wait_for_watches, 1, "services")
        raw = b'{"metadata":{"name":"flaky","namespace":"default"},"spec":{"clusterIP":7}}'
        await call(server.put_raw, "Service", "default", "flaky", raw)
        await call(server.apply, service("after"))
        await eventually(lambda: "after" in view.names())
        assert view.names() == {"good", "flaky", "after"}  # a malformed update is skipped: the last good one stays
        assert view.types("flaky") == [ChangeType.ADDED]
        assert refl.malformed == 2
        # ... also across a relist (the list still holds the malformed version)
        await call(server.expire_watches)
        await eventually(lambda: refl.lists == 2)
        assert view.names() == {"good", "flaky", "after"} and refl.malformed == 4  # both, again

    with caplog.at_level(logging.WARNING):
        run_reflector(plain(server), scenario)
    text = caplog.text
    assert "default/bad-list" in text and "default/flaky" in text and "malformed" in text


def test_continue_token_expiring_mid_pagination_falls_back_to_one_full_list(server: FakeApiServer) -> None:
    for i in range(7):
        server.apply(service(f"s{i}"))

    class CompactingClient(ApiClient):
        async def list_page(self, path: str, params: Mapping[str, str], *, resource: str) -> bytes:
            body = await super().list_page(path, params, resource=resource)
            if "continue" not in params:
                await call(server.apply, service("late"))
                await call(server.compact)  # the first page's snapshot is gone before page 2 is asked for
            return body

    view = View()

    async def main() -> None:
        async with CompactingClient(plain(server)) as client:
            refl = Reflector(client, SERVICES, view.emit, tuning=FAST)
            await refl._list()
            assert refl.lists == 1

    asyncio.run(main())
    assert view.names() == {f"s{i}" for i in range(7)} | {"late"}
    lists = [r for r in server.requests if r.verb == "list"]
    assert [r.status for r in lists] == [200, 410, 200]
    assert "limit" not in lists[-1].query and "continue" not in lists[-1].query


def test_an_error_answer_to_a_watch_relists_but_a_broken_connection_does_not(server: FakeApiServer) -> None:
    server.apply(service("a"))

    async def scenario(refl: Reflector, view: View) -> None:
        await eventually(lambda: refl.synced)
        await call(server.wait_for_watches, 1, "services")
        await call(server.reset_connections)  # transport: resume the watch
        await call(server.wait_for_watches, 1, "services")
        assert refl.lists == 1
        await call(server.forbid, "watch", "services")  # an answer: the position is not trustworthy
        await call(server.reset_connections)
        await eventually(lambda: any(r.status == 403 for r in server.requests))
        await call(server.allow, "watch", "services")
        await eventually(lambda: refl.lists >= 2)

    run_reflector(plain(server), scenario)


def test_a_watch_that_ends_at_once_backs_off() -> None:
    """A proxy answering every watch with an empty 200 must not turn the reflector into a hot loop."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        if request.query.get("watch"):
            return web.Response(body=b"", content_type="application/json")
        return web.json_response({"kind": "ServiceList", "metadata": {"resourceVersion": "5"}, "items": []})

    async def main() -> int:
        app = web.Application()
        app.router.add_get("/api/v1/services", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        stop = asyncio.Event()
        try:
            async with ApiClient(ClientSettings(server=f"http://127.0.0.1:{port}")) as client:
                refl = Reflector(client, SERVICES, lambda c: None, tuning=FAST, rng=random.Random(3))
                task = asyncio.create_task(refl.run(stop))
                await asyncio.sleep(1.0)
                stop.set()
                await asyncio.wait_for(task, 5)
                return refl.watches
        finally:
            await runner.cleanup()

    watches = asyncio.run(main())
    assert 2 <= watches <= 8  # backoff 0.05 s doubling (x1-2 jitter) within one second; without it: thousands


def test_forbidden_at_startup_names_verb_and_resource(server: FakeApiServer) -> None:
    server.forbid("list", "services")

    async def scenario(refl: Reflector, view: View) -> None:
        await asyncio.sleep(30)  # the reflector raises long before

    with pytest.raises(AccessDenied) as err:
        run_reflector(plain(server), scenario)
    assert err.value.status == 403
    assert "verb=list on resource=services" in err.value.explain()
    assert 'cannot list resource "services"' in err.value.message


def test_forbidden_after_startup_keeps_state_and_retries(server: FakeApiServer) -> None:
    server.apply(service("a"))

    async def scenario(refl: Reflector, view: View) -> None:
        await eventually(lambda: refl.synced)
        await call(server.wait_for_watches, 1, "services")
        await call(server.forbid, "watch", "services")
        await call(server.reset_connections)
        await eventually(lambda: any(r.status == 403 for r in server.requests))
        assert view.names() == {"a"}  # nothing torn down
        await call(server.allow, "watch", "services")
        await call(server.apply, service("b"))
        await eventually(lambda: view.names() == {"a", "b"})

    run_reflector(plain(server), scenario)


def test_unauthorized_at_startup(server: FakeApiServer) -> None:
    server.set_tokens({"right"})
    settings = ClientSettings(server=server.url, credentials=Credentials(token="wrong"))

    async def scenario(refl: Reflector, view: View) -> None:
        await asyncio.sleep(30)  # the reflector raises long before

    with pytest.raises(AccessDenied) as err:
        run_reflector(settings, scenario)
    assert err.value.status == 401 and "credentials" in err.value.explain()


def test_rotated_token_file_is_picked_up_on_401(server: FakeApiServer, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("one")
    server.set_tokens({"one"})
    settings = ClientSettings(server=server.url, credentials=Credentials(token_file=token))

    async def scenario(refl: Reflector, view: View) -> None:
        await eventually(lambda: refl.synced)
        await call(server.wait_for_watches, 1, "services")
        token.write_text("two")  # the kubelet rotated the projected token ...
        await call(server.set_tokens, {"two"})  # ... and the old one stopped working
        await call(server.reset_connections)
        await call(server.apply, service("b"))
        await eventually(lambda: "b" in view.names())

    run_reflector(settings, scenario)
    statuses = [(r.verb, r.status) for r in server.requests]
    assert ("watch", 401) in statuses
    assert statuses[-1] == ("watch", 200)


@pytest.fixture(scope="module")
def pki() -> trustme.CA:
    return trustme.CA()


def test_tls_with_ca_and_client_certificate(pki: trustme.CA, tmp_path: Path) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    pki.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_OPTIONAL
    client = pki.issue_cert("kube-proxy-client", common_name="system:kube-proxy")
    kubeconfig = tmp_path / "kubeconfig"
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "clusters": [
                    {
                        "name": "k",
                        "cluster": {
                            "server": "https://127.0.0.1:1",
                            "certificate-authority-data": b64(pki.cert_pem.bytes()),
                        },
                    }
                ],
                "users": [
                    {
                        "name": "u",
                        "user": {
                            "client-certificate-data": b64(client.cert_chain_pems[0].bytes()),
                            "client-key-data": b64(client.private_key_pem.bytes()),
                        },
                    }
                ],
            }
        )
    )
    with FakeApiServer(ssl_context=server_ctx, tokens={"unused"}) as srv:
        srv.apply(service("a"))
        settings = load_kubeconfig(kubeconfig, master=srv.url)

        async def scenario(refl: Reflector, view: View) -> None:
            await eventually(lambda: refl.synced)
            assert view.names() == {"a"}

        run_reflector(settings, scenario)
        assert srv.requests[0].user == "system:kube-proxy"

        # A server certificate from another CA is refused (and retried, never trusted).
        other = trustme.CA()
        bad = ClientSettings(server=srv.url, ca_pem=other.cert_pem.bytes(), origin="test")

        async def refused(refl: Reflector, view: View) -> None:
            await asyncio.sleep(0.5)
            assert not refl.synced

        run_reflector(bad, refused)


def test_api_server_outage_keeps_state_then_converges(server: FakeApiServer) -> None:
    for name in ("a", "b"):
        server.apply(service(name))

    async def scenario(refl: Reflector, view: View) -> None:
        await eventually(lambda: refl.synced)
        await call(server.wait_for_watches, 1, "services")
        await call(server.go_down)
        await asyncio.sleep(0.6)  # several failed reconnects
        assert view.names() == {"a", "b"}
        assert all(c.type is ChangeType.ADDED for c in view.changes)  # nothing torn down while unreachable
        await call(server.delete, "Service", "default", "a")
        await call(server.apply, service("c"))
        await call(server.come_up)
        await eventually(lambda: view.names() == {"b", "c"})
        assert refl.lists == 1  # history was still there: the watch resumed without a relist

    run_reflector(plain(server), scenario)


def test_backoff_is_capped_exponential_with_jitter() -> None:
    refl = Reflector(
        ApiClient(ClientSettings(server="http://127.0.0.1:1")), SERVICES, lambda c: None, rng=random.Random(7)
    )
    delays = [refl._backoff(n) for n in range(1, 10)]
    bases = [min(30.0, 0.8 * 2 ** (n - 1)) for n in range(1, 10)]
    assert all(b <= d <= 2 * b for d, b in zip(delays, bases, strict=True))
    assert delays[-1] <= 60.0 and len({round(d / b, 6) for d, b in zip(delays, bases, strict=True)}) > 1


def test_api_source_announces_sync_once_after_all_initial_lists(server: FakeApiServer) -> None:
    server.apply(service("a"))
    server.apply(
        {
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": "a-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "a"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.2"]}],
        }
    )
    server.apply({"kind": "Node", "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": "z1"}}})
    server.apply({"kind": "Node", "metadata": {"name": "node2"}})
    view = View()
    synced: list[int] = []

    async def main() -> None:
        stop = asyncio.Event()
        source = ApiSource(plain(server), "node1", tuning=FAST)
        task = asyncio.create_task(source.run(view.emit, lambda: synced.append(len(view.objects)), stop=stop))
        await eventually(lambda: bool(synced))
        await call(server.wait_for_watches, 3)
        await call(
            server.apply,
            {"kind": "Node", "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": "z2"}}},
        )
        await eventually(lambda: any(c.type is ChangeType.MODIFIED and c.key.kind == "Node" for c in view.changes))
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert synced == [3]  # the Service, the slice and OUR node, before the first sync
    assert {k.name for k in view.objects if k.kind == "Node"} == {"node1"}
    node_watch = next(r for r in server.requests if r.resource == "nodes" and r.verb == "watch")
    assert node_watch.query["fieldSelector"] == "metadata.name=node1"


EXEC_PLUGIN = """\
import json, os, pathlib, sys
counter = pathlib.Path(sys.argv[1])
n = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(n))
info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
print(json.dumps({"apiVersion": info["apiVersion"], "kind": "ExecCredential", "status": {"token": f"tok-{n}"}}))
"""


def test_exec_plugin_tls_server_name_and_insecure_against_a_tls_server(pki: trustme.CA, tmp_path: Path) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.issue_cert("kubernetes.default.svc").configure_cert(server_ctx)  # NOT valid for 127.0.0.1
    (tmp_path / "plugin.py").write_text(EXEC_PLUGIN)

    def kubeconfig(cluster: dict[str, Any]) -> Path:
        path = tmp_path / "kubeconfig"
        user = {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1",
                "command": sys.executable,
                "args": [str(tmp_path / "plugin.py"), str(tmp_path / "counter")],
            }
        }
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "c",
                    "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                    "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:1", **cluster}}],
                    "users": [{"name": "u", "user": user}],
                }
            )
        )
        return path

    ca_data = base64.b64encode(pki.cert_pem.bytes()).decode()
    with FakeApiServer(ssl_context=server_ctx, tokens={"tok-1"}) as srv:
        srv.apply(service("a"))
        named = load_kubeconfig(
            kubeconfig({"certificate-authority-data": ca_data, "tls-server-name": "kubernetes.default.svc"}),
            master=srv.url,
        )

        async def rotated(refl: Reflector, view: View) -> None:
            await eventually(lambda: refl.synced)
            await call(srv.wait_for_watches, 1, "services")
            await call(srv.set_tokens, {"tok-2"})  # the plugin's next token; tok-1 is now refused
            await call(srv.reset_connections)
            await call(srv.apply, service("b"))
            await eventually(lambda: view.names() == {"a", "b"})

        run_reflector(named, rotated)
        assert (tmp_path / "counter").read_text() == "2"  # re-run after the 401, not before
        assert ("watch", 401) in [(r.verb, r.status) for r in srv.requests]

        # Without tls-server-name the certificate does not match 127.0.0.1: refused, never synced.
        unnamed = load_kubeconfig(kubeconfig({"certificate-authority-data": ca_data}), master=srv.url)

        async def refused(refl: Reflector, view: View) -> None:
            await asyncio.sleep(0.5)
            assert not refl.synced

        run_reflector(unnamed, refused)
        # insecure-skip-tls-verify: no CA, no name check.
        srv.set_tokens(None)
        insecure = load_kubeconfig(kubeconfig({"insecure-skip-tls-verify": True}), master=srv.url)

        async def listed(refl: Reflector, view: View) -> None:
            await eventually(lambda: refl.synced)

        run_reflector(insecure, listed)
