"""``make bench``: every benchmark, one command. In order:

0. ``costmodel``: what an element, a chain, a rule and a set cost in nft here (bench/costmodel.py);
1. ``nftables``: synthetic N Services x M endpoints through the real nftables backend (below), then the
   API source benchmark (bench/api.py: list decode, watch events, list + watch over loopback);
2. ``scale``: the real daemon end to end against the API-server test double (bench/scale.py): cold
   start 1k/10k x 10 and 5k x 50 from process start with peak RSS, churn at 10k (event-to-kernel
   p50/p99), restart with the rules in the kernel;
3. ``dataplane``: connection setup via a ClusterIP among 10k Services vs the pod IP (bench/dataplane.py);
4. ``iptables``: both iptables backends (bench/iptables.py).
Each prints a table and writes bench/results/<part>-<date>.json with machine info.

For each size: state ingest (decoded objects -> trackers -> commit), pure render of the whole
table, cold full sync into an empty network namespace (render + one ``nft -f`` transaction; the
``nft`` share is shown separately), a one-endpoint partial sync (median of 5), and peak RSS of this
process and of its ``nft`` children. Prints a table and writes bench/results/nftables-<date>.json
with machine info. Needs root (it creates, and always deletes, a private network namespace).

Then the iptables rows (bench/iptables.py): the same objects through both iptables backends, each
(backend, size) in its own fresh namespace; a second table and bench/results/iptables-<date>.json.
``python -m bench.run --only nftables|scale|dataplane|iptables`` runs one part; ``--quick`` runs the
small sizes only (1k; a smoke check); ``--timeout`` caps each iptables row.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kubeproxy.backends.nftables.backend import NftablesBackend
from kubeproxy.backends.nftables.render import NftOptions
from kubeproxy.kernel.nft import NftCli
from kubeproxy.model import objects
from kubeproxy.model.service import NamespacedName
from kubeproxy.state.snapshot import ProxyState
from kubeproxy.tools.render import render_state

SIZES = [(1000, 10), (10000, 10)]
PARTS = ("costmodel", "nftables", "scale", "dataplane", "iptables")
OPTS = NftOptions(cluster_cidrs=("10.244.0.0/16",))
EP_BASE = int(ipaddress.ip_address("10.128.0.0"))
PARTIAL_SAMPLES = 5  # one-endpoint partial syncs per size; the median is reported


class TimedNft(NftCli):
    def __init__(self, netns: str) -> None:
        super().__init__(netns=netns)
        self.last_run = 0.0

    def run(self, script: str) -> None:
        start = time.perf_counter()
        super().run(script)
        self.last_run = time.perf_counter() - start


def make_objects(n: int, m: int) -> tuple[list[objects.Service], list[objects.EndpointSlice]]:
    services, slices = [], []
    for i in range(n):
        name = f"svc-{i}"
        meta = objects.ObjectMeta(name=name, namespace="bench")
        cip = str(ipaddress.ip_address(int(ipaddress.ip_address("10.96.0.0")) + i + 1))
        services.append(
            objects.Service(
                metadata=meta,
                spec=objects.ServiceSpec(
                    type="NodePort" if i % 10 == 0 else "ClusterIP",
                    clusterIP=cip,
                    ports=[objects.ServicePortSpec(name="http", port=80, nodePort=30000 + i if i % 10 == 0 else 0)],
                ),
            )
        )
        eps = [
            objects.SliceEndpoint(
                addresses=[str(ipaddress.ip_address(EP_BASE + i * m + j))],
                conditions=objects.EndpointConditions(ready=True),
                nodeName="node1" if j == 0 else "node2",
            )
            for j in range(m)
        ]
        slices.append(
            objects.EndpointSlice(
                metadata=objects.ObjectMeta(
                    name=f"{name}-abc", namespace="bench", labels={objects.SERVICE_NAME_LABEL: name}
                ),
                addressType="IPv4",
                endpoints=eps,
                ports=[objects.SlicePort(name="http", port=8080, protocol="TCP")],
            )
        )
    return services, slices


def build_state(services: list[objects.Service], slices: list[objects.EndpointSlice]) -> tuple[ProxyState, float]:
    """State ingest (decoded objects -> trackers -> commit) on node1; returns the state and seconds."""
    node = objects.Node(
        metadata=objects.ObjectMeta(name="node1"),
        status=objects.NodeStatus(addresses=[objects.NodeAddress(type="InternalIP", address="192.168.50.1")]),
    )
    t0 = time.perf_counter()
    st = ProxyState(node_name="node1")
    st.on_node(node)
    for svc in services:
        st.on_service(NamespacedName("bench", svc.metadata.name), svc)
    for es in slices:
        st.on_endpoint_slice(("bench", es.metadata.name), es)
    st.services_synced = st.slices_synced = True
    st.commit()
    return st, time.perf_counter() - t0


def one_endpoint_change(target: objects.EndpointSlice, n: int, m: int, k: int) -> objects.EndpointSlice:
    """``target`` with its last endpoint replaced by a fresh address (the k-th partial sync's change)."""
    eps = list(target.endpoints or [])
    eps[-1] = objects.SliceEndpoint(
        addresses=[str(ipaddress.ip_address(EP_BASE + n * m + 1 + k))],
        conditions=objects.EndpointConditions(ready=True),
        nodeName="node2",
    )
    return objects.EndpointSlice(metadata=target.metadata, addressType="IPv4", endpoints=eps, ports=target.ports)


def bench_size(n: int, m: int, netns: str) -> dict[str, Any]:
    services, slices = make_objects(n, m)
    st, ingest = build_state(services, slices)

    t0 = time.perf_counter()
    text = render_state(st, OPTS).text()
    render = time.perf_counter() - t0

    nft = TimedNft(netns)
    backend = NftablesBackend(nft, OPTS)
    t0 = time.perf_counter()
    backend.sync(st, set(), full=True)
    cold = time.perf_counter() - t0
    cold_nft = nft.last_run

    partial, partial_nft = [], []
    target = slices[n // 2]
    for k in range(PARTIAL_SAMPLES):
        changed = one_endpoint_change(target, n, m, k)
        t0 = time.perf_counter()
        st.on_endpoint_slice(("bench", target.metadata.name), changed)
        backend.sync(st, st.commit().changed, full=False)
        partial.append(time.perf_counter() - t0)
        partial_nft.append(nft.last_run)

    t0 = time.perf_counter()
    NftablesBackend(TimedNft(netns), OPTS).sync(st, set(), full=True)
    restart = time.perf_counter() - t0
    backend.cleanup()
    return {
        "services": n,
        "endpoints_per_service": m,
        "ruleset_lines": text.count("\n"),
        "ingest_s": round(ingest, 3),
        "render_s": round(render, 3),
        "cold_full_sync_s": round(cold, 3),
        "cold_full_sync_nft_s": round(cold_nft, 3),
        "partial_one_endpoint_s_p50": round(statistics.median(partial), 4),
        "partial_one_endpoint_nft_s_p50": round(statistics.median(partial_nft), 4),
        "restart_full_sync_s": round(restart, 3),
        "peak_rss_self_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_nft_children_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def bench_api() -> dict[str, Any]:
    """bench/api.py in a fresh interpreter, so its RSS delta is not hidden under this process's peak."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.api"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def machine() -> dict[str, Any]:
    nft_version = subprocess.run(["nft", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "nft": nft_version,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def git_info() -> dict[str, Any]:
    """The commit measured, and whether src/ had uncommitted changes."""

    def git(*args: str) -> str:
        root = str(Path(__file__).parent.parent)
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=False).stdout

    return {"git_commit": git("rev-parse", "HEAD").strip(), "git_src_dirty": bool(git("status", "--porcelain", "src"))}


def bench_nftables(sizes: list[tuple[int, int]]) -> None:
    """The nftables rows and the API source benchmark (bench/results/nftables-<date>.json)."""
    netns = f"kpbench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    rows = []
    try:
        for n, m in sizes:
            rows.append(bench_size(n, m, netns))
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=False)
    cols = [
        ("services", "svc"), ("ruleset_lines", "lines"), ("ingest_s", "ingest s"), ("render_s", "render s"),
        ("cold_full_sync_s", "cold sync s"), ("cold_full_sync_nft_s", "(nft s)"),
        ("partial_one_endpoint_s_p50", "1-ep partial s"), ("partial_one_endpoint_nft_s_p50", "(nft s)"),
        ("restart_full_sync_s", "restart s"), ("peak_rss_self_mb", "RSS MB"),
        ("peak_rss_nft_children_mb", "nft RSS MB"),
    ]  # fmt: skip
    print("nftables backend, N Services x 10 endpoints (one transaction per sync)")
    print("  ".join(f"{title:>14}" for _, title in cols))
    for row in rows:
        print("  ".join(f"{row[key]!s:>14}" for key, _ in cols))
    api = bench_api()
    print("\nAPI source: 20k EndpointSlices / 100k endpoints (fresh process; see bench/api.py)")
    for key, value in api.items():
        print(f"  {key:>28}  {value}")
    out = Path(__file__).parent / "results" / f"nftables-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": machine(), "results": rows, "api": api}, indent=2) + "\n")
    print(f"wrote {out}")


def bench_iptables(sizes: list[tuple[int, int]], timeout: float | None) -> None:
    """Both iptables backends (bench/iptables.py; bench/results/iptables-<date>.json)."""
    from bench import iptables  # imports this module: import late to keep the cycle harmless

    rows = iptables.run_rows(sizes, timeout)
    iptables.print_table(rows)
    out = Path(__file__).parent / "results" / f"iptables-{time.strftime('%Y%m%d-%H%M%S')}.json"
    info = machine() | iptables.machine_iptables() | {"row_timeout_s": timeout or iptables.default_timeout()}
    out.write_text(json.dumps({"machine": info, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        choices=PARTS,
        help="costmodel: nft's cost per object; nftables: the backend rows and the API benchmark; "
        "scale: the daemon end to end (cold start, churn, restart); dataplane: ClusterIP vs pod IP "
        "connection setup; iptables: both iptables backends",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes only (1k): a smoke check")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="iptables: seconds per (backend, size) row before it is recorded as timeout "
        "(default: $KUBEPROXY_BENCH_IPT_TIMEOUT or 900)",
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the namespaces are deleted and iptables workers killed.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    if os.geteuid() != 0:
        print("make bench needs root: it loads rulesets into a private network namespace", file=sys.stderr)
        return 1
    for part in PARTS:
        if args.only not in (None, part):
            continue
        if args.only is None:
            print(f"\n===== {part} =====\n")
        if part == "nftables":
            bench_nftables(SIZES[:1] if args.quick else SIZES)
        elif part == "iptables":
            bench_iptables(SIZES[:1] if args.quick else SIZES, args.timeout)
        else:  # a module of its own, with the same --quick
            module = importlib.import_module(f"bench.{part}")
            if module.main(["--quick"] if args.quick else []) != 0:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
