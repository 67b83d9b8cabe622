"""nftables mode with real packets: the proxy programs a lab node's kernel and real connections
from pods, the node itself and an outside client go where the packet-flow table says.

The same ``BASIC_FLOWS`` rows the tracer checks (tests/test_nftables_tracer.py) run here for real:
an endpoint list means every listed pod answers (and no other), REJECT means the client sees
"connection refused", and ``masquerade`` means the pod saw a source address other than the client's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from builders import CLUSTER_CIDR, endpoint_slice, node, service, state_with
from flowlab import PROBES, check_flow, flow_lab
from flows import (
    ALL_FLOWS,
    BASIC_FLOWS,
    FAMILIES,
    Flow,
    addr,
    basic_objects,
    objects_for,
    to_family,
)
from kubeproxy.backends.nftables.backend import NftablesBackend
from kubeproxy.backends.nftables.render import NftOptions
from kubeproxy.kernel.nft import NftCli
from kubeproxy.lab.cluster import Lab
from kubeproxy.lab.netns import lab_unavailable_reason, run
from kubeproxy.lab.probe import Outcome, spread, tcp_probe
from kubeproxy.model import objects
from kubeproxy.model.service import IPFamily, NamespacedName
from kubeproxy.state.snapshot import ProxyState
from waiting import wait_until

_REASON = lab_unavailable_reason()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

OPTS = NftOptions(cluster_cidrs=(CLUSTER_CIDR,))


def options(family: IPFamily) -> NftOptions:
    return NftOptions(family=family, cluster_cidrs=(addr(CLUSTER_CIDR, family),))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with flow_lab(f"nft{os.getpid() % 100000}") as built:
        yield built


@pytest.fixture
def programmed(lab: Lab) -> Iterator[tuple[Lab, NftablesBackend, ProxyState]]:
    nft = NftCli(netns=lab.node_ns)
    backend = NftablesBackend(nft, OPTS)
    st = state_with(*basic_objects())
    backend.sync(st, set(), full=True)
    yield lab, backend, st
    backend.cleanup()


@pytest.fixture(scope="module")
def both_families(lab: Lab) -> Iterator[Lab]:
    """The whole scenario programmed in both tables (flows only read it)."""
    backends = [NftablesBackend(NftCli(netns=lab.node_ns), options(family)) for family in FAMILIES]
    for backend in backends:
        backend.sync(state_with(*objects_for(backend.opts.family)), set(), full=True)
    yield lab
    for backend in backends:
        backend.cleanup()


LAB_FLOWS = [f for f in ALL_FLOWS if f.lab and f.protocol in ("tcp", "udp")]


@pytest.mark.parametrize("flow", LAB_FLOWS, ids=lambda f: f.id)
def test_flows_with_real_packets(both_families: Lab, flow: Flow) -> None:
    check_flow(both_families, flow)


SCTP_FLOWS = [f for f in ALL_FLOWS if f.lab and f.protocol == "sctp"]


@pytest.mark.parametrize("flow", SCTP_FLOWS, ids=lambda f: f.id)
def test_sctp_flows_with_real_packets(both_families: Lab, flow: Flow) -> None:
    check_flow(both_families, flow)  # SCTP: INIT chunks over raw sockets (kubeproxy.lab.sctp)


def test_every_flow_row_runs_in_the_lab_in_both_families() -> None:
    # Rows left to the tracer only must say why (no route in a one-node lab, "not ours" rows): this
    # guards against rows silently dropping out of the lab.
    tracer_only = {f.name for f in BASIC_FLOWS if not f.lab}
    assert tracer_only <= {
        "LB IP itself as source, node in sourceRanges",
        "pod to ClusterIP with affinity, first connection",
        "outside to an ipMode Proxy LB IP: not ours",
        "outside to an unknown NodePort",
    }
    assert len(LAB_FLOWS) + len(SCTP_FLOWS) == 2 * len([f for f in BASIC_FLOWS if f.lab])


def test_udp_service(lab: Lab) -> None:
    nft = NftCli(netns=lab.node_ns)
    backend = NftablesBackend(nft, OPTS)
    st = state_with(
        node(),
        service("dns", "10.96.0.53", ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]),
        endpoint_slice(
            "dns-x", "dns", ["10.244.1.2", "10.244.1.3"], ports=[{"name": "dns", "port": 8080, "protocol": "UDP"}]
        ),
    )
    try:
        backend.sync(st, set(), full=True)
        client = lab.pods["client"].netns
        assert set(spread(client, "10.96.0.53", 53, PROBES, protocol="udp")) == {"a", "b"}
    finally:
        backend.cleanup()


@pytest.mark.parametrize("family", FAMILIES, ids=["ipv4", "ipv6"])
def test_removed_endpoint_stops_receiving_traffic(lab: Lab, family: IPFamily) -> None:
    backend = NftablesBackend(NftCli(netns=lab.node_ns), options(family))
    st = state_with(*objects_for(family))
    client, cip = lab.pods["client"].netns, addr("10.96.0.10", family)
    try:
        backend.sync(st, set(), full=True)
        assert set(spread(client, cip, 80, PROBES)) == {"a", "b"}
        one = to_family(
            endpoint_slice("svc1-x", "svc1", ["10.244.1.3"], ports=[{"name": "http", "port": 8080}]), family
        )
        assert isinstance(one, objects.EndpointSlice)
        st.on_endpoint_slice(("ns1", "svc1-x"), one)
        backend.sync(st, st.commit().changed, full=False)
        assert set(spread(client, cip, 80, PROBES)) == {"b"}
        # And the last one gone: refused, not hanging.
        st.on_endpoint_slice(("ns1", "svc1-x"), None)
        backend.sync(st, st.commit().changed, full=False)
        assert tcp_probe(client, cip, 80, timeout=2.5).outcome is Outcome.REFUSED
    finally:
        backend.cleanup()


def rule_handles(lab: Lab, chain_part: str) -> dict[str, list[str]]:
    listing = run(["nft", "-a", "list", "table", "ip", "kube-proxy"], netns=lab.node_ns).stdout
    out: dict[str, list[str]] = {}
    current = None
    for line in listing.splitlines():
        s = line.strip()
        if s.startswith("chain "):
            current = s.split()[1] if chain_part in s else None
        elif current and "# handle" in s:
            out.setdefault(current, []).append(s.rsplit("# handle", 1)[1].strip())
    return out


def map_elements(lab: Lab, prefix: str) -> list[str]:
    listing = run(["nft", "list", "map", "ip", "kube-proxy", "service-endpoints"], netns=lab.node_ns).stdout
    found = re.findall(r"[0-9a-f.:]+ \. \w+ \. \d+ \. \d+ : [0-9a-f.:]+ \. \d+", listing)
    return sorted(e for e in found if e.startswith(prefix))


def test_partial_sync_leaves_other_services_chains_untouched(
    programmed: tuple[Lab, NftablesBackend, ProxyState],
) -> None:
    lab, backend, st = programmed
    before_all = rule_handles(lab, "")
    before_svc2 = rule_handles(lab, "/svc2/")
    assert before_svc2 and not rule_handles(lab, "/svc1/")  # svc1 is balanced through the map
    assert len(map_elements(lab, "10.96.0.10 . tcp . 80 .")) == 2
    st.on_endpoint_slice(
        ("ns1", "svc1-x"), endpoint_slice("svc1-x", "svc1", ["10.244.1.2"], ports=[{"name": "http", "port": 8080}])
    )
    out = backend.sync(st, st.commit().changed, full=False)
    assert not out.full
    # An endpoint change of a map-balanced Service writes no rule at all: same rules, same handles.
    assert rule_handles(lab, "") == before_all
    assert map_elements(lab, "10.96.0.10 . tcp . 80 .") == ["10.96.0.10 . tcp . 80 . 0 : 10.244.1.2 . 8080"]
    assert set(spread(lab.pods["client"].netns, "10.96.0.10", 80, 4)) == {"a"}
    # A Service with its own chains (a NodePort): only its chains are rewritten.
    others = {c: h for c, h in before_all.items() if "/svc2/" not in c}
    st.on_endpoint_slice(
        ("ns1", "svc2-x"),
        endpoint_slice("svc2-x", "svc2", ["10.244.1.4", "10.244.1.3"], ports=[{"name": "http", "port": 8080}]),
    )
    backend.sync(st, st.commit().changed, full=False)
    assert rule_handles(lab, "/svc2/") != before_svc2
    assert {c: h for c, h in rule_handles(lab, "").items() if "/svc2/" not in c} == others


def test_restart_keeps_traffic_flowing_and_converges(programmed: tuple[Lab, NftablesBackend, ProxyState]) -> None:
    lab, _backend, st = programmed
    # A new process (restart): its first full sync must not disturb existing rules or elements.
    scripts: list[str] = []

    class Recording(NftCli):
        def run(self, script: str) -> None:
            scripts.append(script)
            super().run(script)

    fresh = NftablesBackend(Recording(netns=lab.node_ns), OPTS)
    fresh.sync(st, set(), full=True)
    # What the kernel lists reads back as our element keys: nothing is deleted or re-added.
    assert not [line for line in scripts[-1].splitlines() if " element " in line]
    assert set(spread(lab.pods["client"].netns, "10.96.0.10", 80, PROBES)) == {"a", "b"}


def test_altered_load_balance_chain_is_repaired_by_a_full_sync(
    programmed: tuple[Lab, NftablesBackend, ProxyState],
) -> None:
    lab, backend, st = programmed
    client = lab.pods["client"].netns
    run(["nft", "flush", "chain", "ip", "kube-proxy", "load-balance-2"], netns=lab.node_ns)
    assert set(spread(client, "10.96.0.10", 80, 4)) != {"a", "b"}  # svc1 (2 endpoints) is broken now
    assert backend.sync(st, set(), full=True).full
    assert set(spread(client, "10.96.0.10", 80, PROBES)) == {"a", "b"}
    assert set(spread(client, "10.96.0.20", 80, 4)) == {"c"}


# --- the daemon end to end: manifests directory -> real process -> kernel -> traffic ----------

SERVICES = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns1}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: ns1}
spec:
  clusterIP: 10.96.0.99
  ports: [{name: http, port: "eighty"}]
"""

SLICE = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: ns1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
{endpoints}
"""


def _slice(*ips: str) -> str:
    return SLICE.replace("{endpoints}", "\n".join(f"- addresses: [{ip}]\n  nodeName: node1" for ip in ips))


def test_daemon_from_manifests_programs_node_and_follows_changes(lab: Lab, tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "services.yaml").write_text(SERVICES)
    (manifests / "garbage.yaml").write_text("kind: Service\nmetadata: {name: [unterminated\n")
    (manifests / "slice.yaml").write_text(_slice("10.244.1.2", "10.244.1.3"))
    log = tmp_path / "proxy.log"
    client = lab.pods["client"].netns
    proc = lab.spawn(
        lab.node_ns,
        [sys.executable, "-m", "kubeproxy", f"--manifests={manifests}", "--hostname-override=node1",
         f"--cluster-cidr={CLUSTER_CIDR}", "--v=2", "--iptables-min-sync-period=100ms",
         "--iptables-sync-period=1s"],
        log_path=str(log),
    )  # fmt: skip
    try:
        assert wait_until(lambda: set(spread(client, "10.96.0.10", 80, 8)) == {"a", "b"}), log.read_text()
        text = log.read_text()
        # Bad input is named and skipped; everything else is programmed.
        assert (
            "garbage.yaml" in text
            and "ns1/broken" in text
            and "eighty" not in "".join(spread(client, "10.96.0.99", 80, 1))
        )
        (manifests / "slice.yaml").write_text(_slice("10.244.1.4"))
        assert wait_until(lambda: set(spread(client, "10.96.0.10", 80, 8)) == {"c"}), log.read_text()
        # Someone deletes our table: the proxy notices within a syncPeriod and rebuilds it.
        run(["nft", "delete", "table", "ip", "kube-proxy"], netns=lab.node_ns)
        assert wait_until(lambda: set(spread(client, "10.96.0.10", 80, 4, timeout=0.3)) == {"c"}), log.read_text()
        assert "rules are gone" in log.read_text()
        # SIGTERM: the process exits and the rules stay (traffic keeps flowing during restarts).
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, log.read_text()
        assert set(spread(client, "10.96.0.10", 80, 4)) == {"c"}
        # --cleanup removes everything we installed.
        subprocess.run(
            ["ip", "netns", "exec", lab.node_ns, sys.executable, "-m", "kubeproxy", "--cleanup"], check=True, timeout=30
        )
        assert run(["nft", "list", "tables"], netns=lab.node_ns).stdout.strip() == ""
        assert tcp_probe(client, "10.96.0.10", 80, timeout=0.5).outcome is not Outcome.OK
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("family", FAMILIES, ids=["ipv4", "ipv6"])
def test_session_affinity_sticks_and_can_be_switched_off_and_on(lab: Lab, family: IPFamily) -> None:
    nft = NftCli(netns=lab.node_ns)
    backend = NftablesBackend(nft, options(family))
    ports = [{"name": "http", "port": 80}]
    slice_ports = [{"name": "http", "port": 8080}]
    sticky = to_family(service("aff", "10.96.0.91", ports=ports, sessionAffinity="ClientIP",
                               sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}}), family)  # fmt: skip
    plain = to_family(service("aff", "10.96.0.91", ports=ports), family)
    assert isinstance(sticky, objects.Service) and isinstance(plain, objects.Service)
    eps = to_family(endpoint_slice("aff-x", "aff", ["10.244.1.2", "10.244.1.3"], ports=slice_ports), family)
    st = state_with(to_family(node(), family), sticky, eps)
    key = NamespacedName("ns1", "aff")
    client, cip = lab.pods["client"].netns, addr("10.96.0.91", family)
    try:
        backend.sync(st, set(), full=True)
        answers = spread(client, cip, 80, PROBES)
        assert len(set(answers)) == 1, answers  # P(24 random picks all equal) = 2**-23
        # Off: the same client is spread again (live Service, partial sync).
        st.on_service(key, plain)
        backend.sync(st, st.commit().changed, full=False)
        assert set(spread(client, cip, 80, PROBES)) == {"a", "b"}
        # On again: sticky again.
        st.on_service(key, sticky)
        backend.sync(st, st.commit().changed, full=False)
        assert len(set(spread(client, cip, 80, PROBES))) == 1
    finally:
        backend.cleanup()


def test_a_table_another_kube_proxy_wrote_is_taken_over_on_the_first_sync(lab: Lab) -> None:
    # Swapping the image of a DaemonSet that ran upstream's nftables mode (or an older layout) leaves
    # a table of our name with a base chain at another priority and a set of another type: the kernel
    # refuses to change those in place, so the first full sync replaces the table once.
    foreign = (
        'add table ip kube-proxy { comment "rules for kube-proxy" ; }\n'
        "add chain ip kube-proxy filter-input { type filter hook input priority -110 ; }\n"
        "add rule ip kube-proxy filter-input ct state new counter\n"
        "add set ip kube-proxy cluster-ips { type inet_service ; }\n"
        "add chain ip kube-proxy some-old-chain\n"
    )
    nft = NftCli(netns=lab.node_ns)
    nft.run(foreign)
    backend = NftablesBackend(nft, OPTS)
    try:
        backend.sync(state_with(*basic_objects()), set(), full=True)
        listing = run(["nft", "list", "chain", "ip", "kube-proxy", "filter-input"], netns=lab.node_ns).stdout
        assert "priority filter" in listing and "-110" not in listing
        assert "some-old-chain" not in run(["nft", "list", "table", "ip", "kube-proxy"], netns=lab.node_ns).stdout
        assert set(spread(lab.pods["client"].netns, "10.96.0.10", 80, PROBES)) == {"a", "b"}
    finally:
        backend.cleanup()
