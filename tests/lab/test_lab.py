"""Real-kernel tests of the network-namespace lab: namespaces, routed pods, probes and teardown.

Every test builds its own lab (unique tag) and checks behaviour with real packets; nothing here
touches the host's namespace, and the host-untouched test proves it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeproxy.lab.cluster import STATE_DIR, Lab, sweep_stale_labs
from kubeproxy.lab.netns import LabError, lab_unavailable_reason, netns_exists, run
from kubeproxy.lab.probe import Outcome, spread, tcp_probe, udp_probe

_REASON = lab_unavailable_reason()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

PODSERVER = [sys.executable, "-m", "kubeproxy.lab.podserver"]
NOT_ANSWERED = {Outcome.UNREACHABLE, Outcome.TIMEOUT}


def netns_names() -> set[str]:
    return {line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()}


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as built:
        yield built


def test_pods_answer_tcp_and_udp_with_their_names(lab: Lab) -> None:
    a = lab.add_pod("pod-a", "10.244.1.2", tcp_ports=(80,), udp_ports=(53,))
    b = lab.add_pod("pod-b", "10.244.1.3", tcp_ports=(80,), udp_ports=(53,))
    node_side = {lab.gateway_ip, lab.node_ip}
    for pod in (a, b):
        for probe in (tcp_probe, udp_probe):
            port = 80 if probe is tcp_probe else 53
            result = probe(lab.node_ns, pod.ip, port)
            assert result.outcome is Outcome.OK, result
            assert result.answer == pod.name
            assert result.seen_client_ip in node_side


def test_pod_to_pod_traffic_is_routed_through_the_node(lab: Lab) -> None:
    a = lab.add_pod("pod-a", "10.244.1.2")
    b = lab.add_pod("pod-b", "10.244.1.3")
    result = tcp_probe(a.netns, b.ip, 80)
    assert (result.outcome, result.answer, result.seen_client_ip) == (Outcome.OK, "pod-b", a.ip)
    # Point-to-point like Calico: the pod has no on-link route for the pod CIDR, only the gateway.
    routes = lab.exec(a.netns, ["ip", "route"]).stdout
    assert f"default via {lab.gateway_ip} dev eth0" in routes
    assert "10.244.1.0/24" not in routes


def test_client_reaches_node_ip_but_not_pod_ips(lab: Lab) -> None:
    pod = lab.add_pod("pod-a", "10.244.1.2")
    server = lab.spawn(
        lab.node_ns, [*PODSERVER, "--name", "nodesrv", "--tcp", "8080", "--udp", "8053"], ready_line="ready"
    )
    assert server.poll() is None
    tcp = tcp_probe(lab.client_ns, lab.node_ip, 8080)
    assert (tcp.outcome, tcp.answer, tcp.seen_client_ip) == (Outcome.OK, "nodesrv", lab.client_ip)
    udp = udp_probe(lab.client_ns, lab.node_ip, 8053)
    assert (udp.outcome, udp.answer, udp.seen_client_ip) == (Outcome.OK, "nodesrv", lab.client_ip)
    assert tcp_probe(lab.client_ns, pod.ip, 80, timeout=0.5).outcome in NOT_ANSWERED


def test_closed_port_on_pod_is_refused(lab: Lab) -> None:
    pod = lab.add_pod("pod-a", "10.244.1.2", tcp_ports=(80,), udp_ports=(53,))
    assert tcp_probe(lab.node_ns, pod.ip, 81).outcome is Outcome.REFUSED
    assert udp_probe(lab.node_ns, pod.ip, 54).outcome is Outcome.REFUSED


def test_source_ip_is_honoured(lab: Lab) -> None:
    pod = lab.add_pod("pod-a", "10.244.1.2")
    result = tcp_probe(lab.node_ns, pod.ip, 80, source_ip=lab.node_ip)
    assert (result.outcome, result.seen_client_ip) == (Outcome.OK, lab.node_ip)


def test_spread_counts_answers_and_failures(lab: Lab) -> None:
    pod = lab.add_pod("pod-a", "10.244.1.2", udp_ports=(53,))
    assert spread(lab.node_ns, pod.ip, 80, 10) == Counter({"pod-a": 10})
    assert spread(lab.node_ns, pod.ip, 53, 5, protocol="udp") == Counter({"pod-a": 5})
    assert spread(lab.node_ns, pod.ip, 81, 3) == Counter({"REFUSED": 3})
    assert spread(lab.client_ns, pod.ip, 80, 2, timeout=0.3) == Counter({"UNREACHABLE": 2})


def test_remove_pod_makes_it_unreachable(lab: Lab) -> None:
    pod = lab.add_pod("pod-a", "10.244.1.2")
    process = pod.process
    assert process is not None
    assert tcp_probe(lab.node_ns, pod.ip, 80).outcome is Outcome.OK
    lab.remove_pod("pod-a")
    assert "pod-a" not in lab.pods
    assert process.poll() is not None
    assert not netns_exists(pod.netns)
    assert tcp_probe(lab.node_ns, pod.ip, 80, timeout=0.5).outcome in NOT_ANSWERED
    with pytest.raises(LabError):
        lab.remove_pod("pod-a")
    # The name and the address can be used again.
    again = lab.add_pod("pod-a", "10.244.1.2")
    assert tcp_probe(lab.node_ns, again.ip, 80).answer == "pod-a"


def test_names_are_unique_and_short(lab: Lab) -> None:
    long_name = "a-very-long-pod-name-that-goes-on-and-on"
    p1 = lab.add_pod(long_name, "10.244.1.2")
    p2 = lab.add_pod(long_name + "-2", "10.244.1.3")
    p3 = lab.add_pod("Odd_Name.x", "10.244.1.4")
    assert len({p.netns for p in (p1, p2, p3)}) == 3
    assert len({p.host_veth for p in (p1, p2, p3)}) == 3
    for pod in (p1, p2, p3):
        assert len(pod.netns) <= 40
        assert len(pod.host_veth) <= 15
        assert pod.netns.startswith(f"kpl-{lab.tag}-pod-")
        assert tcp_probe(lab.node_ns, pod.ip, 80).answer == pod.name


def test_bad_pod_requests_are_refused(lab: Lab) -> None:
    lab.add_pod("pod-a", "10.244.1.2")
    for name, ip in [("pod-a", "10.244.1.9"), ("pod-b", "10.244.1.2"), ("pod-c", "10.244.2.5"),
                     ("pod-d", lab.gateway_ip), ("pod e", "10.244.1.7"), ("pod-f", "not-an-ip")]:  # fmt: skip
        with pytest.raises(LabError):
            lab.add_pod(name, ip)
    with pytest.raises(LabError, match="ipv6"):
        lab.add_pod("pod-g", "10.244.1.8", ip6="fd00:10:244::1:8")
    with pytest.raises(LabError, match="not a namespace of this lab"):
        lab.exec("kpscratch-not-ours", ["true"])
    # Failed requests leave nothing behind.
    assert set(lab.pods) == {"pod-a"}
    assert {ns for ns in netns_names() if ns.startswith(f"kpl-{lab.tag}-")} == set(lab.namespaces)


def test_sysctls_are_set_inside_the_lab_only(lab: Lab) -> None:
    def read(netns: str | None) -> str:
        return run(["cat", "/proc/sys/net/ipv4/ip_forward"], netns=netns).stdout.strip()

    assert read(lab.node_ns) == "1"
    assert read(lab.client_ns) == "0"


def _host_view() -> dict[str, Any]:
    """Links, addresses, routes and forwarding of the host namespace (the lab must not change them)."""

    def ip_json(*args: str) -> Any:
        return json.loads(run(["ip", "-j", *args]).stdout or "[]")

    return {
        "links": sorted(link["ifname"] for link in ip_json("link", "show")),
        "addrs": sorted(
            (a["ifname"], info["local"], info["prefixlen"])
            for a in ip_json("addr", "show")
            for info in a.get("addr_info", [])
        ),
        "routes4": sorted((r.get("dst"), r.get("dev"), r.get("gateway")) for r in ip_json("-4", "route")),
        "routes6": sorted((r.get("dst"), r.get("dev"), r.get("gateway")) for r in ip_json("-6", "route")),
        "forward4": Path("/proc/sys/net/ipv4/ip_forward").read_text(),
    }


def test_host_namespace_is_untouched() -> None:
    before = _host_view()
    with Lab(ipv6=True) as lab:
        lab.add_pod("pod-a", "10.244.1.2", ip6="fd00:10:244::1:2")
        lab.add_pod("pod-b", "10.244.1.3", ip6="fd00:10:244::1:3")
        assert _host_view() == before
    assert _host_view() == before


def test_ipv6_pods_answer(tmp_path: Path) -> None:
    with Lab(ipv6=True) as lab:
        assert lab.gateway_ip6 == "fd00:10:244::1:1"
        a = lab.add_pod("pod-a", "10.244.1.2", udp_ports=(53,), ip6="fd00:10:244::1:2")
        b = lab.add_pod("pod-b", "10.244.1.3", udp_ports=(53,), ip6="fd00:10:244::1:3")
        assert a.ip6 is not None
        assert b.ip6 is not None
        node_side = {lab.gateway_ip6, lab.node_ip6}
        for pod in (a, b):
            assert pod.ip6 is not None
            tcp = tcp_probe(lab.node_ns, pod.ip6, 80)
            assert (tcp.outcome, tcp.answer) == (Outcome.OK, pod.name), tcp
            assert tcp.seen_client_ip in node_side
            udp = udp_probe(lab.node_ns, pod.ip6, 53)
            assert (udp.outcome, udp.answer) == (Outcome.OK, pod.name), udp
        assert tcp_probe(a.netns, b.ip6, 80).seen_client_ip == a.ip6
        assert spread(lab.node_ns, a.ip6, 80, 4) == Counter({"pod-a": 4})
        assert tcp_probe(lab.node_ns, a.ip6, 81).outcome is Outcome.REFUSED
        assert udp_probe(lab.node_ns, a.ip6, 54).outcome is Outcome.REFUSED
        lab.spawn(lab.node_ns, [*PODSERVER, "--name", "nodesrv", "--tcp", "8080"], ready_line="ready")
        assert lab.node_ip6 is not None
        tcp = tcp_probe(lab.client_ns, lab.node_ip6, 8080)
        assert (tcp.outcome, tcp.answer, tcp.seen_client_ip) == (Outcome.OK, "nodesrv", lab.client_ip6)
        assert tcp_probe(lab.client_ns, a.ip6, 80, timeout=0.5).outcome in NOT_ANSWERED


def test_teardown_removes_namespaces_processes_and_pidfile() -> None:
    with Lab() as lab:
        pod = lab.add_pod("pod-a", "10.244.1.2")
        names = set(lab.namespaces)
        assert names == {lab.node_ns, lab.client_ns, pod.netns}
        assert names <= netns_names()
        assert (STATE_DIR / f"{lab.tag}.pid").exists()
    assert not names & netns_names()
    assert pod.process is not None
    assert pod.process.poll() is not None
    assert not (STATE_DIR / f"{lab.tag}.pid").exists()
    lab.teardown()  # idempotent


def test_teardown_runs_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab() as lab:
        lab.add_pod("pod-a", "10.244.1.2")
        names = set(lab.namespaces)
        raise RuntimeError("boom")
    assert not names & netns_names()


def test_teardown_kills_a_process_that_ignores_sigterm(lab: Lab) -> None:
    stubborn = lab.spawn(lab.node_ns, ["sh", "-c", "trap '' TERM; echo ready; exec sleep 60"], ready_line="ready")
    lab.teardown()
    assert stubborn.returncode == -signal.SIGKILL


def test_a_failed_spawn_reports_the_log(lab: Lab) -> None:
    with pytest.raises(LabError, match="no-such-option"):
        lab.spawn(lab.node_ns, [*PODSERVER, "--name", "x", "--no-such-option"], ready_line="ready")


_CHILD = textwrap.dedent(
    """
    import sys, time
    from kubeproxy.lab.cluster import Lab
    with Lab() as lab:
        pod = lab.add_pod("pod-a", "10.244.1.2")
        print(pod.process.pid, *lab.namespaces, flush=True)
        time.sleep(60)
    """
)


def _start_child() -> tuple[subprocess.Popen[str], int, set[str]]:
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    words = child.stdout.readline().split()
    assert words, "child lab did not start"
    return child, int(words[0]), set(words[1:])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


def test_sigterm_to_the_creator_cleans_up() -> None:
    child, server_pid, names = _start_child()
    assert names <= netns_names()
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
    assert not names & netns_names()
    assert _gone(server_pid)


def test_sweep_removes_the_leftovers_of_a_killed_creator() -> None:
    child, server_pid, names = _start_child()
    child.kill()  # SIGKILL: no cleanup can run in the child
    child.wait(timeout=30)
    assert names <= netns_names()
    with Lab() as live:
        removed = sweep_stale_labs()
        assert names <= set(removed)
        assert not set(live.namespaces) & set(removed)
        assert set(live.namespaces) <= netns_names()
    assert not names & netns_names()
    deadline = time.monotonic() + 5
    while not _gone(server_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(server_pid)  # the orphaned podserver was killed with its namespace


def test_a_live_tag_cannot_be_reused_but_a_stale_one_can() -> None:
    with Lab() as first:
        with pytest.raises(LabError, match="in use"), Lab(tag=first.tag):
            pass
        assert set(first.namespaces) <= netns_names()  # the refused lab removed nothing of ours
        tag = first.tag
    # Fake a crash: a namespace of the tag and a pid file of a dead process.
    run(["ip", "netns", "add", f"kpl-{tag}-node"])
    (STATE_DIR / f"{tag}.pid").write_text("999999999 0\n")
    with Lab(tag=tag) as second:
        assert second.add_pod("pod-a", "10.244.1.2").process is not None
    assert not {n for n in netns_names() if n.startswith(f"kpl-{tag}-")}
