"""``kube-proxy demo`` (= ``make demo``): the whole product on one machine, with real packets.

Builds a lab (a node namespace, one pod namespace per endpoint in ``examples/demo``, an outside
client namespace), runs the real proxy daemon inside the node namespace in nftables mode from a
copy of the manifest directory, sends real connections and prints who answered; then edits an
EndpointSlice file and shows traffic follow. Everything it creates is removed at the end, also on
failure or Ctrl-C (``Lab`` guarantees it). With ``--keep`` it waits for Enter before tearing down,
so the rules can be inspected.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from kubeproxy.lab.cluster import Lab
from kubeproxy.lab.netns import lab_unavailable_reason, run
from kubeproxy.lab.probe import spread

NODE = "node1"
CLUSTER_CIDR = "10.244.0.0/16"
CLIENT_POD = ("client", "10.244.1.100")
PROBES = 40


def _examples_dir() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "examples" / "demo"
        if candidate.is_dir():
            return candidate
    raise SystemExit("cannot find examples/demo (run from a source checkout)")


def demo_pods(manifest_dir: Path) -> list[tuple[str, str]]:
    """(pod name, IP) for every endpoint on our node, named by targetRef.name."""
    pods: dict[str, str] = {}
    for path in sorted(manifest_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "EndpointSlice":
                continue
            for ep in doc.get("endpoints") or []:
                if ep.get("nodeName") not in (None, NODE):
                    continue
                ip = ep["addresses"][0]
                name = (ep.get("targetRef") or {}).get("name") or f"pod-{ip.replace('.', '-')}"
                pods[name] = ip
    return sorted(pods.items(), key=lambda kv: kv[1])


def _table(title: str, counts: Counter[str], total: int) -> str:
    lines = [f"  {title}"]
    for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        bar = "#" * round(30 * n / total)
        lines.append(f"    {name:<12} {n:>3}/{total}  {bar}")
    return "\n".join(lines)


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="kube-proxy demo", allow_abbrev=False)
    p.add_argument("--keep", action="store_true", help="keep the lab up until Enter is pressed")
    args = p.parse_args(list(argv))
    reason = lab_unavailable_reason()
    if reason is not None:
        print(f"kube-proxy demo cannot build its lab: {reason}", file=sys.stderr)
        print("Run it as root on Linux with iproute2 and nftables (`sudo make demo`).", file=sys.stderr)
        return 1

    workdir = Path(tempfile.mkdtemp(prefix="kube-proxy-demo-"))
    manifests = workdir / "manifests"
    shutil.copytree(_examples_dir(), manifests)
    log_path = workdir / "kube-proxy.log"
    try:
        with Lab(node_name=NODE, tag="demo") as lab:
            print(f"lab: node namespace {lab.node_ns} ({lab.node_ip}), outside client {lab.client_ns}")
            for name, ip in demo_pods(manifests):
                lab.add_pod(name, ip, tcp_ports=(8080,))
            client = lab.add_pod(CLIENT_POD[0], CLIENT_POD[1], tcp_ports=())
            print(f"pods: {', '.join(f'{n} {p.ip}' for n, p in lab.pods.items())}")

            lab.spawn(
                lab.node_ns,
                [
                    sys.executable, "-m", "kubeproxy", "--proxy-mode=nftables", f"--manifests={manifests}",
                    f"--hostname-override={NODE}", f"--cluster-cidr={CLUSTER_CIDR}", "--v=2",
                    "--iptables-min-sync-period=200ms",
                ],
                log_path=str(log_path),
            )  # fmt: skip
            print(f"kube-proxy: running in {lab.node_ns}, log {log_path}")
            _wait_for(
                lambda: (
                    spread(client.netns, "10.96.0.10", 80, 1)["REFUSED"] == 0
                    and run(["nft", "list", "table", "ip", "kube-proxy"], netns=lab.node_ns, check=False).returncode
                    == 0
                ),
                20,
                "the proxy to program the node",
            )

            print("\n== traffic (real TCP connections through the node's kernel) ==")
            web = spread(client.netns, "10.96.0.10", 80, PROBES)
            print(_table(f"pod {CLIENT_POD[0]} -> demo/web ClusterIP 10.96.0.10:80", web, PROBES))
            shop = spread(lab.client_ns, lab.node_ip, 30080, PROBES)
            print(_table(f"outside client {lab.client_ip} -> demo/shop NodePort {lab.node_ip}:30080", shop, PROBES))
            orphan = spread(client.netns, "10.96.0.30", 80, 5)
            print(_table("pod client -> demo/orphan ClusterIP 10.96.0.30:80 (no endpoints)", orphan, 5))

            print("\n== scaling demo/web: web-1 goes away, web-3 comes up (EndpointSlice file edited) ==")
            lab.add_pod("web-3", "10.244.1.13", tcp_ports=(8080,))
            slice_file = manifests / "endpointslices.yaml"
            text = slice_file.read_text()
            text = text.replace("addresses: [10.244.1.11]", "addresses: [10.244.1.13]").replace(
                "name: web-1,", "name: web-3,"
            )
            slice_file.write_text(text)
            started = time.monotonic()
            _wait_for(
                lambda: set(spread(client.netns, "10.96.0.10", 80, 10)) <= {"web-2", "web-3"},
                20,
                "traffic to follow the EndpointSlice change",
            )
            print(f"  traffic followed the file change within {time.monotonic() - started:.1f}s")
            web = spread(client.netns, "10.96.0.10", 80, PROBES)
            print(_table(f"pod {CLIENT_POD[0]} -> demo/web ClusterIP 10.96.0.10:80", web, PROBES))

            print("\n== where to look ==")
            print(f"  ip netns exec {lab.node_ns} nft list table ip kube-proxy")
            print("  the demo/web chain right now:")
            listing = run(["nft", "list", "table", "ip", "kube-proxy"], netns=lab.node_ns).stdout
            in_chain = False
            for line in listing.splitlines():
                if "chain service-" in line and "demo/web/" in line:
                    in_chain = True
                if in_chain:
                    print("   " + line)
                    if line.strip() == "}":
                        break
            if args.keep:
                input("\nlab kept up (try the command above); press Enter to tear it down ... ")
        print("\nlab torn down: namespaces, veths and processes removed.")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
