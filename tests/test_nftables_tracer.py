"""Packet-flow tables through the tracer: the rendered ruleset, interpreted rule by rule."""

from __future__ import annotations

import pytest

from builders import CLUSTER_CIDR, endpoint_slice, node, service, state_with
from flows import BASIC_FLOWS, NODE_IP, Flow, basic_objects
from kubeproxy.backends.nftables.render import NftOptions, Ruleset
from kubeproxy.backends.nftables.tracer import Packet, TraceError, trace
from kubeproxy.model.service import IPFamily
from kubeproxy.tools.render import render_state

OPTS = NftOptions(cluster_cidrs=(CLUSTER_CIDR,))


def basic_ruleset(opts: NftOptions = OPTS) -> Ruleset:
    return render_state(state_with(*basic_objects()), opts)


@pytest.mark.parametrize("flow", BASIC_FLOWS, ids=lambda f: f.name)
def test_basic_flows(flow: Flow) -> None:
    result = trace(basic_ruleset(), Packet(flow.source, flow.protocol, flow.destination, flow.port), [NODE_IP])
    assert (result.output, result.masquerade) == (flow.output, flow.masquerade), result.matched


def test_masquerade_all_masquerades_pod_traffic() -> None:
    rs = basic_ruleset(NftOptions(cluster_cidrs=(CLUSTER_CIDR,), masquerade_all=True))
    result = trace(rs, Packet("10.244.1.100", "tcp", "10.96.0.10", 80), [NODE_IP])
    assert result.masquerade


def test_without_cluster_cidr_outside_clusterip_traffic_is_not_masqueraded() -> None:
    # Upstream: with no local-traffic detector there is no "off-cluster" masquerade rule.
    result = trace(basic_ruleset(NftOptions()), Packet("203.0.113.10", "tcp", "10.96.0.10", 80), [NODE_IP])
    assert (result.output, result.masquerade) == ("10.244.1.2:8080, 10.244.1.3:8080", False)


def test_terminating_endpoints_are_a_fallback_only() -> None:
    ready = endpoint_slice("s-a", "svc", ["10.244.1.2"], conditions={"ready": True})
    term = endpoint_slice(
        "s-b", "svc", ["10.244.1.3"], conditions={"ready": False, "serving": True, "terminating": True}
    )
    gone = endpoint_slice(
        "s-c", "svc", ["10.244.1.4"], conditions={"ready": False, "serving": False, "terminating": True}
    )
    pkt = Packet("10.244.1.100", "tcp", "10.96.0.9", 80)
    both = render_state(state_with(node(), service("svc", "10.96.0.9"), ready, term, gone), OPTS)
    assert trace(both, pkt, [NODE_IP]).output == "10.244.1.2:80"
    only_terminating = render_state(state_with(node(), service("svc", "10.96.0.9"), term, gone), OPTS)
    assert trace(only_terminating, pkt, [NODE_IP]).output == "10.244.1.3:80"
    none_serving = render_state(state_with(node(), service("svc", "10.96.0.9"), gone), OPTS)
    assert trace(none_serving, pkt, [NODE_IP]).output == "REJECT"


def test_multiport_and_same_port_different_protocols() -> None:
    svc = service(
        "dns",
        "10.96.0.53",
        ports=[{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}],
    )
    eps = endpoint_slice(
        "dns-x",
        "dns",
        ["10.244.1.7"],
        ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "dns-tcp", "port": 5354, "protocol": "TCP"}],
    )
    rs = render_state(state_with(node(), svc, eps), OPTS)
    assert trace(rs, Packet("10.244.1.100", "udp", "10.96.0.53", 53), [NODE_IP]).output == "10.244.1.7:5353"
    assert trace(rs, Packet("10.244.1.100", "tcp", "10.96.0.53", 53), [NODE_IP]).output == "10.244.1.7:5354"


def test_ipv6_table_traces_ipv6_service() -> None:
    svc = service("v6", "fd00:10:96::10", ipFamilies=["IPv6"])
    eps = endpoint_slice("v6-x", "v6", ["fd00:10:244:1::2", "fd00:10:244:1::3"], address_type="IPv6")
    rs = render_state(state_with(node(), svc, eps), NftOptions(family=IPFamily.V6))
    result = trace(rs, Packet("fd00:10:244:1::64", "tcp", "fd00:10:96::10", 80), ["fd00:50::1"])
    assert result.output == "[fd00:10:244:1::2]:80, [fd00:10:244:1::3]:80"
    # The IPv4 table ignores it entirely.
    assert "fd00" not in render_state(state_with(node(), svc, eps), OPTS).text()


def test_unknown_rule_shape_is_an_error() -> None:
    rs = basic_ruleset()
    chains = dict(rs.chains)
    chains["services"] = ("ip daddr 1.2.3.4 counter accept",)
    bad = Ruleset(family=rs.family, declarations=rs.declarations, chains=chains, elements=rs.elements)
    with pytest.raises(TraceError):
        trace(bad, Packet("10.244.1.100", "tcp", "10.96.0.10", 80), [NODE_IP])
