"""UDP conntrack cleanup and conntrack sysctls, without a kernel: the planner against tables of flows,
the parser against real ``conntrack -L`` output, the CLI adapter against a stand-in binary, the
daemon hook with fake kernels, and upstream's sysctl rules against a fake /proc/sys."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest

from builders import UDP_SERVICE, UDP_SLICE, endpoint_slice, node, service, state_with
from kubeproxy import daemon
from kubeproxy.backends.conntrack import ConntrackReconciler, UdpServiceIndex, stale_flows
from kubeproxy.config import ConntrackConfig, ProxyConfig
from kubeproxy.kernel.conntrack import ConntrackCli, ConntrackError, FakeConntrack, Flow, parse_flow, parse_flows
from kubeproxy.kernel.nft import FakeNft, NftCli
from kubeproxy.kernel.sysctl import (
    CONNTRACK_MAX,
    HASHSIZE,
    FakeSysctl,
    ProcSysctl,
    SysctlError,
    apply_conntrack_sysctls,
    desired_conntrack_sysctls,
)
from kubeproxy.model import objects
from kubeproxy.model.service import IPFamily, NamespacedName
from kubeproxy.state.snapshot import ProxyState, UpdateResult
from waiting import eventually

V4, V6 = IPFamily.V4, IPFamily.V6
CLIENT = "10.244.1.100"
OUTSIDE = "203.0.113.10"
NODE_IP = "192.168.50.1"
DNS = [{"name": "dns", "port": 53, "protocol": "UDP"}]
DNS_SLICE = [{"name": "dns", "port": 8080, "protocol": "UDP"}]


def flow(dst: str, dport: int, reply_src: str, *, src: str = CLIENT, protocol: str = "udp", sport: int = 40000) -> Flow:
    """A flow from ``src`` to ``dst:dport`` that ``reply_src`` answers (reply port 8080 when DNATed)."""
    reply_sport = dport if reply_src == dst else 8080
    return Flow(protocol, src, dst, sport, dport, reply_src, src, reply_sport, sport)


def lb(name: str, cluster_ip: str, lb_ip: str) -> objects.Service:
    obj = objects.from_builtins(
        "Service",
        {
            "metadata": {"name": name, "namespace": "ns1"},
            "spec": {"type": "LoadBalancer", "clusterIP": cluster_ip, "ports": [{**DNS[0], "nodePort": 30054}]},
            "status": {"loadBalancer": {"ingress": [{"ip": lb_ip}]}},
        },
    )
    assert isinstance(obj, objects.Service)
    return obj


def cluster() -> ProxyState:
    """UDP Services of every kind, one TCP Service, an IPv6 Service; endpoints in every condition."""
    return state_with(
        node(),
        # ClusterIP + ExternalIP, UDP and TCP on port 53 (like DNS): endpoints .2 serving, .5 not serving.
        service(
            "dns",
            "10.96.0.53",
            ports=[DNS[0], {"name": "dns-tcp", "port": 53, "protocol": "TCP"}],
            externalIPs=["198.51.100.53"],
        ),
        endpoint_slice(
            "dns-x",
            "dns",
            ["10.244.1.2"],
            ports=[DNS_SLICE[0], {"name": "dns-tcp", "port": 8080, "protocol": "TCP"}],
        ),
        endpoint_slice("dns-y", "dns", ["10.244.1.5"], ports=DNS_SLICE, conditions={"ready": False, "serving": False}),
        # Terminating but still serving: its flows live on (termination is ignored, as upstream).
        service("drain", "10.96.0.54", ports=DNS),
        endpoint_slice(
            "drain-x",
            "drain",
            ["10.244.1.6"],
            ports=DNS_SLICE,
            conditions={"ready": False, "serving": True, "terminating": True},
        ),
        # NodePort: endpoint .3; internalTrafficPolicy Local with the endpoint on another node
        # (traffic policy is ignored too).
        service(
            "np", "10.96.0.55", type="NodePort", ports=[{**DNS[0], "nodePort": 30053}], internalTrafficPolicy="Local"
        ),
        endpoint_slice("np-x", "np", ["10.244.1.3"], ports=DNS_SLICE, node="node2"),
        # LoadBalancer: endpoint .4.
        lb("lb", "10.96.0.56", "198.51.100.56"),
        endpoint_slice("lb-x", "lb", ["10.244.1.4"], ports=DNS_SLICE),
        # Another UDP Service whose endpoint is .9 -- the address that is stale for "dns".
        service("other", "10.96.0.60", ports=DNS),
        endpoint_slice("other-x", "other", ["10.244.1.9"], ports=DNS_SLICE),
        # No endpoints at all.
        service("empty", "10.96.0.57", ports=DNS),
        # TCP only.
        service("web", "10.96.0.10", ports=[{"name": "http", "port": 80}]),
        endpoint_slice("web-x", "web", ["10.244.1.2"], ports=[{"name": "http", "port": 8080}]),
        # IPv6.
        service("dns6", "fd00:10:96::35", ports=DNS),
        endpoint_slice("dns6-x", "dns6", ["fd00:10:244::1:2"], ports=DNS_SLICE, address_type="IPv6"),
    )


# (flow, deleted?) rows; the id says why.
V4_ROWS: list[tuple[str, Flow, bool]] = [
    ("clusterip-serving-endpoint-kept", flow("10.96.0.53", 53, "10.244.1.2"), False),
    ("clusterip-removed-endpoint-deleted", flow("10.96.0.53", 53, "10.244.1.9"), True),
    ("clusterip-not-serving-endpoint-deleted", flow("10.96.0.53", 53, "10.244.1.5"), True),
    ("clusterip-never-dnated-deleted", flow("10.96.0.53", 53, "10.96.0.53"), True),
    ("clusterip-other-port-kept", flow("10.96.0.53", 54, "10.244.1.9"), False),
    ("clusterip-tcp-kept", flow("10.96.0.53", 53, "10.244.1.9", protocol="tcp"), False),
    ("externalip-serving-kept", flow("198.51.100.53", 53, "10.244.1.2", src=OUTSIDE), False),
    ("externalip-stale-deleted", flow("198.51.100.53", 53, "10.244.1.9", src=OUTSIDE), True),
    ("terminating-but-serving-kept", flow("10.96.0.54", 53, "10.244.1.6"), False),
    ("terminating-service-stale-deleted", flow("10.96.0.54", 53, "10.244.1.2"), True),
    ("nodeport-serving-kept", flow(NODE_IP, 30053, "10.244.1.3", src=OUTSIDE), False),
    ("nodeport-stale-deleted", flow(NODE_IP, 30053, "10.244.1.2", src=OUTSIDE), True),
    ("nodeport-never-dnated-deleted", flow(NODE_IP, 30053, NODE_IP, src=OUTSIDE), True),
    ("nodeport-port-to-remote-address-kept", flow("8.8.8.8", 30053, "8.8.8.8"), False),
    ("policy-local-clusterip-remote-endpoint-kept", flow("10.96.0.55", 53, "10.244.1.3"), False),
    ("lb-ip-serving-kept", flow("198.51.100.56", 53, "10.244.1.4", src=OUTSIDE), False),
    ("lb-ip-stale-deleted", flow("198.51.100.56", 53, "10.244.1.2", src=OUTSIDE), True),
    ("lb-nodeport-stale-deleted", flow(NODE_IP, 30054, "10.244.1.2", src=OUTSIDE), True),
    ("other-service-own-endpoint-kept", flow("10.96.0.60", 53, "10.244.1.9"), False),
    ("no-endpoints-dnated-deleted", flow("10.96.0.57", 53, "10.244.1.9"), True),
    ("tcp-service-kept", flow("10.96.0.10", 80, "10.244.1.7", protocol="tcp"), False),
    ("not-a-service-kept", flow("10.0.0.1", 53, "10.0.0.1"), False),
]

V6_ROWS: list[tuple[str, Flow, bool]] = [
    ("v6-serving-kept", flow("fd00:10:96::35", 53, "fd00:10:244::1:2", src="fd00:10:244::1:64"), False),
    ("v6-stale-deleted", flow("fd00:10:96::35", 53, "fd00:10:244::1:9", src="fd00:10:244::1:64"), True),
    ("v6-never-dnated-deleted", flow("fd00:10:96::35", 53, "fd00:10:96::35", src="fd00:10:244::1:64"), True),
    ("v6-tcp-kept", flow("fd00:10:96::35", 53, "fd00:10:244::1:9", src="fd00:10:244::1:64", protocol="tcp"), False),
    # The IPv4-only NodePort 30053 is no NodePort in IPv6.
    ("v6-ipv4-only-nodeport-kept", flow("fd00:50::1", 30053, "fd00:10:244::1:9", src="fd00:203:0:113::10"), False),
]


@pytest.mark.parametrize(("name", "row", "deleted"), V4_ROWS + V6_ROWS, ids=[r[0] for r in V4_ROWS + V6_ROWS])
def test_planner_row(name: str, row: Flow, deleted: bool) -> None:
    st = cluster()
    stale = stale_flows(st, row.family, [row], local_addresses={NODE_IP, "fd00:50::1"})
    assert (stale == [row]) is deleted, name


def test_planner_whole_table_and_family_separation() -> None:
    st = cluster()
    table = [r[1] for r in V4_ROWS + V6_ROWS]
    expected4 = [r[1] for r in V4_ROWS if r[2]]
    expected6 = [r[1] for r in V6_ROWS if r[2]]
    assert stale_flows(st, V4, table, local_addresses={NODE_IP}) == expected4
    assert stale_flows(st, V6, table, local_addresses={"fd00:50::1"}) == expected6


def test_index_is_empty_without_udp_services_of_the_family() -> None:
    st = state_with(node(), service("web", "10.96.0.10"), service("dns6", "fd00:10:96::35", ports=DNS))
    assert UdpServiceIndex.build(st, V4).empty
    assert not UdpServiceIndex.build(st, V6).empty


def test_shared_external_ip_keeps_flows_of_both_services() -> None:
    st = state_with(
        service("a", "10.96.0.1", ports=DNS, externalIPs=["198.51.100.9"]),
        endpoint_slice("a-x", "a", ["10.244.1.2"], ports=DNS_SLICE),
        service("b", "10.96.0.2", ports=DNS, externalIPs=["198.51.100.9"]),
        endpoint_slice("b-x", "b", ["10.244.1.3"], ports=DNS_SLICE),
    )
    flows = [flow("198.51.100.9", 53, ip) for ip in ("10.244.1.2", "10.244.1.3", "10.244.1.4")]
    assert stale_flows(st, V4, flows, local_addresses=()) == [flows[2]]


# --- parsing real conntrack -L output (conntrack-tools 1.4.7, kernel 6.18, accounting on) ----------

LIST_V4 = """\
tcp      6 119 ESTABLISHED src=10.244.1.100 dst=10.96.0.10 sport=41000 dport=80 packets=0 bytes=0 [UNREPLIED] src=10.244.1.3 dst=10.244.1.100 sport=8080 dport=41000 packets=0 bytes=0 mark=16384 use=1
udp      17 119 src=10.244.1.101 dst=10.96.0.53 sport=40001 dport=53 packets=0 bytes=0 [UNREPLIED] src=10.96.0.53 dst=10.244.1.101 sport=53 dport=40001 packets=0 bytes=0 mark=0 zone=7 use=1
udp      17 119 src=10.244.1.100 dst=10.96.0.53 sport=40000 dport=53 packets=0 bytes=0 src=10.244.1.2 dst=10.244.1.100 sport=8080 dport=40000 packets=0 bytes=0 [ASSURED] mark=0 use=1
udp      17 119 src=203.0.113.10 dst=192.168.50.1 sport=5000 dport=30053 [UNREPLIED] src=10.244.1.2 dst=192.168.50.1 sport=8080 dport=61234 mark=0 use=1 id=2061416738
icmp     1 29 src=10.244.1.100 dst=10.96.0.10 type=8 code=0 id=7 src=10.244.1.3 dst=10.244.1.100 type=0 code=0 id=7 mark=0 use=1
"""  # noqa: E501

LIST_V6 = """\
udp      17 119 src=fd00:10:244::1:64 dst=fd00:10:96::35 sport=40000 dport=53 packets=0 bytes=0 [UNREPLIED] src=fd00:10:244::1:2 dst=fd00:10:244::1:64 sport=8080 dport=40000 packets=0 bytes=0 mark=0 use=1
"""  # noqa: E501

LIST_EXTENDED = """\
ipv6     10 udp      17 119 src=fd00:10:244::1:64 dst=fd00:10:96::35 sport=40000 dport=53 [UNREPLIED] src=fd00:10:244::1:2 dst=fd00:10:244::1:64 sport=8080 dport=40000 mark=0 use=1
ipv4     2 udp      17 119 src=10.244.1.100 dst=10.96.0.53 sport=40000 dport=53 src=10.244.1.2 dst=10.244.1.100 sport=8080 dport=40000 [ASSURED] mark=0 use=1
"""  # noqa: E501


def test_parse_real_ipv4_listing() -> None:
    flows = parse_flows(LIST_V4)
    assert [f.protocol for f in flows] == ["tcp", "udp", "udp", "udp", "icmp"]
    assert flows[1] == Flow("udp", "10.244.1.101", "10.96.0.53", 40001, 53, "10.96.0.53", "10.244.1.101", 53, 40001)
    assert flows[2] == Flow("udp", CLIENT, "10.96.0.53", 40000, 53, "10.244.1.2", CLIENT, 8080, 40000)
    assert flows[3] == Flow("udp", OUTSIDE, NODE_IP, 5000, 30053, "10.244.1.2", NODE_IP, 8080, 61234)
    assert (flows[4].orig_dport, flows[4].reply_src) == (0, "10.244.1.3")  # no ports: 0
    assert all(f.family is V4 for f in flows)


def test_parse_real_ipv6_listing_and_extended_format() -> None:
    (v6,) = parse_flows(LIST_V6)
    assert v6 == Flow(
        "udp", "fd00:10:244::1:64", "fd00:10:96::35", 40000, 53, "fd00:10:244::1:2", "fd00:10:244::1:64", 8080, 40000
    )
    assert v6.family is V6
    assert parse_flows(LIST_EXTENDED) == [v6, parse_flows(LIST_V4)[2]]


@pytest.mark.parametrize(
    "line",
    [
        "",
        "conntrack v1.4.7 (conntrack-tools): 5 flow entries have been shown.",
        "udp 17 119 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=2",  # no reply tuple
        "udp 17 119 src=10.0.0.999 dst=10.0.0.2 sport=1 dport=2 src=10.0.0.2 dst=10.0.0.1 sport=2 dport=1",
        "udp 17 119 src=10.0.0.1 dst=10.0.0.2 sport=x dport=2 src=10.0.0.2 dst=10.0.0.1 sport=2 dport=1",
    ],
)
def test_parse_skips_lines_that_are_not_entries(line: str) -> None:
    assert parse_flow(line) is None


def test_parse_normalizes_ipv6_spelling() -> None:
    line = "udp 17 1 src=FD00:10:244:0::1:64 dst=fd00:10:96:0:0:0:0:35 sport=1 dport=53 src=fd00:10:244::1:2 dst=fd00:10:244::1:64 sport=8080 dport=1"  # noqa: E501
    parsed = parse_flow(line)
    assert parsed is not None and (parsed.orig_src, parsed.orig_dst) == ("fd00:10:244::1:64", "fd00:10:96::35")


# --- the CLI adapter against a stand-in binary ------------------------------------------------------


def fake_binary(tmp_path: Path, *, version: str = "1.4.7", rc: int = 0, stdout: str = "", stderr: str = "") -> Path:
    """A ``conntrack`` stand-in that logs its argv and stdin, then answers as told."""
    script = tmp_path / "conntrack"
    (tmp_path / "out").write_text(stdout)
    (tmp_path / "err").write_text(stderr)
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {tmp_path}/argv\n'
        f'if [ "$1" = --version ]; then echo "conntrack v{version} (conntrack-tools)"; exit 0; fi\n'
        f'if [ "$1" = -R ]; then cat >> {tmp_path}/stdin; fi\n'
        f"cat {tmp_path}/out; cat {tmp_path}/err >&2; exit {rc}\n"
    )
    script.chmod(0o755)
    return script


def stale_pair() -> list[Flow]:
    # Two clients of one dead endpoint share a delete key; a v6 flow has its own.
    return [
        flow("10.96.0.53", 53, "10.244.1.9"),
        flow("10.96.0.53", 53, "10.244.1.9", src="10.244.1.101"),
        flow("fd00:10:96::35", 53, "fd00:10:244::1:9", src="fd00:10:244::1:64"),
    ]


def test_cli_lists_with_family_and_protocol(tmp_path: Path) -> None:
    cli = ConntrackCli(binary=str(fake_binary(tmp_path, stdout=LIST_V4)))
    flows = cli.list_flows(V4)
    assert (tmp_path / "argv").read_text() == "-L -f ipv4 -p udp\n"
    assert [f.protocol for f in flows] == ["udp", "udp", "udp"]  # the stand-in ignored -p; we did not


def test_cli_deletes_by_key_in_one_batch(tmp_path: Path) -> None:
    deleted_lines = LIST_V4.splitlines()[1] + "\n" + LIST_V4.splitlines()[2] + "\n"
    cli = ConntrackCli(binary=str(fake_binary(tmp_path, stdout=deleted_lines)))
    assert cli.delete(stale_pair()) == 2  # counted from the entries conntrack printed
    assert (tmp_path / "stdin").read_text() == (
        "-D -p udp --orig-dst 10.96.0.53 --orig-port-dst 53 --reply-src 10.244.1.9\n"
        "-D -p udp --orig-dst fd00:10:96::35 --orig-port-dst 53 --reply-src fd00:10:244::1:9\n"
    )
    assert cli.delete([]) == 0


def test_cli_without_batch_support_runs_one_filter_per_process(tmp_path: Path) -> None:
    nothing = "conntrack v1.4.5 (conntrack-tools): 0 flow entries have been deleted.\n"
    cli = ConntrackCli(binary=str(fake_binary(tmp_path, version="1.4.5", rc=1, stderr=nothing)))
    assert cli.delete(stale_pair()) == 0  # "nothing matched" is not an error
    assert (tmp_path / "argv").read_text().splitlines()[1:] == [
        "-D -p udp --orig-dst 10.96.0.53 --orig-port-dst 53 --reply-src 10.244.1.9",
        "-D -p udp --orig-dst fd00:10:96::35 --orig-port-dst 53 --reply-src fd00:10:244::1:9",
    ]


def test_cli_failures_are_conntrack_errors(tmp_path: Path) -> None:
    broken = ConntrackCli(binary=str(fake_binary(tmp_path, rc=1, stderr="Operation not permitted")))
    with pytest.raises(ConntrackError, match="Operation not permitted"):
        broken.list_flows(V6)
    with pytest.raises(ConntrackError, match="Operation not permitted"):
        broken.delete(stale_pair())
    with pytest.raises(ConntrackError, match="cannot run"):
        ConntrackCli(binary=str(tmp_path / "missing")).list_flows(V4)


def test_fake_deletes_by_key_like_the_kernel_adapter() -> None:
    live = flow("10.96.0.53", 53, "10.244.1.2")
    newer_stale = flow("10.96.0.53", 53, "10.244.1.9", src="10.244.1.102")  # opened after the listing
    ct = FakeConntrack([*stale_pair(), live, newer_stale])
    assert ct.delete(stale_pair()[:1]) == 3  # both clients of the dead endpoint, and the newer one
    assert ct.flows == [stale_pair()[2], live]


# --- the reconciler and the daemon hook ---------------------------------------------------------


def test_reconciler_runs_only_for_udp_changes_and_full_syncs() -> None:
    st = cluster()
    ct = FakeConntrack([r[1] for r in V4_ROWS + V6_ROWS])
    rec = ConntrackReconciler(ct)
    tcp_only = UpdateResult(changed=frozenset({NamespacedName("ns1", "web")}))
    asyncio.run(rec.after_sync(st, tcp_only, False))
    assert ct.lists == [] and len(ct.flows) == len(V4_ROWS + V6_ROWS)
    asyncio.run(rec.after_sync(st, UpdateResult(changed=frozenset(), udp_changed=True), False))
    assert ct.lists == [(V4, "udp"), (V6, "udp")]
    assert sorted(ct.flows) == sorted(r[1] for r in V4_ROWS + V6_ROWS if not r[2])
    assert rec.deleted_total == sum(r[2] for r in V4_ROWS + V6_ROWS)
    asyncio.run(rec.after_sync(st, tcp_only, True))  # a full sync always reconciles
    assert len(ct.lists) == 4 and rec.runs == 2


def test_reconciler_skips_families_without_udp_services_and_survives_failures() -> None:
    st = state_with(node(), service("dns", "10.96.0.53", ports=DNS))
    ct = FakeConntrack([flow("10.96.0.53", 53, "10.244.1.9")])
    ct.fail = ConntrackError("netlink: Operation not permitted")
    rec = ConntrackReconciler(ct)
    (result,) = rec.reconcile(st)  # IPv4 only: no IPv6 UDP Service, the IPv6 table is not read
    assert result.error is not None and rec.errors == 1 and ct.flows
    (result,) = rec.reconcile(st)
    assert result.error is None and result.deleted == 1 and ct.flows == []
    assert ct.lists == [(V4, "udp")]


def test_reconciler_counts_interface_addresses_as_local() -> None:
    st = state_with(
        service("np", "10.96.0.55", type="NodePort", ports=[{**DNS[0], "nodePort": 30053}]),
        endpoint_slice("np-x", "np", ["10.244.1.3"], ports=DNS_SLICE),
    )  # no Node object: only the interfaces say which addresses are local
    to_second_ip = flow("192.168.60.1", 30053, "10.244.1.2", src=OUTSIDE)
    ct = FakeConntrack([to_second_ip])
    ConntrackReconciler(ct).reconcile(st)
    assert ct.flows == [to_second_ip]
    ConntrackReconciler(ct, interface_addresses=lambda: ["127.0.0.1", "192.168.60.1"]).reconcile(st)
    assert ct.flows == []


def conntrack_sysctls(**over: str) -> FakeSysctl:
    values = {
        CONNTRACK_MAX: "262144",
        HASHSIZE: "65536",
        "net/netfilter/nf_conntrack_tcp_timeout_established": "432000",
        "net/netfilter/nf_conntrack_tcp_timeout_close_wait": "60",
        "net/netfilter/nf_conntrack_tcp_be_liberal": "0",
        "net/netfilter/nf_conntrack_udp_timeout": "30",
        "net/netfilter/nf_conntrack_udp_timeout_stream": "120",
    }
    return FakeSysctl(values={**values, **over})


def test_daemon_applies_sysctls_after_the_first_sync_and_cleans_conntrack_after_udp_syncs(tmp_path: Path) -> None:
    (tmp_path / "svc.yaml").write_text(UDP_SERVICE)
    (tmp_path / "slice.yaml").write_text(UDP_SLICE.replace("ADDR", "10.244.1.2"))
    cfg = ProxyConfig(manifests=tmp_path, hostname_override="node1", min_sync_period=0.01)
    to_a = flow("10.96.0.53", 53, "10.244.1.2")
    to_gone = flow("10.96.0.53", 53, "10.244.1.9", src="10.244.1.101")
    before_endpoints = flow("10.96.0.53", 53, "10.96.0.53", src="10.244.1.102")
    tcp = flow("10.96.0.53", 53, "10.244.1.9", protocol="tcp")
    ct = FakeConntrack([to_a, to_gone, before_endpoints, tcp])
    sysctl = conntrack_sysctls()
    nft = FakeNft()

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(cfg, nft=nft, conntrack=ct, sysctl=sysctl, stop=stop))
        await eventually(lambda: to_gone not in ct.flows)
        assert ct.flows == [to_a, tcp]
        assert sysctl.values["net/netfilter/nf_conntrack_tcp_timeout_established"] == "86400"
        # The endpoint moves: the flow to the old one goes, after the sync that programmed the new one.
        (tmp_path / "slice.yaml").write_text(UDP_SLICE.replace("ADDR", "10.244.1.3"))
        await eventually(lambda: to_a not in ct.flows)
        assert "10.244.1.3" in nft.dump() and ct.flows == [tcp]
        stop.set()
        assert await task == 0

    asyncio.run(scenario())


class OtherNamespaceNft(NftCli):
    """A real-class nft adapter aimed at another namespace (here backed by a fake kernel)."""

    def __init__(self, fake: FakeNft) -> None:
        super().__init__(netns="kpl-elsewhere")
        self.run, self.list_table, self.delete_table = fake.run, fake.list_table, fake.delete_table  # type: ignore[method-assign]


@pytest.mark.parametrize("how", ["injected", "patched-class", "injected-other-namespace"])
def test_daemon_with_a_fake_data_plane_never_builds_real_node_adapters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a real kernel adapter was built in a fake-kernel run")

    monkeypatch.setattr(daemon, "ConntrackCli", refuse)
    monkeypatch.setattr(daemon, "ProcSysctl", refuse)
    (tmp_path / "svc.yaml").write_text(UDP_SERVICE)
    cfg = ProxyConfig(manifests=tmp_path, hostname_override="node1", min_sync_period=0.01)
    nft = FakeNft()
    if how == "patched-class":  # as tests/test_daemon.py does: daemon.NftCli replaced by the fake
        monkeypatch.setattr(daemon, "NftCli", lambda: nft)

    async def scenario() -> None:
        stop = asyncio.Event()
        injected = {"injected": nft, "injected-other-namespace": OtherNamespaceNft(nft)}.get(how)
        task = asyncio.create_task(daemon.run(cfg, nft=injected, stop=stop))
        await eventually(lambda: "10.96.0.53" in nft.dump())
        stop.set()
        assert await task == 0

    asyncio.run(scenario())


def test_a_start_that_fails_before_the_first_sync_tunes_no_sysctls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubeproxy.cli import main

    node_sysctls = conntrack_sysctls()
    # The production path (no adapters injected), with the node adapters swapped for fakes.
    monkeypatch.setattr(daemon, "ProcSysctl", lambda: node_sysctls)
    monkeypatch.setattr(daemon, "ConntrackCli", FakeConntrack)
    assert main([f"--manifests={tmp_path / 'missing'}", "--hostname-override=node1"]) == 2
    assert node_sysctls.writes == []


def test_failed_cleanup_does_not_fail_the_sync(tmp_path: Path) -> None:
    (tmp_path / "svc.yaml").write_text(UDP_SERVICE)
    (tmp_path / "slice.yaml").write_text(UDP_SLICE.replace("ADDR", "10.244.1.2"))
    cfg = ProxyConfig(manifests=tmp_path, hostname_override="node1", min_sync_period=0.01)
    stale = flow("10.96.0.53", 53, "10.244.1.9")
    ct = FakeConntrack([stale], fail=ConntrackError("simulated"))
    nft = FakeNft()

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(cfg, nft=nft, conntrack=ct, stop=stop))
        await eventually(lambda: "10.244.1.2" in nft.dump())
        assert ct.flows == [stale] and ct.fail is None  # the first cleanup failed, the sync stood
        (tmp_path / "slice.yaml").write_text(UDP_SLICE.replace("ADDR", "10.244.1.3"))
        await eventually(lambda: ct.flows == [])  # the next UDP change cleans up
        stop.set()
        assert await task == 0

    asyncio.run(scenario())


# --- sysctls ---------------------------------------------------------------------------------------


def test_desired_sysctls_follow_upstream_rules() -> None:
    assert desired_conntrack_sysctls(ConntrackConfig(), cpus=2) == {
        CONNTRACK_MAX: 131072,  # max(32768 x 2, 131072)
        "net/netfilter/nf_conntrack_tcp_timeout_established": 86400,
        "net/netfilter/nf_conntrack_tcp_timeout_close_wait": 3600,
    }
    assert desired_conntrack_sysctls(ConntrackConfig(), cpus=8)[CONNTRACK_MAX] == 262144
    custom = ConntrackConfig(
        max_per_core=0,
        tcp_timeout_established=None,
        tcp_timeout_close_wait=0,
        tcp_be_liberal=True,
        udp_timeout=45,
        udp_timeout_stream=150.9,
    )
    assert desired_conntrack_sysctls(custom, cpus=64) == {
        "net/netfilter/nf_conntrack_tcp_be_liberal": 1,
        "net/netfilter/nf_conntrack_udp_timeout": 45,
        "net/netfilter/nf_conntrack_udp_timeout_stream": 150,
    }


def test_only_values_that_differ_are_written_and_hashsize_follows_max() -> None:
    sysctl = conntrack_sysctls(**{"net/netfilter/nf_conntrack_tcp_timeout_close_wait": "3600"})
    report = apply_conntrack_sysctls(sysctl, ConntrackConfig(), cpus=16)  # max 524288
    assert sysctl.writes == [
        (CONNTRACK_MAX, "524288"),
        (HASHSIZE, "131072"),  # max / 4 > 65536
        ("net/netfilter/nf_conntrack_tcp_timeout_established", "86400"),
    ]
    assert "net/netfilter/nf_conntrack_tcp_timeout_close_wait" in report.unchanged
    again = conntrack_sysctls(**dict(sysctl.values))
    apply_conntrack_sysctls(again, ConntrackConfig(), cpus=16)
    assert again.writes == []


def test_a_big_enough_hash_table_is_left_alone() -> None:
    sysctl = conntrack_sysctls(**{HASHSIZE: "262144"})
    apply_conntrack_sysctls(sysctl, ConntrackConfig(), cpus=2)
    assert (CONNTRACK_MAX, "131072") in sysctl.writes
    assert all(name != HASHSIZE for name, _ in sysctl.writes)


def test_refused_writes_are_warnings_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    # Outside the initial namespace nf_conntrack_max is read-only (EACCES); a read-only /sys is EROFS.
    sysctl = conntrack_sysctls()
    sysctl.read_only = {CONNTRACK_MAX: errno.EACCES}
    report = apply_conntrack_sysctls(sysctl, ConntrackConfig(udp_timeout=45), cpus=4)
    assert CONNTRACK_MAX in report.failed and HASHSIZE not in report.written  # hashsize not attempted
    assert sysctl.values["net/netfilter/nf_conntrack_udp_timeout"] == "45"  # the rest still applied
    assert "refused" in caplog.text

    ro_sys = conntrack_sysctls()
    ro_sys.read_only = {HASHSIZE: errno.EROFS}
    report = apply_conntrack_sysctls(ro_sys, ConntrackConfig(), cpus=16)
    assert report.written[CONNTRACK_MAX] == 524288 and HASHSIZE in report.failed

    missing = FakeSysctl(values={CONNTRACK_MAX: "131072"})  # nf_conntrack timeouts absent
    report = apply_conntrack_sysctls(missing, ConntrackConfig(), cpus=1)
    assert set(report.failed) == {
        HASHSIZE,
        "net/netfilter/nf_conntrack_tcp_timeout_established",
        "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    }


@pytest.mark.parametrize("name", ["../../etc/passwd", "net/../../../etc/passwd", "/etc/passwd", "/sys/class/x"])
def test_proc_sysctl_refuses_paths_outside_proc_sys(name: str) -> None:
    # Only the guard itself is exercised: a regression must never get to write a host file.
    with pytest.raises(SysctlError, match="not a sysctl"):
        ProcSysctl.path(name)


def test_proc_sysctl_translates_os_errors() -> None:
    with pytest.raises(SysctlError) as info:
        ProcSysctl().get("net/netfilter/no_such_sysctl")  # a read: the host is never written here
    assert info.value.errno == errno.ENOENT and not info.value.refused
    with pytest.raises(SysctlError, match="not available"):
        ProcSysctl(netns="kpl-no-such-namespace").get(CONNTRACK_MAX)
