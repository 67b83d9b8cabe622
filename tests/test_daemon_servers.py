"""The daemon's own servers, end to end: a real daemon (fake kernel, manifests source) configured by
our flag parser serves /healthz and /livez with upstream's semantics and /metrics, /proxyMode and
/configz on loopback ports, and its metrics follow what the proxy does."""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from exposition import Exposition
from kubeproxy import daemon
from kubeproxy.cli import load_config
from kubeproxy.kernel.nft import FakeNft, NftError
from waiting import eventually

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns1}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
"""

NODE = """\
apiVersion: v1
kind: Node
metadata: {name: node1}
spec: {podCIDRs: [10.244.1.0/24]TAINTS}
status: {addresses: [{type: InternalIP, address: 192.168.50.1}]}
"""


def slice_yaml(ip: str, trigger: str) -> str:
    return f"""\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: ns1
  labels: {{kubernetes.io/service-name: web}}
  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: "{trigger}"}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: ["{ip}"], nodeName: node1, conditions: {{ready: true}}}}]
"""


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def aget(port: int, path: str) -> tuple[int, str]:
    for _ in range(100):  # the daemon task may not have opened its servers yet
        try:
            return await asyncio.to_thread(get, port, path)
        except urllib.error.URLError as err:
            if not isinstance(err.reason, ConnectionRefusedError):
                raise
            await asyncio.sleep(0.05)
    return await asyncio.to_thread(get, port, path)


def write_manifests(root: Path, *, taints: str = "", node: bool = True) -> None:
    (root / "svc.yaml").write_text(SERVICE)
    node_file = root / "node.yaml"
    if node:
        node_file.write_text(NODE.replace("TAINTS", taints))
    elif node_file.exists():
        node_file.unlink()


def config(root: Path, healthz: int, metrics: int, *extra: str) -> Any:
    return load_config(
        [
            f"--manifests={root}",
            "--hostname-override=node1",
            f"--healthz-bind-address=127.0.0.1:{healthz}",
            f"--metrics-bind-address=127.0.0.1:{metrics}",
            "--iptables-min-sync-period=0s",
            *extra,
        ]
    )


def test_health_and_metrics_servers_of_a_running_daemon(tmp_path: Path) -> None:
    write_manifests(tmp_path)
    (tmp_path / "slice.yaml").write_text(slice_yaml("10.244.1.2", now_rfc3339()))
    hz, mp = free_port(), free_port()
    cfg = config(tmp_path, hz, mp)
    nft = FakeNft()

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(cfg, nft=nft, stop=stop))
        await eventually(lambda: "10.244.1.2" in nft.dump())

        status, body = await aget(hz, "/healthz")
        doc = json.loads(body)
        assert status == 200 and list(doc) == ["lastUpdated", "currentTime", "nodeEligible", "healthy", "status"]
        assert doc["nodeEligible"] is True and doc["healthy"] is True and set(doc["status"]) == {"IPv4", "IPv6"}
        status, body = await aget(hz, "/livez")
        assert status == 200 and "nodeEligible" not in json.loads(body)

        assert await aget(mp, "/proxyMode") == (200, "nftables")
        assert await aget(mp, "/healthz") == (200, "ok")
        status, body = await aget(mp, "/configz")
        configz = json.loads(body)["kubeproxy.config.k8s.io"]
        assert status == 200 and configz["kind"] == "KubeProxyConfiguration"
        assert configz["nftables"]["minSyncPeriod"] == "0s" and configz["hostnameOverride"] == "node1"

        status, text = await aget(mp, "/metrics")
        metrics = Exposition(text)
        assert metrics.value("kubeproxy_sync_proxy_rules_last_timestamp_seconds", ip_family="IPv4") > 0
        assert metrics.value("kubeproxy_sync_full_proxy_rules_duration_seconds_count", ip_family="IPv6") >= 1
        # The initial list predates the proxy: not a programming latency (upstream trackerStartTime).
        assert not [x for x in metrics.samples if x[0].startswith("kubeproxy_network_programming_duration")]
        assert metrics.value("kubeproxy_sync_proxy_rules_service_changes_total") == 1
        assert metrics.value("kubeproxy_sync_proxy_rules_endpoint_changes_total") == 1
        assert metrics.value("kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0
        assert metrics.value("kubeproxy_proxy_healthz_total", code="200") == 1
        assert metrics.value("kubeproxy_proxy_livez_total", code="200") == 1

        # An endpoint change: a partial sync, and its network-programming latency observed.
        (tmp_path / "slice.yaml").write_text(slice_yaml("10.244.1.3", now_rfc3339()))
        await eventually(lambda: "10.244.1.3" in nft.dump())

        def programmed() -> bool:
            m = Exposition(get(mp, "/metrics")[1])
            return any(x[0] == "kubeproxy_network_programming_duration_seconds_count" for x in m.samples)

        await eventually(programmed)
        metrics = Exposition((await aget(mp, "/metrics"))[1])
        assert metrics.value("kubeproxy_network_programming_duration_seconds_count", ip_family="IPv4") == 1
        assert metrics.value("kubeproxy_sync_proxy_rules_endpoint_changes_total") == 2  # every event counts
        assert metrics.value("kubeproxy_network_programming_duration_seconds_sum", ip_family="IPv4") < 60
        assert metrics.value("kubeproxy_sync_partial_proxy_rules_duration_seconds_count", ip_family="IPv4") >= 1

        # The cluster autoscaler marks the node for deletion: /healthz fails (load balancers drain it),
        # /livez does not (the proxy itself is fine).
        write_manifests(tmp_path, taints=", taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]")

        async def eligible() -> bool:
            return bool(json.loads((await aget(hz, "/healthz"))[1])["nodeEligible"])

        for _ in range(100):
            if not await eligible():
                break
            await asyncio.sleep(0.05)
        status, body = await aget(hz, "/healthz")
        assert status == 503 and json.loads(body)["healthy"] is True
        assert (await aget(hz, "/livez"))[0] == 200
        # Taint removed, then the Node object deleted.
        write_manifests(tmp_path)
        for _ in range(100):
            if await eligible():
                break
            await asyncio.sleep(0.05)
        assert (await aget(hz, "/healthz"))[0] == 200
        write_manifests(tmp_path, node=False)
        for _ in range(100):
            if not await eligible():
                break
            await asyncio.sleep(0.05)
        assert (await aget(hz, "/healthz"))[0] == 503

        stop.set()
        assert await task == 0

    asyncio.run(scenario())


class BrokenNft(FakeNft):
    def __init__(self) -> None:
        super().__init__()
        self.broken = True

    def run(self, script: str) -> None:
        if self.broken:
            raise NftError("simulated: kernel refuses every transaction")
        super().run(script)


def test_a_proxy_that_cannot_program_turns_unhealthy_and_recovers(tmp_path: Path) -> None:
    write_manifests(tmp_path)
    (tmp_path / "slice.yaml").write_text(slice_yaml("10.244.1.2", now_rfc3339()))
    hz, mp = free_port(), free_port()
    # syncPeriod 0.3 s: unhealthy once a queued change waits 0.6 s; retries every 0.3 s.
    cfg = config(tmp_path, hz, mp, "--iptables-sync-period=300ms")
    nft = BrokenNft()

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(cfg, nft=nft, stop=stop))
        for _ in range(200):
            if (await aget(hz, "/livez"))[0] == 503:
                break
            await asyncio.sleep(0.05)
        status, body = await aget(hz, "/livez")
        assert status == 503 and json.loads(body)["healthy"] is False
        assert (await aget(hz, "/healthz"))[0] == 503
        metrics = Exposition((await aget(mp, "/metrics"))[1])
        assert metrics.value("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", ip_family="IPv4") >= 1
        assert metrics.value("kubeproxy_proxy_livez_total", code="503") >= 1
        nft.broken = False
        await eventually(lambda: "10.244.1.2" in nft.dump())
        for _ in range(100):
            if (await aget(hz, "/livez"))[0] == 200:
                break
            await asyncio.sleep(0.05)
        assert (await aget(hz, "/livez"))[0] == 200 and (await aget(hz, "/healthz"))[0] == 200
        stop.set()
        assert await task == 0

    asyncio.run(scenario())


def test_bind_address_hard_fail_stops_startup_before_programming(tmp_path: Path) -> None:
    write_manifests(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = config(tmp_path, port, free_port(), "--bind-address-hard-fail")
        nft = FakeNft()
        from kubeproxy.servers.threaded import ServerBindError

        try:
            asyncio.run(daemon.run(cfg, nft=nft))
        except ServerBindError as exc:
            assert str(port) in str(exc)
        else:
            raise AssertionError("a taken healthz port must be fatal with --bind-address-hard-fail")
        assert nft.transactions == []


def test_a_changed_config_file_makes_the_daemon_exit_with_an_error(tmp_path: Path) -> None:
    # Upstream exits when --config is written or renamed; the DaemonSet restarts it with the new file.
    (tmp_path / "m").mkdir()
    write_manifests(tmp_path / "m")
    conf = tmp_path / "config.conf"
    conf.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
        f"healthzBindAddress: 127.0.0.1:{free_port()}\nmetricsBindAddress: 127.0.0.1:{free_port()}\n"
    )
    cfg = load_config([f"--config={conf}", f"--manifests={tmp_path / 'm'}", "--hostname-override=node1"])
    assert cfg.config_file == conf
    nft = FakeNft()

    async def scenario() -> None:
        task = asyncio.create_task(daemon.run(cfg, nft=nft))
        await eventually(lambda: "10.96.0.10" in nft.dump())
        await asyncio.sleep(0.1)
        assert not task.done()  # an untouched file keeps it running
        # A ConfigMap update: the kubelet swaps the file atomically (rename).
        (tmp_path / "new.conf").write_text(conf.read_text() + "clusterCIDR: 10.244.0.0/16\n")
        (tmp_path / "new.conf").rename(conf)
        try:
            await asyncio.wait_for(task, timeout=10)
        except daemon.ConfigFileChanged as exc:
            assert str(conf) in str(exc)
        else:
            raise AssertionError("the daemon must exit when its configuration file changes")
        assert "10.96.0.10" in nft.dump()  # the rules stay for the restarted process

    asyncio.run(scenario())
