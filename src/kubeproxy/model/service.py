"""Backend-neutral Service model: ``ServicePortName`` and validated, immutable ``ServicePort`` values.

``service_ports(svc)`` is the single place that turns a raw ``objects.Service`` into what the
renderers consume, mirroring upstream's ``newBaseServiceInfo``: ExternalName and headless Services
and those carrying the ``service-proxy-name`` label yield nothing; every address is parsed and
normalized; every name that will end up inside a ruleset is checked against Kubernetes' own
syntax, so nothing from the API can smuggle text into a rule. A Service with any invalid field is
rejected as a whole (``InvalidObject`` names the field and the value), never partially programmed.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

from kubeproxy.model import objects

# DNS-1123 label (namespaces, Service names) and IANA_SVC_NAME (port names): the API server
# enforces these; we re-check because manifests and test doubles do not.
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

DEFAULT_AFFINITY_TIMEOUT = 10800  # API default for sessionAffinityConfig.clientIP.timeoutSeconds
MAX_AFFINITY_TIMEOUT = 86400


class InvalidObject(ValueError):
    """Raised for an object that must be skipped; the message says which field and why."""


class Protocol(enum.StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def nft(self) -> str:
        """The lower-case spelling nft and the chain-name hashes use (``tcp``)."""
        return self.value.lower()


class IPFamily(enum.IntEnum):
    V4 = 4
    V6 = 6

    @property
    def nft_family(self) -> str:
        return "ip" if self is IPFamily.V4 else "ip6"


def family_of(address: str) -> IPFamily:
    return IPFamily.V6 if ":" in address else IPFamily.V4


@dataclass(frozen=True, slots=True, order=True)
class NamespacedName:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """Identity of one port of one Service: ``ns/name:portName`` plus protocol (upstream's key)."""

    namespace: str
    name: str
    port: str
    protocol: Protocol

    @property
    def service(self) -> NamespacedName:
        return NamespacedName(self.namespace, self.name)

    def __str__(self) -> str:
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port}" if self.port else base


@dataclass(frozen=True, slots=True)
class ServicePort:
    """Everything a backend needs to program one Service port, all families together.

    Addresses are normalized strings; backends select their family with ``family_of``.
    """

    name: ServicePortName
    port: int
    cluster_ips: tuple[str, ...]
    node_port: int = 0
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int = 0
    affinity_timeout: int | None = None  # seconds when sessionAffinity is ClientIP
    traffic_distribution: str | None = None

    @property
    def protocol(self) -> Protocol:
        return self.name.protocol

    @property
    def externally_accessible(self) -> bool:
        return bool(self.node_port or self.external_ips or self.load_balancer_ips)

    def cluster_ip(self, family: IPFamily) -> str | None:
        for ip in self.cluster_ips:
            if family_of(ip) is family:
                return ip
        return None


# A dotted quad without leading zeros is already canonical: the common case skips ipaddress (about
# 8 us per address; 100k endpoints made it most of a cold start's state ingest).
_CANONICAL_V4 = re.compile(r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)", re.ASCII)


def parse_ip(value: str, where: str) -> str:
    """The canonical text of an IP address (``ipaddress``'s); ``InvalidObject`` names ``where``.
    IPv6 zone IDs (``fe80::1%eth0``) are refused, as the API server does: no ruleset can use them."""
    if _CANONICAL_V4.fullmatch(value):
        return value
    try:
        text = str(ipaddress.ip_address(value.strip()))
    except ValueError as exc:
        raise InvalidObject(f"{where}: invalid IP address {value!r}") from exc
    if "%" in text:
        raise InvalidObject(f"{where}: invalid IP address {value!r} (zone IDs are not allowed)")
    return text


def parse_cidr(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError as exc:
        raise InvalidObject(f"{where}: invalid CIDR {value!r}") from exc


def parse_port(value: int, where: str, *, allow_zero: bool = False) -> int:
    if allow_zero and value == 0:
        return 0
    if not 1 <= value <= 65535:
        raise InvalidObject(f"{where}: port {value} out of range 1-65535")
    return value


def check_object_name(namespace: str, name: str, *, kind: str) -> None:
    """Namespaces and names must be DNS-1123 labels/subdomains before they reach a ruleset."""
    if not _DNS1123_LABEL.match(namespace) or len(namespace) > 63:
        raise InvalidObject(f"{kind} namespace {namespace!r} is not a valid DNS-1123 label")
    if not _DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
        raise InvalidObject(f"{kind} name {name!r} is not a valid DNS-1123 subdomain")


def is_ignored(svc: objects.Service) -> str | None:
    """Why upstream would never hand this Service to a proxier, or None if it would."""
    labels = svc.metadata.labels or {}
    if objects.SERVICE_PROXY_NAME_LABEL in labels:
        return f"label {objects.SERVICE_PROXY_NAME_LABEL} is set (served by another proxy)"
    if svc.spec.type == "ExternalName":
        return "type ExternalName (DNS only)"
    if svc.spec.clusterIP in ("", "None"):
        return "headless or no cluster IP"
    return None


def service_ports(svc: objects.Service) -> dict[ServicePortName, ServicePort]:
    """Validated ports of a Service; empty for ignored Services; ``InvalidObject`` for bad ones."""
    if is_ignored(svc) is not None:
        return {}
    meta, spec = svc.metadata, svc.spec
    check_object_name(meta.namespace, meta.name, kind="Service")

    cluster_ips: list[str] = []
    for raw in spec.clusterIPs or [spec.clusterIP]:
        ip = parse_ip(raw, "spec.clusterIPs")
        if ip not in cluster_ips:
            cluster_ips.append(ip)
    external_ips = tuple(dict.fromkeys(parse_ip(v, "spec.externalIPs") for v in spec.externalIPs or ()))
    ranges = tuple(
        dict.fromkeys(parse_cidr(v, "spec.loadBalancerSourceRanges") for v in spec.loadBalancerSourceRanges or ())
    )
    lb_ips: list[str] = []
    if spec.type == "LoadBalancer" and svc.status is not None and svc.status.loadBalancer is not None:
        for ingress in svc.status.loadBalancer.ingress or ():
            # KEP-1860: ipMode Proxy means the load balancer delivers to the node itself.
            if ingress.ip and ingress.ipMode != "Proxy":
                lb_ips.append(parse_ip(ingress.ip, "status.loadBalancer.ingress[].ip"))

    affinity: int | None = None
    if spec.sessionAffinity == "ClientIP":
        cfg = spec.sessionAffinityConfig
        timeout = cfg.clientIP.timeoutSeconds if cfg and cfg.clientIP else None
        affinity = DEFAULT_AFFINITY_TIMEOUT if timeout is None else timeout
        if not 0 < affinity <= MAX_AFFINITY_TIMEOUT:
            raise InvalidObject(f"sessionAffinityConfig.clientIP.timeoutSeconds {affinity} out of range")
    elif spec.sessionAffinity not in ("", "None"):
        raise InvalidObject(f"spec.sessionAffinity {spec.sessionAffinity!r} is not None or ClientIP")

    external_capable = spec.type in ("NodePort", "LoadBalancer")
    out: dict[ServicePortName, ServicePort] = {}
    ports = spec.ports or []
    seen: set[tuple[int, Protocol]] = set()
    for index, p in enumerate(ports):
        where = f"spec.ports[{index}]"
        if len(ports) > 1 and not p.name:
            raise InvalidObject(f"{where}: name is required when a Service has several ports")
        if p.name and (not _PORT_NAME.match(p.name) or len(p.name) > 63):
            raise InvalidObject(f"{where}: port name {p.name!r} is not a valid IANA service name")
        try:
            protocol = Protocol(p.protocol or "TCP")
        except ValueError as exc:
            raise InvalidObject(f"{where}: unsupported protocol {p.protocol!r}") from exc
        spn = ServicePortName(meta.namespace, meta.name, p.name, protocol)
        if spn in out:
            raise InvalidObject(f"{where}: duplicate port {spn} {protocol}")
        number = parse_port(p.port, f"{where}.port")
        if (number, protocol) in seen:
            # The API server refuses this too; two ports claiming one address:port cannot both work.
            raise InvalidObject(f"{where}: duplicate port {number}/{protocol.value}")
        seen.add((number, protocol))
        out[spn] = ServicePort(
            name=spn,
            port=number,
            cluster_ips=tuple(cluster_ips),
            node_port=parse_port(p.nodePort, f"{where}.nodePort", allow_zero=True) if external_capable else 0,
            external_ips=external_ips,
            load_balancer_ips=tuple(dict.fromkeys(lb_ips)),
            load_balancer_source_ranges=ranges,
            external_policy_local=spec.externalTrafficPolicy == "Local",
            internal_policy_local=spec.internalTrafficPolicy == "Local",
            # Only an ETP=Local LoadBalancer has one (the API server enforces it; manifests may not).
            health_check_node_port=(
                spec.healthCheckNodePort if spec.type == "LoadBalancer" and spec.externalTrafficPolicy == "Local" else 0
            ),
            affinity_timeout=affinity,
            traffic_distribution=spec.trafficDistribution,
        )
    return out
