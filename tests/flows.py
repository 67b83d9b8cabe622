"""The basic Service scenario and its packet-flow table, shared by the tracer tests (pure) and the
lab tests (real packets): the same rows must hold in both.

Addresses follow DESIGN.md's plan: node 192.168.50.1, pods 10.244.1.0/24, Services 10.96.0.0/16,
outside client 203.0.113.10, external IPs 198.51.100.0/24.
"""

from __future__ import annotations

from dataclasses import dataclass

from builders import endpoint_slice, node, service
from kubeproxy.model import objects

POD_CLIENT = "10.244.1.100"  # a pod with no Service of its own
OUTSIDE = "203.0.113.10"
NODE_IP = "192.168.50.1"

# Endpoint IP -> pod name in the lab.
PODS = {"10.244.1.2": "a", "10.244.1.3": "b", "10.244.1.4": "c"}


def basic_objects() -> list[objects.KubeObject]:
    web = [{"name": "http", "port": 80}]
    slice_port = [{"name": "http", "port": 8080}]
    return [
        node(),
        service("svc1", "10.96.0.10", ports=web),
        endpoint_slice("svc1-x", "svc1", ["10.244.1.2", "10.244.1.3"], ports=slice_port),
        service("svc2", "10.96.0.20", type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}]),
        endpoint_slice("svc2-x", "svc2", ["10.244.1.4"], ports=slice_port),
        service("svc3", "10.96.0.30", ports=web),
        service("svc4", "10.96.0.40", type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30040}]),
        service("svc5", "10.96.0.50", ports=web, externalIPs=["198.51.100.50"]),
        endpoint_slice("svc5-x", "svc5", ["10.244.1.4"], ports=slice_port),
    ]


@dataclass(frozen=True)
class Flow:
    name: str
    source: str
    protocol: str
    destination: str
    port: int
    output: str  # "ip:port, ip:port" | "REJECT" | "DROP"
    masquerade: bool
    lab: bool = True  # also run with real packets (needs a route from the source in the lab)


BASIC_FLOWS = [
    Flow("pod to ClusterIP", POD_CLIENT, "tcp", "10.96.0.10", 80, "10.244.1.2:8080, 10.244.1.3:8080", False),
    Flow("outside to ClusterIP", OUTSIDE, "tcp", "10.96.0.10", 80, "10.244.1.2:8080, 10.244.1.3:8080", True, False),
    Flow("node to ClusterIP", NODE_IP, "tcp", "10.96.0.10", 80, "10.244.1.2:8080, 10.244.1.3:8080", True),
    # Hairpin masquerade applies only when the pod lands on itself: use a one-endpoint Service.
    Flow("hairpin: pod to its own Service", "10.244.1.4", "tcp", "10.96.0.20", 80, "10.244.1.4:8080", True),
    Flow("pod to a Service it does not back", "10.244.1.2", "tcp", "10.96.0.20", 80, "10.244.1.4:8080", False),
    Flow("outside to NodePort", OUTSIDE, "tcp", NODE_IP, 30080, "10.244.1.4:8080", True),
    Flow("pod to NodePort", POD_CLIENT, "tcp", NODE_IP, 30080, "10.244.1.4:8080", True),
    Flow("pod to ClusterIP without endpoints", POD_CLIENT, "tcp", "10.96.0.30", 80, "REJECT", False),
    Flow("node to ClusterIP without endpoints", NODE_IP, "tcp", "10.96.0.30", 80, "REJECT", False),
    Flow("outside to NodePort without endpoints", OUTSIDE, "tcp", NODE_IP, 30040, "REJECT", False),
    Flow("pod to ClusterIP on an undefined port", POD_CLIENT, "tcp", "10.96.0.10", 81, "REJECT", False),
    Flow("pod to ClusterIP over UDP (TCP-only Service)", POD_CLIENT, "udp", "10.96.0.10", 80, "REJECT", False),
    Flow("pod to ExternalIP", POD_CLIENT, "tcp", "198.51.100.50", 80, "10.244.1.4:8080", True, False),
    Flow("outside to ExternalIP", OUTSIDE, "tcp", "198.51.100.50", 80, "10.244.1.4:8080", True, False),
    Flow("outside to an unknown NodePort", OUTSIDE, "tcp", NODE_IP, 31999, "", False, False),
]
