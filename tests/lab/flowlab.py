"""The lab every packet-flow table runs in: one dual-stack node with pods a, b, c and a client pod,
an outside client, and the routes the rows need (see tests/flows.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flows import IIF, NODE_IP, POD_CLIENT, PODS, SECOND_NODE_IP, Flow, addr, v6
from kubeproxy.lab.cluster import Lab
from kubeproxy.lab.probe import Outcome, spread, tcp_probe, udp_probe
from kubeproxy.lab.sctp import sctp_probe

PROBES = 24  # P(one of two pods never answers) = 2 * 2**-24


@contextmanager
def flow_lab(tag: str) -> Iterator[Lab]:
    with Lab(tag=tag, ipv6=True) as built:
        for ip, name in PODS.items():
            built.add_pod(name, ip, tcp_ports=(8080,), udp_ports=(8080,), ip6=v6(ip))
        built.add_pod("client", POD_CLIENT, tcp_ports=(), ip6=v6(POD_CLIENT))
        for ip, iif in IIF.items():
            if ip in PODS or ip == POD_CLIENT:
                assert built.pods[PODS.get(ip, "client")].host_veth == iif, "flows.IIF disagrees with the lab"
        # The outside world reaches ExternalIPs and LB IPs through the node (as a load balancer
        # would), and, to show off-cluster masquerading, ClusterIPs too.
        for cidr in ("198.51.100.0/24", "10.96.0.0/16"):
            built.exec(built.client_ns, ["ip", "route", "add", cidr, "via", NODE_IP])
            built.exec(built.client_ns, ["ip", "-6", "route", "add", v6(cidr), "via", v6(NODE_IP)])
        # A second node address (nodePortAddresses rows).
        built.exec(built.node_ns, ["ip", "addr", "add", f"{SECOND_NODE_IP}/24", "dev", "eth0"])
        built.exec(built.node_ns, ["ip", "addr", "add", f"{v6(SECOND_NODE_IP)}/64", "dev", "eth0", "nodad"])
        yield built


def source_netns(lab: Lab, flow: Flow) -> str:
    from flows import OUTSIDE

    source = flow.source
    if source == addr(OUTSIDE, flow.family):
        return lab.client_ns
    if source == addr(NODE_IP, flow.family):
        return lab.node_ns
    if source == addr(POD_CLIENT, flow.family):
        return lab.pods["client"].netns
    return lab.pods[{addr(ip, flow.family): n for ip, n in PODS.items()}[source]].netns


def check_flow(lab: Lab, flow: Flow, mode: str = "nftables") -> None:
    """Run one packet-flow row with real packets from its source's namespace, as ``mode`` answers it."""
    from flows import expected, expected_pods

    output, masquerade = expected(flow, mode)
    ns = source_netns(lab, flow)
    if flow.protocol == "sctp":
        # No SCTP sockets on this kernel: INIT chunks over raw sockets (kubeproxy.lab.sctp).
        listeners = {name: lab.pods[name].netns for name in PODS.values()}
        arrivals = [sctp_probe(ns, flow.destination, flow.port, listeners, target_port=8080) for _ in range(8)]
        assert {a.pod for a in arrivals} == expected_pods(flow, output), arrivals
        assert all((a.source != flow.source) is masquerade for a in arrivals), arrivals
        return
    probe = tcp_probe if flow.protocol == "tcp" else udp_probe
    if output in ("REJECT", "DROP"):
        # A REJECT's ICMP error can reach a connecting TCP socket while connect() still holds the
        # socket lock (veth delivers it synchronously); the kernel then only notes it (LockDroppedIcmps)
        # and the SYN retransmit 1 s later gets the refusal. Hence a REJECT probe may take ~1 s.
        result = probe(ns, flow.destination, flow.port, timeout=2.5 if output == "REJECT" else 1.0)
        assert result.outcome is (Outcome.REFUSED if output == "REJECT" else Outcome.TIMEOUT), result
        return
    if output == "":
        # Not ours: whatever the kernel does with it, no pod answers.
        result = probe(ns, flow.destination, flow.port, timeout=1.0)
        assert result.outcome is not Outcome.OK, result
        return
    answers = spread(ns, flow.destination, flow.port, PROBES, protocol=flow.protocol)
    assert set(answers) == expected_pods(flow, output), answers
    seen = probe(ns, flow.destination, flow.port).seen_client_ip
    assert (seen != flow.source) is masquerade, f"pod saw {seen} for a connection from {flow.source}"
