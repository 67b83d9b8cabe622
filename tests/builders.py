"""Small builders for Service / EndpointSlice / Node objects used across tests (address plan of DESIGN.md)."""

from __future__ import annotations

from typing import Any

from kubeproxy.model import objects
from kubeproxy.model.service import NamespacedName
from kubeproxy.state.snapshot import ProxyState

NODE = "node1"
NODE_IP = "192.168.50.1"
CLUSTER_CIDR = "10.244.0.0/16"


def service(
    name: str,
    cluster_ip: str,
    *,
    namespace: str = "ns1",
    ports: list[dict[str, Any]] | None = None,
    type: str = "ClusterIP",
    **spec: Any,
) -> objects.Service:
    body = {"type": type, "clusterIP": cluster_ip, "ports": ports or [{"name": "p80", "port": 80}], **spec}
    obj = objects.from_builtins("Service", {"metadata": {"name": name, "namespace": namespace}, "spec": body})
    assert isinstance(obj, objects.Service)
    return obj


def endpoint_slice(
    name: str,
    service_name: str,
    addresses: list[str],
    *,
    namespace: str = "ns1",
    ports: list[dict[str, Any]] | None = None,
    node: str | None = NODE,
    conditions: dict[str, bool] | None = None,
    address_type: str = "IPv4",
    endpoints: list[dict[str, Any]] | None = None,
    trigger_time: str | None = None,
) -> objects.EndpointSlice:
    """One endpoint per address (ready, on ``node``); ``endpoints`` gives full endpoint dicts instead."""
    annotations = {objects.TRIGGER_TIME_ANNOTATION: trigger_time} if trigger_time else {}
    obj = objects.from_builtins(
        "EndpointSlice",
        {
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"kubernetes.io/service-name": service_name},
                "annotations": annotations,
            },
            "addressType": address_type,
            "endpoints": endpoints
            or [{"addresses": [a], "nodeName": node, "conditions": conditions or {"ready": True}} for a in addresses],
            "ports": ports or [{"name": "p80", "port": 80}],
        },
    )
    assert isinstance(obj, objects.EndpointSlice)
    return obj


def node(
    name: str = NODE,
    ip: str = NODE_IP,
    *,
    labels: dict[str, str] | None = None,
    pod_cidrs: list[str] | None = None,
    taints: list[dict[str, str]] | None = None,
    deleting: bool = False,
) -> objects.Node:
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-21T08:00:00Z"
    obj = objects.from_builtins(
        "Node",
        {
            "metadata": meta,
            "spec": {"podCIDRs": pod_cidrs or [], "taints": taints or []},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
        },
    )
    assert isinstance(obj, objects.Node)
    return obj


def state_with(*objs: objects.KubeObject, node_name: str = NODE) -> ProxyState:
    st = ProxyState(node_name=node_name)
    for o in objs:
        meta = o.metadata
        if isinstance(o, objects.Service):
            st.on_service(NamespacedName(meta.namespace, meta.name), o)
        elif isinstance(o, objects.EndpointSlice):
            st.on_endpoint_slice((meta.namespace, meta.name), o)
        else:
            st.on_node(o)
    st.services_synced = st.slices_synced = True
    st.commit()
    return st


# A UDP ClusterIP Service and its slice as manifest text (a daemon's --manifests directory); ADDR is
# the endpoint's address.
UDP_SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: ns1}
spec:
  clusterIP: 10.96.0.53
  ports: [{name: dns, port: 53, protocol: UDP}]
"""

UDP_SLICE = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: ns1, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 8080, protocol: UDP}]
endpoints: [{addresses: [ADDR], nodeName: node1}]
"""
