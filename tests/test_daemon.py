"""Daemon and runner behaviour with the fake kernel: initial-sync gating, coalescing, minimum
interval, failure -> retry with a full sync. Asserts counts and order, never wall-clock time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from builders import endpoint_slice, node, service
from kubeproxy import daemon
from kubeproxy.config import ProxyConfig
from kubeproxy.daemon import Proxy, build_backends
from kubeproxy.kernel.nft import FakeNft, NftError
from kubeproxy.lab.apiserver import FakeApiServer
from kubeproxy.model import objects
from kubeproxy.runner import SyncRunner
from kubeproxy.sources.events import Change, ChangeType, ObjectKey
from waiting import eventually


def change(obj: object, kind: str, ns: str, name: str) -> Change:
    return Change(ChangeType.ADDED, ObjectKey(kind, ns, name), None, obj)  # type: ignore[arg-type]


class FlakyNft(FakeNft):
    def __init__(self) -> None:
        super().__init__()
        self.failures_left = 0

    def run(self, script: str) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise NftError("simulated failure")
        super().run(script)


def make_proxy(nft: FakeNft) -> Proxy:
    cfg = ProxyConfig(manifests=Path(), hostname_override="node1", cluster_cidrs=("10.244.0.0/16",))
    return Proxy(cfg, build_backends(cfg, nft))


def test_nothing_is_programmed_before_initial_lists_are_complete() -> None:
    async def scenario() -> None:
        nft = FakeNft()
        proxy = make_proxy(nft)
        proxy.on_change(change(service("svc1", "10.96.0.10"), "Service", "ns1", "svc1"))
        await proxy.sync()
        assert nft.transactions == [] and nft.tables == {}
        proxy.on_change(change(endpoint_slice("s1", "svc1", ["10.244.1.2"]), "EndpointSlice", "ns1", "s1"))
        proxy.state.services_synced = proxy.state.slices_synced = True
        await proxy.sync()
        assert ("ip", "kube-proxy") in nft.tables and ("ip6", "kube-proxy") in nft.tables

    asyncio.run(scenario())


def test_other_nodes_are_ignored_and_own_node_feeds_nodeports() -> None:
    async def scenario() -> None:
        nft = FakeNft()
        proxy = make_proxy(nft)
        proxy.on_change(change(node("node2", "192.168.50.2"), "Node", "", "node2"))
        proxy.on_change(change(node("node1", "192.168.50.1"), "Node", "", "node1"))
        proxy.state.services_synced = proxy.state.slices_synced = True
        await proxy.sync()
        assert set(nft.tables[("ip", "kube-proxy")].elements["nodeport-ips"]) == {"192.168.50.1"}

    asyncio.run(scenario())


def test_a_zone_label_change_on_our_node_forces_a_full_sync() -> None:
    def zoned(zone: str) -> objects.Node:
        obj = objects.from_builtins(
            "Node", {"metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": zone}}}
        )
        assert isinstance(obj, objects.Node)
        return obj

    async def scenario() -> None:
        nft = FakeNft()
        proxy = make_proxy(nft)
        proxy.on_change(change(zoned("z1"), "Node", "", "node1"))
        proxy.state.services_synced = proxy.state.slices_synced = True
        await proxy.sync()
        proxy.on_change(change(service("svc1", "10.96.0.10"), "Service", "ns1", "svc1"))
        before = len(nft.transactions)
        await proxy.sync()
        assert not any(t.startswith("add table") for t in nft.transactions[before:])  # partial
        proxy.on_change(change(zoned("z2"), "Node", "", "node1"))
        assert proxy.state.node.zone == "z1"
        before = len(nft.transactions)
        await proxy.sync()
        assert proxy.state.node.zone == "z2"
        assert any(t.startswith("add table ip kube-proxy") for t in nft.transactions[before:])  # full

    asyncio.run(scenario())


def test_failed_sync_is_retried_as_a_full_sync() -> None:
    async def scenario() -> None:
        nft = FlakyNft()
        proxy = make_proxy(nft)
        proxy.state.services_synced = proxy.state.slices_synced = True
        await proxy.sync()  # initial full sync
        proxy.on_change(change(service("svc1", "10.96.0.10"), "Service", "ns1", "svc1"))
        nft.failures_left = 1
        try:
            await proxy.sync()
        except NftError:
            pass
        else:
            raise AssertionError("the sync should have failed")
        before = len(nft.transactions)
        await proxy.sync()
        retried = nft.transactions[before:]
        assert any(t.startswith("add table ip kube-proxy") for t in retried)  # full: skeleton rewritten
        assert "10.96.0.10" in nft.tables[("ip", "kube-proxy")].elements["cluster-ips"]

    asyncio.run(scenario())


def test_runner_coalesces_requests_and_respects_min_interval() -> None:
    async def scenario() -> None:
        calls: list[int] = []

        async def fn() -> float | None:
            calls.append(1)
            return None

        runner = SyncRunner(fn, min_interval=0.3, retry_interval=10)
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        for _ in range(20):  # a burst of requests within the minimum interval
            runner.request()
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        stop.set()
        await task
        # The first request runs at once; the rest of the burst coalesces into at most one more
        # run, which the minimum interval holds back until after the burst.
        assert 1 <= len(calls) <= 2

    asyncio.run(scenario())


def test_runner_retries_after_failure_and_honours_followup() -> None:
    async def scenario() -> None:
        outcomes: list[str] = []

        async def fn() -> float | None:
            outcomes.append("run")
            if len(outcomes) == 1:
                raise RuntimeError("boom")
            if len(outcomes) == 2:
                return 0.01  # ask to run again soon (stale chain deletion)
            return None

        runner = SyncRunner(fn, min_interval=0.0, retry_interval=0.01)
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        runner.request()
        for _ in range(200):
            if len(outcomes) >= 3:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task
        assert len(outcomes) == 3 and runner.failures == 1  # failed, retried without a request, follow-up

    asyncio.run(scenario())


def test_startup_misconfiguration_is_one_clear_error_and_exit_2(tmp_path: Path) -> None:
    from kubeproxy.cli import main

    assert main([f"--manifests={tmp_path / 'missing'}", "--hostname-override=node1"]) == 2
    assert main(["--proxy-mode=userspace", f"--manifests={tmp_path}"]) == 2
    assert main(["--cluster-cidr=10.0.0.0/8,10.1.0.0/16", f"--manifests={tmp_path}"]) == 2
    assert main(["--kubeconfig", str(tmp_path / "no-such-kubeconfig"), "--hostname-override=node1"]) == 2
    (tmp_path / "kp.yaml").write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: Other\n")
    assert main([f"--config={tmp_path / 'kp.yaml'}"]) == 2


def test_config_file_client_connection_kubeconfig(tmp_path: Path) -> None:
    from kubeproxy.cli import load_config

    (tmp_path / "kp.yaml").write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
        "clientConnection:\n  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf\n"
    )
    cfg = load_config([f"--config={tmp_path / 'kp.yaml'}"])
    assert cfg.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf" and cfg.manifests is None
    # Upstream: the file replaces the flag-built configuration; --kubeconfig is one of those flags.
    assert load_config([f"--config={tmp_path / 'kp.yaml'}", "--kubeconfig=/k"]).kubeconfig.endswith("kubeconfig.conf")


def _api_objects(server: FakeApiServer) -> None:
    server.apply(
        {
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "ns1"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]},
        }
    )
    server.apply(_api_slice("10.244.1.2"))


def _api_slice(ip: str) -> dict[str, object]:
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "ns1", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}],
    }


def test_daemon_from_the_api_server_programs_and_follows_changes() -> None:
    with FakeApiServer() as server:
        _api_objects(server)
        cfg = ProxyConfig(master=server.url, hostname_override="node1", min_sync_period=0.01)
        nft = FakeNft()

        async def scenario() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(daemon.run(cfg, nft=nft, stop=stop))
            await eventually(lambda: "10.244.1.2" in nft.dump())
            await asyncio.to_thread(server.apply, _api_slice("10.244.1.3"))
            await eventually(lambda: "10.244.1.3" in nft.dump() and "10.244.1.2" not in nft.dump())
            stop.set()
            assert await task == 0

        asyncio.run(scenario())


def test_missing_permission_stops_startup_with_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubeproxy.cli import main

    monkeypatch.setattr(daemon, "NftCli", FakeNft)  # never the host's kernel, even if it went wrong
    with FakeApiServer() as server:
        _api_objects(server)
        server.forbid("watch", "endpointslices")
        server.forbid("list", "endpointslices")
        assert main([f"--master={server.url}", "--hostname-override=node1"]) == 1
    assert "kube-proxy needs verb=list on resource=endpointslices" in capsys.readouterr().err


def test_a_table_deleted_behind_our_back_is_recreated() -> None:
    async def scenario() -> None:
        nft = FakeNft()
        proxy = make_proxy(nft)
        proxy.on_change(change(service("svc1", "10.96.0.10"), "Service", "ns1", "svc1"))
        proxy.on_change(change(endpoint_slice("s1", "svc1", ["10.244.1.2"]), "EndpointSlice", "ns1", "s1"))
        proxy.runner.min_interval = 0.0
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(proxy.runner.run(stop)),
            asyncio.create_task(proxy.watch_tables(stop, 0.05)),
        ]
        proxy.on_synced()
        await eventually(lambda: ("ip", "kube-proxy") in nft.tables)
        before = nft.tables[("ip", "kube-proxy")].elements["service-ips"]
        del nft.tables[("ip", "kube-proxy")]  # `nft delete table ip kube-proxy` by someone else
        await eventually(lambda: ("ip", "kube-proxy") in nft.tables)
        assert nft.tables[("ip", "kube-proxy")].elements["service-ips"] == before
        stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
