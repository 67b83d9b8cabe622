"""iptables mode with real packets, through both iptables backends (iptables-nft and iptables-legacy).

The same packet-flow rows the tracers check (tests/test_flow_tables.py) and the nftables lab runs
(tests/lab/test_nftables_lab.py) run here against the kernel programmed by ``iptables-restore``:
every listed pod answers (and no other), REJECT is "connection refused", DROP a timeout, and
``masquerade`` means the pod saw another source address. Rows where upstream's modes differ on
purpose carry their iptables answer (``Flow.iptables``).
"""

from __future__ import annotations

import os
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
    ALL_OPTION_FLOWS,
    FAMILIES,
    Flow,
    addr,
    objects_for,
    to_family,
    variant_objects,
    variant_options,
)
from kubeproxy.backends.iptables.backend import ROUTE_LOCALNET, IptablesBackend
from kubeproxy.backends.iptables.render import IptOptions
from kubeproxy.kernel.iptables import IptablesCli, IptablesMode, available_modes
from kubeproxy.kernel.netif import LocalAddresses
from kubeproxy.kernel.sysctl import ProcSysctl
from kubeproxy.lab.cluster import Lab
from kubeproxy.lab.netns import lab_unavailable_reason, run
from kubeproxy.lab.probe import Outcome, spread, tcp_probe
from kubeproxy.model.service import IPFamily, NamespacedName
from waiting import wait_until

_REASON = lab_unavailable_reason() or (None if available_modes() else "no iptables binaries")
pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

IPT_MODES = available_modes() or [IptablesMode.NFT]


def options(family: IPFamily, **kw: object) -> IptOptions:
    return IptOptions(family=family, cluster_cidrs=(addr(CLUSTER_CIDR, family),), **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with flow_lab(f"ipt{os.getpid() % 100000}") as built:
        yield built


@pytest.fixture(scope="module", params=IPT_MODES, ids=lambda m: m.value)
def programmed(lab: Lab, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The whole scenario programmed in both families through one iptables backend."""
    ipt = IptablesCli(request.param, netns=lab.node_ns)
    sysctl = ProcSysctl(netns=lab.node_ns)
    backends = [IptablesBackend(ipt, options(family), sysctl=sysctl) for family in FAMILIES]
    try:
        for backend in backends:
            backend.sync(state_with(*objects_for(backend.opts.family)), set(), full=True)
        yield lab
    finally:
        for backend in backends:
            backend.cleanup()


LAB_FLOWS = [f for f in ALL_FLOWS if f.lab and f.protocol in ("tcp", "udp")]
SCTP_FLOWS = [f for f in ALL_FLOWS if f.lab and f.protocol == "sctp"]


@pytest.mark.parametrize("flow", LAB_FLOWS, ids=lambda f: f.id)
def test_flows_with_real_packets(programmed: Lab, flow: Flow) -> None:
    check_flow(programmed, flow, "iptables")


@pytest.mark.parametrize("flow", SCTP_FLOWS, ids=lambda f: f.id)
def test_sctp_flows_with_real_packets(programmed: Lab, flow: Flow) -> None:
    check_flow(programmed, flow, "iptables")  # SCTP: INIT chunks over raw sockets (kubeproxy.lab.sctp)


def test_localhost_nodeport_answers_on_loopback(programmed: Lab) -> None:
    # iptables mode's localhost NodePorts (IPv4): route_localnet=1 lets 127.0.0.1 be DNATed.
    lab = programmed
    assert run(["sysctl", "-n", ROUTE_LOCALNET.replace("/", ".")], netns=lab.node_ns).stdout.strip() == "1"
    assert set(spread(lab.node_ns, "127.0.0.1", 30080, 4)) == {"c"}


def test_the_layout_is_upstreams(programmed: Lab) -> None:
    # What `iptables-save -t nat` shows an operator: upstream's chain names and comments.
    lab = programmed
    text = "".join(run([f"iptables-{m.value}-save", "-t", "nat"], netns=lab.node_ns).stdout for m in IPT_MODES)
    assert '-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "ns1/svc1:http cluster IP"' in text
    assert "-m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-" in text
    assert "-j DNAT --to-destination 10.244.1.2:8080" in text


# --- option variants and partial syncs: each test programs, probes, and cleans up ---------------


@pytest.fixture(scope="module")
def bare_lab() -> Iterator[Lab]:
    with flow_lab(f"ipo{os.getpid() % 100000}") as built:
        yield built


@pytest.mark.parametrize("mode", IPT_MODES[:1], ids=lambda m: m.value)
@pytest.mark.parametrize("flow", [f for f in ALL_OPTION_FLOWS if f.lab], ids=lambda f: f.id)
def test_option_flows_with_real_packets(bare_lab: Lab, mode: IptablesMode, flow: Flow) -> None:
    backend = IptablesBackend(
        IptablesCli(mode, netns=bare_lab.node_ns),
        variant_options(flow.variant, flow.family, IptOptions),
        interface_addresses=LocalAddresses(netns=bare_lab.node_ns),
    )
    try:
        backend.sync(state_with(*variant_objects(flow.variant, flow.family)), set(), full=True)
        check_flow(bare_lab, flow, "iptables")
    finally:
        backend.cleanup()


@pytest.mark.parametrize("mode", IPT_MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("family", FAMILIES, ids=["ipv4", "ipv6"])
def test_partial_syncs_follow_endpoints(bare_lab: Lab, mode: IptablesMode, family: IPFamily) -> None:
    backend = IptablesBackend(IptablesCli(mode, netns=bare_lab.node_ns), options(family))
    st = state_with(*objects_for(family))
    client, cip = bare_lab.pods["client"].netns, addr("10.96.0.10", family)
    try:
        backend.sync(st, set(), full=True)
        assert set(spread(client, cip, 80, PROBES)) == {"a", "b"}
        one = to_family(
            endpoint_slice("svc1-x", "svc1", ["10.244.1.3"], ports=[{"name": "http", "port": 8080}]), family
        )
        st.on_endpoint_slice(("ns1", "svc1-x"), one)  # type: ignore[arg-type]
        assert not backend.sync(st, st.commit().changed, full=False).full
        assert set(spread(client, cip, 80, PROBES)) == {"b"}
        st.on_endpoint_slice(("ns1", "svc1-x"), None)
        backend.sync(st, st.commit().changed, full=False)
        assert tcp_probe(client, cip, 80, timeout=2.5).outcome is Outcome.REFUSED
        # Deleted Service: its chains go, in the same restore.
        st.on_service(NamespacedName("ns1", "svc1"), None)
        backend.sync(st, st.commit().changed, full=False)
        save = run([f"ip{'6' if family is IPFamily.V6 else ''}tables-{mode.value}-save"], netns=bare_lab.node_ns)
        assert "ns1/svc1:" not in save.stdout
    finally:
        backend.cleanup()


@pytest.mark.parametrize("mode", IPT_MODES, ids=lambda m: m.value)
def test_session_affinity_sticks(bare_lab: Lab, mode: IptablesMode) -> None:
    backend = IptablesBackend(IptablesCli(mode, netns=bare_lab.node_ns), options(IPFamily.V4))
    st = state_with(
        node(),
        service("aff", "10.96.0.91", ports=[{"name": "http", "port": 80}], sessionAffinity="ClientIP",
                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}}),
        endpoint_slice("aff-x", "aff", ["10.244.1.2", "10.244.1.3"], ports=[{"name": "http", "port": 8080}]),
    )  # fmt: skip
    try:
        backend.sync(st, set(), full=True)
        answers = spread(bare_lab.pods["client"].netns, "10.96.0.91", 80, PROBES)
        assert len(set(answers)) == 1, answers  # P(24 random picks all equal) = 2**-23
    finally:
        backend.cleanup()


@pytest.mark.parametrize("mode", IPT_MODES, ids=lambda m: m.value)
def test_restart_converges_and_cleanup_leaves_nothing(bare_lab: Lab, mode: IptablesMode) -> None:
    ipt = IptablesCli(mode, netns=bare_lab.node_ns)
    st = state_with(*objects_for(IPFamily.V4))
    client = bare_lab.pods["client"].netns
    first = IptablesBackend(ipt, options(IPFamily.V4))
    try:
        first.sync(st, set(), full=True)
        before = ipt.chains(IPFamily.V4, "filter")
        # A new process: the first full sync adds no second copy of the jump rules.
        IptablesBackend(ipt, options(IPFamily.V4)).sync(st, set(), full=True)
        assert ipt.chains(IPFamily.V4, "filter")["FORWARD"] == before["FORWARD"]
        assert set(spread(client, "10.96.0.10", 80, PROBES)) == {"a", "b"}
    finally:
        first.cleanup()
    shared = {"KUBE-FIREWALL", "KUBE-MARK-MASQ"}  # kubelet's too: never deleted (as upstream)
    for table in ("filter", "nat", "mangle"):
        chains = ipt.chains(IPFamily.V4, table)
        assert all(not c.startswith("KUBE-") or c in shared for c in chains), table
        assert all(not rules for c, rules in chains.items() if c not in shared and c not in ("INPUT", "OUTPUT")), table
    assert tcp_probe(client, "10.96.0.10", 80, timeout=0.5).outcome is not Outcome.OK


# --- the daemon: iptables mode end to end, and switching modes both ways -----------------------

WEB = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns1}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: ns1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.1.2]
  nodeName: node1
"""


def _iptables_chains(lab: Lab) -> str:
    """Our iptables layout in the node, minus the chains shared with kubelet (never deleted)."""
    text = "".join(run([f"iptables-{m.value}-save"], netns=lab.node_ns).stdout for m in IPT_MODES)
    return "\n".join(line for line in text.splitlines() if "KUBE-FIREWALL" not in line and "KUBE-MARK-MASQ" not in line)


def _nft_tables(lab: Lab) -> str:
    return run(["nft", "list", "tables"], netns=lab.node_ns).stdout


def test_daemon_switches_modes_and_removes_the_other_modes_rules(bare_lab: Lab, tmp_path: Path) -> None:
    lab = bare_lab
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "web.yaml").write_text(WEB)
    client = lab.pods["client"].netns

    def start(mode: str, n: int) -> subprocess.Popen[str]:
        return lab.spawn(
            lab.node_ns,
            [sys.executable, "-m", "kubeproxy", f"--proxy-mode={mode}", f"--manifests={manifests}",
             "--hostname-override=node1", f"--cluster-cidr={CLUSTER_CIDR}", "--v=2",
             "--iptables-min-sync-period=100ms", "--iptables-sync-period=1s"],
            log_path=str(tmp_path / f"{n}-{mode}.log"),
        )  # fmt: skip

    def stop(proc: subprocess.Popen[str]) -> None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0

    proc: subprocess.Popen[str] | None = None
    try:
        proc = start("iptables", 1)
        assert wait_until(lambda: set(spread(client, "10.96.0.10", 80, 4, timeout=0.3)) == {"a"})
        assert "KUBE-SVC-" in _iptables_chains(lab) and "kube-proxy" not in _nft_tables(lab)
        # Someone flushes our chains: the canary notices within a syncPeriod, a full sync rebuilds them.
        run(["iptables", "-t", "mangle", "-X", "KUBE-PROXY-CANARY"], netns=lab.node_ns)
        run(["iptables", "-t", "nat", "-F", "KUBE-SERVICES"], netns=lab.node_ns)
        assert wait_until(lambda: set(spread(client, "10.96.0.10", 80, 4, timeout=0.3)) == {"a"})
        stop(proc)
        # iptables -> nftables: after its first sync, the iptables layout is gone.
        proc = start("nftables", 2)
        assert wait_until(lambda: "KUBE-" not in _iptables_chains(lab))
        assert "table ip kube-proxy" in _nft_tables(lab)
        assert set(spread(client, "10.96.0.10", 80, 4)) == {"a"}
        stop(proc)
        # nftables -> iptables: our nftables tables go.
        proc = start("iptables", 3)
        assert wait_until(lambda: "kube-proxy" not in _nft_tables(lab))
        assert set(spread(client, "10.96.0.10", 80, 4)) == {"a"}
        stop(proc)
        # --cleanup removes every mode's rules.
        subprocess.run(
            ["ip", "netns", "exec", lab.node_ns, sys.executable, "-m", "kubeproxy", "--cleanup"], check=True, timeout=30
        )
        assert "KUBE-" not in _iptables_chains(lab) and "kube-proxy" not in _nft_tables(lab)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        for mode in IPT_MODES:
            IptablesBackend(IptablesCli(mode, netns=lab.node_ns), options(IPFamily.V4)).cleanup()
        run(["nft", "flush", "ruleset"], netns=lab.node_ns)
