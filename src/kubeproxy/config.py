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
    manifests: Path | None = None
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
