"""The multi-node lab: a small dual-stack Kubernetes cluster (nodes, routed pods, an outside client) in namespaces.

Topology (the address plan of DESIGN.md section 4; IPv4 and IPv6 always)::

    bridge ns: br0 (a plain L2 switch, no addresses) with ports n1, n2, n3 and client
        |  n<N> <-veth-> eth0 of node<N>            |  client <-veth-> eth0 of the client
    node<N> ns                                       client ns
      eth0 192.168.50.N/24, fd00:50::N/64              eth0 203.0.113.10/24, fd00:203:0:113::10/64
      kp<S>-<pod> 10.244.N.1/32, fd00:10:244::N:1/128    198.51.100.0/24, fd00:198:51:100::/64 via node1
        <-veth-> pod ns: eth0 10.244.N.M, fd00:10:244::N:M

Every node routes its own pods point-to-point exactly like :class:`~kubeproxy.lab.cluster.Lab` (the
gateway ``10.244.N.1``/``fd00:10:244::N:1`` on the node end of each pod veth, a host route per pod) and
the other nodes' pod ranges host-gw style: ``10.244.M.0/24 via 192.168.50.M`` and
``fd00:10:244::M:0/112 via fd00:50::M``. Nodes and client reach each other through on-link routes
(their subnets differ, the bridge joins them); a node's default route points at the client (the
outside world), and the client routes the load-balancer range via node1 (as a load balancer would)
but has no route to any pod range. Nodes forward, the client does not; the bridge namespace only
switches frames.

:meth:`MultiNodeLab.start_proxy` runs the real ``python -m kubeproxy`` daemon inside one node
namespace, reading a manifest directory; :meth:`MultiNodeLab.write_node_manifests` writes the Node
objects the proxies need there (addresses of both families, pod CIDRs).

Invariants: those of :class:`~kubeproxy.lab.cluster.LabBase` (the lab safety rule): nothing is ever
created in the host's namespace (veths are created from inside lab namespaces, peers born in lab
namespaces), no lab namespace is linked to the host, every namespace is named ``kpl-<tag>-...`` (at most
40 characters; :func:`~kubeproxy.lab.cluster.sweep_stale_labs` finds leftovers), and every namespace
and process is removed on every exit path.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any

import yaml

from kubeproxy.lab.cluster import LabBase, Pod, _add_veth
from kubeproxy.lab.netns import LabError, call_in_netns

__all__ = [
    "CLIENT_IP",
    "CLIENT_IP6",
    "CLUSTER_CIDRS",
    "LB_CIDR",
    "LB_CIDR6",
    "LabNode",
    "MultiNodeLab",
]

CLIENT_IP = "203.0.113.10"
CLIENT_IP6 = "fd00:203:0:113::10"
LB_CIDR = "198.51.100.0/24"
LB_CIDR6 = "fd00:198:51:100::/64"
CLUSTER_CIDRS = ("10.244.0.0/16", "fd00:10:244::/64")
_NODE_NET = ipaddress.IPv4Network("192.168.50.0/24")
_NODE_NET6 = ipaddress.IPv6Network("fd00:50::/64")
_CLIENT_NET = ipaddress.IPv4Network("203.0.113.0/24")
_CLIENT_NET6 = ipaddress.IPv6Network("fd00:203:0:113::/64")
_BRIDGE = "br0"
_MIN_NODES = 2
_MAX_NODES = 9  # keeps node N's IPv6 pod range fd00:10:244::N:0/112 reading like its IPv4 10.244.N.0/24
_MIN_HOST = 2  # .1 is the gateway
_MAX_HOST = 254


@dataclass(frozen=True)
class LabNode:
    """One node of a :class:`MultiNodeLab`: its namespace and its addresses (fixed by ``index``)."""

    index: int
    name: str  # node<N>, the Kubernetes node name (--hostname-override)
    netns: str
    ip: str
    ip6: str
    pod_cidr: str
    pod_cidr6: str
    gateway_ip: str
    gateway_ip6: str

    @classmethod
    def numbered(cls, index: int, *, netns: str) -> LabNode:
        return cls(
            index=index,
            name=f"node{index}",
            netns=netns,
            ip=str(_NODE_NET.network_address + index),
            ip6=str(_NODE_NET6.network_address + index),
            pod_cidr=f"10.244.{index}.0/24",
            pod_cidr6=f"fd00:10:244::{index}:0/112",
            gateway_ip=f"10.244.{index}.1",
            gateway_ip6=f"fd00:10:244::{index}:1",
        )

    def pod_ip(self, host: int) -> str:
        """IPv4 address of pod ``host`` on this node: ``10.244.<N>.<host>``."""
        return str(ipaddress.IPv4Network(self.pod_cidr).network_address + _check_host(host))

    def pod_ip6(self, host: int) -> str:
        """IPv6 address of pod ``host`` on this node: ``fd00:10:244::<N>:<host>`` (same digits as IPv4)."""
        # Written with the IPv4 host number's digits (10.244.2.11 <-> fd00:10:244::2:11), as people read them.
        return str(ipaddress.IPv6Address(f"fd00:10:244::{self.index}:{_check_host(host)}"))

    def manifest(self) -> dict[str, Any]:
        """This node as the API server returns it: InternalIPs of both families, both pod CIDRs."""
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": {"kubernetes.io/hostname": self.name}},
            "spec": {"podCIDR": self.pod_cidr, "podCIDRs": [self.pod_cidr, self.pod_cidr6]},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": self.ip},
                    {"type": "InternalIP", "address": self.ip6},
                    {"type": "Hostname", "address": self.name},
                ]
            },
        }


def _check_host(host: int) -> int:
    if not isinstance(host, int) or not _MIN_HOST <= host <= _MAX_HOST:
        raise LabError(f"pod host number {host!r} must be an integer in {_MIN_HOST}..{_MAX_HOST}")
    return host


class MultiNodeLab(LabBase):
    """``nodes`` dual-stack node namespaces on one bridge, routed pods per node, one outside client.

    Use as a context manager; everything it created is removed on exit (also on failure, SIGTERM, or
    interpreter exit).
    """

    def __init__(self, *, nodes: int = 3, tag: str | None = None) -> None:
        super().__init__(tag=tag, ipv6=True)
        if not isinstance(nodes, int) or not _MIN_NODES <= nodes <= _MAX_NODES:
            raise LabError(f"nodes={nodes!r}: a multi-node lab has {_MIN_NODES}..{_MAX_NODES} nodes")
        self.nodes: tuple[LabNode, ...] = tuple(
            LabNode.numbered(i, netns=f"{self._base}-node{i}") for i in range(1, nodes + 1)
        )
        self.bridge_ns = f"{self._base}-bridge"
        self.client_ns = f"{self._base}-client"
        self.client_ip = CLIENT_IP
        self.client_ip6 = CLIENT_IP6
        self.proxy_logs: dict[str, Path] = {}  # node name -> log of the last proxy started there

    # -- lookups --------------------------------------------------------------------------------------

    def node(self, which: int | str) -> LabNode:
        """A node by index (1-based) or by name (``"node2"``)."""
        for candidate in self.nodes:
            if which in (candidate.index, candidate.name):
                return candidate
        raise LabError(f"no node {which!r} in this lab ({', '.join(n.name for n in self.nodes)})")

    def node_of(self, pod_name: str) -> LabNode:
        """The node a pod lives on."""
        node_ns = self._pod_node_ns.get(pod_name)
        for candidate in self.nodes:
            if candidate.netns == node_ns:
                return candidate
        raise LabError(f"no pod named {pod_name!r} in this lab")

    # -- building -------------------------------------------------------------------------------------

    def _build(self) -> None:
        self._add_netns(self.bridge_ns)
        for n in self.nodes:
            self._add_netns(n.netns)
        self._add_netns(self.client_ns)

        # The bridge namespace is a switch: no IP addresses at all (IPv6 off, so its ports do not even
        # get link-local addresses), and bridged frames never pass through netfilter there.
        self._sysctls(
            self.bridge_ns,
            {
                "net.ipv4.ip_forward": "0",
                "net.ipv6.conf.all.disable_ipv6": "1",
                "net.ipv6.conf.default.disable_ipv6": "1",
            },
        )
        _disable_bridge_netfilter(self.bridge_ns)
        for n in self.nodes:
            self._sysctls(n.netns, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})
        # The client stands for the outside world and must not route traffic onwards (IPv4 settings of
        # a new namespace are copied from the host's, so say it explicitly).
        self._sysctls(self.client_ns, {"net.ipv4.ip_forward": "0", "net.ipv6.conf.all.forwarding": "0"})

        # Every veth is created from inside the bridge namespace with its peer born in the node (client)
        # namespace: nothing ever appears in the host namespace.
        ports = [f"n{n.index}" for n in self.nodes] + ["client"]
        for n in self.nodes:
            _add_veth(self.bridge_ns, f"n{n.index}", peer_netns=n.netns, peer_name="eth0")
        _add_veth(self.bridge_ns, "client", peer_netns=self.client_ns, peer_name="eth0")
        # No STP and no forward delay: ports forward at once. No multicast snooping: IPv6 neighbour
        # discovery (solicited-node multicast) is flooded instead of depending on MLD reports.
        bridge_cmds = [
            "link set lo up",
            f"link add {_BRIDGE} type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
            f"link set {_BRIDGE} up",
        ]
        for port in ports:
            bridge_cmds += [f"link set {port} master {_BRIDGE}", f"link set {port} up"]
        self._ip_batch(self.bridge_ns, bridge_cmds)

        for n in self.nodes:
            # nodad: an address is usable at once instead of after ~1 s of duplicate detection.
            cmds = [
                "link set lo up",
                f"addr add {n.ip}/{_NODE_NET.prefixlen} dev eth0",
                f"addr add {n.ip6}/{_NODE_NET6.prefixlen} dev eth0 nodad",
                "link set eth0 up",
                f"route add {_CLIENT_NET} dev eth0 scope link",
                f"route add {_CLIENT_NET6} dev eth0",
                f"route add default via {self.client_ip} dev eth0",
                f"route add ::/0 via {self.client_ip6} dev eth0",
            ]
            # host-gw: the other nodes' pod ranges through those nodes' addresses on the shared segment.
            for other in self.nodes:
                if other is not n:
                    cmds += [
                        f"route add {other.pod_cidr} via {other.ip} dev eth0",
                        f"route add {other.pod_cidr6} via {other.ip6} dev eth0",
                    ]
            self._ip_batch(n.netns, cmds)

        first = self.nodes[0]
        self._ip_batch(
            self.client_ns,
            [
                "link set lo up",
                f"addr add {self.client_ip}/{_CLIENT_NET.prefixlen} dev eth0",
                f"addr add {self.client_ip6}/{_CLIENT_NET6.prefixlen} dev eth0 nodad",
                "link set eth0 up",
                f"route add {_NODE_NET} dev eth0 scope link",
                f"route add {_NODE_NET6} dev eth0",
                # Load-balancer / external IPs enter the cluster through node1; pod ranges are not routed.
                f"route add {LB_CIDR} via {first.ip} dev eth0",
                f"route add {LB_CIDR6} via {first.ip6} dev eth0",
            ],
        )

    # -- pods -----------------------------------------------------------------------------------------

    def add_pod(
        self,
        name: str,
        *,
        node: int | str,
        host: int,
        tcp_ports: Sequence[int] = (80,),
        udp_ports: Sequence[int] = (),
    ) -> Pod:
        """Create a dual-stack routed pod on ``node`` at ``10.244.N.<host>`` and ``fd00:10:244::N:<host>``.

        The pod runs a podserver on the given ports (none when both are empty). Pod names are unique in
        the whole lab.
        """
        self._require_active()
        self._check_new_pod_name(name)
        where = self.node(node)
        ip = where.pod_ip(host)
        ip6 = where.pod_ip6(host)
        for other in self.pods.values():
            if other.ip == ip:
                raise LabError(f"pod {name!r}: address {ip} is already used by pod {other.name!r}")
        return self._create_routed_pod(
            name,
            node_ns=where.netns,
            ip=ip,
            network=ipaddress.IPv4Network(where.pod_cidr),
            gateway=where.gateway_ip,
            ip6=ip6,
            network6=ipaddress.IPv6Network(where.pod_cidr6),
            gateway6=where.gateway_ip6,
            tcp_ports=tcp_ports,
            udp_ports=udp_ports,
        )

    # -- kube-proxy per node --------------------------------------------------------------------------

    def node_manifests(self) -> str:
        """Every node of the lab as a multi-document YAML manifest."""
        return yaml.safe_dump_all([n.manifest() for n in self.nodes], sort_keys=False)

    def write_node_manifests(self, directory: str | Path, *, filename: str = "nodes.yaml") -> Path:
        """Write :meth:`node_manifests` into ``directory`` (created if missing); returns the file."""
        path = Path(directory) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.node_manifests())
        return path

    def start_proxy(
        self,
        node: int | str,
        manifests_dir: str | Path,
        *,
        extra_args: Sequence[str] = (),
        log_path: str | Path | None = None,
    ) -> Popen[str]:
        """Run ``python -m kubeproxy`` for ``node`` inside its namespace, reading ``manifests_dir``.

        The proxy logs to ``log_path`` (default: ``kube-proxy-node<N>.log`` in the lab's temporary
        directory; :attr:`proxy_logs` names it). Teardown stops it; the caller waits for programming
        (e.g. by polling traffic) -- the daemon applies nothing before its initial lists are read.
        """
        self._require_active()
        where = self.node(node)
        log = Path(log_path) if log_path is not None else self._tmp() / f"kube-proxy-{where.name}.log"
        argv = [
            sys.executable,
            "-m",
            "kubeproxy",
            f"--manifests={manifests_dir}",
            f"--hostname-override={where.name}",
            f"--cluster-cidr={','.join(CLUSTER_CIDRS)}",
            "--v=2",
            "--iptables-min-sync-period=100ms",
            *extra_args,
        ]
        proc = self.spawn(where.netns, argv, log_path=str(log))
        self.proxy_logs[where.name] = log
        return proc


def _disable_bridge_netfilter(netns: str) -> None:
    """Turn off br_netfilter's hooks for bridged frames in ``netns``, when that module is loaded.

    With br_netfilter loaded, bridged IP frames would traverse the bridge namespace's netfilter hooks
    (conntrack included); the switch should be transparent. Without the module the sysctls do not exist.
    """

    def write() -> None:
        base = Path("/proc/sys/net/bridge")
        for name in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables"):
            path = base / name
            if path.exists():
                path.write_text("0\n")

    try:
        call_in_netns(netns, write)
    except OSError as exc:
        raise LabError(f"cannot switch off bridge netfilter in {netns}: {exc}") from exc
