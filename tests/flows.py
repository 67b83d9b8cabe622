"""The Service scenario and its packet-flow table, shared by the tracer tests (pure) and the lab tests
(real packets): the same rows must hold in both, for IPv4 and for IPv6.

The scenario and the rows are written once, in IPv4 terms (DESIGN.md's address plan: node
192.168.50.1, pods 10.244.1.0/24, Services 10.96.0.0/16, outside client 203.0.113.10, external and
LB IPs 198.51.100.0/24). ``objects(IPFamily.V6)`` and ``flows(IPFamily.V6)`` translate every address
and CIDR with ``v6`` (pods fd00:10:244::1:N, Services fd00:10:96::N, node fd00:50::1, outside
fd00:203:0:113::10, LB/external fd00:198:51:100::N), so the IPv6 table is proven by the same rows.

The single-node lab holds pods a, b, c on node1. An EndpointSlice may say a pod runs on "node2":
the proxy only knows what the slice says, so that pod is "remote" for traffic policies while it
still answers real packets.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Any

import msgspec

from builders import CLUSTER_CIDR, endpoint_slice, node, service
from kubeproxy.model import objects
from kubeproxy.model.service import IPFamily

POD_CLIENT = "10.244.1.100"  # a pod with no Service of its own
OUTSIDE = "203.0.113.10"
NODE_IP = "192.168.50.1"
ZONE = "zone-a"

# Endpoint IP -> pod name in the lab.
PODS = {"10.244.1.2": "a", "10.244.1.3": "b", "10.244.1.4": "c"}

V4, V6 = IPFamily.V4, IPFamily.V6
FAMILIES = [V4, V6]

# --- IPv4 -> IPv6 translation of the address plan ------------------------------------------------

_V6_PREFIXES = (
    ("10.244.", "fd00:10:244::"),  # 10.244.N.M -> fd00:10:244::N:M (node N's pods)
    ("10.96.0.", "fd00:10:96::"),
    ("192.168.50.", "fd00:50::"),
    ("203.0.113.", "fd00:203:0:113::"),
    ("198.51.100.", "fd00:198:51:100::"),
    ("192.0.2.", "fd00:192:0:2::"),
)
_V6_CIDRS = {
    CLUSTER_CIDR: "fd00:10:244::/64",
    "10.244.1.0/24": "fd00:10:244::1:0/112",
    "10.244.1.0/26": "fd00:10:244::1:0/122",  # pods .0-.63: a, b, c yes; the client (.100) no
    "10.96.0.0/16": "fd00:10:96::/112",
    "192.168.50.0/24": "fd00:50::/64",
    "203.0.113.0/24": "fd00:203:0:113::/64",
    "198.51.100.0/24": "fd00:198:51:100::/64",
    "192.0.2.0/24": "fd00:192:0:2::/64",
    "192.168.50.200/29": "fd00:50::200/125",
}


def v6(text: str) -> str:
    """The IPv6 twin of a lab IPv4 address or CIDR (KeyError/ValueError for anything off-plan)."""
    if "/" in text:
        return _V6_CIDRS[str(ipaddress.ip_network(text))]
    if text == "127.0.0.1":
        return "::1"
    for v4_prefix, v6_prefix in _V6_PREFIXES:
        if text.startswith(v4_prefix):
            return str(ipaddress.ip_address(v6_prefix + text[len(v4_prefix) :].replace(".", ":")))
    raise ValueError(f"{text} is not in the lab's address plan")


def addr(text: str, family: IPFamily) -> str:
    return text if family is V4 else v6(text)


def _is_v4(text: str) -> bool:
    try:
        return ipaddress.ip_network(text, strict=False).version == 4
    except ValueError:
        return False


def _translate(value: Any) -> Any:
    if isinstance(value, dict):
        out = {k: _translate(v) for k, v in value.items()}
        if out.get("addressType") == "IPv4":
            out["addressType"] = "IPv6"
        return out
    if isinstance(value, list):
        return [_translate(v) for v in value]
    if isinstance(value, str) and _is_v4(value):
        return v6(value)
    return value


def to_family(obj: objects.KubeObject, family: IPFamily) -> objects.KubeObject:
    """The same object in ``family``: every address and CIDR translated, Services single-stack IPv6."""
    if family is V4:
        return obj
    data = _translate(msgspec.to_builtins(obj))
    kind = type(obj).__name__
    if kind == "Service":
        data["spec"]["ipFamilies"] = ["IPv6"]
    return objects.from_builtins(kind, data)


# --- the scenario --------------------------------------------------------------------------------

WEB = [{"name": "http", "port": 80}]
SLICE_PORT = [{"name": "http", "port": 8080}]


def _ep(ip: str, node_name: str = "node1", **extra: Any) -> dict[str, Any]:
    return {"addresses": [ip], "nodeName": node_name, "conditions": {"ready": True}, **extra}


def _slice(name: str, svc: str, eps: list[dict[str, Any]], ports: list[dict[str, Any]] | None = None) -> Any:
    return endpoint_slice(name, svc, [], endpoints=eps, ports=ports or SLICE_PORT)


TERMINATING = {"ready": False, "serving": True, "terminating": True}
GONE = {"ready": False, "serving": False, "terminating": True}


def basic_objects() -> list[objects.KubeObject]:
    return [
        node(labels={objects.TOPOLOGY_ZONE_LABEL: ZONE}),
        service("svc1", "10.96.0.10", ports=WEB),
        endpoint_slice("svc1-x", "svc1", ["10.244.1.2", "10.244.1.3"], ports=SLICE_PORT),
        service("svc2", "10.96.0.20", type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}]),
        endpoint_slice("svc2-x", "svc2", ["10.244.1.4"], ports=SLICE_PORT),
        service("svc3", "10.96.0.30", ports=WEB),
        service("svc4", "10.96.0.40", type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30040}]),
        service("svc5", "10.96.0.50", ports=WEB, externalIPs=["198.51.100.50"]),
        endpoint_slice("svc5-x", "svc5", ["10.244.1.4"], ports=SLICE_PORT),
        # LoadBalancer, reachable only from the outside client's network.
        load_balancer("svc6", "10.96.0.60", "198.51.100.60", 30060, source_ranges=["203.0.113.0/24"]),
        endpoint_slice("svc6-x", "svc6", ["10.244.1.4"], ports=SLICE_PORT),
        # LoadBalancer whose ranges hold the node but not the client: the LB IP itself may also send.
        load_balancer("svc7", "10.96.0.70", "198.51.100.70", 0, source_ranges=["192.0.2.0/24", "192.168.50.0/24"]),
        endpoint_slice("svc7-x", "svc7", ["10.244.1.2"], ports=SLICE_PORT),
        # ipMode Proxy and hostname-only ingress: the load balancer proxies to the node; nothing to program.
        load_balancer("svc8", "10.96.0.80", "198.51.100.80", 0, ip_mode="Proxy"),
        endpoint_slice("svc8-x", "svc8", ["10.244.1.2"], ports=SLICE_PORT),
        # sessionAffinity ClientIP: a first connection may go anywhere; later ones stick (lab test).
        service("svc9", "10.96.0.90", ports=WEB, sessionAffinity="ClientIP"),
        endpoint_slice("svc9-x", "svc9", ["10.244.1.2", "10.244.1.3"], ports=SLICE_PORT),
        # externalTrafficPolicy Local: a is on this node, b (says the slice) on node2.
        service(
            "svc10",
            "10.96.0.100",
            type="NodePort",
            ports=[{"name": "http", "port": 80, "nodePort": 30100}],
            externalIPs=["198.51.100.100"],
            externalTrafficPolicy="Local",
        ),
        _slice("svc10-x", "svc10", [_ep("10.244.1.2"), _ep("10.244.1.3", "node2")]),
        # externalTrafficPolicy Local without a local endpoint.
        service(
            "svc11",
            "10.96.0.110",
            type="NodePort",
            ports=[{"name": "http", "port": 80, "nodePort": 30110}],
            externalTrafficPolicy="Local",
        ),
        _slice("svc11-x", "svc11", [_ep("10.244.1.3", "node2")]),
        # internalTrafficPolicy Local, with and without a local endpoint.
        service("svc12", "10.96.0.120", ports=WEB, internalTrafficPolicy="Local"),
        _slice("svc12-x", "svc12", [_ep("10.244.1.2"), _ep("10.244.1.3", "node2")]),
        service("svc13", "10.96.0.130", ports=WEB, internalTrafficPolicy="Local"),
        _slice("svc13-x", "svc13", [_ep("10.244.1.3", "node2")]),
        # Terminating endpoints: ready ones preferred; serving-terminating ones only as a fallback.
        service("svc14", "10.96.0.140", ports=WEB),
        _slice("svc14-x", "svc14", [_ep("10.244.1.2", conditions=TERMINATING), _ep("10.244.1.3")]),
        service("svc15", "10.96.0.150", ports=WEB),
        _slice("svc15-x", "svc15", [_ep("10.244.1.2", conditions=TERMINATING), _ep("10.244.1.3", conditions=GONE)]),
        service("svc16", "10.96.0.160", ports=WEB),
        _slice("svc16-x", "svc16", [_ep("10.244.1.4", conditions=GONE)]),
        # Topology: zone hints (this node is in zone-a) and node hints (PreferSameNode).
        service("svc17", "10.96.0.170", ports=WEB, trafficDistribution="PreferSameZone"),
        _slice(
            "svc17-x",
            "svc17",
            [
                _ep("10.244.1.2", hints={"forZones": [{"name": ZONE}]}),
                _ep("10.244.1.3", "node2", hints={"forZones": [{"name": "zone-b"}]}),
            ],
        ),
        service("svc18", "10.96.0.180", ports=WEB, trafficDistribution="PreferSameNode"),
        _slice(
            "svc18-x",
            "svc18",
            [
                _ep("10.244.1.2", hints={"forNodes": [{"name": "node1"}]}),
                _ep("10.244.1.3", "node2", hints={"forNodes": [{"name": "node2"}]}),
            ],
        ),
        # Multi-port, the same port number on two protocols, each to a different pod.
        service(
            "svc19",
            "10.96.0.190",
            ports=[{"name": "dns-tcp", "port": 53, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}],
        ),
        _slice("svc19-t", "svc19", [_ep("10.244.1.2")], [{"name": "dns-tcp", "port": 8080, "protocol": "TCP"}]),
        _slice("svc19-u", "svc19", [_ep("10.244.1.3")], [{"name": "dns", "port": 8080, "protocol": "UDP"}]),
        # Terminating fallback per policy: the only local endpoint is serving-terminating, a ready one
        # runs "on node2" (upstream e2e: "fallback to local terminating endpoints ...").
        service("svc21", "10.96.0.210", ports=WEB, internalTrafficPolicy="Local"),
        _slice("svc21-x", "svc21", [_ep("10.244.1.2", conditions=TERMINATING), _ep("10.244.1.3", "node2")]),
        service(
            "svc22",
            "10.96.0.220",
            type="NodePort",
            ports=[{"name": "http", "port": 80, "nodePort": 30220}],
            externalTrafficPolicy="Local",
        ),
        _slice("svc22-x", "svc22", [_ep("10.244.1.2", conditions=TERMINATING), _ep("10.244.1.3", "node2")]),
        # SCTP.
        service("svc20", "10.96.0.200", ports=[{"name": "sig", "port": 80, "protocol": "SCTP"}]),
        _slice("svc20-x", "svc20", [_ep("10.244.1.2")], [{"name": "sig", "port": 8080, "protocol": "SCTP"}]),
    ]


def objects_for(family: IPFamily) -> list[objects.KubeObject]:
    return [to_family(o, family) for o in basic_objects()]


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
    output: str  # "ip:port, ip:port" | "REJECT" | "DROP" | "" (not ours)
    masquerade: bool
    lab: bool = True  # also run with real packets (needs a route from the source in the lab)
    family: IPFamily = V4
    variant: str = ""  # proxy options other than the default (OPTION_VARIANTS)
    # What iptables mode answers instead, (output, masquerade), where upstream's two layouts differ on
    # purpose (reference/upstream.md section 4.6); None: the same answer in every mode.
    iptables: tuple[str, bool] | None = None

    @property
    def id(self) -> str:
        return f"{self.variant + ': ' if self.variant else ''}{self.name} [{'ipv4' if self.family is V4 else 'ipv6'}]"


AB, A, B, C = "10.244.1.2:8080, 10.244.1.3:8080", "10.244.1.2:8080", "10.244.1.3:8080", "10.244.1.4:8080"

BASIC_FLOWS = [
    Flow("pod to ClusterIP", POD_CLIENT, "tcp", "10.96.0.10", 80, AB, False),
    Flow("outside to ClusterIP (off-cluster source)", OUTSIDE, "tcp", "10.96.0.10", 80, AB, True),
    Flow("node to ClusterIP", NODE_IP, "tcp", "10.96.0.10", 80, AB, True),
    # Hairpin masquerade applies only when the pod lands on itself: use a one-endpoint Service.
    Flow("hairpin: pod to its own Service", "10.244.1.4", "tcp", "10.96.0.20", 80, C, True),
    Flow("pod to a Service it does not back", "10.244.1.2", "tcp", "10.96.0.20", 80, C, False),
    Flow("outside to NodePort", OUTSIDE, "tcp", NODE_IP, 30080, C, True),
    Flow("pod to NodePort", POD_CLIENT, "tcp", NODE_IP, 30080, C, True),
    Flow("pod to ClusterIP without endpoints", POD_CLIENT, "tcp", "10.96.0.30", 80, "REJECT", False),
    Flow("node to ClusterIP without endpoints", NODE_IP, "tcp", "10.96.0.30", 80, "REJECT", False),
    Flow("outside to NodePort without endpoints", OUTSIDE, "tcp", NODE_IP, 30040, "REJECT", False),
    # nftables mode rejects ports no Service defines on a ClusterIP (cluster-ips-check); iptables
    # mode leaves such packets alone.
    Flow(
        "pod to ClusterIP on an undefined port",
        POD_CLIENT,
        "tcp",
        "10.96.0.10",
        81,
        "REJECT",
        False,
        iptables=("", False),
    ),
    Flow(
        "pod to ClusterIP over UDP (TCP-only Service)",
        POD_CLIENT,
        "udp",
        "10.96.0.10",
        80,
        "REJECT",
        False,
        iptables=("", False),
    ),
    Flow("pod to ExternalIP", POD_CLIENT, "tcp", "198.51.100.50", 80, C, True),
    Flow("outside to ExternalIP", OUTSIDE, "tcp", "198.51.100.50", 80, C, True),
    Flow("outside (in sourceRanges) to LB IP", OUTSIDE, "tcp", "198.51.100.60", 80, C, True),
    Flow("pod (not in sourceRanges) to LB IP", POD_CLIENT, "tcp", "198.51.100.60", 80, "DROP", False),
    Flow("outside to NodePort of a Service with sourceRanges", OUTSIDE, "tcp", NODE_IP, 30060, C, True),
    Flow("outside (not in sourceRanges) to LB IP", OUTSIDE, "tcp", "198.51.100.70", 80, "DROP", False),
    Flow("node (in sourceRanges) to LB IP", NODE_IP, "tcp", "198.51.100.70", 80, A, True),
    Flow("LB IP itself as source, node in sourceRanges", "198.51.100.70", "tcp", "198.51.100.70", 80, A, True, False),
    Flow("pod to ClusterIP with affinity, first connection", POD_CLIENT, "tcp", "10.96.0.90", 80, AB, False, False),
    Flow("outside to an ipMode Proxy LB IP: not ours", OUTSIDE, "tcp", "198.51.100.80", 80, "", False, False),
    Flow("outside to an unknown NodePort", OUTSIDE, "tcp", NODE_IP, 31999, "", False, False),
    # externalTrafficPolicy Local: outside traffic only to local endpoints, client IP preserved.
    Flow("ETP=Local: outside to NodePort, local endpoint only", OUTSIDE, "tcp", NODE_IP, 30100, A, False),
    Flow("ETP=Local: outside to ExternalIP, local endpoint only", OUTSIDE, "tcp", "198.51.100.100", 80, A, False),
    Flow("ETP=Local: pod to ExternalIP short-circuits to all", POD_CLIENT, "tcp", "198.51.100.100", 80, AB, False),
    Flow("ETP=Local: pod to NodePort short-circuits to all", POD_CLIENT, "tcp", NODE_IP, 30100, AB, False),
    Flow("ETP=Local: node to NodePort goes to all, masqueraded", NODE_IP, "tcp", NODE_IP, 30100, AB, True),
    Flow("ETP=Local: pod to ClusterIP uses Cluster policy", POD_CLIENT, "tcp", "10.96.0.100", 80, AB, False),
    Flow("ETP=Local, none local: outside to NodePort dropped", OUTSIDE, "tcp", NODE_IP, 30110, "DROP", False),
    Flow("ETP=Local, none local: pod to ClusterIP", POD_CLIENT, "tcp", "10.96.0.110", 80, B, False),
    Flow("ETP=Local, none local: pod to NodePort short-circuits", POD_CLIENT, "tcp", NODE_IP, 30110, B, False),
    # internalTrafficPolicy Local.
    Flow("ITP=Local: pod to ClusterIP, local endpoint only", POD_CLIENT, "tcp", "10.96.0.120", 80, A, False),
    Flow("ITP=Local: node to ClusterIP, local endpoint only", NODE_IP, "tcp", "10.96.0.120", 80, A, True),
    Flow("ITP=Local, none local: pod to ClusterIP dropped", POD_CLIENT, "tcp", "10.96.0.130", 80, "DROP", False),
    # Terminating endpoints.
    Flow("terminating: ready endpoint preferred", POD_CLIENT, "tcp", "10.96.0.140", 80, B, False),
    Flow("terminating: serving-terminating as fallback", POD_CLIENT, "tcp", "10.96.0.150", 80, A, False),
    Flow("terminating: never not-serving ones", POD_CLIENT, "tcp", "10.96.0.160", 80, "REJECT", False),
    Flow(
        "terminating: ITP=Local falls back to the local terminating one", POD_CLIENT, "tcp", "10.96.0.210", 80, A, False
    ),
    Flow("terminating: ETP=Local falls back to the local terminating one", OUTSIDE, "tcp", NODE_IP, 30220, A, False),
    Flow(
        "terminating: ETP=Local, pod traffic uses ready cluster endpoints", POD_CLIENT, "tcp", NODE_IP, 30220, B, False
    ),
    # Topology.
    Flow("topology: zone hints for this node's zone", POD_CLIENT, "tcp", "10.96.0.170", 80, A, False),
    Flow("topology: node hints (PreferSameNode)", POD_CLIENT, "tcp", "10.96.0.180", 80, A, False),
    # Protocols.
    Flow("same port, TCP", POD_CLIENT, "tcp", "10.96.0.190", 53, A, False),
    Flow("same port, UDP", POD_CLIENT, "udp", "10.96.0.190", 53, B, False),
    Flow("outside to ClusterIP over UDP", OUTSIDE, "udp", "10.96.0.190", 53, B, True),
    Flow("node to ClusterIP over UDP", NODE_IP, "udp", "10.96.0.190", 53, B, True),
    Flow("pod to ClusterIP over SCTP", POD_CLIENT, "sctp", "10.96.0.200", 80, A, False),
]


def _translate_output(output: str) -> str:
    if output in ("", "REJECT", "DROP"):
        return output
    targets = []
    for target in output.split(","):
        ip, port = target.strip().rsplit(":", 1)
        targets.append(f"[{v6(ip)}]:{port}")
    return ", ".join(targets)


def flows(family: IPFamily, table: list[Flow] | None = None) -> list[Flow]:
    table = BASIC_FLOWS if table is None else table
    if family is V4:
        return table
    return [
        replace(
            f,
            source=v6(f.source),
            destination=v6(f.destination),
            output=_translate_output(f.output),
            family=V6,
            # IPv6 has no localhost NodePorts in any mode.
            iptables=_v6_iptables(f),
        )
        for f in table
    ]


def _v6_iptables(flow: Flow) -> tuple[str, bool] | None:
    if flow.iptables is None or flow.destination == "127.0.0.1":
        return None
    return (_translate_output(flow.iptables[0]), flow.iptables[1])


def expected(flow: Flow, mode: str) -> tuple[str, bool]:
    """(output, masquerade) the flow must give in ``mode`` ("nftables" or "iptables")."""
    if mode == "iptables" and flow.iptables is not None:
        return flow.iptables
    return (flow.output, flow.masquerade)


ALL_FLOWS = [f for family in FAMILIES for f in flows(family)]


def expected_pods(flow: Flow, output: str | None = None) -> set[str]:
    """Pod names behind a flow's output ("ip:port, ..." in either family), or behind ``output``."""
    names = {addr(ip, flow.family): name for ip, name in PODS.items()}
    return {names[t.strip().rsplit(":", 1)[0].strip("[]")] for t in (output or flow.output).split(",")}


# --- proxy options: local-traffic detection, masqueradeAll, nodePortAddresses ---------------------

SECOND_NODE_IP = "192.168.50.201"  # another address on the node's eth0 (nodePortAddresses rows)
# The node-side veth of each lab pod (Lab names them kp<N>-<pod> in creation order): the input
# interface of the pod's packets, for interface-based local detection.
IIF = {"10.244.1.2": "kp1-a", "10.244.1.3": "kp2-b", "10.244.1.4": "kp3-c", POD_CLIENT: "kp4-client", OUTSIDE: "eth0"}

OPTION_VARIANTS: dict[str, dict[str, Any]] = {
    # NftOptions fields in IPv4 terms (CIDRs are translated for IPv6).
    "NodeCIDR": {"node_cidr": True},
    "BridgeInterface": {"local_interface": "kp4-client"},
    "InterfaceNamePrefix": {"local_interface": "kp*"},
    "masqueradeAll": {"masquerade_all": True, "cluster_cidrs": (CLUSTER_CIDR,)},
    "nodePortAddresses primary": {"cluster_cidrs": (CLUSTER_CIDR,), "nodeport_addresses": ("primary",)},
    "nodePortAddresses all": {"cluster_cidrs": (CLUSTER_CIDR,), "nodeport_addresses": ("all",)},
    "nodePortAddresses CIDR": {"cluster_cidrs": (CLUSTER_CIDR,), "nodeport_addresses": ("192.168.50.200/29",)},
    "nodePortAddresses localhost": {"cluster_cidrs": (CLUSTER_CIDR,), "nodeport_addresses": ("localhost",)},
}
NODE_POD_CIDR = "10.244.1.0/26"  # NodeCIDR variant: pods a, b, c are inside, the client pod (.100) is not


def variant_options(variant: str, family: IPFamily, cls: Any = None) -> Any:
    """The options of a variant for one family, as ``cls`` (a ProxyOptions subclass; NftOptions by default)."""
    from kubeproxy.backends.nftables.render import NftOptions

    cls = cls or NftOptions
    fields = dict(OPTION_VARIANTS[variant])
    if "cluster_cidrs" in fields:
        fields["cluster_cidrs"] = tuple(addr(c, family) for c in fields["cluster_cidrs"])
    if "nodeport_addresses" in fields:
        fields["nodeport_addresses"] = tuple(
            a if a in ("all", "primary", "localhost") else addr(a, family) for a in fields["nodeport_addresses"]
        )
    return cls(family=family, **fields)


def variant_objects(variant: str, family: IPFamily) -> list[objects.KubeObject]:
    objs = basic_objects()
    if variant == "NodeCIDR":
        objs[0] = node(labels={objects.TOPOLOGY_ZONE_LABEL: ZONE}, pod_cidrs=[NODE_POD_CIDR])
    return [to_family(o, family) for o in objs]


def _variant(variant: str, rows: list[Flow]) -> list[Flow]:
    return [replace(f, variant=variant) for f in rows]


OPTION_FLOWS = [
    *_variant("NodeCIDR", [
        Flow("pod inside the node's pod CIDR to ClusterIP", "10.244.1.2", "tcp", "10.96.0.20", 80, C, False),
        Flow("pod outside the node's pod CIDR to ClusterIP", POD_CLIENT, "tcp", "10.96.0.20", 80, C, True),
        Flow("local pod to ETP=Local ExternalIP short-circuits", "10.244.1.4", "tcp", "198.51.100.100", 80, AB, False),
        Flow("non-local source to ETP=Local ExternalIP", POD_CLIENT, "tcp", "198.51.100.100", 80, A, False),
    ]),
    *_variant("BridgeInterface", [
        Flow("pod on the bridge to ClusterIP", POD_CLIENT, "tcp", "10.96.0.20", 80, C, False),
        Flow("pod on another interface to ClusterIP", "10.244.1.2", "tcp", "10.96.0.20", 80, C, True),
        Flow("outside to ClusterIP", OUTSIDE, "tcp", "10.96.0.20", 80, C, True),
    ]),
    *_variant("InterfaceNamePrefix", [
        Flow("pod to ClusterIP", POD_CLIENT, "tcp", "10.96.0.20", 80, C, False),
        Flow("another pod to ClusterIP", "10.244.1.2", "tcp", "10.96.0.20", 80, C, False),
        Flow("outside to ClusterIP", OUTSIDE, "tcp", "10.96.0.20", 80, C, True),
        Flow("pod to ETP=Local ExternalIP short-circuits", POD_CLIENT, "tcp", "198.51.100.100", 80, AB, False),
        Flow("outside to ETP=Local ExternalIP", OUTSIDE, "tcp", "198.51.100.100", 80, A, False),
    ]),
    *_variant("masqueradeAll", [
        Flow("pod to ClusterIP is masqueraded", POD_CLIENT, "tcp", "10.96.0.10", 80, AB, True),
    ]),
    *_variant("nodePortAddresses primary", [
        Flow("outside to NodePort on the primary IP", OUTSIDE, "tcp", NODE_IP, 30080, C, True),
        Flow("outside to NodePort on another node IP: not ours", OUTSIDE, "tcp", SECOND_NODE_IP, 30080, "", False),
    ]),
    *_variant("nodePortAddresses all", [
        Flow("outside to NodePort on the primary IP", OUTSIDE, "tcp", NODE_IP, 30080, C, True),
        Flow("outside to NodePort on another node IP", OUTSIDE, "tcp", SECOND_NODE_IP, 30080, C, True),
        Flow("outside to NodePort without endpoints", OUTSIDE, "tcp", SECOND_NODE_IP, 30040, "REJECT", False),
        # Tracer only: with route_localnet=0 the kernel drops such packets after DNAT anyway, so real
        # packets could not tell a rule that matched loopback from one that did not.
        # iptables mode answers on 127.0.0.1 (localhostNodePorts, IPv4 only); nftables mode never.
        Flow("node to NodePort on loopback", NODE_IP, "tcp", "127.0.0.1", 30080, "", False, False,
             iptables=(C, True)),
    ]),
    *_variant("nodePortAddresses CIDR", [
        Flow("outside to NodePort on an IP in the CIDR", OUTSIDE, "tcp", SECOND_NODE_IP, 30080, C, True),
        Flow("outside to NodePort on an IP outside it", OUTSIDE, "tcp", NODE_IP, 30080, "", False),
    ]),
    *_variant("nodePortAddresses localhost", [
        Flow("outside to NodePort: loopback only means nowhere", OUTSIDE, "tcp", NODE_IP, 30080, "", False),
    ]),
]  # fmt: skip

ALL_OPTION_FLOWS = [f for family in FAMILIES for f in flows(family, OPTION_FLOWS)]


def iif_of(flow: Flow) -> str | None:
    """The input interface of a flow's first packet in the lab (None: host-originated)."""
    names = {addr(ip, flow.family): name for ip, name in IIF.items()}
    return names.get(flow.source)


def node_addresses(family: IPFamily) -> list[str]:
    """The lab node's local addresses (the tracer's "fib ... type local")."""
    return [addr(a, family) for a in (NODE_IP, SECOND_NODE_IP, "127.0.0.1")]
