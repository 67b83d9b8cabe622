"""The nftables tracer and renderer beyond the shared packet-flow tables (tests/test_flow_tables.py)."""

from __future__ import annotations

import pytest

from builders import CLUSTER_CIDR, state_with
from flows import NODE_IP, V4, addr, objects_for
from kubeproxy.backends.nftables.render import NftOptions, Ruleset
from kubeproxy.backends.nftables.tracer import Packet, TraceError, trace
from kubeproxy.model.service import IPFamily
from kubeproxy.tools.render import render_state

OPTS = NftOptions(cluster_cidrs=(CLUSTER_CIDR,))


def options(family: IPFamily, **kw: object) -> NftOptions:
    return NftOptions(family=family, cluster_cidrs=(addr(CLUSTER_CIDR, family),), **kw)  # type: ignore[arg-type]


def basic_ruleset(opts: NftOptions = OPTS) -> Ruleset:
    return render_state(state_with(*objects_for(opts.family)), opts)


def test_the_ipv4_table_ignores_ipv6_services_and_vice_versa() -> None:
    v4_text = render_state(state_with(*objects_for(IPFamily.V6)), OPTS).text()
    assert "fd00" not in v4_text and "service-ips" in v4_text
    assert "10.244." not in render_state(state_with(*objects_for(V4)), options(IPFamily.V6)).text()


def test_masquerade_all_masquerades_pod_traffic() -> None:
    rs = basic_ruleset(NftOptions(cluster_cidrs=(CLUSTER_CIDR,), masquerade_all=True))
    result = trace(rs, Packet("10.244.1.100", "tcp", "10.96.0.10", 80), [NODE_IP])
    assert result.masquerade


def test_without_cluster_cidr_outside_clusterip_traffic_is_not_masqueraded() -> None:
    # Upstream: with no local-traffic detector there is no "off-cluster" masquerade rule.
    result = trace(basic_ruleset(NftOptions()), Packet("203.0.113.10", "tcp", "10.96.0.10", 80), [NODE_IP])
    assert (result.output, result.masquerade) == ("10.244.1.2:8080, 10.244.1.3:8080", False)


def test_unknown_rule_shape_is_an_error() -> None:
    rs = basic_ruleset()
    chains = dict(rs.chains)
    chains["services"] = ("ip daddr @cluster-ips counter accept",)
    bad = Ruleset(family=rs.family, declarations=rs.declarations, chains=chains, elements=rs.elements)
    with pytest.raises(TraceError):
        trace(bad, Packet("10.244.1.100", "tcp", "10.96.0.10", 80), [NODE_IP])
