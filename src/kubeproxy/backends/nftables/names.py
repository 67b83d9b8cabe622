"""Chain names for the nftables backend, derived exactly like upstream's ``hashAndTruncate``.

A per-service chain is ``<prefix>-<HASH8>-<ns>/<name>/<proto>/<portName>``: the first 8 characters
of base32(sha256(base)) keep names unique after truncation, and the readable tail lets an operator
find a Service's chains with ``nft list table``. Names that would exceed nft's limit are truncated
with "...". Inputs are DNS-1123 names validated by the model, so a name never carries quoting or
whitespace into a ruleset (the hash would still keep chain identity unique if it did).

Upstream vectors (reference/upstream.md section 4.4): ``ns1/svc1/tcp/p80`` -> ``ULMVA6XW-ns1/svc1/tcp/p80``.
"""

from __future__ import annotations

import base64
import hashlib

from kubeproxy.model.service import ServicePortName

# nft allows 256-byte chain names; upstream keeps 16 bytes for the longest prefix.
_MAX_BASE = 240

SERVICE = "service"
LOCAL = "local"
EXTERNAL = "external"
FIREWALL = "firewall"
ENDPOINT = "endpoint"
AFFINITY = "affinity"
SERVICE_CHAIN_PREFIXES = (SERVICE, LOCAL, EXTERNAL, FIREWALL, ENDPOINT)


def hash_and_truncate(name: str) -> str:
    digest = base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()[:8]
    full = f"{digest}-{name}"
    return full if len(full) <= _MAX_BASE else full[: _MAX_BASE - 3] + "..."


def service_base(spn: ServicePortName) -> str:
    return hash_and_truncate(f"{spn.namespace}/{spn.name}/{spn.protocol.nft}/{spn.port}")


def endpoint_base(spn: ServicePortName, ip: str, port: int) -> str:
    return hash_and_truncate(f"{spn.namespace}/{spn.name}/{spn.protocol.nft}/{spn.port}__{ip.replace(':', '.')}/{port}")


def is_service_chain(name: str) -> bool:
    """Per-service chains are exactly those whose name contains '/' (static chains never do)."""
    return "/" in name
