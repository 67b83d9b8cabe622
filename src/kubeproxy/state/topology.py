"""Endpoint categorization: which endpoints each traffic policy may use on this node.

Follows upstream's ``CategorizeEndpoints`` (pkg/proxy/topology.go):
- cluster endpoints (Cluster policy): ready endpoints (filtered by topology hints when every ready
  endpoint carries hints for this node or zone); if there are none, serving-and-terminating ones;
- local endpoints (Local policy): ready local ones, else serving-terminating local ones;
- ``all_reachable``: the union of the two sets the Service uses; ``has_any``: some usable endpoint
  exists anywhere (decides REJECT "no endpoints" versus DROP "none local").
Not-serving endpoints are never used.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kubeproxy.model.endpoint import Endpoint
from kubeproxy.model.service import ServicePort


class TopologyMode(enum.Enum):
    NONE = ""
    PREFER_SAME_NODE = "PreferSameNode"
    PREFER_SAME_ZONE = "PreferSameZone"


@dataclass(frozen=True, slots=True)
class NodeTopology:
    name: str
    zone: str | None = None


@dataclass(frozen=True, slots=True)
class Categorized:
    cluster: tuple[Endpoint, ...]
    local: tuple[Endpoint, ...]
    all_reachable: tuple[Endpoint, ...]
    has_any: bool


def uses_cluster_endpoints(svc: ServicePort) -> bool:
    # Even with externalTrafficPolicy Local, cluster endpoints are needed: pod- and host-originated
    # traffic to an external destination is short-circuited to them (upstream UsesClusterEndpoints).
    return not svc.internal_policy_local or svc.externally_accessible


def uses_local_endpoints(svc: ServicePort) -> bool:
    return svc.internal_policy_local or (svc.externally_accessible and svc.external_policy_local)


def topology_mode(endpoints: Sequence[Endpoint], node: NodeTopology) -> TopologyMode:
    ready = [ep for ep in endpoints if ep.ready]
    if ready and all(ep.node_hints for ep in ready) and any(node.name in ep.node_hints for ep in ready):
        return TopologyMode.PREFER_SAME_NODE
    if ready and node.zone and all(ep.zone_hints for ep in ready) and any(node.zone in ep.zone_hints for ep in ready):
        return TopologyMode.PREFER_SAME_ZONE
    return TopologyMode.NONE


def _topology_filter(mode: TopologyMode, node: NodeTopology) -> Callable[[Endpoint], bool]:
    if mode is TopologyMode.PREFER_SAME_NODE:
        return lambda ep: node.name in ep.node_hints
    if mode is TopologyMode.PREFER_SAME_ZONE:
        return lambda ep: node.zone in ep.zone_hints
    return lambda ep: True


def categorize(endpoints: Sequence[Endpoint], svc: ServicePort, node: NodeTopology) -> Categorized:
    def is_local(ep: Endpoint) -> bool:
        return ep.node_name == node.name

    def fallback(ep: Endpoint) -> bool:
        return ep.serving and ep.terminating

    cluster: tuple[Endpoint, ...] = ()
    has_any = False
    if uses_cluster_endpoints(svc):
        in_topology = _topology_filter(topology_mode(endpoints, node), node)
        cluster = tuple(ep for ep in endpoints if ep.ready and in_topology(ep))
        if not cluster:
            cluster = tuple(ep for ep in endpoints if fallback(ep) and in_topology(ep))
        has_any = bool(cluster)

    if not uses_local_endpoints(svc):
        return Categorized(cluster=cluster, local=(), all_reachable=cluster, has_any=has_any)

    has_any = has_any or any(ep.ready or fallback(ep) for ep in endpoints)
    local = tuple(ep for ep in endpoints if ep.ready and is_local(ep))
    if not local:
        local = tuple(ep for ep in endpoints if fallback(ep) and is_local(ep))
    if not uses_cluster_endpoints(svc):
        return Categorized(cluster=(), local=local, all_reachable=local, has_any=has_any)
    union = {(ep.ip, ep.port): ep for ep in (*cluster, *local)}
    return Categorized(cluster=cluster, local=local, all_reachable=tuple(union.values()), has_any=has_any)
