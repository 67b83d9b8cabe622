"""Command line: upstream-compatible flags (Go style: ``--v=2``, ``--masquerade-all=false``) plus our
subcommands. Parsing only; the work happens in daemon, lab and tools.

    kube-proxy [flags]          run the proxy: from the API server (``--kubeconfig``, ``--master``, else
                                in-cluster config), or from ``--manifests DIR`` (our embedded source)
    kube-proxy --cleanup        remove every rule we installed and exit
    kube-proxy demo [--keep]    build the namespace lab and show real traffic (``make demo``)
    kube-proxy render --manifests DIR --hostname-override NODE
                                print the nftables ruleset the proxy would program (dry run)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from kubeproxy import __version__
from kubeproxy.config import (
    IMPLEMENTED_MODES,
    ConfigError,
    ConntrackConfig,
    DetectLocalMode,
    ProxyConfig,
    ProxyMode,
    check_local_detection,
    kubeconfig_from_config_file,
    parse_cluster_cidrs,
    parse_nodeport_addresses,
)
from kubeproxy.observe import logging as klog

log = logging.getLogger("kubeproxy.cli")

# Upstream flags we accept but do not implement yet: reported once, never silently ignored.
_UNSUPPORTED_FLAGS = (
    "write-config-to", "feature-gates", "bind-address",
    "healthz-bind-address", "metrics-bind-address", "oom-score-adj",
    "config-sync-period", "kube-api-qps", "kube-api-burst", "kube-api-content-type",
    "ipvs-sync-period", "ipvs-min-sync-period", "ipvs-scheduler",
)  # fmt: skip


def gobool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "t", "true", "yes"):
        return True
    if v in ("0", "f", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {value!r}")


def goduration(value: str) -> float:
    """Go durations: ``1s``, ``500ms``, ``1m30s``, ``1h``."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        raise argparse.ArgumentTypeError(f"invalid duration {value!r} (examples: 1s, 500ms, 1m30s)")
    return sum(float(n) * units[u] for n, u in parts)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kube-proxy",
        allow_abbrev=False,
        description="The Kubernetes network proxy runs on each node. It reflects Services as defined in the "
        "Kubernetes API on each node and programs the kernel to forward traffic to their endpoints.",
    )
    p.add_argument("--proxy-mode", default="nftables", help="which proxy mode to use: 'nftables' (default here)")
    p.add_argument("--manifests", type=Path, help="directory of Service/EndpointSlice/Node manifests (our source)")
    p.add_argument("--kubeconfig", default="", help="path to a kubeconfig file with authorization and master location")
    p.add_argument("--master", default="", help="address of the API server (overrides the kubeconfig's server)")
    p.add_argument("--config", type=Path, help="KubeProxyConfiguration file (only clientConnection.kubeconfig so far)")
    p.add_argument("--hostname-override", default="", help="use this name instead of the hostname as node name")
    p.add_argument("--cluster-cidr", default="", help="pod CIDR(s); traffic from outside is masqueraded")
    p.add_argument(
        "--detect-local-mode",
        default="ClusterCIDR",
        help="how local (pod) traffic is detected: ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix",
    )
    p.add_argument("--pod-bridge-interface", default="", help="bridge the pods hang off (BridgeInterface mode)")
    p.add_argument("--pod-interface-name-prefix", default="", help="pod interface prefix (InterfaceNamePrefix mode)")
    p.add_argument(
        "--nodeport-addresses",
        default="",
        help="CIDRs and keywords (primary, localhost, all) of the node addresses that accept NodePorts "
        "(default: primary)",
    )
    p.add_argument("--conntrack-max-per-core", type=int, default=32768, help="conntrack entries per CPU (0: leave)")
    p.add_argument("--conntrack-min", type=int, default=131072, help="minimum nf_conntrack_max")
    p.add_argument("--conntrack-tcp-timeout-established", type=goduration, default=86400.0, help="(24h0m0s)")
    p.add_argument("--conntrack-tcp-timeout-close-wait", type=goduration, default=3600.0, help="(1h0m0s)")
    p.add_argument("--conntrack-tcp-be-liberal", nargs="?", const=True, default=False, type=gobool)
    p.add_argument("--conntrack-udp-timeout", type=goduration, default=0.0, help="UDP timeout (0: leave)")
    p.add_argument("--conntrack-udp-timeout-stream", type=goduration, default=0.0, help="UDP stream timeout")
    p.add_argument("--masquerade-all", nargs="?", const=True, default=False, type=gobool)
    p.add_argument("--iptables-masquerade-bit", type=int, default=14, help="packet mark bit for SNAT (0-31)")
    p.add_argument("--iptables-min-sync-period", type=goduration, default=1.0, help="minimum sync interval (1s)")
    p.add_argument("--iptables-sync-period", type=goduration, default=30.0, help="retry interval after failure")
    p.add_argument("--cleanup", nargs="?", const=True, default=False, type=gobool, help="remove rules and exit")
    p.add_argument("-v", "--v", type=int, default=0, help="log verbosity (2: syncs, 4: debug, 6: transactions)")
    p.add_argument("--version", action="version", version=f"kube-proxy (python) v{__version__}")
    for flag in _UNSUPPORTED_FLAGS:
        p.add_argument(f"--{flag}", dest=f"unsupported_{flag.replace('-', '_')}", help=argparse.SUPPRESS)
    return p


def config_from_args(argv: Sequence[str]) -> ProxyConfig:
    args = _parser().parse_args(list(argv))
    for flag in _UNSUPPORTED_FLAGS:
        if getattr(args, f"unsupported_{flag.replace('-', '_')}") is not None:
            log.warning("flag not supported yet, ignored flag=--%s", flag)
    try:
        mode = ProxyMode(args.proxy_mode or "nftables")
    except ValueError as exc:
        raise ConfigError(f"--proxy-mode: unknown mode {args.proxy_mode!r}") from exc
    if mode not in IMPLEMENTED_MODES:
        raise ConfigError(f"--proxy-mode={mode.value} is not implemented yet (implemented: nftables)")
    if not 0 <= args.iptables_masquerade_bit <= 31:
        raise ConfigError(f"--iptables-masquerade-bit: {args.iptables_masquerade_bit} not in 0-31")
    try:
        detect_local = DetectLocalMode(args.detect_local_mode or "ClusterCIDR")
    except ValueError as exc:
        modes = ", ".join(m.value for m in DetectLocalMode)
        raise ConfigError(f"--detect-local-mode: unknown mode {args.detect_local_mode!r} (one of {modes})") from exc
    cluster_cidrs = parse_cluster_cidrs(args.cluster_cidr)
    check_local_detection(detect_local, bridge=args.pod_bridge_interface, prefix=args.pod_interface_name_prefix)
    for flag in ("conntrack_max_per_core", "conntrack_min"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')}: {getattr(args, flag)} must not be negative")
    conntrack = ConntrackConfig(
        max_per_core=args.conntrack_max_per_core,
        min=args.conntrack_min,
        tcp_timeout_established=args.conntrack_tcp_timeout_established or None,
        tcp_timeout_close_wait=args.conntrack_tcp_timeout_close_wait or None,
        tcp_be_liberal=args.conntrack_tcp_be_liberal,
        udp_timeout=args.conntrack_udp_timeout,
        udp_timeout_stream=args.conntrack_udp_timeout_stream,
    )
    kubeconfig = args.kubeconfig
    if args.config is not None:
        log.warning("config file: only clientConnection.kubeconfig is applied so far path=%s", args.config)
        kubeconfig = kubeconfig or kubeconfig_from_config_file(args.config)
    return ProxyConfig(
        mode=mode,
        manifests=args.manifests,
        kubeconfig=kubeconfig,
        master=args.master,
        hostname_override=args.hostname_override,
        cluster_cidrs=cluster_cidrs,
        detect_local_mode=detect_local,
        pod_bridge_interface=args.pod_bridge_interface,
        pod_interface_name_prefix=args.pod_interface_name_prefix,
        nodeport_addresses=parse_nodeport_addresses(args.nodeport_addresses),
        conntrack=conntrack,
        masquerade_all=args.masquerade_all,
        masquerade_bit=args.iptables_masquerade_bit,
        min_sync_period=args.iptables_min_sync_period,
        sync_period=args.iptables_sync_period,
        verbosity=args.v,
        cleanup=args.cleanup,
    )


def _preparse_verbosity(argv: Sequence[str]) -> int:
    for i, a in enumerate(argv):
        for prefix in ("--v=", "-v="):
            if a.startswith(prefix) and a[len(prefix) :].isdigit():
                return int(a[len(prefix) :])
        if a in ("-v", "--v") and i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
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
    from kubeproxy.sources.errors import AccessDenied, ConnectionConfigError
    from kubeproxy.sources.manifests import ManifestError

    try:
        cfg = config_from_args(argv)
        if cfg.cleanup:
            return daemon.cleanup()
        return asyncio.run(daemon.run(cfg))
    except (ConfigError, ManifestError, ConnectionConfigError) as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    except AccessDenied as exc:
        log.error("cannot start: %s", exc.explain())
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
