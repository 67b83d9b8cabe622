"""Data-plane benchmark: TCP connection setup through a ClusterIP among N Services vs straight to the pod.

``python -m bench.dataplane [--services 10000] [--connections 2000] [--quick] [--iptables nft|legacy]``

What is measured: the time a blocking ``connect()`` takes (SYN out, SYN-ACK back) from a client pod
to one server pod, once through a ClusterIP (``10.96.250.1:80`` -> ``10.244.1.2:8080``) and once
straight to the pod IP (``10.244.1.2:8080``), with the node's kernel programmed by the real backend
holding N synthetic Services x 10 endpoints (``bench.run.make_objects``) plus that one measured
Service. The measured Service has exactly ONE endpoint, the real server pod, so every ClusterIP
connection lands on it; the load-balancing choice among several endpoints is not part of the
number. Rows: N = 0 (the table skeleton and the one Service: the baseline) and N = ``--services``
(10000 by default: "ClusterIP connection setup within 10% of direct pod IP at 10k Services").

How: each row builds a fresh namespace lab (``kubeproxy.lab.cluster.Lab``: node namespace, pods on
routed veths) with a server pod running the lab podserver and a client pod, programs the node with
``NftablesBackend.sync(state, set(), full=True)`` (or ``IptablesBackend`` with ``--iptables``),
checks with one real probe per path that both reach the server, then measures from a thread that
has joined the client pod's namespace (``call_in_netns``). Only the public backend API and real
packets are used, never chain or map names, so the benchmark survives layout changes. Every
namespace, veth and process is removed when the row ends, also on errors and SIGTERM (the Lab does
it).

Why it is done this way:
- A/B interleaving: ClusterIP and direct connections alternate (AB, BA, AB, ...), so drift on a
  shared machine (other processes, frequency changes, a cache going cold) hits both targets alike and
  the ratio stays honest; alternating the order inside a pair cancels any "second of a pair" effect.
  A warm-up (``--warmup`` of each, discarded) fills caches and the conntrack/NAT slab first.
- RST close: the client sets ``SO_LINGER {on, 0}``, so ``close()`` sends a RST and leaves no
  TIME_WAIT socket: the ephemeral ports never run out and a port is free again at once. Each row has
  a fresh lab (conntrack starts empty), and the kernel's port choice walks the ~28k ephemeral ports,
  so within a row no 4-tuple repeats and every connection is a NEW conntrack entry taking the full
  NAT path (a reused 4-tuple could otherwise meet a lingering entry and skip the nat hooks; after a
  RST the kernel kills such an entry when a new SYN comes, so even a wrap-around stays honest).
- Blocking connect with ``SO_SNDTIMEO`` (Linux honours it for connect) instead of a Python timeout:
  a Python timeout would turn the socket non-blocking and time connect + poll + getsockopt.
- Pinning: the server pod's process runs on the first CPU and the measuring thread on the last
  (``--no-pin`` turns this off). On veths the whole SYN/SYN-ACK path runs in softirq on the
  connecting CPU, so connect() takes only 20-35 us; unpinned, the server (accept, send, close in
  Python) often lands on that CPU between connections and shifts samples by ~45 us, a bimodal mess
  that buries a 1-2 us difference (measured on 2 cores: p90 ~98 us unpinned, ~33 us pinned).
- The garbage collector is off while measuring (the 10k-Service state is a large heap).

"Direct" is not "no kube-proxy": both paths cross the same node with the same ruleset (conntrack
and every base chain see both); the ClusterIP path adds the Service dispatch, the DNAT and its
reverse translation. With ``--iptables`` the measured Service is named so that it sorts last: in
iptables mode it is the last rule of KUBE-SERVICES (the worst case of a linear chain); nftables
does not care about order.

Output, per row: p50/p90/p99/mean of connect() in microseconds for both targets, "ratio p50" and
"ratio mean" (ClusterIP / direct), "Δpair p50" (the median over pairs of ClusterIP minus its
neighbouring direct sample: the added cost in microseconds, the most drift-proof number), and the
failed connects per target. Prints a table and writes ``bench/results/dataplane-<date>.json``
({"machine": ..., "results": [...]}). Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.run import build_state, git_info, machine, make_objects
from kubeproxy.backends.iptables.backend import IptablesBackend
from kubeproxy.backends.iptables.render import IptOptions
from kubeproxy.backends.nftables.backend import NftablesBackend
from kubeproxy.backends.nftables.render import NftOptions
from kubeproxy.kernel.errors import KernelError
from kubeproxy.kernel.iptables import IptablesCli, IptablesMode, available_modes, tool_name
from kubeproxy.kernel.nft import NftCli
from kubeproxy.lab.cluster import Lab
from kubeproxy.lab.netns import LabError, call_in_netns, lab_unavailable_reason
from kubeproxy.lab.probe import Outcome, tcp_probe
from kubeproxy.model import objects
from kubeproxy.model.service import IPFamily
from kubeproxy.state.snapshot import ProxyState

ROOT = Path(__file__).parent.parent
CLUSTER_CIDR = "10.244.0.0/16"
ENDPOINTS_PER_SERVICE = 10  # of the N synthetic Services (the measured one has 1)
SERVER_POD, SERVER_IP, SERVER_PORT = "server", "10.244.1.2", 8080
CLIENT_POD, CLIENT_IP = "client", "10.244.1.100"
# Outside the synthetic Services' range (10.96.0.1 .. 10.96.39.16 at 10k); the name sorts after svc-N.
TARGET_NAMESPACE, TARGET_NAME, TARGET_VIP, TARGET_PORT = "bench", "zz-dataplane", "10.96.250.1", 80
CONNECT_TIMEOUT_S = 2
IPTABLES_TIMEOUT_S = 1200.0  # iptables-nft-restore of 10k Services takes ~3.5 min on 2 cores
_LINGER_RST = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}: close() sends RST
_SNDTIMEO = struct.pack("ll", CONNECT_TIMEOUT_S, 0)  # struct timeval; bounds a blocking connect()

Target = tuple[str, int]
CLUSTER_IP: Target = (TARGET_VIP, TARGET_PORT)
DIRECT: Target = (SERVER_IP, SERVER_PORT)


# --- objects and programming ----------------------------------------------------------------------


def target_objects() -> tuple[objects.Service, objects.EndpointSlice]:
    """The measured Service: ClusterIP ``TARGET_VIP:80`` whose one endpoint is the server pod."""
    service = objects.Service(
        metadata=objects.ObjectMeta(name=TARGET_NAME, namespace=TARGET_NAMESPACE),
        spec=objects.ServiceSpec(
            type="ClusterIP",
            clusterIP=TARGET_VIP,
            ports=[objects.ServicePortSpec(name="http", port=TARGET_PORT)],
        ),
    )
    endpoint_slice = objects.EndpointSlice(
        metadata=objects.ObjectMeta(
            name=f"{TARGET_NAME}-abc",
            namespace=TARGET_NAMESPACE,
            labels={objects.SERVICE_NAME_LABEL: TARGET_NAME},
        ),
        addressType="IPv4",
        endpoints=[
            objects.SliceEndpoint(
                addresses=[SERVER_IP], conditions=objects.EndpointConditions(ready=True), nodeName="node1"
            )
        ],
        ports=[objects.SlicePort(name="http", port=SERVER_PORT, protocol="TCP")],
    )
    return service, endpoint_slice


def bench_state(n: int) -> ProxyState:
    """N synthetic Services x 10 endpoints (bench.run) plus the measured Service, committed on node1."""
    services, slices = make_objects(n, ENDPOINTS_PER_SERVICE)
    service, endpoint_slice = target_objects()
    state, _ingest = build_state([*services, service], [*slices, endpoint_slice])
    return state


def program(mode: str, node_ns: str, state: ProxyState) -> float:
    """One full sync of ``state`` into the node namespace with ``mode``'s backend; returns seconds."""
    start = time.perf_counter()
    if mode == "nftables":
        NftablesBackend(NftCli(netns=node_ns), NftOptions(cluster_cidrs=(CLUSTER_CIDR,))).sync(state, set(), full=True)
    else:
        ipt = IptablesCli(IptablesMode(mode.removeprefix("iptables-")), netns=node_ns, timeout=IPTABLES_TIMEOUT_S)
        # No sysctl adapter: route_localnet is for localhost NodePorts, which this bench does not use.
        opts = IptOptions(family=IPFamily.V4, cluster_cidrs=(CLUSTER_CIDR,))
        IptablesBackend(ipt, opts).sync(state, set(), full=True)
    return time.perf_counter() - start


# --- measuring (runs in a thread inside the client pod's namespace) ------------------------------


def connect_ns(target: Target) -> int | None:
    """Nanoseconds one blocking connect() to ``target`` takes; None when it fails. Closes with RST."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _SNDTIMEO)
        start = time.perf_counter_ns()
        sock.connect(target)
        return time.perf_counter_ns() - start
    except OSError:
        return None
    finally:
        sock.close()


def interleaved(pairs: int, warmup: int, cpu: int | None) -> tuple[list[int | None], list[int | None]]:
    """``warmup`` discarded pairs, then ``pairs`` timed ones; each pair is (ClusterIP, direct), the
    order within a pair alternating. Returns the samples (ns, None = failed) per target, pair-aligned.
    With ``cpu``, this thread (a throw-away one: ``call_in_netns``) first pins itself to that CPU."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # 0: the calling thread only
    for i in range(warmup):
        for target in (CLUSTER_IP, DIRECT) if i % 2 == 0 else (DIRECT, CLUSTER_IP):
            connect_ns(target)
    via_cluster_ip: list[int | None] = []
    direct: list[int | None] = []
    for i in range(pairs):
        if i % 2 == 0:
            via_cluster_ip.append(connect_ns(CLUSTER_IP))
            direct.append(connect_ns(DIRECT))
        else:
            direct.append(connect_ns(DIRECT))
            via_cluster_ip.append(connect_ns(CLUSTER_IP))
    return via_cluster_ip, direct


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# --- statistics -------------------------------------------------------------------------------------


def summary(samples_ns: list[int | None]) -> dict[str, Any]:
    ok = [s / 1000 for s in samples_ns if s is not None]
    out: dict[str, Any] = {"connections": len(samples_ns), "errors": len(samples_ns) - len(ok)}
    if len(ok) < 2:
        return out
    cuts = statistics.quantiles(ok, n=100, method="inclusive")
    out |= {
        "p50_us": round(statistics.median(ok), 1),
        "p90_us": round(cuts[89], 1),
        "p99_us": round(cuts[98], 1),
        "mean_us": round(statistics.fmean(ok), 1),
        "min_us": round(min(ok), 1),
    }
    return out


def compare(via_cluster_ip: list[int | None], direct: list[int | None]) -> dict[str, Any]:
    a, b = summary(via_cluster_ip), summary(direct)
    out: dict[str, Any] = {"clusterip": a, "direct": b}
    if "p50_us" in a and "p50_us" in b:
        out["ratio_p50"] = round(a["p50_us"] / b["p50_us"], 3)
        out["ratio_mean"] = round(a["mean_us"] / b["mean_us"], 3)
        # Per-pair difference: each ClusterIP sample minus its neighbouring direct one (drift-free).
        deltas = [
            (x - y) / 1000 for x, y in zip(via_cluster_ip, direct, strict=True) if x is not None and y is not None
        ]
        out["pair_delta_p50_us"] = round(statistics.median(deltas), 1)
    return out


# --- one row ----------------------------------------------------------------------------------------


def check_paths(client_ns: str) -> None:
    """One real connection per path must reach the server pod, or the numbers would mean nothing."""
    for ip, port in (DIRECT, CLUSTER_IP):
        result = tcp_probe(client_ns, ip, port, timeout=3.0)
        if result.outcome is not Outcome.OK or result.answer != SERVER_POD:
            raise RuntimeError(f"{ip}:{port} from the client pod: {result.outcome.value} {result.detail}".strip())


def cpu_plan(pin: bool) -> tuple[int, int] | None:
    """(server CPU, client CPU): the first and the last CPU this process may use; None for no pinning."""
    allowed = sorted(os.sched_getaffinity(0))
    return (allowed[0], allowed[-1]) if pin and len(allowed) >= 2 else None


def run_row(
    mode: str, n: int, *, pairs: int, warmup: int, cpus: tuple[int, int] | None, log: Callable[[str], None]
) -> dict[str, Any]:
    row: dict[str, Any] = {"mode": mode, "services": n, "endpoints_per_service": ENDPOINTS_PER_SERVICE}
    row["target_endpoints"] = 1
    t0 = time.perf_counter()
    state = bench_state(n)
    row["ingest_s"] = round(time.perf_counter() - t0, 2)
    with Lab(tag=f"dp{os.getpid()}") as lab:
        server = lab.add_pod(SERVER_POD, SERVER_IP, tcp_ports=(SERVER_PORT,))
        client = lab.add_pod(CLIENT_POD, CLIENT_IP, tcp_ports=())
        log(f"sync {n} Services ...")
        row["full_sync_s"] = round(program(mode, lab.node_ns, state), 2)
        del state
        check_paths(client.netns)
        if cpus is not None and server.process is not None:
            # `ip netns exec` execs the podserver in place: the pid is the server itself.
            os.sched_setaffinity(server.process.pid, {cpus[0]})
        row["cpus_server_client"] = list(cpus) if cpus is not None else None
        log(f"{warmup} + {pairs} pairs ...")
        with gc_paused():
            t0 = time.perf_counter()
            via_cluster_ip, direct = call_in_netns(
                client.netns, interleaved, pairs, warmup, None if cpus is None else cpus[1]
            )
            row["measure_s"] = round(time.perf_counter() - t0, 2)
    row["warmup_pairs"] = warmup
    row |= compare(via_cluster_ip, direct)
    return row


# --- output -----------------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]]) -> None:
    stats = ("p50_us", "p90_us", "p99_us", "mean_us")
    head = ["mode", "services", "sync s"]
    head += [f"cip {s.removesuffix('_us')}" for s in stats] + [f"pod {s.removesuffix('_us')}" for s in stats]
    head += ["ratio p50", "ratio mean", "Δpair p50", "errors"]
    print("connect() latency in µs, ClusterIP (1 endpoint) vs pod IP, A/B interleaved, from a client pod")
    print("  ".join(f"{h:>10}" for h in head))
    for row in rows:
        a, b = row.get("clusterip", {}), row.get("direct", {})
        cells = [row["mode"], row["services"], row.get("full_sync_s", "-")]
        cells += [a.get(s, "-") for s in stats] + [b.get(s, "-") for s in stats]
        cells += [row.get("ratio_p50", "-"), row.get("ratio_mean", "-"), row.get("pair_delta_p50_us", "-")]
        cells.append(f"{a.get('errors', '-')}/{b.get('errors', '-')}" if "error" not in row else row["error"][:40])
        print("  ".join(f"{c!s:>10}" for c in cells))
    for row in rows:
        if "error" in row:
            print(f"{row['mode']} N={row['services']}: {row['error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dataplane", description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, help="N synthetic Services x 10 endpoints (default 10000; quick 1000)")
    parser.add_argument("--connections", type=int, help="timed connections per target (default 2000; quick 300)")
    parser.add_argument("--warmup", type=int, default=200, help="discarded connections per target first")
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the server pod and the client thread to two CPUs"
    )
    parser.add_argument("--quick", action="store_true", help="N = 1000, 300 connections per target")
    parser.add_argument(
        "--iptables",
        choices=[m.value for m in IptablesMode],
        action="append",
        default=[],
        help="also measure iptables mode with this iptables backend (repeatable; iptables-nft needs "
        "~3.5 min to load 10k Services on 2 cores)",
    )
    args = parser.parse_args(argv)
    n = args.services if args.services is not None else (1000 if args.quick else 10000)
    pairs = args.connections if args.connections is not None else (300 if args.quick else 2000)
    if n < 0 or pairs < 2 or args.warmup < 0:
        parser.error("--services and --warmup must be >= 0, --connections >= 2")
    reason = lab_unavailable_reason()
    if reason is not None:
        print(f"bench.dataplane needs the namespace lab: {reason}", file=sys.stderr)
        return 1
    # SIGTERM unwinds like Ctrl-C (the Lab does the same while a lab exists), so teardown always runs.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))

    modes = ["nftables"]
    installed = {m.value for m in available_modes()}
    modes += [tool_name(IPFamily.V4, IptablesMode(m)) for m in dict.fromkeys(args.iptables)]
    info = machine() | git_info() | {"loadavg_at_start": os.getloadavg()}
    if args.iptables:
        info |= {
            tool_name(IPFamily.V4, IptablesMode(m)): subprocess.run(
                [tool_name(IPFamily.V4, IptablesMode(m)), "--version"], capture_output=True, text=True, check=False
            ).stdout.strip()
            for m in args.iptables
            if m in installed
        }
    rows: list[dict[str, Any]] = []
    for mode in modes:
        for size in dict.fromkeys((0, n)):
            if mode != "nftables" and mode.removeprefix("iptables-") not in installed:
                rows.append({"mode": mode, "services": size, "error": "not installed"})
                continue

            def log(text: str, mode: str = mode, size: int = size) -> None:
                print(f"  {mode} N={size}: {text}", file=sys.stderr, flush=True)

            start = time.perf_counter()
            try:
                rows.append(
                    run_row(mode, size, pairs=pairs, warmup=args.warmup, cpus=cpu_plan(not args.no_pin), log=log)
                )
            except (KernelError, LabError, RuntimeError) as exc:  # the row failed; the lab is gone already
                rows.append({"mode": mode, "services": size, "error": str(exc)[:2000]})
                log(f"FAILED: {exc}")
                continue
            log(f"done in {time.perf_counter() - start:.1f} s")
    print_table(rows)
    for row in rows:
        if row["mode"] == "nftables" and row["services"] >= 10000 and "ratio_p50" in row:
            verdict = "yes" if row["ratio_p50"] <= 1.10 else "NO"
            print(
                f"ClusterIP within 10% of pod IP at {row['services']} Services (nftables, p50): {verdict} "
                f"(p50 x{row['ratio_p50']}, mean x{row['ratio_mean']})"
            )
    out = ROOT / "bench" / "results" / f"dataplane-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": info, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
