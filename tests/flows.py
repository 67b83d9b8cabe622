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
        # LoadBalancer, reachable only from the outside client's network.
        load_balancer("svc6", "10.96.0.60", "198.51.100.60", 30060, source_ranges=["203.0.113.0/24"]),
        endpoint_slice("svc6-x", "svc6", ["10.244.1.4"], ports=slice_port),
        # LoadBalancer whose ranges hold the node but not the client: the LB IP itself may also send.
        load_balancer("svc7", "10.96.0.70", "198.51.100.70", 0, source_ranges=["192.0.2.0/24", "192.168.50.0/24"]),
        endpoint_slice("svc7-x", "svc7", ["10.244.1.2"], ports=slice_port),
        # ipMode Proxy and hostname-only ingress: the load balancer proxies to the node; nothing to program.
        load_balancer("svc8", "10.96.0.80", "198.51.100.80", 0, ip_mode="Proxy"),
        endpoint_slice("svc8-x", "svc8", ["10.244.1.2"], ports=slice_port),
        # sessionAffinity ClientIP: a first connection may go anywhere; later ones stick (lab test).
        service("svc9", "10.96.0.90", ports=web, sessionAffinity="ClientIP"),
        endpoint_slice("svc9-x", "svc9", ["10.244.1.2", "10.244.1.3"], ports=slice_port),
    ]


def load_balancer(
    name: str, cluster_ip: str, lb_ip: str, node_port: int, *, source_ranges: list[str] | None = None, ip_mode: str = ""
) -> objects.Service:
    ingress: list[dict[str, str]] = [
        {"ip": lb_ip, **({"ipMode": ip_mode} if ip_mode else {})},
        {"hostname": "lb.example"},
    ]
    obj = objects.from_builtins(
        "Service",
        {
            "metadata": {"name": name, "namespace": "ns1"},
            "spec": {
                "type": "LoadBalancer",
                "clusterIP": cluster_ip,
                "ports": [{"name": "http", "port": 80, **({"nodePort": node_port} if node_port else {})}],
                "loadBalancerSourceRanges": source_ranges or [],
            },
            "status": {"loadBalancer": {"ingress": ingress}},
        },
    )
    assert isinstance(obj, objects.Service)
    return obj


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
    Flow("pod to ExternalIP", POD_CLIENT, "tcp", "198.51.100.50", 80, "10.244.1.4:8080", True),
    Flow("outside to ExternalIP", OUTSIDE, "tcp", "198.51.100.50", 80, "10.244.1.4:8080", True),
    Flow("outside (in sourceRanges) to LB IP", OUTSIDE, "tcp", "198.51.100.60", 80, "10.244.1.4:8080", True),
    Flow("pod (not in sourceRanges) to LB IP", POD_CLIENT, "tcp", "198.51.100.60", 80, "DROP", False),
    Flow("outside to NodePort of a Service with sourceRanges", OUTSIDE, "tcp", NODE_IP, 30060, "10.244.1.4:8080", True),
    Flow("outside (not in sourceRanges) to LB IP", OUTSIDE, "tcp", "198.51.100.70", 80, "DROP", False),
    Flow("node (in sourceRanges) to LB IP", NODE_IP, "tcp", "198.51.100.70", 80, "10.244.1.2:8080", True),
    Flow(
        "LB IP itself as source, node in sourceRanges",
        "198.51.100.70",
        "tcp",
        "198.51.100.70",
        80,
        "10.244.1.2:8080",
        True,
        False,
    ),
    Flow(
        "pod to ClusterIP with affinity, first connection",
        POD_CLIENT,
        "tcp",
        "10.96.0.90",
        80,
        "10.244.1.2:8080, 10.244.1.3:8080",
        False,
        False,
    ),
    Flow("outside to an ipMode Proxy LB IP: not ours", OUTSIDE, "tcp", "198.51.100.80", 80, "", False, False),
    Flow("outside to an unknown NodePort", OUTSIDE, "tcp", NODE_IP, 31999, "", False, False),
]
