"""Command line: upstream kube-proxy's flags (Go/pflag style: ``--v=2``, ``--masquerade-all=false``,
``--feature-gates=A=true,B=false``) plus our subcommands. Parsing only; the work happens in daemon,
lab and tools.

    kube-proxy [flags]          run the proxy: from the API server (``--kubeconfig``, ``--master``, else
                                in-cluster config), or from ``--manifests DIR`` (our embedded source)
    kube-proxy --config FILE    the same, configured by a KubeProxyConfiguration file
    kube-proxy --cleanup        remove every rule we installed and exit
    kube-proxy --init-only      node setup that needs full root (conntrack sysctls), then exit
    kube-proxy --write-config-to FILE   write the effective configuration and exit
    kube-proxy demo [--keep]    build the namespace lab and show real traffic (``make demo``)
    kube-proxy render --manifests DIR --hostname-override NODE
                                print the nftables ruleset the proxy would program (dry run)

Precedence is upstream's: without ``--config`` the flags build the configuration; with it, the file
replaces the flags, except the logging flags (``-v``, ``--vmodule``, ``--logging-format``) and
``--hostname-override``, which still win. Flags the file makes moot are named in one warning.
Settings we accept but do not implement yet are reported once, by name (``configfile.unsupported``).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from kubeproxy import __version__, configfile
from kubeproxy.config import ConfigError, ProxyConfig
from kubeproxy.observe import logging as klog

log = logging.getLogger("kubeproxy.cli")

KUBERNETES_VERSION = "v1.37.0"  # the upstream release whose flags, config and behaviour we follow

DESCRIPTION = """\
The Kubernetes network proxy runs on each node. This reflects services as defined in the
Kubernetes API on each node and programs the kernel (nftables) to forward TCP, UDP and SCTP
traffic for each Service's virtual IPs, NodePorts and load-balancer IPs to its endpoints.
This is kube-proxy in Python: it takes upstream kube-proxy's flags and configuration file."""


# -- value parsers (pflag types) ----------------------------------------------------------------------


def gobool(value: str) -> bool:
    """strconv.ParseBool."""
    v = value.strip()
    if v in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if v in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {value!r}")


def goduration(value: str) -> float:
    """Go durations: ``1s``, ``500ms``, ``1m30s``, ``1h``."""
    try:
        return configfile.parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def goint(value: str) -> int:
    try:
        return int(value, 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid integer {value!r}") from exc


def gofloat(value: str) -> float:
    try:
        return float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid number {value!r}") from exc


def gostrings(value: str) -> list[str]:
    """pflag ``strings``: comma-separated."""
    return [p.strip() for p in value.split(",") if p.strip()]


def gomapbool(value: str) -> dict[str, bool]:
    """``--feature-gates=A=true,B=false``."""
    out: dict[str, bool] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"missing bool value for {part!r} (expected Name=true|false)")
        out[key.strip()] = gobool(raw)
    return out


def goip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid IP address {value!r}") from exc


def goipport(value: str) -> str:
    """upstream's ``ipport`` flag type: IP:port, or a bare IP (the default port is added later)."""
    if value.strip() == "":
        return ""
    try:
        ipaddress.ip_address(value.strip("[]"))
        return value
    except ValueError:
        pass
    try:
        configfile.split_host_port(value, name="address")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("address: ")) from exc
    return value


def govmodule(value: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        pattern, sep, level = part.rpartition("=")
        if not sep or not level.isdigit():
            raise argparse.ArgumentTypeError(f"invalid vmodule entry {part!r} (expected pattern=N)")
        out.append({"filePattern": pattern, "verbosity": int(level)})
    return out


# -- the flag table -----------------------------------------------------------------------------------

# Where a flag's value goes in the KubeProxyConfiguration document: field paths (camelCase), or one of
# the special destinations handled in load_config.
Path_ = tuple[str, ...]


@dataclass(frozen=True)
class Flag:
    name: str
    type_name: str  # pflag's type word in --help ("" for booleans)
    parse: Callable[[str], Any]
    default: str  # as --help shows it ("" for none)
    help: str
    paths: tuple[Path_, ...] = ()  # document fields the value sets
    shorthand: str = ""
    logging: bool = False  # still wins over --config (upstream copyLogsFromFlags)
    deprecated: str = ""

    @property
    def is_bool(self) -> bool:
        return self.parse is gobool


def _flags() -> tuple[Flag, ...]:
    dur = goduration
    ignored = " This parameter is ignored if a config file is specified by --config."
    return (
        Flag("bind-address", "ip", goip, "0.0.0.0", "Overrides kube-proxy's idea of what its node's primary IP is. "
             "Note that the name is a historical artifact, and kube-proxy does not actually bind any sockets to "
             "this IP." + ignored, (("bindAddress",),)),
        Flag("bind-address-hard-fail", "", gobool, "", "If true kube-proxy will treat failure to bind to a port as "
             "fatal and exit", (("bindAddressHardFail",),)),
        Flag("cleanup", "", gobool, "", "If true cleanup iptables and ipvs rules and exit."),
        Flag("cluster-cidr", "string", str, "", "The CIDR range of the pods in the cluster. (For dual-stack "
             "clusters, this can be a comma-separated dual-stack pair of CIDR ranges.). When --detect-local-mode "
             "is set to ClusterCIDR, kube-proxy will consider traffic to be local if its source IP is in this "
             "range. (Otherwise it is not used.)" + ignored, (("clusterCIDR",),)),
        Flag("config", "string", str, "", "The path to the configuration file."),
        Flag("config-sync-period", "duration", dur, "15m0s", "How often configuration from the apiserver is "
             "refreshed.  Must be greater than 0.", (("configSyncPeriod",),)),
        Flag("conntrack-max-per-core", "int32", goint, "32768", "Maximum number of NAT connections to track per "
             "CPU core (0 to leave the limit as-is and ignore conntrack-min).", (("conntrack", "maxPerCore"),)),
        Flag("conntrack-min", "int32", goint, "131072", "Minimum number of conntrack entries to allocate, "
             "regardless of conntrack-max-per-core (set conntrack-max-per-core=0 to leave the limit as-is).",
             (("conntrack", "min"),)),
        Flag("conntrack-tcp-be-liberal", "", gobool, "", "Enable liberal mode for tracking TCP packets by setting "
             "nf_conntrack_tcp_be_liberal to 1", (("conntrack", "tcpBeLiberal"),)),
        Flag("conntrack-tcp-timeout-close-wait", "duration", dur, "1h0m0s", "NAT timeout for TCP connections in "
             "the CLOSE_WAIT state", (("conntrack", "tcpCloseWaitTimeout"),)),
        Flag("conntrack-tcp-timeout-established", "duration", dur, "24h0m0s", "Idle timeout for established TCP "
             "connections (0 to leave as-is)", (("conntrack", "tcpEstablishedTimeout"),)),
        Flag("conntrack-udp-timeout", "duration", dur, "", "Idle timeout for UNREPLIED UDP connections (0 to "
             "leave as-is)", (("conntrack", "udpTimeout"),)),
        Flag("conntrack-udp-timeout-stream", "duration", dur, "", "Idle timeout for ASSURED UDP connections (0 to "
             "leave as-is)", (("conntrack", "udpStreamTimeout"),)),
        Flag("detect-local-mode", "LocalMode", str, "", "Mode to use to detect local traffic. This parameter is "
             "ignored if a config file is specified by --config.", (("detectLocalMode",),)),
        Flag("feature-gates", "mapStringBool", gomapbool, "", "A set of key=value pairs that describe feature "
             "gates for alpha/experimental features." + ignored, (("featureGates",),)),
        Flag("healthz-bind-address", "ipport", goipport, "0.0.0.0:10256", "The IP address with port for the "
             "health check server to serve on (set to '0.0.0.0:10256' for all IPv4 interfaces and '[::]:10256' "
             "for all IPv6 interfaces). Set empty to disable." + ignored, (("healthzBindAddress",),)),
        Flag("healthz-port", "int32", goint, "10256", "The port to bind the health check server. Use 0 to "
             "disable.", deprecated="This flag is deprecated and will be removed in a future release. Please use "
             "--healthz-bind-address instead."),
        Flag("hostname-override", "string", str, "", "If non-empty, will be used as the name of the Node that "
             "kube-proxy is running on. If unset, the node name is assumed to be the same as the node's "
             "hostname.", (("hostnameOverride",),)),
        Flag("init-only", "", gobool, "", "If true, perform any initialization steps that must run with full root "
             "privileges, and then exit. After doing this, you can run kube-proxy again with only the "
             "CAP_NET_ADMIN capability."),
        Flag("iptables-localhost-nodeports", "", gobool, "true", "If false, kube-proxy will disable the legacy "
             "behavior of allowing NodePort services to be accessed via localhost. (Applies only to iptables "
             "mode and IPv4; localhost NodePorts are never allowed with other proxy modes or with IPv6.)",
             (("iptables", "localhostNodePorts"),)),
        Flag("iptables-masquerade-bit", "int32", goint, "14", "If using the iptables or ipvs proxy mode, the bit "
             "of the fwmark space to mark packets requiring SNAT with.  Must be within the range [0, 31].",
             (("iptables", "masqueradeBit"), ("nftables", "masqueradeBit"))),
        Flag("iptables-min-sync-period", "duration", dur, "1s", "The minimum period between iptables rule "
             "resyncs (e.g. '5s', '1m', '2h22m'). A value of 0 means every Service or EndpointSlice change will "
             "result in an immediate iptables resync.",
             (("iptables", "minSyncPeriod"), ("nftables", "minSyncPeriod"))),
        Flag("iptables-sync-period", "duration", dur, "30s", "An interval (e.g. '5s', '1m', '2h22m') indicating "
             "how frequently various re-synchronizing and cleanup operations are performed. Must be greater "
             "than 0.", (("iptables", "syncPeriod"), ("nftables", "syncPeriod"))),
        Flag("ipvs-exclude-cidrs", "strings", gostrings, "", "A comma-separated list of CIDRs which the ipvs "
             "proxier should not touch when cleaning up IPVS rules.", (("ipvs", "excludeCIDRs"),)),
        Flag("ipvs-min-sync-period", "duration", dur, "", "The minimum period between IPVS rule resyncs (e.g. "
             "'5s', '1m', '2h22m'). A value of 0 means every Service or EndpointSlice change will result in an "
             "immediate IPVS resync.", (("ipvs", "minSyncPeriod"),)),
        Flag("ipvs-scheduler", "string", str, "", "The ipvs scheduler type when proxy mode is ipvs",
             (("ipvs", "scheduler"),)),
        Flag("ipvs-strict-arp", "", gobool, "", "Enable strict ARP by setting arp_ignore to 1 and arp_announce to 2",
             (("ipvs", "strictARP"),)),
        Flag("ipvs-sync-period", "duration", dur, "30s", "An interval (e.g. '5s', '1m', '2h22m') indicating how "
             "frequently various re-synchronizing and cleanup operations are performed. Must be greater than 0.",
             (("ipvs", "syncPeriod"),)),
        Flag("ipvs-tcp-timeout", "duration", dur, "", "The timeout for idle IPVS TCP connections, 0 to leave as "
             "is. (e.g. '5s', '1m', '2h22m').", (("ipvs", "tcpTimeout"),)),
        Flag("ipvs-tcpfin-timeout", "duration", dur, "", "The timeout for IPVS TCP connections after receiving a "
             "FIN packet, 0 to leave as is. (e.g. '5s', '1m', '2h22m').", (("ipvs", "tcpFinTimeout"),)),
        Flag("ipvs-udp-timeout", "duration", dur, "", "The timeout for IPVS UDP packets, 0 to leave as is. (e.g. "
             "'5s', '1m', '2h22m').", (("ipvs", "udpTimeout"),)),
        Flag("kube-api-burst", "int32", goint, "10", "Burst to use while talking with kubernetes apiserver",
             (("clientConnection", "burst"),)),
        Flag("kube-api-content-type", "string", str, "application/vnd.kubernetes.protobuf", "Content type of "
             "requests sent to apiserver.", (("clientConnection", "contentType"),)),
        Flag("kube-api-qps", "float32", gofloat, "5", "QPS to use while talking with kubernetes apiserver",
             (("clientConnection", "qps"),)),
        Flag("kubeconfig", "string", str, "", "Path to kubeconfig file with authorization information (the "
             "master location can be overridden by the master flag).", (("clientConnection", "kubeconfig"),)),
        Flag("log-flush-frequency", "duration", dur, "5s", "Maximum number of seconds between log flushes",
             (("logging", "flushFrequency"),), logging=True),
        Flag("logging-format", "string", str, "text", "Sets the log format. Permitted formats: \"text\".",
             (("logging", "format"),), logging=True),
        Flag("manifests", "string", str, "", "Directory of Service, EndpointSlice and Node manifests to serve "
             "instead of an API server (kube-proxy in Python only; watched for changes)."),
        Flag("masquerade-all", "", gobool, "", "SNAT all traffic sent via Service cluster IPs. This may be "
             "required with some CNI plugins.", (("iptables", "masqueradeAll"), ("nftables", "masqueradeAll"))),
        Flag("master", "string", str, "", "The address of the Kubernetes API server (overrides any value in "
             "kubeconfig)"),
        Flag("metrics-bind-address", "ipport", goipport, "127.0.0.1:10249", "The IP address with port for the "
             "metrics server to serve on (set to '0.0.0.0:10249' for all IPv4 interfaces and '[::]:10249' for "
             "all IPv6 interfaces). Set empty to disable." + ignored, (("metricsBindAddress",),)),
        Flag("metrics-port", "int32", goint, "10249", "The port to bind the metrics server. Use 0 to disable.",
             deprecated="This flag is deprecated and will be removed in a future release. Please use "
             "--metrics-bind-address instead."),
        Flag("nodeport-addresses", "strings", gostrings, "", "A list of CIDR ranges that contain valid node IPs, "
             "or alternatively, the single string 'primary'. If set to a list of CIDRs, connections to NodePort "
             "services will only be accepted on node IPs in one of the indicated ranges. If set to 'primary', "
             "NodePort services will only be accepted on the node's primary IPv4 and/or IPv6 address according "
             "to the Node object. If unset, NodePort connections will be accepted on all local IPs." + ignored,
             (("nodePortAddresses",),)),
        Flag("oom-score-adj", "int32", goint, "-999", "The oom-score-adj value for kube-proxy process. Values "
             "must be within the range [-1000, 1000]." + ignored, (("oomScoreAdj",),)),
        Flag("pod-bridge-interface", "string", str, "", "A bridge interface name. When --detect-local-mode is set "
             "to BridgeInterface, kube-proxy will consider traffic to be local if it originates from this "
             "bridge.", (("detectLocal", "bridgeInterface"),)),
        Flag("pod-interface-name-prefix", "string", str, "", "An interface name prefix. When --detect-local-mode "
             "is set to InterfaceNamePrefix, kube-proxy will consider traffic to be local if it originates from "
             "any interface whose name begins with this prefix.", (("detectLocal", "interfaceNamePrefix"),)),
        Flag("profiling", "", gobool, "", "If true enables profiling via web interface on /debug/pprof handler."
             + ignored, (("enableProfiling",),)),
        Flag("proxy-mode", "ProxyMode", str, "", "Which proxy mode to use: on Linux this can be 'iptables' "
             "(default), 'ipvs', or 'nftables'. Only 'nftables' is implemented here so far, and it is the "
             "default." + ignored, (("mode",),)),
        Flag("show-hidden-metrics-for-version", "string", str, "", "The previous version for which you want to "
             "show hidden metrics. Only the previous minor version is meaningful, other values will not be "
             "allowed. The format is <major>.<minor>, e.g.: '1.16'." + ignored,
             (("showHiddenMetricsForVersion",),)),
        Flag("v", "Level", goint, "0", "number for the log level verbosity (2: syncs, 4: debug, 6: the applied "
             "nftables transactions)", (("logging", "verbosity"),), shorthand="v", logging=True),
        Flag("version", "version[=true]", str, "false", "--version, --version=raw prints version information and "
             "quits; --version=vX.Y.Z... sets the reported version"),
        Flag("vmodule", "pattern=N,...", govmodule, "", "comma-separated list of pattern=N settings for "
             "file-filtered logging (only works for text log format)", (("logging", "vmodule"),), logging=True),
    )  # fmt: skip


FLAGS = _flags()
_BY_NAME = {f.name: f for f in FLAGS}
# Flags that still apply with --config: the logging flags, --hostname-override (upstream), and the
# process-level ones that are not part of the document.
_OUTSIDE_DOCUMENT = frozenset({"config", "cleanup", "init-only", "master", "manifests", "version", "write-config-to"})


def usage() -> str:
    """``--help`` in pflag's layout: description, usage, then every flag sorted, with its default."""
    rows: list[tuple[str, str]] = []
    for flag in sorted((*FLAGS, _WRITE_CONFIG_TO, _HELP), key=lambda f: f.name):
        head = f"-{flag.shorthand}, --{flag.name}" if flag.shorthand else f"    --{flag.name}"
        if flag.type_name:
            head += f" {flag.type_name}"
        text = flag.help
        if flag.default and flag.default not in ("false", "0s") and flag.name != "version":
            text += f" (default {flag.default})"
        if flag.deprecated:
            text += f" (DEPRECATED: {flag.deprecated})"
        rows.append((head, text))
    width = max(len(h) for h, _ in rows) + 3
    lines = [DESCRIPTION, "", "Usage:", "  kube-proxy [flags]", "  kube-proxy demo [--keep]",
             "  kube-proxy render --manifests DIR --hostname-override NODE", "", "Flags:"]  # fmt: skip
    lines += [f"  {h.ljust(width)}{t}" for h, t in rows]
    return "\n".join(lines) + "\n"


_WRITE_CONFIG_TO = Flag("write-config-to", "string", str, "", "If set, write the default configuration values "
                        "to this file and exit.")  # fmt: skip
_HELP = Flag("help", "", gobool, "", "help for kube-proxy", shorthand="h")


class _Accumulate(argparse.Action):
    """pflag's mapStringBool and strings: repeating the flag adds to it (``--feature-gates=A=true
    --feature-gates=B=false`` sets both)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, _: Any = None
    ) -> None:
        old = getattr(namespace, self.dest, None)
        if isinstance(old, dict) and isinstance(values, dict):
            values = {**old, **values}
        elif isinstance(old, list) and isinstance(values, list):
            values = old + values
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kube-proxy", allow_abbrev=False, add_help=False, argument_default=argparse.SUPPRESS)
    for flag in (*FLAGS, _WRITE_CONFIG_TO):
        names = [f"--{flag.name}"] + ([f"-{flag.shorthand}"] if flag.shorthand else [])
        if flag.name == "version":
            p.add_argument(*names, dest="version", nargs="?", const="true")
        elif flag.is_bool:
            # pflag booleans: --flag means true, --flag=false says so explicitly.
            p.add_argument(*names, dest=flag.name, nargs="?", const=True, type=flag.parse)
        elif flag.parse in (gomapbool, gostrings):
            p.add_argument(*names, dest=flag.name, type=flag.parse, action=_Accumulate)
        else:
            p.add_argument(*names, dest=flag.name, type=flag.parse)
    p.add_argument("-h", "--help", dest="help", action="store_true")
    return p


@dataclass(frozen=True)
class CommandLine:
    """What the command line asked for: the flags given (name -> parsed value) and the actions."""

    given: dict[str, Any]

    def __contains__(self, name: str) -> bool:
        return name in self.given

    def get(self, name: str, default: Any = None) -> Any:
        return self.given.get(name, default)


def parse_args(argv: Sequence[str]) -> CommandLine:
    args = vars(_parser().parse_args(list(argv)))
    return CommandLine({k: v for k, v in args.items() if not (k == "help" and v is False)})


def _set(doc: dict[str, Any], path: Path_, value: Any) -> None:
    node = doc
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _document_value(flag: Flag, value: Any) -> Any:
    if flag.parse is goduration:
        return configfile.format_duration(value)
    return value


def _hostname_override(value: str) -> str:
    """upstream processHostnameOverrideFlag: trimmed and lower-cased; only spaces is an error."""
    name = value.strip()
    if not name:
        raise ConfigError("--hostname-override: empty hostname-override is invalid")
    return name.lower()


def document_from_flags(cmd: CommandLine, *, logging_only: bool = False) -> dict[str, Any]:
    """The KubeProxyConfiguration document the given flags describe (only the fields they set)."""
    doc: dict[str, Any] = {"apiVersion": configfile.API_VERSION, "kind": configfile.KIND}
    for name, value in cmd.given.items():
        flag = _BY_NAME.get(name)
        if flag is None or (logging_only and not flag.logging):
            continue
        if name == "hostname-override":
            value = _hostname_override(value) if value else ""
        for path in flag.paths:
            _set(doc, path, _document_value(flag, value))
    return doc


def _server_address(address: str, port: int | None, default_port: int) -> str:
    """A flag's server address: a bare IP gets a port (upstream AppendPortIfNeeded) -- the deprecated
    --healthz-port / --metrics-port when given (0 there disables the server, upstream
    addressFromDeprecatedFlags), else the default one. An address with a port keeps it."""
    if port == 0:
        return ""
    return configfile.with_port(address, port or default_port) if address else ""


def load_config(argv: Sequence[str]) -> ProxyConfig:
    """Flags (and ``--config``) to the validated ``ProxyConfig``; ConfigError names what is wrong."""
    return _load(parse_args(argv)).config


@dataclass(frozen=True)
class Loaded:
    config: ProxyConfig
    given: configfile.KubeProxyConfiguration  # the document as given (unsupported settings are checked here)
    effective: configfile.KubeProxyConfiguration  # defaults filled in (--write-config-to writes this)


def _load(cmd: CommandLine) -> Loaded:
    config_file = Path(cmd.get("config")) if cmd.get("config") else None
    extra: dict[str, Any] = {
        "manifests": Path(cmd.get("manifests")) if cmd.get("manifests") else None,
        "master": cmd.get("master", ""),
        "cleanup": bool(cmd.get("cleanup", False)),
        "init_only": bool(cmd.get("init-only", False)),
        "config_file": config_file,
    }
    if config_file is not None:
        raw = configfile.load(config_file)
        # Logging flags and --hostname-override win over the file (upstream copyLogsFromFlags and
        # processHostnameOverrideFlag); everything else in the document comes from the file.
        overrides = document_from_flags(cmd, logging_only=True)
        if cmd.get("hostname-override"):
            overrides["hostnameOverride"] = _hostname_override(cmd.get("hostname-override"))
        raw = _merge(raw, overrides)
        effective = raw.defaulted()
        moot = sorted(n for n in cmd.given if n in _BY_NAME and n not in _OUTSIDE_DOCUMENT
                      and n != "hostname-override" and not _BY_NAME[n].logging)  # fmt: skip
        if moot:
            log.warning(
                "flags ignored because --config is set (the file wins) flags=%s", ",".join(f"--{n}" for n in moot)
            )
    else:
        # Upstream applies the flags on top of the defaulted configuration, so a flag's zero value
        # stays zero (``--iptables-min-sync-period=0s`` means "sync at once", and an empty
        # ``--metrics-bind-address`` disables the server), unlike the same zero in a file.
        flags = document_from_flags(cmd)
        raw = configfile.parse_document(flags, source="flags")
        effective = _merge(configfile.KubeProxyConfiguration().defaulted(), flags)
        for port_flag, key, default_port in (
            ("healthz-port", "healthz_bind_address", configfile.HEALTHZ_PORT),
            ("metrics-port", "metrics_bind_address", configfile.METRICS_PORT),
        ):
            address = _server_address(getattr(effective, key), cmd.get(port_flag), default_port)
            effective = effective.model_copy(update={key: address})
    try:
        cfg = configfile.resolve(effective, **extra)
    except ConfigError as exc:
        raise ConfigError(_attribute(str(exc), config_file)) from exc
    return Loaded(cfg, raw, effective)


def _attribute(message: str, config_file: Path | None) -> str:
    """Say where a bad value came from: the file, or the flag that set the field."""
    if config_file:
        return f"--config {config_file}: {message}"
    field_path = message.split(":", 1)[0]
    for flag in FLAGS:
        if any(".".join(p) == field_path for p in flag.paths):
            return f"--{flag.name} ({message})"
    return message


def _merge(raw: configfile.KubeProxyConfiguration, overrides: dict[str, Any]) -> configfile.KubeProxyConfiguration:
    doc = raw.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def deep(into: dict[str, Any], new: dict[str, Any]) -> None:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                deep(into[k], v)
            else:
                into[k] = v

    deep(doc, overrides)
    return configfile.parse_document(doc, source="--config with flags")


def _report_unsupported(raw: configfile.KubeProxyConfiguration) -> None:
    for setting in configfile.unsupported(raw):
        log.warning("setting not supported yet, ignored setting=%s", setting)
    if not raw.mode:
        log.info("mode not set: using nftables (upstream's default is iptables, not implemented here yet)")


def _version(value: str) -> int:
    if value.lower() in ("false", "0", "f"):
        return -1
    if value == "raw":
        sys.stdout.write(
            f'version.Info{{Major:"1", Minor:"37", GitVersion:"{KUBERNETES_VERSION}", '
            f'Implementation:"kube-proxy in Python {__version__}", Platform:"linux"}}\n'
        )
    else:
        sys.stdout.write(f"Kubernetes {KUBERNETES_VERSION} (kube-proxy in Python {__version__})\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    klog.setup(_preparse_verbosity(argv))
    if argv and argv[0] == "demo":
        from kubeproxy.lab.demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "render":
        from kubeproxy.tools.render import main as render_main

        return render_main(argv[1:])
    from kubeproxy import daemon
    from kubeproxy.daemon import ConfigFileChanged
    from kubeproxy.servers.threaded import ServerBindError
    from kubeproxy.sources.errors import AccessDenied, ConnectionConfigError
    from kubeproxy.sources.manifests import ManifestError

    try:
        cmd = parse_args(argv)
        if cmd.get("help"):
            sys.stdout.write(usage())
            return 0
        if "version" in cmd:
            status = _version(cmd.get("version"))
            if status >= 0:
                return status
        loaded = _load(cmd)
        cfg = loaded.config
        klog.setup(cfg.verbosity)
        if cmd.get("write-config-to"):
            target = Path(cmd.get("write-config-to"))
            try:
                target.write_text(configfile.dump(loaded.effective))
            except OSError as exc:
                raise ConfigError(f"--write-config-to {target}: {exc.strerror or exc}") from exc
            log.info("wrote configuration path=%s", target)
            return 0
        _report_unsupported(loaded.given)
        if cfg.cleanup:
            return daemon.cleanup()
        if cfg.init_only:
            return daemon.init_only(cfg)
        return asyncio.run(daemon.run(cfg))
    except (ConfigError, ManifestError, ConnectionConfigError) as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    except AccessDenied as exc:
        log.error("cannot start: %s", exc.explain())
        return 1
    except ConfigFileChanged as exc:
        log.error("%s", exc)
        return 1
    except ServerBindError as exc:
        log.error("cannot start: %s (bindAddressHardFail is set)", exc)
        return 1
    except KeyboardInterrupt:
        return 0


def _preparse_verbosity(argv: Sequence[str]) -> int:
    for i, a in enumerate(argv):
        for prefix in ("--v=", "-v="):
            if a.startswith(prefix) and a[len(prefix) :].isdigit():
                return int(a[len(prefix) :])
        if a in ("-v", "--v") and i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
