"""Object dicts for the scale benchmark (bench/scale.py): Services, EndpointSlices and the Node, shaped as
a real API server sends them (managedFields, ownerReferences, targetRefs, ...), so that the daemon's
decode cost is realistic. Built straight as dicts (no model objects, no ipaddress) because the largest
size holds 250k endpoints.

Address plan (inside DESIGN.md section 4's ranges, and disjoint from each other):
- ClusterIPs of the initial Services: 10.96.0.1 upward (10k Services end at 10.96.39.16);
- ClusterIPs of Services the churn scenario adds: 10.96.240.1 upward;
- endpoints of the initial Services: 10.128.0.1 upward, ``services x per_service`` addresses (250k end at
  10.131.208.x, well inside 10.128.0.0/10);
- endpoints written by the churn scenario: 10.200.0.0/16, each address used once (no x.x.x.0/255).
Every 10th Service is a NodePort (ports 30000 upward, one per NodePort Service), the rest ClusterIP.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Sequence
from typing import Any, Final

__all__ = [
    "NODE_IP",
    "NODE_NAME",
    "TRIGGER_ANNOTATION",
    "FreshIps",
    "added_service",
    "cluster_objects",
    "endpoint_ips",
    "endpoint_slice",
    "ipv4",
    "node",
    "rfc3339_now",
    "service",
]

NODE_NAME: Final = "node1"
NODE_IP: Final = "192.168.50.1"
TRIGGER_ANNOTATION: Final = "endpoints.kubernetes.io/last-change-trigger-time"
NAMESPACES: Final = 50
SERVICE_PORT: Final = 80
TARGET_PORT: Final = 8080
NODE_PORT_BASE: Final = 30000

_CLUSTER_IP_BASE: Final = (10 << 24) | (96 << 16)  # 10.96.0.0
_ADDED_CLUSTER_IP_BASE: Final = (10 << 24) | (96 << 16) | (240 << 8)  # 10.96.240.0
_ENDPOINT_BASE: Final = (10 << 24) | (128 << 16)  # 10.128.0.0
_ENDPOINT_LIMIT: Final = (10 << 24) | (192 << 16)  # end of 10.128.0.0/10
_CHURN_BASE: Final = (10 << 24) | (200 << 16)  # 10.200.0.0/16
_CREATED: Final = "2026-11-01T10:00:00Z"


def ipv4(value: int) -> str:
    return f"{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}"


def rfc3339_now() -> str:
    """The current UTC time as the EndpointSlice controller writes trigger times, with microseconds."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _name(i: int) -> str:
    return f"svc-{i:05d}"


def _namespace(i: int) -> str:
    return f"ns-{i % NAMESPACES}"


def endpoint_ips(i: int, per_service: int) -> list[str]:
    """The initial endpoint addresses of Service ``i``."""
    first = _ENDPOINT_BASE + 1 + i * per_service
    if first + per_service > _ENDPOINT_LIMIT:
        raise ValueError(f"Service {i} x {per_service} endpoints leaves 10.128.0.0/10")
    return [ipv4(first + j) for j in range(per_service)]


class FreshIps:
    """Endpoint addresses from 10.200.0.0/16 that nothing else uses, each handed out once."""

    def __init__(self) -> None:
        self._next = _CHURN_BASE

    def take(self, count: int) -> list[str]:
        out: list[str] = []
        while len(out) < count:
            self._next += 1
            if self._next >= _CHURN_BASE + (1 << 16):
                raise RuntimeError("10.200.0.0/16 is used up")
            if self._next & 255 not in (0, 255):
                out.append(ipv4(self._next))
        return out


def _managed_fields(manager: str, api_version: str, fields: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "manager": manager,
            "operation": "Update",
            "apiVersion": api_version,
            "time": _CREATED,
            "fieldsType": "FieldsV1",
            "fieldsV1": fields,
        }
    ]


def service(i: int, *, cluster_ip: str | None = None, node_port: bool | None = None) -> dict[str, Any]:
    """Service ``i`` (``svc-NNNNN`` in ``ns-<i % 50>``), one TCP port 80 -> 8080."""
    name = _name(i)
    cip = cluster_ip if cluster_ip is not None else ipv4(_CLUSTER_IP_BASE + 1 + i)
    is_node_port = (i % 10 == 0) if node_port is None else node_port
    port: dict[str, Any] = {"name": "http", "protocol": "TCP", "port": SERVICE_PORT, "targetPort": TARGET_PORT}
    spec: dict[str, Any] = {
        "ports": [port],
        "selector": {"app": name},
        "clusterIP": cip,
        "clusterIPs": [cip],
        "type": "ClusterIP",
        "sessionAffinity": "None",
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "internalTrafficPolicy": "Cluster",
    }
    if is_node_port:
        port["nodePort"] = NODE_PORT_BASE + i // 10
        spec["type"] = "NodePort"
        spec["externalTrafficPolicy"] = "Cluster"
    return {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": _namespace(i),
            "creationTimestamp": _CREATED,
            "labels": {"app": name, "tier": "backend"},
            "managedFields": _managed_fields(
                "kubectl-client-side-apply",
                "v1",
                {
                    "f:metadata": {"f:labels": {".": {}, "f:app": {}, "f:tier": {}}},
                    "f:spec": {
                        "f:internalTrafficPolicy": {},
                        "f:ports": {'k:{"port":80,"protocol":"TCP"}': {".": {}, "f:name": {}, "f:port": {}}},
                        "f:selector": {},
                        "f:sessionAffinity": {},
                        "f:type": {},
                    },
                },
            ),
        },
        "spec": spec,
        "status": {"loadBalancer": {}},
    }


def added_service(k: int) -> tuple[dict[str, Any], str]:
    """The k-th Service the churn scenario adds (a ClusterIP Service from 10.96.240.1 up) and its ClusterIP."""
    if k >= 3500:
        raise ValueError("too many added Services for 10.96.240.0/20")
    cip = ipv4(_ADDED_CLUSTER_IP_BASE + 1 + k)
    obj = service(100_000 + k, cluster_ip=cip, node_port=False)
    return obj, cip


def endpoint_slice(i: int, ips: Sequence[str], *, trigger_time: str = _CREATED) -> dict[str, Any]:
    """The one EndpointSlice of Service ``i`` holding ``ips`` (ready, port 8080), with the trigger-time
    annotation ``trigger_time``."""
    name = _name(i)
    namespace = _namespace(i)
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": f"{name}-{(i * 2654435761) & 0xFFFFF:05x}",
            "generateName": f"{name}-",
            "namespace": namespace,
            "generation": 1,
            "creationTimestamp": _CREATED,
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "app": name,
            },
            "annotations": {TRIGGER_ANNOTATION: trigger_time},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": name,
                    "uid": f"00000000-0000-4000-8000-{i:012d}",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "managedFields": _managed_fields(
                "kube-controller-manager",
                "discovery.k8s.io/v1",
                {
                    "f:addressType": {},
                    "f:endpoints": {},
                    "f:metadata": {"f:annotations": {".": {}}, "f:labels": {".": {}}, "f:ownerReferences": {}},
                    "f:ports": {},
                },
            ),
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": NODE_NAME if j == 0 else f"node{2 + (i + j) % 99}",
                "zone": f"zone-{j % 3}",
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": f"{name}-pod-{j}", "uid": f"{i}-{j}"},
            }
            for j, ip in enumerate(ips)
        ],
        "ports": [{"name": "http", "protocol": "TCP", "port": TARGET_PORT}],
    }


def node() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]},
    }


def cluster_objects(services: int, per_service: int) -> Iterator[dict[str, Any]]:
    """The Node, then each Service followed by its EndpointSlice (generated lazily)."""
    if services >= 0xEF00:  # ClusterIPs 10.96.0.1 .. must stay below the added Services' 10.96.240.0
        raise ValueError(f"{services} Services do not fit below 10.96.240.0")
    yield node()
    for i in range(services):
        yield service(i)
        yield endpoint_slice(i, endpoint_ips(i, per_service))
