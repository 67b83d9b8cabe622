"""A three-node dual-stack cluster in namespaces, one real kube-proxy per node, real packets across nodes.

One module-scoped cluster (MultiNodeLab: three nodes on a bridge, routed pods, an outside client)
runs the real daemon on every node from one manifest directory holding the Nodes and four
Services, each Service for one question:

    Service     type      policy   endpoints (pod@node)          question
    remote      NodePort  Cluster  n2a@node2                     NodePort on node1 -> pod on node2, masqueraded
    pair        ClusterIP -        n2a@node2, n3a@node3          pod on node1 -> ClusterIP -> other nodes, no SNAT
    local2      NodePort  Local    n2b@node2                     client IP kept on node2; DROP on node1
    everywhere  NodePort  Cluster  n1a@node1, n2a@node2, n3a@node3  one NodePort spreads over all nodes
    udp-v4/v6   NodePort  Cluster  n2a@node2, then n3a@node3     a UDP flow follows its pod to another node
                (UDP, one Service per family, so each family's test may move its own endpoint)

Every data-path test runs for IPv4 and IPv6. A few fast tests at the end check the lab object itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from kubeproxy.lab.cluster import STATE_DIR
from kubeproxy.lab.multinode import CLIENT_IP, CLIENT_IP6, LabNode, MultiNodeLab
from kubeproxy.lab.netns import LabError, call_in_netns, lab_unavailable_reason, netns_exists, run
from kubeproxy.lab.probe import Outcome, ProbeResult, spread, tcp_probe
from waiting import wait_until

_REASON = lab_unavailable_reason()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

NS = "mn"
POD_PORT = 8080
SVC_PORT = 80
# name -> (node, host number); every pod is dual-stack: 10.244.<node>.<host> and fd00:10:244::<node>:<host>.
PODS = {"n1a": (1, 11), "n2a": (2, 11), "n2b": (2, 12), "n3a": (3, 11)}
CLIENT_POD = ("n1client", 1, 2)  # a pod on node1 that only connects


@dataclass(frozen=True)
class Svc:
    name: str
    index: int  # ClusterIPs 10.96.0.<index> and fd00:10:96::<index>
    endpoints: tuple[str, ...]  # pod names
    node_port: int | None = None
    local: bool = False  # externalTrafficPolicy: Local
    protocol: str = "TCP"

    def cluster_ip(self, family: int) -> str:
        return f"10.96.0.{self.index}" if family == 4 else f"fd00:10:96::{self.index}"


REMOTE = Svc("remote", 11, ("n2a",), node_port=30011)
PAIR = Svc("pair", 12, ("n2a", "n3a"))
LOCAL2 = Svc("local2", 13, ("n2b",), node_port=30013, local=True)
EVERYWHERE = Svc("everywhere", 14, ("n1a", "n2a", "n3a"), node_port=30014)
UDP_CYCLE = {4: Svc("udp-v4", 15, ("n2a",), node_port=30015, protocol="UDP"),
             6: Svc("udp-v6", 16, ("n2a",), node_port=30016, protocol="UDP")}  # fmt: skip
SERVICES = (REMOTE, PAIR, LOCAL2, EVERYWHERE, *UDP_CYCLE.values())


def service_manifest(svc: Svc) -> dict[str, Any]:
    port: dict[str, Any] = {"name": "http", "port": SVC_PORT, "protocol": svc.protocol, "targetPort": POD_PORT}
    spec: dict[str, Any] = {
        "type": "NodePort" if svc.node_port else "ClusterIP",
        "clusterIP": svc.cluster_ip(4),
        "clusterIPs": [svc.cluster_ip(4), svc.cluster_ip(6)],
        "ipFamilies": ["IPv4", "IPv6"],
        "ipFamilyPolicy": "RequireDualStack",
        "ports": [port],
    }
    if svc.node_port:
        port["nodePort"] = svc.node_port
        spec["externalTrafficPolicy"] = "Local" if svc.local else "Cluster"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": svc.name, "namespace": NS}, "spec": spec}


def slice_manifests(svc: Svc, lab: MultiNodeLab) -> list[dict[str, Any]]:
    out = []
    for family in (4, 6):
        endpoints = [
            {
                "addresses": [pod_ip(lab, name, family)],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": lab.node_of(name).name,
                "targetRef": {"kind": "Pod", "name": name, "namespace": NS},
            }
            for name in svc.endpoints
        ]
        out.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{svc.name}-v{family}",
                    "namespace": NS,
                    "labels": {"kubernetes.io/service-name": svc.name},
                },
                "addressType": f"IPv{family}",
                "ports": [{"name": "http", "port": POD_PORT, "protocol": svc.protocol}],
                "endpoints": endpoints,
            }
        )
    return out


def pod_ip(lab: MultiNodeLab, name: str, family: int) -> str:
    pod = lab.pods[name]
    ip = pod.ip if family == 4 else pod.ip6
    assert ip is not None
    return ip


def node_ip(node: LabNode, family: int) -> str:
    return node.ip if family == 4 else node.ip6


def client_ip(family: int) -> str:
    return CLIENT_IP if family == 4 else CLIENT_IP6


def proxy_logs(lab: MultiNodeLab) -> str:
    parts = []
    for name, path in sorted(lab.proxy_logs.items()):
        tail = "\n".join(path.read_text(errors="replace").splitlines()[-15:]) if path.exists() else "(no log)"
        parts.append(f"--- kube-proxy on {name} ---\n{tail}")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("multinode-manifests")


def write_services(lab: MultiNodeLab, directory: Path, services: Sequence[Svc]) -> None:
    items = [service_manifest(s) for s in services] + [sl for s in services for sl in slice_manifests(s, lab)]
    tmp = directory / ".services.json.tmp"
    tmp.write_text(json.dumps({"kind": "List", "items": items}))
    tmp.replace(directory / "services.json")  # a new inode: seen as a change even within one mtime tick


@pytest.fixture(scope="module")
def cluster(manifests: Path) -> Iterator[MultiNodeLab]:
    with MultiNodeLab(nodes=3, tag=f"mn{os.getpid() % 100000}") as lab:
        for name, (node, host) in PODS.items():
            lab.add_pod(name, node=node, host=host, tcp_ports=(POD_PORT,), udp_ports=(POD_PORT,))
        client_name, client_node, client_host = CLIENT_POD
        lab.add_pod(client_name, node=client_node, host=client_host, tcp_ports=())
        lab.write_node_manifests(manifests)
        write_services(lab, manifests, SERVICES)
        procs = [lab.start_proxy(n.index, manifests) for n in lab.nodes]

        # Every file is in place before the proxies start, and a proxy programs all of its initial
        # state in one transaction per family: once "everywhere" answers through a node's NodePort for
        # a family, every Service is programmed on that node for that family.
        def programmed() -> bool:
            return all(
                tcp_probe(lab.client_ns, node_ip(n, family), EVERYWHERE.node_port or 0).outcome is Outcome.OK
                for n in lab.nodes
                for family in (4, 6)
            )

        assert wait_until(programmed, timeout=20), proxy_logs(lab)
        yield lab
        for proc in procs:
            assert proc.poll() is None, f"a proxy exited during the tests\n{proxy_logs(lab)}"


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def family(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def probes(netns: str, ip: str, port: int, count: int) -> list[ProbeResult]:
    return [tcp_probe(netns, ip, port) for _ in range(count)]


# --- the data path across nodes ----------------------------------------------------------------------


def test_nodeport_on_node1_reaches_a_pod_on_node2_masqueraded(cluster: MultiNodeLab, family: int) -> None:
    node1 = cluster.node(1)
    assert REMOTE.node_port is not None
    results = probes(cluster.client_ns, node_ip(node1, family), REMOTE.node_port, 6)
    # ETP=Cluster: node1 forwards to node2's pod and SNATs to its own address, so the reply comes back
    # through node1 (where the DNAT must be undone) and not straight from node2 to the client.
    seen = {(r.outcome, r.answer, r.seen_client_ip) for r in results}
    assert seen == {(Outcome.OK, "n2a", node_ip(node1, family))}, (results, proxy_logs(cluster))
    assert cluster.node_of("n2a").name == "node2"


def test_clusterip_from_a_pod_on_node1_reaches_node2_and_node3_without_snat(cluster: MultiNodeLab, family: int) -> None:
    client = cluster.pods[CLIENT_POD[0]]
    results = probes(client.netns, PAIR.cluster_ip(family), SVC_PORT, 16)
    # P(one of the two endpoints never picked in 16 random draws) = 2 * 2**-16.
    seen = {(r.outcome, r.answer, r.seen_client_ip) for r in results}
    mine = pod_ip(cluster, client.name, family)
    assert seen == {(Outcome.OK, "n2a", mine), (Outcome.OK, "n3a", mine)}, (results, proxy_logs(cluster))
    assert {cluster.node_of(name).name for name in ("n2a", "n3a")} == {"node2", "node3"}


def test_local_policy_keeps_the_client_ip_on_node2_and_drops_on_node1(cluster: MultiNodeLab, family: int) -> None:
    assert LOCAL2.node_port is not None
    via_node2 = probes(cluster.client_ns, node_ip(cluster.node(2), family), LOCAL2.node_port, 4)
    seen = {(r.outcome, r.answer, r.seen_client_ip) for r in via_node2}
    assert seen == {(Outcome.OK, "n2b", client_ip(family))}, (via_node2, proxy_logs(cluster))
    # node1 has no local endpoint: the packet is dropped (a timeout), not refused and not forwarded.
    via_node1 = tcp_probe(cluster.client_ns, node_ip(cluster.node(1), family), LOCAL2.node_port, timeout=0.5)
    assert via_node1.outcome is Outcome.TIMEOUT, (via_node1, proxy_logs(cluster))


def test_nodeport_on_node1_spreads_over_pods_on_every_node(cluster: MultiNodeLab, family: int) -> None:
    assert EVERYWHERE.node_port is not None
    target = node_ip(cluster.node(1), family)
    # P(one of three endpoints never picked in 48 draws) = 3 * (2/3)**48, about 1e-8.
    answers = spread(cluster.client_ns, target, EVERYWHERE.node_port, 48)
    assert set(answers) == {"n1a", "n2a", "n3a"}, (answers, proxy_logs(cluster))
    assert {cluster.node_of(name).name for name in answers} == {"node1", "node2", "node3"}
    # ETP=Cluster: masqueraded whichever node the pod is on.
    result = tcp_probe(cluster.client_ns, target, EVERYWHERE.node_port)
    assert result.outcome is Outcome.OK
    assert result.seen_client_ip != client_ip(family), result


# --- the lab itself ----------------------------------------------------------------------------------


def test_a_udp_flow_follows_its_pod_to_another_node(cluster: MultiNodeLab, manifests: Path, family: int) -> None:
    # Upstream e2e "should be able to preserve UDP traffic when server pod cycles for a LoadBalancer
    # service on different nodes": ONE client socket (one conntrack entry on node1) keeps talking
    # while the endpoint moves from node2 to node3; node1's proxy must delete the stale entry.
    svc = UDP_CYCLE[family]
    assert svc.node_port is not None
    target = (node_ip(cluster.node(1), family), svc.node_port)
    sock = call_in_netns(cluster.client_ns, socket.socket, socket.AF_INET if family == 4 else socket.AF_INET6,
                         socket.SOCK_DGRAM)  # fmt: skip
    sock.settimeout(0.5)

    def ask() -> str | None:
        try:
            sock.sendto(b"probe\n", target)
            return sock.recv(4096).decode().split()[0]
        except OSError:
            return None

    try:
        assert wait_until(lambda: ask() == "n2a"), proxy_logs(cluster)
        moved = [replace(s, endpoints=("n3a",)) if s is svc else s for s in SERVICES]
        write_services(cluster, manifests, moved)
        assert wait_until(lambda: ask() == "n3a", timeout=15), proxy_logs(cluster)
        assert "conntrack cleanup" in cluster.proxy_logs["node1"].read_text()
    finally:
        sock.close()
        write_services(cluster, manifests, SERVICES)


def test_routing_follows_the_address_plan(cluster: MultiNodeLab, family: int) -> None:
    # Pod to pod across nodes (host-gw): direct, no proxy involved, the source address kept.
    a, c = cluster.pods["n1a"], cluster.pods["n3a"]
    result = tcp_probe(a.netns, pod_ip(cluster, c.name, family), POD_PORT)
    assert (result.outcome, result.answer, result.seen_client_ip) == (
        Outcome.OK,
        "n3a",
        pod_ip(cluster, a.name, family),
    )
    # The outside client has no route to any pod range.
    blocked = tcp_probe(cluster.client_ns, pod_ip(cluster, "n2a", family), POD_PORT, timeout=0.5)
    assert blocked.outcome is Outcome.UNREACHABLE, blocked
    # The client reaches the load-balancer range through node1.
    lb = "198.51.100.7" if family == 4 else "fd00:198:51:100::7"
    route = cluster.exec(cluster.client_ns, ["ip", f"-{family}", "route", "get", lb]).stdout
    assert f"via {node_ip(cluster.node(1), family)} " in route, route
    # Nodes forward, the client (the outside world) does not.
    knob = "/proc/sys/net/ipv4/ip_forward" if family == 4 else "/proc/sys/net/ipv6/conf/all/forwarding"
    assert all(cluster.exec(n.netns, ["cat", knob]).stdout.strip() == "1" for n in cluster.nodes)
    assert cluster.exec(cluster.client_ns, ["cat", knob]).stdout.strip() == "0"


def test_addresses_and_names_follow_the_plan() -> None:
    lab = MultiNodeLab(nodes=3, tag="x" * 12)
    n2 = lab.node("node2")
    assert lab.node(2) is n2
    assert (n2.name, n2.ip, n2.ip6, n2.gateway_ip, n2.gateway_ip6) == (
        "node2",
        "192.168.50.2",
        "fd00:50::2",
        "10.244.2.1",
        "fd00:10:244::2:1",
    )
    assert (n2.pod_cidr, n2.pod_cidr6) == ("10.244.2.0/24", "fd00:10:244::2:0/112")
    assert (n2.pod_ip(11), n2.pod_ip6(11)) == ("10.244.2.11", "fd00:10:244::2:11")
    names = [lab.bridge_ns, lab.client_ns, *(n.netns for n in lab.nodes)]
    assert len(set(names)) == 5
    for name in names:
        assert name.startswith("kpl-xxxxxxxxxxxx-")
        assert len(name) <= 40
    for bad in (
        lambda: MultiNodeLab(nodes=1),
        lambda: MultiNodeLab(nodes=10),
        lambda: MultiNodeLab(tag="Bad"),
        lambda: n2.pod_ip(1),
        lambda: n2.pod_ip6(255),
        lambda: lab.node(4),
        lambda: lab.add_pod("p", node=1, host=5),  # not running
    ):
        with pytest.raises(LabError):
            bad()
    manifest = n2.manifest()
    assert manifest["status"]["addresses"][:2] == [
        {"type": "InternalIP", "address": "192.168.50.2"},
        {"type": "InternalIP", "address": "fd00:50::2"},
    ]
    assert manifest["spec"]["podCIDRs"] == ["10.244.2.0/24", "fd00:10:244::2:0/112"]


def _host_links_and_addresses() -> tuple[list[str], list[str]]:
    links = run(["ip", "-o", "link", "show"]).stdout
    addrs = run(["ip", "-o", "addr", "show"]).stdout
    # Interface and address only: lifetimes of DHCP/SLAAC addresses tick on their own.
    return sorted(line.split(":")[1].strip() for line in links.splitlines()), sorted(
        " ".join(line.split()[1:4]) for line in addrs.splitlines()
    )


def test_teardown_removes_every_namespace_and_process_and_touches_no_host_state() -> None:
    before = _host_links_and_addresses()
    with MultiNodeLab(nodes=2) as lab:
        pod = lab.add_pod("a-rather-long-pod-name-for-the-lab", node=2, host=7)
        names = set(lab.namespaces)
        assert names == {lab.bridge_ns, lab.client_ns, pod.netns, *(n.netns for n in lab.nodes)}
        assert all(netns_exists(n) and len(n) <= 40 and n.startswith(f"kpl-{lab.tag}-") for n in names)
        assert len(pod.host_veth) <= 15
        assert (pod.ip, pod.ip6, lab.node_of(pod.name).name) == ("10.244.2.7", "fd00:10:244::2:7", "node2")
        assert tcp_probe(lab.node(1).netns, pod.ip, 80).answer == pod.name
        with pytest.raises(LabError, match="already"):
            lab.add_pod("other", node=2, host=7)
        assert _host_links_and_addresses() == before
        assert (STATE_DIR / f"{lab.tag}.pid").exists()
    assert not any(netns_exists(n) for n in names)
    assert pod.process is not None
    assert pod.process.poll() is not None
    assert not (STATE_DIR / f"{lab.tag}.pid").exists()
    assert _host_links_and_addresses() == before
    lab.teardown()  # idempotent


def test_teardown_runs_when_building_or_the_body_fails() -> None:
    with pytest.raises(RuntimeError, match="boom"), MultiNodeLab(nodes=2) as lab:
        lab.add_pod("a", node=1, host=2, tcp_ports=())
        names = set(lab.namespaces)
        raise RuntimeError("boom")
    assert not any(netns_exists(n) for n in names)


def test_sigterm_to_the_creator_removes_every_namespace() -> None:
    child_code = textwrap.dedent(
        """
        import time
        from kubeproxy.lab.multinode import MultiNodeLab
        with MultiNodeLab(nodes=2) as lab:
            lab.add_pod("a", node=1, host=2, tcp_ports=())
            print(*lab.namespaces, flush=True)
            time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", child_code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    names = set(child.stdout.readline().split())
    assert names and all(netns_exists(n) for n in names)
    child.terminate()
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
    assert not any(netns_exists(n) for n in names)
