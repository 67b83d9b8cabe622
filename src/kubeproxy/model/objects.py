"""Slim typed views of the Kubernetes objects kube-proxy reads, as the API server sends them.

Only the fields the proxy reads are declared; msgspec ignores the rest, which keeps decoding fast
and memory small (reference/dependencies.md section 1: ~3 us per watch event, ~90 MB for 100k
endpoints). Attribute names are the API's own JSON names (``clusterIP``, ``nodeName``) so the mapping
is greppable. The structs are ``gc=False``: they hold no reference cycles, so the cyclic GC never
needs to walk them. They are frozen: nothing downstream may mutate what a source decoded.

Invariant: this module does no validation beyond types; ``model.service`` and ``model.endpoint``
turn these raw views into validated domain values and report what they reject.
"""

from __future__ import annotations

from typing import Any

import msgspec

SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TOPOLOGY_ZONE_LABEL = "topology.kubernetes.io/zone"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


class _Struct(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    pass


class ObjectMeta(_Struct, frozen=True, gc=False):
    name: str = ""
    namespace: str = ""
    uid: str = ""
    resourceVersion: str = ""
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    deletionTimestamp: str | None = None


class ServicePortSpec(_Struct, frozen=True, gc=False):
    port: int = 0
    name: str = ""
    protocol: str = "TCP"
    nodePort: int = 0
    targetPort: int | str | None = None


class ClientIPConfig(_Struct, frozen=True, gc=False):
    timeoutSeconds: int | None = None


class SessionAffinityConfig(_Struct, frozen=True, gc=False):
    clientIP: ClientIPConfig | None = None


class ServiceSpec(_Struct, frozen=True, gc=False):
    type: str = "ClusterIP"
    clusterIP: str = ""
    clusterIPs: list[str] | None = None
    ports: list[ServicePortSpec] | None = None
    externalIPs: list[str] | None = None
    loadBalancerSourceRanges: list[str] | None = None
    externalTrafficPolicy: str = ""
    internalTrafficPolicy: str = ""
    healthCheckNodePort: int = 0
    sessionAffinity: str = ""
    sessionAffinityConfig: SessionAffinityConfig | None = None
    trafficDistribution: str | None = None
    externalName: str = ""


class LoadBalancerIngress(_Struct, frozen=True, gc=False):
    ip: str = ""
    hostname: str = ""
    ipMode: str | None = None


class LoadBalancerStatus(_Struct, frozen=True, gc=False):
    ingress: list[LoadBalancerIngress] | None = None


class ServiceStatus(_Struct, frozen=True, gc=False):
    loadBalancer: LoadBalancerStatus | None = None


class Service(_Struct, frozen=True, gc=False):
    metadata: ObjectMeta = ObjectMeta()
    spec: ServiceSpec = ServiceSpec()
    status: ServiceStatus | None = None
    kind: str = "Service"


class EndpointConditions(_Struct, frozen=True, gc=False):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class ForZone(_Struct, frozen=True, gc=False):
    name: str = ""


class ForNode(_Struct, frozen=True, gc=False):
    name: str = ""


class EndpointHints(_Struct, frozen=True, gc=False):
    forZones: list[ForZone] | None = None
    forNodes: list[ForNode] | None = None


class SliceEndpoint(_Struct, frozen=True, gc=False):
    addresses: list[str] = []
    conditions: EndpointConditions = EndpointConditions()
    nodeName: str | None = None
    zone: str | None = None
    hints: EndpointHints | None = None


class SlicePort(_Struct, frozen=True, gc=False):
    name: str | None = None
    port: int | None = None
    protocol: str | None = None


class EndpointSlice(_Struct, frozen=True, gc=False):
    metadata: ObjectMeta = ObjectMeta()
    addressType: str = ""
    endpoints: list[SliceEndpoint] | None = None
    ports: list[SlicePort] | None = None
    kind: str = "EndpointSlice"


class Taint(_Struct, frozen=True, gc=False):
    key: str = ""
    value: str = ""
    effect: str = ""


class NodeSpec(_Struct, frozen=True, gc=False):
    podCIDR: str = ""
    podCIDRs: list[str] | None = None
    taints: list[Taint] | None = None


class NodeAddress(_Struct, frozen=True, gc=False):
    type: str = ""
    address: str = ""


class NodeStatus(_Struct, frozen=True, gc=False):
    addresses: list[NodeAddress] | None = None


class Node(_Struct, frozen=True, gc=False):
    metadata: ObjectMeta = ObjectMeta()
    spec: NodeSpec = NodeSpec()
    status: NodeStatus = NodeStatus()
    kind: str = "Node"


KubeObject = Service | EndpointSlice | Node

_KINDS: dict[str, type[Service] | type[EndpointSlice] | type[Node]] = {
    "Service": Service,
    "EndpointSlice": EndpointSlice,
    "Node": Node,
}


class DecodeError(ValueError):
    """An object could not be read into its struct; the message names the field that was wrong."""


def kind_supported(kind: str) -> bool:
    return kind in _KINDS


def from_builtins(kind: str, data: Any) -> KubeObject:
    """Convert a parsed document (dicts/lists, e.g. from YAML) of a known kind into its struct."""
    cls = _KINDS.get(kind)
    if cls is None:
        raise DecodeError(f"unsupported kind {kind!r}")
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        raise DecodeError(str(exc)) from exc


def decode_json(kind: str, raw: bytes) -> KubeObject:
    """Decode one JSON object of a known kind (the watch/list hot path)."""
    cls = _KINDS.get(kind)
    if cls is None:
        raise DecodeError(f"unsupported kind {kind!r}")
    try:
        return msgspec.json.decode(raw, type=cls)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DecodeError(str(exc)) from exc
