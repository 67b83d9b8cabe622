"""End to end from an API server: the real ``kube-proxy`` process, started with ``--kubeconfig``, watches
the API-server test double and programs a lab node's kernel; real packets follow EndpointSlice changes.

The test double listens on the lab node's own loopback (inside the namespace the test created), so no API
traffic touches the host's network namespace. Also shown: nothing is programmed before the initial lists
complete (the API server starts out unreachable), rules stay while the API server is away, and they
converge to what changed in the meantime once it is back.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from builders import CLUSTER_CIDR
from kubeproxy.lab.apiserver import FakeApiServer
from kubeproxy.lab.cluster import Lab
from kubeproxy.lab.netns import call_in_netns, lab_unavailable_reason, run
from kubeproxy.lab.probe import spread
from waiting import wait_until

_REASON = lab_unavailable_reason()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

PODS = {"10.244.1.2": "a", "10.244.1.3": "b", "10.244.1.4": "c"}
TOKEN = "kube-proxy-token"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(tag=f"api{os.getpid() % 100000}") as built:
        for ip, name in PODS.items():
            built.add_pod(name, ip, tcp_ports=(8080,))
        built.add_pod("client", "10.244.1.100", tcp_ports=())
        yield built


def web_slice(*ips: str) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "ns1", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node1"} for ip in ips],
    }


def test_proxy_follows_the_api_server(lab: Lab, tmp_path: Path) -> None:
    def listen_in_node(port: int) -> socket.socket:
        return call_in_netns(lab.node_ns, socket.create_server, ("127.0.0.1", port))

    (tmp_path / "token").write_text(TOKEN)
    with FakeApiServer(tokens={TOKEN}, socket_factory=listen_in_node) as api:
        api.apply(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web", "namespace": "ns1"},
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
            }
        )
        api.apply(web_slice("10.244.1.2", "10.244.1.3"))
        api.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}})
        # A malformed object must be named in the log and must not stop the rest.
        api.put_raw("Service", "ns1", "broken", b'{"metadata":{"name":"broken","namespace":"ns1"},"spec":{"ports":7}}')
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "lab",
                    "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "kube-proxy"}}],
                    "clusters": [{"name": "lab", "cluster": {"server": api.url}}],
                    "users": [{"name": "kube-proxy", "user": {"tokenFile": "token"}}],
                }
            )
        )
        api.go_down()  # start unreachable: nothing may be programmed before the initial lists
        log = tmp_path / "proxy.log"
        client = lab.pods["client"].netns
        proc = lab.spawn(
            lab.node_ns,
            [sys.executable, "-m", "kubeproxy", f"--kubeconfig={kubeconfig}", "--hostname-override=node1",
             f"--cluster-cidr={CLUSTER_CIDR}", "--v=2", "--iptables-min-sync-period=100ms"],
            log_path=str(log),
        )  # fmt: skip
        try:
            time.sleep(1.5)
            assert proc.poll() is None, log.read_text()
            assert run(["nft", "list", "tables"], netns=lab.node_ns).stdout.strip() == "", log.read_text()
            api.come_up()
            # Reconnects back off (0.8 s doubling, jitter up to 2x, reset after 2 healthy minutes): allow for it.
            assert wait_until(lambda: set(spread(client, "10.96.0.10", 80, 8)) == {"a", "b"}, 40), log.read_text()
            assert "ns1/broken" in log.read_text()

            api.apply(web_slice("10.244.1.4"))
            assert wait_until(lambda: set(spread(client, "10.96.0.10", 80, 8)) == {"c"}), log.read_text()

            # The API server goes away: rules stay and traffic keeps flowing.
            api.go_down()
            time.sleep(1.0)
            assert set(spread(client, "10.96.0.10", 80, 8)) == {"c"}
            api.apply(web_slice("10.244.1.2"))  # changed while we could not see it
            api.compact()  # ... and its history is gone: the proxy must relist
            api.come_up()
            assert wait_until(lambda: set(spread(client, "10.96.0.10", 80, 8)) == {"a"}, 40), log.read_text()
            assert proc.poll() is None, log.read_text()

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0, log.read_text()
            assert set(spread(client, "10.96.0.10", 80, 4)) == {"a"}  # SIGTERM leaves the rules in place
        finally:
            if proc.poll() is None:
                proc.kill()
