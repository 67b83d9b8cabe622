"""``kubeproxy.config.k8s.io/v1alpha1`` ``KubeProxyConfiguration``: the file ``--config`` reads.

The models mirror upstream's v1alpha1 types field for field (camelCase names, Go zero values), so a
file taken from a kubeadm cluster's ``kube-proxy`` ConfigMap loads unchanged. Decoding is strict, as
upstream's: an unknown or duplicated field, or a value of the wrong type, is an error that names the
field path and the value.

Defaulting follows upstream's ``SetDefaults_KubeProxyConfiguration``: Go zero values of the fields
upstream defaults (``syncPeriod: 0s``, ``healthzBindAddress: ""``, ``masqueradeBit: null``, ...) mean
"the default"; an explicit non-zero value is kept. ``defaulted()`` returns the filled-in document --
what ``/configz`` shows and ``--write-config-to`` writes.

Durations are Go durations (``30s``, ``1m30s``, ``24h0m0s``); they are held as seconds (float) and
written back in Go's own format.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from kubeproxy.config import (
    IMPLEMENTED_MODES,
    ConfigError,
    ConntrackConfig,
    DetectLocalMode,
    ProxyConfig,
    ProxyMode,
    check_local_detection,
    parse_cluster_cidrs,
    parse_nodeport_addresses,
)
from kubeproxy.servers.threaded import parse_bind_address

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
GROUP = "kubeproxy.config.k8s.io"

HEALTHZ_PORT = 10256  # upstream ports.ProxyHealthzPort
METRICS_PORT = 10249  # upstream ports.ProxyStatusPort
OOM_SCORE_ADJ = -999  # upstream qos.KubeProxyOOMScoreAdj

# -- Go durations -------------------------------------------------------------------------------------

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(value: str) -> float:
    """Go ``time.ParseDuration``: ``300ms``, ``-1.5h``, ``2h45m``, or a bare ``0``; seconds as float."""
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-") if text[:1] in "+-" else text
    if body == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(body):
        m = _DURATION_PART.match(body, pos)
        if m is None:
            raise ValueError(f"invalid duration {value!r} (examples: 1s, 500ms, 1m30s, 24h)")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not body:
        raise ValueError(f"invalid duration {value!r} (examples: 1s, 500ms, 1m30s, 24h)")
    return sign * total


def format_duration(seconds: float) -> str:
    """Go ``Duration.String``: ``0s``, ``250ms``, ``1.5s``, ``1m30s``, ``24h0m0s``."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= size:
                return sign + _trim(ns / size) + unit
    hours, rest = divmod(ns, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    secs = _trim(rest / 1e9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}"
    if minutes:
        return f"{sign}{minutes}m{secs}"
    return sign + secs


def _trim(x: float) -> str:
    text = f"{x:.9f}".rstrip("0").rstrip(".")
    return text or "0"


def _go_duration(value: object) -> float:
    # metav1.Duration unmarshals from a JSON string only; a bare number is a type error upstream too.
    if not isinstance(value, str):
        raise ValueError(f"expected a duration string such as 30s or 1m30s, got {value!r}")
    seconds = parse_duration(value)
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}")
    return seconds


def _time_or_duration(value: object) -> float:
    # logging.flushFrequency (component-base TimeOrMetaDuration): nanoseconds as a number, or a duration.
    if isinstance(value, bool):
        raise ValueError(f"expected nanoseconds or a duration string, got {value!r}")
    if isinstance(value, int | float):
        return float(value) / 1e9
    return _go_duration(value)


Duration = Annotated[float, BeforeValidator(_go_duration), PlainSerializer(format_duration, return_type=str)]
FlushFrequency = Annotated[float, BeforeValidator(_time_or_duration), PlainSerializer(format_duration, return_type=str)]


# -- models -------------------------------------------------------------------------------------------


class _Section(BaseModel):
    """Strict, camelCase, Go-like: unknown fields are errors; ``null`` is accepted where Go accepts it."""

    model_config = ConfigDict(extra="forbid", strict=True, alias_generator=to_camel, populate_by_name=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_zero(cls, data: Any) -> Any:
        # Go's JSON decoding leaves a field at its zero value (a pointer at nil) for ``null``: both
        # mean "not set", which is each field's default here.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class ClientConnection(_Section):
    kubeconfig: str = ""
    accept_content_types: str = ""
    content_type: str = ""
    qps: float = 0.0
    burst: int = 0


class OutputOptions(_Section):
    split_stream: bool = False
    info_buffer_size: str | int = "0"


class FormatOptions(_Section):
    text: OutputOptions = OutputOptions()
    json_: OutputOptions = Field(default=OutputOptions(), alias="json")


class VModuleItem(_Section):
    file_pattern: str
    verbosity: int = Field(ge=0)


class Logging(_Section):
    format: str = ""
    flush_frequency: FlushFrequency = 0.0
    verbosity: int = Field(default=0, ge=0)
    vmodule: list[VModuleItem] | None = None
    options: FormatOptions = FormatOptions()


class IPTables(_Section):
    masquerade_bit: int | None = None
    masquerade_all: bool = False
    localhost_node_ports: bool | None = None
    snat_node_internal_ip: bool | None = Field(default=None, alias="snatNodeInternalIP")
    sync_period: Duration = 0.0
    min_sync_period: Duration = 0.0


class IPVS(_Section):
    sync_period: Duration = 0.0
    min_sync_period: Duration = 0.0
    scheduler: str = ""
    exclude_cidrs: list[str] | None = Field(default=None, alias="excludeCIDRs")
    strict_arp: bool = Field(default=False, alias="strictARP")
    tcp_timeout: Duration = 0.0
    tcp_fin_timeout: Duration = 0.0
    udp_timeout: Duration = 0.0


class NFTables(_Section):
    masquerade_bit: int | None = None
    masquerade_all: bool = False
    sync_period: Duration = 0.0
    min_sync_period: Duration = 0.0


class Winkernel(_Section):
    network_name: str = ""
    source_vip: str = ""
    enable_dsr: bool = Field(default=False, alias="enableDSR")
    root_hns_endpoint_name: str = ""
    forward_health_check_vip: bool = False


class DetectLocal(_Section):
    bridge_interface: str = ""
    interface_name_prefix: str = ""


class Conntrack(_Section):
    max_per_core: int | None = None
    min: int | None = None
    tcp_established_timeout: Duration | None = None
    tcp_close_wait_timeout: Duration | None = None
    tcp_be_liberal: bool = False
    udp_timeout: Duration = 0.0
    udp_stream_timeout: Duration = 0.0


class KubeProxyConfiguration(_Section):
    """Upstream ``k8s.io/kube-proxy/config/v1alpha1.KubeProxyConfiguration``, every field."""

    api_version: str = API_VERSION
    kind: str = KIND
    feature_gates: dict[str, bool] | None = None
    client_connection: ClientConnection = ClientConnection()
    logging: Logging = Logging()
    hostname_override: str = ""
    bind_address: str = ""
    healthz_bind_address: str = ""
    metrics_bind_address: str = ""
    bind_address_hard_fail: bool = False
    enable_profiling: bool = False
    show_hidden_metrics_for_version: str = ""
    mode: str = ""
    iptables: IPTables = IPTables()
    ipvs: IPVS = IPVS()
    nftables: NFTables = NFTables()
    winkernel: Winkernel = Winkernel()
    detect_local_mode: str = ""
    detect_local: DetectLocal = DetectLocal()
    cluster_cidr: str = Field(default="", alias="clusterCIDR")
    node_port_addresses: list[str] | None = None
    oom_score_adj: int | None = None
    conntrack: Conntrack = Conntrack()
    config_sync_period: Duration = 0.0
    port_range: str = ""
    windows_run_as_service: bool = False

    def defaulted(self) -> KubeProxyConfiguration:
        """Upstream's defaulting: zero values of defaulted fields become the defaults."""
        bind = self.bind_address or "0.0.0.0"
        healthz_host, metrics_host = _default_hosts(bind)
        ipt, nft, ipvs, ct, cc, lg = (
            self.iptables,
            self.nftables,
            self.ipvs,
            self.conntrack,
            self.client_connection,
            self.logging,
        )
        return self.model_copy(
            update={
                "bind_address": bind,
                "healthz_bind_address": _with_port(self.healthz_bind_address, healthz_host, HEALTHZ_PORT),
                "metrics_bind_address": _with_port(self.metrics_bind_address, metrics_host, METRICS_PORT),
                "oom_score_adj": OOM_SCORE_ADJ if self.oom_score_adj is None else self.oom_score_adj,
                "feature_gates": dict(self.feature_gates or {}),
                "iptables": ipt.model_copy(
                    update={
                        "masquerade_bit": 14 if ipt.masquerade_bit is None else ipt.masquerade_bit,
                        "localhost_node_ports": True if ipt.localhost_node_ports is None else ipt.localhost_node_ports,
                        "snat_node_internal_ip": bool(ipt.snat_node_internal_ip),
                        "sync_period": ipt.sync_period or 30.0,
                        "min_sync_period": ipt.min_sync_period or 1.0,
                    }
                ),
                "nftables": nft.model_copy(
                    update={
                        "masquerade_bit": 14 if nft.masquerade_bit is None else nft.masquerade_bit,
                        "sync_period": nft.sync_period or 30.0,
                        "min_sync_period": nft.min_sync_period or 1.0,
                    }
                ),
                "ipvs": ipvs.model_copy(update={"sync_period": ipvs.sync_period or 30.0}),
                "conntrack": ct.model_copy(
                    update={
                        "max_per_core": 32 * 1024 if ct.max_per_core is None else ct.max_per_core,
                        "min": 128 * 1024 if ct.min is None else ct.min,
                        "tcp_established_timeout": (
                            86400.0 if ct.tcp_established_timeout is None else ct.tcp_established_timeout
                        ),
                        "tcp_close_wait_timeout": (
                            3600.0 if ct.tcp_close_wait_timeout is None else ct.tcp_close_wait_timeout
                        ),
                    }
                ),
                "config_sync_period": self.config_sync_period or 900.0,
                "client_connection": cc.model_copy(
                    update={
                        "content_type": cc.content_type or "application/vnd.kubernetes.protobuf",
                        "qps": cc.qps or 5.0,
                        "burst": cc.burst or 10,
                    }
                ),
                # component-base's recommended logging defaults.
                "logging": lg.model_copy(
                    update={"format": lg.format or "text", "flush_frequency": lg.flush_frequency or 5.0}
                ),
            }
        )

    def document(self) -> dict[str, Any]:
        """The JSON/YAML document, camelCase keys, durations as Go strings (``/configz``, write-config-to)."""
        return self.model_dump(mode="json", by_alias=True)


def _default_hosts(bind_address: str) -> tuple[str, str]:
    try:
        v6 = ipaddress.ip_address(bind_address).version == 6
    except ValueError:
        v6 = False
    return ("[::]", "[::1]") if v6 else ("0.0.0.0", "127.0.0.1")


def _with_port(value: str, default_host: str, port: int) -> str:
    """Upstream defaulting: "" -> default host:port; an address without a port gets the default port."""
    return with_port(value, port) if value else f"{default_host}:{port}"


def with_port(value: str, port: int) -> str:
    """upstream AppendPortIfNeeded: a bare IP gets ``port`` (IPv6 in brackets); IP:port is kept."""
    try:
        ip = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return value  # has a port already (or is invalid: validation reports it)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


# -- loading ------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """YAML loader that rejects duplicate keys (upstream's strict decoding does)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate field {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _describe(error: Mapping[str, Any]) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "(document)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown field"
    value = error.get("input")
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{path}: {message} (value: {value!r})"


def parse(text: str, *, source: str = "config") -> KubeProxyConfiguration:
    """Decode one KubeProxyConfiguration document strictly (not yet defaulted)."""
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{source}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from exc
    return parse_document(doc, source=source)


def parse_document(doc: object, *, source: str = "config") -> KubeProxyConfiguration:
    """Strictly decode an already-parsed document (a dict from YAML/JSON, or built from flags)."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a KubeProxyConfiguration mapping, got {type(doc).__name__}")
    if doc.get("kind") != KIND:
        raise ConfigError(f"{source}: kind {doc.get('kind')!r} is not {KIND}")
    if doc.get("apiVersion") != API_VERSION:
        raise ConfigError(f"{source}: apiVersion {doc.get('apiVersion')!r} is not {API_VERSION}")
    try:
        return KubeProxyConfiguration.model_validate(doc, by_alias=True, by_name=False)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{source}: {problems}") from exc


def load(path: Path) -> KubeProxyConfiguration:
    """Read and strictly decode ``--config``; errors name the file, the field and the value."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read: {exc.strerror or exc}") from exc
    return parse(text, source=f"--config {path}")


def dump(config: KubeProxyConfiguration) -> str:
    """YAML as ``--write-config-to`` writes it: apiVersion and kind first, then the fields sorted."""
    doc = config.document()
    head = {"apiVersion": doc.pop("apiVersion"), "kind": doc.pop("kind")}
    return yaml.safe_dump(head, sort_keys=False) + yaml.safe_dump(doc, sort_keys=True)


# -- resolving ----------------------------------------------------------------------------------------

_MODES = {"": "nftables", "nftables": "nftables", "iptables": "iptables", "ipvs": "ipvs", "kernelspace": "kernelspace"}


def split_host_port(value: str, *, name: str) -> tuple[str, int]:
    """``IP:port`` or ``[IPv6]:port`` (upstream's ipport type), parsed as the servers will bind it
    (``servers.threaded.parse_bind_address``); the IP must be given, as upstream validation wants."""
    try:
        ip, port = parse_bind_address(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc} (e.g. 0.0.0.0:10256 or [::]:10256)") from exc
    if value.startswith(":"):
        raise ConfigError(f"{name}: {value!r} has no IP (e.g. 0.0.0.0:10256 or [::]:10256)")
    return ip, port


def _check_duration(seconds: float, name: str, *, positive: bool) -> None:
    if seconds < 0 or (positive and seconds == 0):
        raise ConfigError(f"{name}: {format_duration(seconds)} must be {'greater than' if positive else 'at least'} 0")


def unsupported(raw: KubeProxyConfiguration) -> list[str]:
    """Settings upstream honours that we accept but do not implement yet, as ``field=value`` strings.

    Checked on the document as given (before defaulting), so a value only counts when someone set it.
    Settings of other modes or platforms (``ipvs``, ``winkernel``, ``iptables.localhostNodePorts`` in
    nftables mode) are ignored by upstream too, and not listed.
    """
    out: list[str] = []
    cc = raw.client_connection
    if cc.content_type not in ("", "application/json"):
        out.append(f"clientConnection.contentType={cc.content_type} (we always speak JSON)")
    if cc.accept_content_types:
        out.append(f"clientConnection.acceptContentTypes={cc.accept_content_types}")
    if cc.qps:
        out.append(f"clientConnection.qps={cc.qps:g} (no client-side rate limit)")
    if cc.burst:
        out.append(f"clientConnection.burst={cc.burst}")
    try:
        bind_ip = ipaddress.ip_address(raw.bind_address) if raw.bind_address else None
    except ValueError:
        bind_ip = None
    if bind_ip is not None and not bind_ip.is_unspecified:
        out.append(f"bindAddress={raw.bind_address} (the primary node IP comes from the Node object)")
    if raw.enable_profiling:
        out.append("enableProfiling=true")
    if raw.show_hidden_metrics_for_version:
        out.append(f"showHiddenMetricsForVersion={raw.show_hidden_metrics_for_version}")
    if raw.config_sync_period:
        out.append(f"configSyncPeriod={format_duration(raw.config_sync_period)} (watches never resync)")
    if raw.iptables.snat_node_internal_ip:
        out.append("iptables.snatNodeInternalIP=true")
    if raw.logging.format not in ("", "text"):
        out.append(f"logging.format={raw.logging.format} (text only)")
    if raw.logging.vmodule:
        out.append("logging.vmodule=" + ",".join(f"{v.file_pattern}={v.verbosity}" for v in raw.logging.vmodule))
    out.extend(f"featureGates.{gate}={str(on).lower()}" for gate, on in sorted((raw.feature_gates or {}).items()))
    return out


def resolve(cfg: KubeProxyConfiguration, **extra: Any) -> ProxyConfig:
    """Validate a defaulted document (from flags or a file) and turn it into the daemon's ``ProxyConfig``.

    ``extra`` carries what is not part of the document: ``manifests``, ``master``, ``cleanup``,
    ``init_only``.
    """
    mode = _MODES.get(cfg.mode)
    if mode is None:
        raise ConfigError(f"mode: unknown proxy mode {cfg.mode!r} (nftables, iptables, ipvs)")
    if mode not in (m.value for m in IMPLEMENTED_MODES):
        implemented = ", ".join(m.value for m in IMPLEMENTED_MODES)
        raise ConfigError(f"mode: {mode} is not implemented yet (implemented: {implemented})")
    # Upstream's conversion takes masqueradeAll/Bit and the sync periods from the section of the mode
    # in force; an unset mode is upstream's iptables mode, so its settings live under ``iptables``
    # (we run nftables then, with the settings the file's author wrote for it).
    section: NFTables | IPTables = cfg.iptables if cfg.mode in ("", "iptables") else cfg.nftables
    where = "iptables" if cfg.mode in ("", "iptables") else mode
    for name, seconds, positive in (
        (f"{where}.syncPeriod", section.sync_period, True),
        (f"{where}.minSyncPeriod", section.min_sync_period, False),
        ("conntrack.udpTimeout", cfg.conntrack.udp_timeout, False),
        ("conntrack.udpStreamTimeout", cfg.conntrack.udp_stream_timeout, False),
        ("conntrack.tcpEstablishedTimeout", cfg.conntrack.tcp_established_timeout or 0.0, False),
        ("conntrack.tcpCloseWaitTimeout", cfg.conntrack.tcp_close_wait_timeout or 0.0, False),
        ("configSyncPeriod", cfg.config_sync_period, True),
    ):
        _check_duration(seconds, name, positive=positive)
    bit = section.masquerade_bit if section.masquerade_bit is not None else 14
    if not 0 <= bit <= 31:
        raise ConfigError(f"{where}.masqueradeBit: {bit} must be within 0-31")
    assert cfg.oom_score_adj is not None  # defaulted
    if not -1000 <= cfg.oom_score_adj <= 1000:
        raise ConfigError(f"oomScoreAdj: {cfg.oom_score_adj} must be within -1000..1000")
    ct = cfg.conntrack
    for name, count in (("conntrack.maxPerCore", ct.max_per_core), ("conntrack.min", ct.min)):
        if count is not None and count < 0:
            raise ConfigError(f"{name}: {count} must not be negative")
    if cfg.bind_address:
        try:
            ipaddress.ip_address(cfg.bind_address)
        except ValueError as exc:
            raise ConfigError(f"bindAddress: {cfg.bind_address!r} is not an IP address") from exc
    healthz, metrics = cfg.healthz_bind_address, cfg.metrics_bind_address
    for name, address in (("healthzBindAddress", healthz), ("metricsBindAddress", metrics)):
        if address:
            split_host_port(address, name=name)
    try:
        detect_local = DetectLocalMode(cfg.detect_local_mode or DetectLocalMode.CLUSTER_CIDR.value)
    except ValueError as exc:
        modes = ", ".join(m.value for m in DetectLocalMode)
        raise ConfigError(f"detectLocalMode: unknown mode {cfg.detect_local_mode!r} (one of {modes})") from exc
    check_local_detection(
        detect_local, bridge=cfg.detect_local.bridge_interface, prefix=cfg.detect_local.interface_name_prefix
    )
    return ProxyConfig(
        mode=ProxyMode(mode),
        kubeconfig=cfg.client_connection.kubeconfig,
        hostname_override=cfg.hostname_override,
        cluster_cidrs=parse_cluster_cidrs(cfg.cluster_cidr, name="clusterCIDR"),
        detect_local_mode=detect_local,
        pod_bridge_interface=cfg.detect_local.bridge_interface,
        pod_interface_name_prefix=cfg.detect_local.interface_name_prefix,
        nodeport_addresses=parse_nodeport_addresses(cfg.node_port_addresses or [], name="nodePortAddresses"),
        conntrack=ConntrackConfig(
            max_per_core=ct.max_per_core or 0,
            min=ct.min or 0,
            tcp_timeout_established=ct.tcp_established_timeout or None,
            tcp_timeout_close_wait=ct.tcp_close_wait_timeout or None,
            tcp_be_liberal=ct.tcp_be_liberal,
            udp_timeout=ct.udp_timeout,
            udp_timeout_stream=ct.udp_stream_timeout,
        ),
        masquerade_all=section.masquerade_all,
        masquerade_bit=bit,
        localhost_nodeports=cfg.iptables.localhost_node_ports is not False,
        min_sync_period=section.min_sync_period,
        sync_period=section.sync_period,
        verbosity=cfg.logging.verbosity,
        healthz_bind_address=healthz,
        metrics_bind_address=metrics,
        bind_address_hard_fail=cfg.bind_address_hard_fail,
        oom_score_adj=cfg.oom_score_adj,
        feature_gates=MappingProxyType(dict(cfg.feature_gates or {})),
        configz=MappingProxyType(cfg.document()),
        **extra,
    )
