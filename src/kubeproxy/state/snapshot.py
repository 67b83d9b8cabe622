"""The proxy's state: what is applied, what is pending, and the read-only view renderers get.

``ProxyState`` receives decoded objects from any source (``on_service``, ``on_endpoint_slice``,
``on_node``), validates them through the model (an invalid object is logged with its
namespace/name and reason and treated as absent: everything else is still programmed), and keeps
pending changes coalesced. ``commit()`` folds pending changes into the applied maps and returns an
``UpdateResult`` naming the Services whose rules must be rewritten. Renderers read ``services``,
``endpoints`` and ``node`` and never mutate them.

Invariant: ``is_initialized`` is False until both the Services and the EndpointSlices sources have
reported their initial list complete; the daemon programs nothing before that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kubeproxy.model import objects
from kubeproxy.model.endpoint import Endpoint, PortKey, slice_content
from kubeproxy.model.service import (
    InvalidObject,
    IPFamily,
    NamespacedName,
    Protocol,
    ServicePort,
    ServicePortName,
    family_of,
    parse_cidr,
    parse_ip,
    service_ports,
)
from kubeproxy.state.slices import EndpointSliceCache
from kubeproxy.state.topology import NodeTopology, categorize
from kubeproxy.state.trackers import PendingChanges

log = logging.getLogger("kubeproxy.state")

ServicePorts = dict[ServicePortName, ServicePort]
ServiceEndpoints = dict[PortKey, tuple[Endpoint, ...]]


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What the proxy needs from its own Node object."""

    name: str
    addresses: tuple[str, ...] = ()  # InternalIP first, then ExternalIP, as the kubelet reports them
    zone: str | None = None
    pod_cidrs: tuple[str, ...] = ()
    exists: bool = False

    @property
    def topology(self) -> NodeTopology:
        return NodeTopology(name=self.name, zone=self.zone)


@dataclass(frozen=True, slots=True)
class UpdateResult:
    changed: frozenset[NamespacedName]
    node_changed: bool = False
    udp_changed: bool = False  # a changed Service had a UDP port before or after (conntrack cleanup)
    # (family, endpoints.kubernetes.io/last-change-trigger-time) of the EndpointSlice updates this
    # sync programs: the start of upstream's network_programming_duration_seconds.
    trigger_times: tuple[tuple[IPFamily, str], ...] = ()


TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"


def node_eligible(node: objects.Node) -> bool:
    """Upstream's /healthz node check (KEP-3836): not being deleted, not marked for scale-down."""
    if node.metadata.deletionTimestamp:
        return False
    return not any(t.key == TO_BE_DELETED_TAINT for t in node.spec.taints or ())


def _has_udp(ports: ServicePorts | None) -> bool:
    return any(spn.protocol is Protocol.UDP for spn in ports or {})


@dataclass
class ProxyState:
    node_name: str
    services: dict[NamespacedName, ServicePorts] = field(default_factory=dict)
    endpoints: dict[NamespacedName, ServiceEndpoints] = field(default_factory=dict)
    node: NodeInfo = field(init=False)
    services_synced: bool = False
    slices_synced: bool = False

    def __post_init__(self) -> None:
        self.node = NodeInfo(name=self.node_name)
        self._service_changes: PendingChanges[NamespacedName, ServicePorts] = PendingChanges(self.services)
        self._endpoint_changes: PendingChanges[NamespacedName, ServiceEndpoints] = PendingChanges(self.endpoints)
        self._slices = EndpointSliceCache()
        self._pending_node: NodeInfo | None = None
        self.rejected: dict[str, str] = {}  # "Kind ns/name" -> reason, for explain/metrics
        # Upstream's EndpointsChangeTracker.lastChangeTriggerTimes: per Service, the trigger times of
        # the slice updates (not deletions) since the last commit.
        self._triggers: dict[NamespacedName, list[tuple[IPFamily, str]]] = {}
        # /healthz "nodeEligible": our Node exists, is not being deleted and is not tainted
        # ToBeDeletedByClusterAutoscaler. Not part of NodeInfo: it must not cause a resync.
        self.node_eligible = False

    # -- input -------------------------------------------------------------------------------
    @property
    def is_initialized(self) -> bool:
        return self.services_synced and self.slices_synced

    def pending(self) -> int:
        return len(self._service_changes) + len(self._endpoint_changes) + (self._pending_node is not None)

    def pending_changes(self) -> tuple[int, int]:
        """(Services, Services whose endpoints changed) waiting for the next sync."""
        return len(self._service_changes), len(self._endpoint_changes)

    def _reject(self, kind: str, meta: objects.ObjectMeta, reason: str) -> None:
        ident = f"{kind} {meta.namespace}/{meta.name}"
        if self.rejected.get(ident) != reason:
            log.warning(
                "skipping invalid object kind=%s object=%r reason=%r", kind, f"{meta.namespace}/{meta.name}", reason
            )
        self.rejected[ident] = reason

    def on_service(self, key: NamespacedName, svc: objects.Service | None) -> bool:
        """A Service is now ``svc`` (None: deleted). Returns True if a sync is needed."""
        ports: ServicePorts | None = None
        if svc is not None:
            try:
                ports = service_ports(svc) or None
                self.rejected.pop(f"Service {key}", None)
            except InvalidObject as exc:
                self._reject("Service", svc.metadata, str(exc))
        else:
            self.rejected.pop(f"Service {key}", None)
        return self._service_changes.set(key, ports)

    def on_endpoint_slice(self, key: tuple[str, str], es: objects.EndpointSlice | None) -> bool:
        """An EndpointSlice (namespace, name) is now ``es`` (None: deleted)."""
        content = None
        ident = f"EndpointSlice {key[0]}/{key[1]}"
        if es is not None:
            try:
                content = slice_content(es)
                self.rejected.pop(ident, None)
            except InvalidObject as exc:
                self._reject("EndpointSlice", es.metadata, str(exc))
        else:
            self.rejected.pop(ident, None)
        pending = False
        for service in self._slices.update(key, content):
            pending = self._endpoint_changes.set(service, self._slices.endpoints(service) or None)
            if es is None:
                # A deletion's annotation dates from its last update: not what the metric measures.
                self._triggers.pop(service, None)
            elif content is not None and content.trigger_time:
                family = IPFamily.V6 if es.addressType == "IPv6" else IPFamily.V4
                self._triggers.setdefault(service, []).append((family, content.trigger_time))
        return pending or bool(self._endpoint_changes)

    def on_node(self, node: objects.Node | None) -> bool:
        self.node_eligible = node is not None and node_eligible(node)
        info = NodeInfo(name=self.node_name) if node is None else self._node_info(node)
        if info == (self._pending_node or self.node):
            return self.pending() > 0
        self._pending_node = None if info == self.node else info
        return self.pending() > 0

    def _node_info(self, node: objects.Node) -> NodeInfo:
        addresses: list[str] = []
        for wanted in ("InternalIP", "ExternalIP"):
            for addr in node.status.addresses or ():
                if addr.type != wanted:
                    continue
                try:
                    ip = parse_ip(addr.address, "status.addresses")
                except InvalidObject as exc:
                    self._reject("Node", node.metadata, str(exc))
                    continue
                if ip not in addresses:
                    addresses.append(ip)
        cidrs: list[str] = []
        for raw in node.spec.podCIDRs or ([node.spec.podCIDR] if node.spec.podCIDR else []):
            try:
                cidrs.append(parse_cidr(raw, "spec.podCIDRs"))
            except InvalidObject as exc:
                self._reject("Node", node.metadata, str(exc))
        labels = node.metadata.labels or {}
        return NodeInfo(
            name=self.node_name,
            addresses=tuple(addresses),
            zone=labels.get(objects.TOPOLOGY_ZONE_LABEL),
            pod_cidrs=tuple(cidrs),
            exists=True,
        )

    # -- commit ------------------------------------------------------------------------------
    def commit(self) -> UpdateResult:
        """Fold pending changes into the applied state; say what changed."""
        changed: set[NamespacedName] = set()
        udp = False
        for key, (before, after) in self._service_changes.drain().items():
            changed.add(key)
            udp = udp or _has_udp(before) or _has_udp(after)
            if after is None:
                self.services.pop(key, None)
            else:
                self.services[key] = after
        triggers: list[tuple[IPFamily, str]] = []
        for key, (_old_eps, new_eps) in self._endpoint_changes.drain().items():
            changed.add(key)
            udp = udp or _has_udp(self.services.get(key))
            triggers.extend(self._triggers.get(key, ()))
            if new_eps is None:
                self.endpoints.pop(key, None)
            else:
                self.endpoints[key] = new_eps
        self._triggers.clear()
        node_changed = self._pending_node is not None
        if self._pending_node is not None:
            self.node, self._pending_node = self._pending_node, None
        return UpdateResult(
            changed=frozenset(changed), node_changed=node_changed, udp_changed=udp, trigger_times=tuple(triggers)
        )

    # -- read-only helpers for renderers ----------------------------------------------------
    def no_local_endpoints(self, family: IPFamily) -> tuple[int, int]:
        """Service ports of ``family`` whose Local policy drops traffic: (internal, external).

        Upstream's ``sync_proxy_rules_no_local_endpoints_total``: the Service has usable endpoints
        somewhere, but none on this node for its Local internal (ITP) or external (ETP) policy.
        """
        internal = external = 0
        node = self.node.topology
        for ports in self.services.values():
            for svc in ports.values():
                if not (svc.internal_policy_local or (svc.external_policy_local and svc.externally_accessible)):
                    continue
                if svc.cluster_ip(family) is None:
                    continue
                eps = tuple(ep for ep in self.service_endpoints(svc) if family_of(ep.ip) is family)
                cat = categorize(eps, svc, node)
                if not cat.has_any or cat.local:
                    continue
                internal += svc.internal_policy_local
                external += svc.external_policy_local and svc.externally_accessible
        return internal, external

    def service_endpoints(self, svc: ServicePort) -> tuple[Endpoint, ...]:
        per_port = self.endpoints.get(svc.name.service, {})
        return per_port.get((svc.name.port, svc.name.protocol), ())
