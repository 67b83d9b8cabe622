"""Effective proxy configuration, as the daemon consumes it.

This is the resolved, validated form that flags and the ``KubeProxyConfiguration`` file
(``configfile.py``) produce. Durations are seconds.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any


class ConfigError(Exception):
    """A setting is invalid; the message names the setting and the value."""


class ProxyMode(enum.StrEnum):
    NFTABLES = "nftables"
    IPTABLES = "iptables"
    IPVS = "ipvs"


IMPLEMENTED_MODES = (ProxyMode.NFTABLES, ProxyMode.IPTABLES)


class DetectLocalMode(enum.StrEnum):
    """How "traffic from a pod on this node / in the cluster" is recognised (upstream detectLocalMode)."""

    CLUSTER_CIDR = "ClusterCIDR"  # source inside --cluster-cidr (one CIDR per family)
    NODE_CIDR = "NodeCIDR"  # source inside this Node's spec.podCIDRs
    BRIDGE_INTERFACE = "BridgeInterface"  # arrived on --pod-bridge-interface
    INTERFACE_NAME_PREFIX = "InterfaceNamePrefix"  # arrived on an interface named --pod-interface-name-prefix*


NODEPORT_KEYWORDS = ("primary", "localhost", "all")


@dataclass(frozen=True, slots=True)
class ConntrackConfig:
    """Conntrack sysctls kube-proxy sets at startup (upstream KubeProxyConntrackConfiguration).

    Durations are seconds; ``None`` (or 0 for the UDP timeouts) means "leave the kernel's value".
    """

    max_per_core: int = 32768
    min: int = 131072
    tcp_timeout_established: float | None = 86400.0
    tcp_timeout_close_wait: float | None = 3600.0
    tcp_be_liberal: bool = False
    udp_timeout: float = 0.0
    udp_timeout_stream: float = 0.0


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    mode: ProxyMode = ProxyMode.NFTABLES
    manifests: Path | None = None  # our embedded source; when unset, the API server is the source
    kubeconfig: str = ""  # --kubeconfig / clientConnection.kubeconfig; with master both empty: in-cluster
    master: str = ""  # --master: overrides the kubeconfig's server
    hostname_override: str = ""
    cluster_cidrs: tuple[str, ...] = ()
    detect_local_mode: DetectLocalMode = DetectLocalMode.CLUSTER_CIDR
    pod_bridge_interface: str = ""
    pod_interface_name_prefix: str = ""
    nodeport_addresses: tuple[str, ...] = ()  # CIDRs and keywords; empty: the mode's default (nftables: primary)
    conntrack: ConntrackConfig = ConntrackConfig()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    localhost_nodeports: bool = True  # iptables mode: NodePorts also on 127.0.0.1 (route_localnet)
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    full_sync_period: float = 3600.0
    verbosity: int = 0
    cleanup: bool = False  # --cleanup: remove our rules and exit
    init_only: bool = False  # --init-only: node setup that needs full root (sysctls), then exit
    config_file: Path | None = None  # --config: the process exits when it changes (upstream), to be restarted
    # IP:port of the /healthz + /livez and the /metrics servers; "" disables one. Flags and the config
    # file default them to upstream's 0.0.0.0:10256 and 127.0.0.1:10249 (configfile.resolve); a
    # ProxyConfig built in code (tests, the lab) serves neither unless asked.
    healthz_bind_address: str = ""
    metrics_bind_address: str = ""
    bind_address_hard_fail: bool = False  # a server that cannot bind is fatal (else retried)
    oom_score_adj: int | None = -999  # None: leave the process's value
    feature_gates: Mapping[str, bool] = field(default_factory=lambda: MappingProxyType({}))
    # The effective KubeProxyConfiguration document (defaults filled in), as /configz shows it.
    configz: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False)

    @property
    def node_name(self) -> str:
        # Upstream GetHostname: the override, else the lower-cased hostname.
        return (self.hostname_override or socket.gethostname()).strip().lower()


def parse_cluster_cidrs(value: str, *, name: str = "--cluster-cidr") -> tuple[str, ...]:
    """``--cluster-cidr``: one CIDR, or a comma-separated dual-stack pair."""
    out: list[str] = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError as exc:
            raise ConfigError(f"{name}: invalid CIDR {part!r}") from exc
    families = [ipaddress.ip_network(c).version for c in out]
    if len(families) != len(set(families)):
        raise ConfigError(f"{name}: at most one CIDR per IP family, got {value!r}")
    return tuple(out)


def parse_nodeport_addresses(value: str | list[str], *, name: str = "--nodeport-addresses") -> tuple[str, ...]:
    """``--nodeport-addresses``: comma-separated CIDRs and the keywords primary, localhost, all."""
    out: list[str] = []
    parts = value.split(",") if isinstance(value, str) else value
    for part in filter(None, (p.strip() for p in parts)):
        if part in NODEPORT_KEYWORDS:
            out.append(part)
            continue
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError as exc:
            raise ConfigError(f"{name}: {part!r} is neither a CIDR nor one of {', '.join(NODEPORT_KEYWORDS)}") from exc
    return tuple(dict.fromkeys(out))


_INTERFACE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,15}$")  # what we accept inside a quoted nft iifname


def check_local_detection(mode: DetectLocalMode, *, bridge: str, prefix: str) -> None:
    """The mode's parameter must be given, as upstream requires (ClusterCIDR may run without a CIDR).

    Interface names are restricted to letters, digits, ``.``, ``_`` and ``-``: they end up quoted
    inside rules, and nothing a flag says may change a rule's meaning.
    """
    if mode is DetectLocalMode.BRIDGE_INTERFACE and not _INTERFACE_NAME.match(bridge):
        raise ConfigError(
            f"--pod-bridge-interface (detectLocal.bridgeInterface): {bridge!r} is not a valid interface name "
            "(BridgeInterface mode)"
        )
    if mode is DetectLocalMode.INTERFACE_NAME_PREFIX and not _INTERFACE_NAME.match(prefix):
        raise ConfigError(
            f"--pod-interface-name-prefix (detectLocal.interfaceNamePrefix): {prefix!r} is not a valid interface "
            "name prefix (InterfaceNamePrefix mode)"
        )
