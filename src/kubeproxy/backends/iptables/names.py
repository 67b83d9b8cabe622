"""Chain names for the iptables backend, derived exactly like upstream's iptables proxier.

Per-Service-port chains (``KUBE-SVC-``, ``KUBE-SVL-``, ``KUBE-EXT-``, ``KUBE-FW-``) share one hash:
the first 16 characters of base32(sha256(servicePortName + protocol)), where servicePortName is
``ns/name`` plus ``:portName`` when the port is named and protocol is lower case. An endpoint chain
(``KUBE-SEP-``) hashes servicePortName + protocol + ``ip:port`` (``[ip]:port`` for IPv6). Chain
names stay within iptables' 28-character limit whatever the input, and nothing from the API
reaches a chain name unhashed.

Upstream vectors (reference/upstream.md section 3.2): ``ns1/svc1:p80`` + ``tcp`` ->
``KUBE-SVC-XPGD46QRK7WJZT7O``; its endpoint ``10.180.0.1:80`` -> ``KUBE-SEP-SXIVWICOYRO3J4NJ``.
"""

from __future__ import annotations

import base64
import functools
import hashlib

from kubeproxy.model.service import ServicePortName

SVC = "KUBE-SVC-"
SVL = "KUBE-SVL-"
EXT = "KUBE-EXT-"
FW = "KUBE-FW-"
SEP = "KUBE-SEP-"
SERVICE_CHAIN_PREFIXES = (SVC, SVL, EXT, FW, SEP)


# Rendering 10k Services x 10 endpoints asks for ~400k names, most of them again on every full sync:
# hashing dominated the render before these caches (pure-Python base32).
@functools.lru_cache(maxsize=1 << 18)
def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def service_hash(spn: ServicePortName) -> str:
    return _hash(str(spn) + spn.protocol.nft)


def endpoint_text(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def endpoint_chain(spn: ServicePortName, ip: str, port: int) -> str:
    return SEP + _hash(str(spn) + spn.protocol.nft + endpoint_text(ip, port))


def is_service_chain(name: str) -> bool:
    return name.startswith(SERVICE_CHAIN_PREFIXES)
