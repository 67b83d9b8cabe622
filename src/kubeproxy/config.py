"""Effective proxy configuration, as the daemon consumes it.

This is the resolved, validated form that flags (and, in a later issue, the
``KubeProxyConfiguration`` file) produce. Durations are seconds.
"""

from __future__ import annotations

import enum
import ipaddress
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


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    mode: ProxyMode = ProxyMode.NFTABLES
    manifests: Path | None = None  # our embedded source; when unset, the API server is the source
    kubeconfig: str = ""  # --kubeconfig / clientConnection.kubeconfig; with master both empty: in-cluster
    master: str = ""  # --master: overrides the kubeconfig's server
    hostname_override: str = ""
    cluster_cidrs: tuple[str, ...] = ()
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
