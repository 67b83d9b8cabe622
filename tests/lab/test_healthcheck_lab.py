"""healthCheckNodePort end to end: the real daemon in a lab node namespace serves the health check of
an externalTrafficPolicy=Local LoadBalancer Service, probed over HTTP from the outside client's
namespace the way a cloud load balancer probes a node."""

from __future__ import annotations

import http.client
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from builders import CLUSTER_CIDR
from kubeproxy.lab.cluster import Lab
from kubeproxy.lab.netns import call_in_netns, lab_unavailable_reason
from waiting import wait_until

_REASON = lab_unavailable_reason()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

HC_PORT = 32000

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: ns1}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.60
  clusterIPs: [10.96.0.60, "fd00:10:96::60"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{name: http, port: 80, nodePort: 30080}]
"""

SLICE = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: lb-{name}, namespace: ns1, labels: {{kubernetes.io/service-name: lb}}}}
addressType: {family}
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: ["{address}"]
  nodeName: {node}
  conditions: {conditions}
"""


def slices(node: str, conditions: str) -> str:
    """One slice per family (the IPv4 and IPv6 health checks count their own family's endpoints)."""
    return "---\n".join(
        SLICE.format(name=family.lower(), family=family, address=address, node=node, conditions=conditions)
        for family, address in (("IPv4", "10.244.1.2"), ("IPv6", "fd00:10:244::1:2"))
    )


READY = "{ready: true}"
TERMINATING = "{ready: false, serving: true, terminating: true}"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)  # a new inode: the directory source sees the change even within one mtime tick


def _get(host: str, port: int) -> tuple[int, dict[str, object], str] | None:
    """(status, JSON body, weight header) of GET /, or None if nothing answers."""
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), resp.getheader("X-Load-Balancing-Endpoint-Weight") or ""
    except OSError:
        return None
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_daemon_serves_health_check_node_port_to_the_outside(tmp_path: Path, mode: str) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    _write(manifests / "service.yaml", SERVICE)
    _write(manifests / "slice.yaml", slices("node1", READY))
    log = tmp_path / "proxy.log"
    with Lab(tag=f"hc{os.getpid() % 100000}", ipv6=True) as lab:
        answers: list[tuple[int, dict[str, object], str] | None] = []
        assert lab.node_ip6 is not None
        node_ips = (lab.node_ip, lab.node_ip6)

        def probe(node_ip: str | None = None) -> tuple[int, dict[str, object], str] | None:
            # From the client's namespace, like a load balancer outside the node; never from the host.
            answers.append(call_in_netns(lab.client_ns, _get, node_ip or lab.node_ip, HC_PORT))
            return answers[-1]

        def answers_with(status: int, local: int) -> bool:
            # Both families' health checks: each counts the endpoints of its own family.
            got = [probe(ip) for ip in node_ips]
            return all(g is not None and g[0] == status and g[1]["localEndpoints"] == local for g in got)

        if mode == "iptables":
            # A host firewall that drops by default: iptables mode's filter KUBE-NODEPORTS accepts
            # health-check ports anyway (upstream #97225).
            lab.exec(lab.node_ns, ["ip6tables-nft", "-A", "INPUT", "-p", "icmpv6", "-j", "ACCEPT"])  # NDP
            for tool in ("iptables-nft", "ip6tables-nft"):
                lab.exec(lab.node_ns, [tool, "-P", "INPUT", "DROP"])
        proc = lab.spawn(
            lab.node_ns,
            [sys.executable, "-m", "kubeproxy", f"--proxy-mode={mode}", f"--manifests={manifests}",
             "--hostname-override=node1",
             f"--cluster-cidr={CLUSTER_CIDR},fd00:10:244::/64", "--v=2", "--iptables-min-sync-period=100ms"],
            log_path=str(log),
        )  # fmt: skip
        try:
            assert wait_until(lambda: answers_with(200, 1)), (answers[-1:], log.read_text())
            _status, body, weight = answers[-1] or (0, {}, "")
            assert body == {
                "service": {"namespace": "ns1", "name": "lb"},
                "localEndpoints": 1,
                "serviceProxyHealthy": True,
            }
            assert weight == "1"

            # The local pod starts terminating: the node reports no endpoints so the LB drains it.
            _write(manifests / "slice.yaml", slices("node1", TERMINATING))
            assert wait_until(lambda: answers_with(503, 0)), (answers[-1:], log.read_text())
            _write(manifests / "slice.yaml", slices("node1", READY))
            assert wait_until(lambda: answers_with(200, 1)), (answers[-1:], log.read_text())
            # The endpoint now lives on another node.
            _write(manifests / "slice.yaml", slices("node2", READY))
            assert wait_until(lambda: answers_with(503, 0)), (answers[-1:], log.read_text())
            # The Service is deleted: the listener closes.
            (manifests / "service.yaml").unlink()
            assert wait_until(lambda: all(probe(ip) is None for ip in node_ips)), (answers[-1:], log.read_text())

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
