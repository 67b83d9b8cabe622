"""Backend-neutral proxy options for one IP family: what every data path needs to know.

``ProxyOptions`` holds the settings that mean the same in every mode (masquerade bit, masqueradeAll,
local-traffic detection, nodePortAddresses) and the family-neutral logic around them. Each backend
subclasses it with its own syntax (``NftOptions``, ``IptOptions``). The one semantic difference
between modes is the default of ``nodePortAddresses``: nftables mode answers NodePorts on the
Node's primary IPs only, iptables mode on every local address (upstream, reference/upstream.md
section 4.6); ``DEFAULT_NODEPORT_ADDRESSES`` carries it.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Self, TypeVar

from kubeproxy.model.service import IPFamily, family_of

log = logging.getLogger("kubeproxy.backends")


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    """Backend settings for one IP family."""

    DEFAULT_NODEPORT_ADDRESSES: ClassVar[tuple[str, ...]] = ("primary",)

    family: IPFamily = IPFamily.V4
    masquerade_bit: int = 14
    masquerade_all: bool = False
    # Local-traffic detection (upstream detectLocalMode), at most one of the two:
    cluster_cidrs: tuple[str, ...] = ()  # by source CIDR: ClusterCIDR, or NodeCIDR once resolved (for_node)
    local_interface: str = ""  # by input interface: "cbr0" (BridgeInterface) or "veth*" (InterfaceNamePrefix)
    node_cidr: bool = False  # NodeCIDR: cluster_cidrs are this Node's spec.podCIDRs of this family
    nodeport_addresses: tuple[str, ...] = ()  # --nodeport-addresses: CIDRs and keywords; () means the default

    @property
    def mark_value(self) -> int:
        return 1 << self.masquerade_bit

    def for_node(self, pod_cidrs: Sequence[str]) -> Self:
        """The options in force for a Node: NodeCIDR detection takes the Node's pod CIDRs of this family."""
        if not self.node_cidr:
            return self
        mine = tuple(c for c in pod_cidrs if family_of(c.split("/")[0]) is self.family)
        return self if mine == self.cluster_cidrs else replace(self, cluster_cidrs=mine)

    @property
    def local_detection(self) -> bool:
        """Can pod (local) traffic be told apart from the rest?"""
        return bool(self.local_interface or self.cluster_cidrs)

    @property
    def nodeport_spec(self) -> tuple[str, ...]:
        """--nodeport-addresses as given, or this mode's default."""
        return self.nodeport_addresses or self.DEFAULT_NODEPORT_ADDRESSES

    @property
    def nodeport_cidrs(self) -> tuple[str, ...]:
        """nodePortAddresses CIDRs of this family ("primary" is resolved per Node by nodeport_ips)."""
        out: list[str] = []
        for item in self.nodeport_spec:
            if item == "all":
                out.append("0.0.0.0/0" if self.family is IPFamily.V4 else "::/0")
            elif item == "localhost":
                out.append("127.0.0.0/8" if self.family is IPFamily.V4 else "::1/128")
            elif item != "primary" and family_of(item.split("/")[0]) is self.family:
                out.append(item)
        return tuple(out)

    @property
    def nodeport_match_all(self) -> bool:
        """NodePorts on every local address (upstream: no CIDR of this family given, or a /0)."""
        cidrs = self.nodeport_cidrs
        if any(ipaddress.ip_network(c).prefixlen == 0 for c in cidrs):
            return True
        return not cidrs and "primary" not in self.nodeport_spec

    def nodeport_ips(
        self, node_addresses: Sequence[str], interface_addresses: Sequence[str] = (), *, loopback: bool = False
    ) -> tuple[str, ...]:
        """The addresses NodePorts answer on when not every local address does (empty when match-all).

        ``primary`` is the Node's first address of this family; CIDRs select the node's interface
        addresses inside them. Loopback addresses qualify only with ``loopback`` (iptables mode's
        localhost NodePorts).
        """
        if self.nodeport_match_all:
            return ()
        mine = [a for a in node_addresses if family_of(a) is self.family]
        out: list[str] = []
        if "primary" in self.nodeport_spec and mine:
            out.append(mine[0])
        nets = [ipaddress.ip_network(c) for c in self.nodeport_cidrs]
        for candidate in (*interface_addresses, *mine):
            if family_of(candidate) is not self.family:
                continue
            ip = ipaddress.ip_address(candidate)
            if (loopback or not ip.is_loopback) and any(ip in net for net in nets):
                out.append(candidate)
        return tuple(dict.fromkeys(out))


OptionsT = TypeVar("OptionsT", bound=ProxyOptions)


def in_force(
    configured: OptionsT, current: OptionsT, pod_cidrs: Sequence[str], *, family: str
) -> tuple[OptionsT, bool]:
    """The options for this sync (NodeCIDR detection follows the Node's podCIDRs), and whether they
    changed since ``current``: the local-traffic match is in static and Service rules alike, so a
    change means a full sync."""
    opts = configured.for_node(pod_cidrs)
    if opts == current:
        return current, False
    log.info("local traffic detection changed family=%s cidrs=%s", family, ",".join(opts.cluster_cidrs))
    return opts, True
