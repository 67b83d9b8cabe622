"""What one Service port means on this node, decided once for every backend.

``plan_port`` turns a Service port, its endpoints, the node and the family into a ``PortPlan``:
which endpoints each traffic policy uses (``state.topology.categorize``), whether internal and
external traffic has somewhere to go, and otherwise which verdict it gets -- REJECT when no usable
endpoint exists anywhere, DROP when a Local policy has none on this node (upstream's semantics,
reference/upstream.md section 5) -- plus the addresses and the loadBalancerSourceRanges of this
family. Renderers only translate a plan into their syntax, so the modes cannot disagree on what a
Service means; the backend-equivalence tests check that their syntax does not either.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from kubeproxy.model.endpoint import Endpoint
from kubeproxy.model.service import IPFamily, ServicePort, family_of
from kubeproxy.state.topology import Categorized, NodeTopology, categorize


class Verdict(enum.Enum):
    REJECT = "reject"  # no usable endpoint anywhere: clients see "connection refused"
    DROP = "drop"  # a Local traffic policy with no endpoint on this node


@dataclass(frozen=True, slots=True)
class PortPlan:
    svc: ServicePort
    family: IPFamily
    cluster_ip: str
    endpoints: Categorized
    internal_verdict: Verdict | None  # None: internal traffic goes to the internal policy's endpoints
    external_verdict: Verdict | None  # None: external traffic goes to the external policy's endpoints
    external_ips: tuple[str, ...]
    load_balancer_ips: tuple[str, ...]
    # Sources allowed to reach the LB IPs (loadBalancerSourceRanges of this family, plus the LB IPs
    # themselves when a node IP is in a range, as upstream); empty: no firewall.
    firewall_sources: tuple[str, ...]

    @property
    def has_any(self) -> bool:
        return self.endpoints.has_any

    @property
    def externally_accessible(self) -> bool:
        """Does the port need an external entry (NodePort, ExternalIP, LB IP) with somewhere to go?"""
        return self.svc.externally_accessible and self.endpoints.has_any


def plan_port(
    svc: ServicePort,
    endpoints: Sequence[Endpoint],
    family: IPFamily,
    node: NodeTopology,
    node_ips: Sequence[str] = (),
) -> PortPlan | None:
    """The plan for one Service port in one family; None when the Service has no ClusterIP of it."""
    cluster_ip = svc.cluster_ip(family)
    if cluster_ip is None:
        return None
    cat = categorize([ep for ep in endpoints if family_of(ep.ip) is family], svc, node)
    has_internal = cat.has_any and bool(cat.local if svc.internal_policy_local else cat.cluster)
    has_external = cat.has_any and bool(cat.local if svc.external_policy_local else cat.cluster)
    missing = Verdict.DROP if cat.has_any else Verdict.REJECT
    lb_ips = tuple(ip for ip in svc.load_balancer_ips if family_of(ip) is family)
    return PortPlan(
        svc=svc,
        family=family,
        cluster_ip=cluster_ip,
        endpoints=cat,
        internal_verdict=None if has_internal else missing,
        external_verdict=None if has_external else missing,
        external_ips=tuple(ip for ip in svc.external_ips if family_of(ip) is family),
        load_balancer_ips=lb_ips,
        firewall_sources=firewall_sources(svc, lb_ips, family, node_ips),
    )


def firewall_sources(
    svc: ServicePort, lb_ips: Sequence[str], family: IPFamily, node_ips: Sequence[str]
) -> tuple[str, ...]:
    """``loadBalancerSourceRanges`` of this family, plus the LB IPs when a node IP is in a range
    (a node reaching the LB IP it holds sends from that IP); empty when the port has no ranges."""
    ranges = [r for r in svc.load_balancer_source_ranges if family_of(r.split("/")[0]) is family]
    if not ranges or not lb_ips:
        return ()
    nets = [ipaddress.ip_network(r) for r in ranges]
    allowed = list(ranges)
    if any(ipaddress.ip_address(ip) in net for ip in node_ips for net in nets if family_of(ip) is family):
        allowed += [ip for ip in lb_ips if ip not in allowed]
    return tuple(allowed)
