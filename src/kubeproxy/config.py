"""Effective proxy configuration, as the daemon consumes it.

This is the resolved, validated form that flags (and, in a later issue, the
``KubeProxyConfiguration`` file) produce. Durations are seconds.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path


class ConfigError(Exception):
    """A setting is invalid; the message names the setting and the value."""


class ProxyMode(enum.StrEnum):
    NFTABLES = "nftables"
    IPTABLES = "iptables"
    IPVS = "ipvs"


IMPLEMENTED_MODES = (ProxyMode.NFTABLES,)


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
    nodeport_addresses: tuple[str, ...] = ()  # CIDRs and keywords; empty: nftables' default ("primary")
    conntrack: ConntrackConfig = ConntrackConfig()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    full_sync_period: float = 3600.0
    verbosity: int = 0
    cleanup: bool = False  # --cleanup: remove our rules and exit

    @property
    def node_name(self) -> str:
        # Upstream GetHostname: the override, else the lower-cased hostname.
        return (self.hostname_override or socket.gethostname()).strip().lower()


def kubeconfig_from_config_file(path: Path) -> str:
    """``clientConnection.kubeconfig`` of a ``KubeProxyConfiguration`` file ("" when unset).

    The full configuration file (every field, strict decoding) is issue 5; until then this is the
    only field read from it, and the daemon says so.
    """
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("kind") != "KubeProxyConfiguration":
        raise ConfigError(f"--config {path}: not a KubeProxyConfiguration")
    if doc.get("apiVersion") != "kubeproxy.config.k8s.io/v1alpha1":
        raise ConfigError(
            f"--config {path}: apiVersion {doc.get('apiVersion')!r} is not kubeproxy.config.k8s.io/v1alpha1"
        )
    conn = doc.get("clientConnection") or {}
    if not isinstance(conn, dict):
        raise ConfigError(f"--config {path}: clientConnection must be a mapping")
    value = conn.get("kubeconfig") or ""
    if not isinstance(value, str):
        raise ConfigError(f"--config {path}: clientConnection.kubeconfig must be a string")
    return value


def parse_cluster_cidrs(value: str) -> tuple[str, ...]:
    """``--cluster-cidr``: one CIDR, or a comma-separated dual-stack pair."""
    out: list[str] = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError as exc:
            raise ConfigError(f"--cluster-cidr: invalid CIDR {part!r}") from exc
    families = [ipaddress.ip_network(c).version for c in out]
    if len(families) != len(set(families)):
        raise ConfigError(f"--cluster-cidr: at most one CIDR per IP family, got {value!r}")
    return tuple(out)


def parse_nodeport_addresses(value: str) -> tuple[str, ...]:
    """``--nodeport-addresses``: comma-separated CIDRs and the keywords primary, localhost, all."""
    out: list[str] = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        if part in NODEPORT_KEYWORDS:
            out.append(part)
            continue
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError as exc:
            raise ConfigError(
                f"--nodeport-addresses: {part!r} is neither a CIDR nor one of {', '.join(NODEPORT_KEYWORDS)}"
            ) from exc
    return tuple(dict.fromkeys(out))


_INTERFACE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,15}$")  # what we accept inside a quoted nft iifname


def check_local_detection(mode: DetectLocalMode, *, bridge: str, prefix: str) -> None:
    """The mode's parameter must be given, as upstream requires (ClusterCIDR may run without a CIDR).

    Interface names are restricted to letters, digits, ``.``, ``_`` and ``-``: they end up quoted
    inside rules, and nothing a flag says may change a rule's meaning.
    """
    if mode is DetectLocalMode.BRIDGE_INTERFACE and not _INTERFACE_NAME.match(bridge):
        raise ConfigError(f"--pod-bridge-interface: {bridge!r} is not a valid interface name (BridgeInterface mode)")
    if mode is DetectLocalMode.INTERFACE_NAME_PREFIX and not _INTERFACE_NAME.match(prefix):
        raise ConfigError(
            f"--pod-interface-name-prefix: {prefix!r} is not a valid interface name prefix (InterfaceNamePrefix mode)"
        )
