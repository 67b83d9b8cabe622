"""A live Service changing under real traffic, in both families (upstream e2e cases in
tests/README.md): ports added and removed, ClusterIP -> NodePort, nodePort changed and released,
the same port on another protocol, ExternalName and back, deleted and recreated; and session
affinity on a NodePort with a timeout."""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from builders import endpoint_slice, state_with
from flowlab import PROBES, flow_lab
from flows import FAMILIES, NODE_IP, OUTSIDE, POD_CLIENT, addr, objects_for, to_family
from kubeproxy.lab.cluster import Lab
from kubeproxy.lab.netns import lab_unavailable_reason, run
from kubeproxy.lab.probe import Outcome, spread, tcp_probe
from kubeproxy.model import objects
from kubeproxy.model.service import IPFamily, NamespacedName
from kubeproxy.state.snapshot import ProxyState
from modes import MODES, Mode

_REASON = lab_unavailable_reason()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

KEY = NamespacedName("ns1", "life")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with flow_lab(f"life{os.getpid() % 100000}") as built:
        yield built


def _service(family: IPFamily, spec: dict[str, Any]) -> objects.KubeObject:
    body = {"clusterIP": "10.96.0.250", **spec}
    obj = objects.from_builtins("Service", {"metadata": {"name": "life", "namespace": "ns1"}, "spec": body})
    return to_family(obj, family)


def _slice(family: IPFamily, ip: str, ports: list[dict[str, Any]], name: str) -> objects.KubeObject:
    return to_family(endpoint_slice(name, "life", [ip], ports=ports), family)


class Live:
    """One Service in a real kernel, changed step by step through partial syncs."""

    def __init__(self, lab: Lab, family: IPFamily, mode: Mode) -> None:
        self.lab, self.family, self.mode = lab, family, mode
        opts = mode.options(family=family, cluster_cidrs=(addr("10.244.0.0/16", family),))
        self.backend = mode.backend(lab.node_ns, opts)
        self.state: ProxyState = state_with(*objects_for(family))
        self.backend.sync(self.state, set(), full=True)

    def service(self, spec: dict[str, Any] | None) -> None:
        obj = None if spec is None else _service(self.family, spec)
        assert obj is None or isinstance(obj, objects.Service)
        self.state.on_service(KEY, obj)
        self.backend.sync(self.state, self.state.commit().changed, full=False)

    def slice(self, name: str, ip: str, ports: list[dict[str, Any]]) -> None:
        obj = _slice(self.family, ip, ports, name)
        assert isinstance(obj, objects.EndpointSlice)
        self.state.on_endpoint_slice(("ns1", name), obj)
        self.backend.sync(self.state, self.state.commit().changed, full=False)

    def answers(self, source: str, dest: str, port: int, protocol: str = "tcp") -> set[str]:
        ns = self.lab.client_ns if source == OUTSIDE else self.lab.pods["client"].netns
        return set(spread(ns, addr(dest, self.family), port, 6, protocol=protocol))

    def no_pod_answers(self, source: str, dest: str, port: int) -> bool:
        ns = self.lab.client_ns if source == OUTSIDE else self.lab.pods["client"].netns
        return tcp_probe(ns, addr(dest, self.family), port, timeout=1.0).outcome is not Outcome.OK


@pytest.fixture(
    params=[(f, m) for m in MODES for f in FAMILIES], ids=[f"{m.name}-{f}" for m in MODES for f in ("ipv4", "ipv6")]
)
def live(lab: Lab, request: pytest.FixtureRequest) -> Iterator[Live]:
    svc = Live(lab, *request.param)
    yield svc
    svc.backend.cleanup()


HTTP = {"name": "http", "port": 80}
ALT = {"name": "alt", "port": 81}


def test_a_live_service_through_its_lifecycle(live: Live) -> None:
    cip = "10.96.0.250"
    live.service({"ports": [HTTP]})
    live.slice("life-a", "10.244.1.2", [{"name": "http", "port": 8080}])
    live.slice("life-b", "10.244.1.3", [{"name": "alt", "port": 8080}])
    assert live.answers(POD_CLIENT, cip, 80) == {"a"}
    # A port added to the live Service serves at once; removing it refuses it again.
    live.service({"ports": [HTTP, ALT]})
    assert live.answers(POD_CLIENT, cip, 81) == {"b"}
    live.service({"ports": [HTTP]})
    if live.mode.name == "nftables":  # iptables mode leaves undefined ClusterIP ports alone (upstream)
        assert (
            tcp_probe(live.lab.pods["client"].netns, addr(cip, live.family), 81, timeout=2.5).outcome is Outcome.REFUSED
        )
    else:
        assert live.no_pod_answers(POD_CLIENT, cip, 81)
    assert live.answers(POD_CLIENT, cip, 80) == {"a"}
    # ClusterIP -> NodePort; then the nodePort moves: the new one serves, the old one is released.
    live.service({"type": "NodePort", "ports": [{**HTTP, "nodePort": 30200}]})
    assert live.answers(OUTSIDE, NODE_IP, 30200) == {"a"}
    live.service({"type": "NodePort", "ports": [{**HTTP, "nodePort": 30201}]})
    assert live.answers(OUTSIDE, NODE_IP, 30201) == {"a"}
    assert live.no_pod_answers(OUTSIDE, NODE_IP, 30200)
    # The same port number on UDP as well (its endpoint answers UDP on 8080 too).
    udp = {"name": "dns", "port": 80, "protocol": "UDP", "nodePort": 30201}
    live.service({"type": "NodePort", "ports": [{**HTTP, "nodePort": 30201}, udp]})
    live.slice("life-u", "10.244.1.4", [{"name": "dns", "port": 8080, "protocol": "UDP"}])
    assert live.answers(OUTSIDE, NODE_IP, 30201, "udp") == {"c"}
    assert live.answers(OUTSIDE, NODE_IP, 30201) == {"a"}
    # ExternalName: nothing of ours is left; back to ClusterIP, it serves again.
    live.service({"type": "ExternalName", "externalName": "example.com", "clusterIP": ""})
    assert live.no_pod_answers(POD_CLIENT, cip, 80)
    live.service({"ports": [HTTP]})
    assert live.answers(POD_CLIENT, cip, 80) == {"a"}
    # Down and up again: deleted, the address answers nothing of ours; recreated, it serves.
    live.service(None)
    assert live.no_pod_answers(POD_CLIENT, cip, 80)
    live.service({"ports": [HTTP]})
    assert live.answers(POD_CLIENT, cip, 80) == {"a"}


def _affinity_elements(live: Live) -> str:
    """Clients the kernel remembers: nftables' affinity sets, or iptables' ``recent`` lists."""
    if live.mode.name == "iptables":
        listing = run(["sh", "-c", "cat /proc/net/xt_recent/*"], netns=live.lab.node_ns).stdout
        # "src=fd00:0203:0000:...": the kernel prints IPv6 sources exploded.
        return " ".join(str(ipaddress.ip_address(w[4:])) for w in listing.split() if w.startswith("src="))
    table = "ip" if live.family is IPFamily.V4 else "ip6"
    listing = run(["nft", "list", "table", table, "kube-proxy"], netns=live.lab.node_ns).stdout
    return "".join(line for line in listing.splitlines() if "expires" in line)


def test_nodeport_affinity_sticks_and_times_out(live: Live) -> None:
    ports = [{**HTTP, "nodePort": 30202}]
    live.slice("life-a", "10.244.1.2", [{"name": "http", "port": 8080}])
    live.slice("life-b", "10.244.1.3", [{"name": "http", "port": 8080}])
    affinity = {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 2}}}
    live.service({"type": "NodePort", "ports": ports, **affinity})
    node_ip = addr(NODE_IP, live.family)
    answers = spread(live.lab.client_ns, node_ip, 30202, PROBES)
    assert len(answers) == 1, answers  # P(24 random picks all equal) = 2**-23
    assert addr(OUTSIDE, live.family) in _affinity_elements(live)
    # The kernel forgets the client after timeoutSeconds without traffic. (iptables' `recent` lists
    # keep stale entries until a packet reaps them, so there only the connection below shows it.)
    time.sleep(3.0)
    if live.mode.name == "nftables":
        assert addr(OUTSIDE, live.family) not in _affinity_elements(live)
    assert tcp_probe(live.lab.client_ns, node_ip, 30202).outcome is Outcome.OK
    # Switched off on the live Service: spread again.
    live.service({"type": "NodePort", "ports": ports})
    assert set(spread(live.lab.client_ns, node_ip, 30202, PROBES)) == {"a", "b"}
