"""iptables backend against the fake kernel: what each restore contains, recovery, cleanup."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from builders import CLUSTER_CIDR, endpoint_slice, node, service, state_with
from flows import basic_objects, objects_for
from kubeproxy.backends.iptables.backend import ROUTE_LOCALNET, IptablesBackend, cleanup_leftovers
from kubeproxy.backends.iptables.render import CANARY, IptOptions, IptRuleset
from kubeproxy.kernel.errors import KernelError
from kubeproxy.kernel.iptables import FakeIptables
from kubeproxy.kernel.sysctl import FakeSysctl
from kubeproxy.model.service import IPFamily, NamespacedName
from kubeproxy.state.snapshot import ProxyState
from kubeproxy.tools.render import render_state

V4, V6 = IPFamily.V4, IPFamily.V6
OPTS = IptOptions(cluster_cidrs=(CLUSTER_CIDR,))
SVC1, SVC2 = NamespacedName("ns1", "svc1"), NamespacedName("ns1", "svc2")
GOLDEN = Path(__file__).parent / "golden"


def two_services() -> ProxyState:
    return state_with(
        node(),
        service("svc1", "10.96.0.10"),
        endpoint_slice("s1", "svc1", ["10.244.1.2", "10.244.1.3"]),
        service("svc2", "10.96.0.20", type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}]),
        endpoint_slice("s2", "svc2", ["10.244.1.4"]),
    )


def ours(ipt: FakeIptables, family: IPFamily, table: str) -> dict[str, list[str]]:
    return {c: r for c, r in ipt.chains(family, table).items() if c != CANARY}


def kernel_matches_render(
    ipt: FakeIptables, st: ProxyState, opts: IptOptions = OPTS, interface_addresses: Sequence[str] = ()
) -> None:
    """The fake kernel holds exactly what the pure renderer says (built-in chains: only our jumps)."""
    want: IptRuleset = render_state(st, opts, interface_addresses)
    for table, chains in want.tables.items():
        have = ours(ipt, opts.family, table)
        assert {c: tuple(r) for c, r in have.items() if r or c in chains} == {
            c: r for c, r in chains.items() if r or c in have
        }


def restored(ipt: FakeIptables) -> str:
    return ipt.restores[-1][1]


def test_first_sync_is_full_and_programs_everything() -> None:
    st, ipt = two_services(), FakeIptables()
    out = IptablesBackend(ipt, OPTS).sync(st, set(), full=False)
    assert out.full
    kernel_matches_render(ipt, st)
    assert CANARY in ipt.chains(V4, "mangle")


@pytest.mark.parametrize("family", [V4, V6], ids=["ipv4", "ipv6"])
def test_whole_scenario_loads_and_matches_the_renderer(family: IPFamily) -> None:
    st, ipt = state_with(*objects_for(family)), FakeIptables()
    opts = IptOptions(family=family, cluster_cidrs=(CLUSTER_CIDR if family is V4 else "fd00:10:244::/64",))
    IptablesBackend(ipt, opts).sync(st, set(), full=True)
    kernel_matches_render(ipt, st, opts)


def test_partial_sync_rewrites_only_the_changed_service_chains() -> None:
    st, ipt = two_services(), FakeIptables()
    be = IptablesBackend(ipt, OPTS)
    be.sync(st, set(), full=True)
    st.on_endpoint_slice(("ns1", "s1"), endpoint_slice("s1", "svc1", ["10.244.1.2"]))
    out = be.sync(st, st.commit().changed, full=False)
    text = restored(ipt)
    assert not out.full and out.services_rendered == 1
    assert "ns1/svc2" not in text and "KUBE-SERVICES" not in text  # shared chains unchanged: not sent
    assert "*filter" not in text
    assert text.count("-X KUBE-SEP-") == 1  # 10.244.1.3's endpoint chain retired in the same input
    kernel_matches_render(ipt, st)


def test_a_new_service_rewrites_the_shared_chain_but_no_other_service() -> None:
    st, ipt = two_services(), FakeIptables()
    be = IptablesBackend(ipt, OPTS)
    be.sync(st, set(), full=True)
    st.on_service(NamespacedName("ns1", "svc3"), service("svc3", "10.96.0.30"))
    be.sync(st, st.commit().changed, full=False)
    text = restored(ipt)
    assert ":KUBE-SERVICES - [0:0]" in text  # filter: the REJECT rule of the endpoint-less svc3
    assert "KUBE-SVC-" not in text and "KUBE-SEP-" not in text
    kernel_matches_render(ipt, st)


def test_removing_a_service_deletes_its_chains() -> None:
    st, ipt = two_services(), FakeIptables()
    be = IptablesBackend(ipt, OPTS)
    be.sync(st, set(), full=True)
    st.on_service(SVC2, None)
    st.on_endpoint_slice(("ns1", "s2"), None)
    be.sync(st, st.commit().changed, full=False)
    nat = ours(ipt, V4, "nat")
    assert not any("svc2" in r for rules in nat.values() for r in rules)
    assert not [c for c in nat if c.startswith("KUBE-EXT-")]
    kernel_matches_render(ipt, st)


def test_restart_converges_without_duplicating_jumps_and_drops_stale_chains() -> None:
    st, ipt = two_services(), FakeIptables()
    IptablesBackend(ipt, OPTS).sync(st, set(), full=True)
    # A new process, and svc2 was deleted while we were down.
    st.on_service(SVC2, None)
    st.on_endpoint_slice(("ns1", "s2"), None)
    st.commit()
    IptablesBackend(ipt, OPTS).sync(st, set(), full=True)
    kernel_matches_render(ipt, st)
    assert ":KUBE-SERVICES" in restored(ipt) and "-I " not in restored(ipt)  # jumps were all there


def test_others_rules_in_builtin_chains_are_left_alone_and_missing_jumps_come_back() -> None:
    ipt = FakeIptables()
    ipt.restore(V4, "*filter\n:DOCKER - [0:0]\n-A FORWARD -j DOCKER\n-A INPUT -j ACCEPT\nCOMMIT\n")
    st = two_services()
    be = IptablesBackend(ipt, OPTS)
    be.sync(st, set(), full=True)
    forward = ipt.chains(V4, "filter")["FORWARD"]
    assert forward[-1] == "-j DOCKER" and len(forward) == 5
    # Someone deletes one of our jumps: the next full sync puts ours back on top, once.
    ipt.restore(V4, f"*filter\n-D FORWARD {forward[0]}\nCOMMIT\n")
    be.sync(st, set(), full=True)
    assert ipt.chains(V4, "filter")["FORWARD"] == forward


def test_failed_restore_raises_and_the_next_sync_is_full() -> None:
    st, ipt = two_services(), FakeIptables()
    be = IptablesBackend(ipt, OPTS)
    be.sync(st, set(), full=True)
    st.on_endpoint_slice(("ns1", "s1"), endpoint_slice("s1", "svc1", ["10.244.1.2"]))
    changed = st.commit().changed
    ipt.fail_next = "iptables-restore: line 3 failed"
    with pytest.raises(KernelError):
        be.sync(st, changed, full=False)
    out = be.sync(st, set(), full=False)
    assert out.full
    kernel_matches_render(ipt, st)


def test_large_cluster_mode_drops_per_endpoint_comments() -> None:
    ips = [f"10.244.{i // 250}.{i % 250 + 1}" for i in range(1001)]
    st, ipt = state_with(node(), service("big", "10.96.0.99"), endpoint_slice("b", "big", ips)), FakeIptables()
    be = IptablesBackend(ipt, OPTS)
    be.sync(st, set(), full=True)
    sep = [r for c, rules in ours(ipt, V4, "nat").items() if c.startswith("KUBE-SEP-") for r in rules]
    assert len(sep) == 2002 and not any("comment" in r for r in sep)
    svc = next(r for c, r in ours(ipt, V4, "nat").items() if c.startswith("KUBE-SVC-"))
    assert svc[0].startswith('-m comment --comment "ns1/big:p80 cluster IP"')  # Service comments stay
    # Back under the threshold: a full rewrite with comments.
    st.on_endpoint_slice(("ns1", "b"), endpoint_slice("b", "big", ips[:10]))
    assert be.sync(st, st.commit().changed, full=False).full
    kernel_matches_render(ipt, st)


def test_present_follows_the_mangle_canary() -> None:
    st, ipt = two_services(), FakeIptables()
    be = IptablesBackend(ipt, OPTS)
    be.sync(st, set(), full=True)
    assert be.present()
    ipt.restore(V4, f"*mangle\n-X {CANARY}\nCOMMIT\n")
    assert not be.present()


def test_localhost_nodeports_set_route_localnet_and_guard_loopback() -> None:
    st, ipt, sysctl = two_services(), FakeIptables(), FakeSysctl({ROUTE_LOCALNET: "0"})
    IptablesBackend(ipt, OPTS, sysctl=sysctl).sync(st, set(), full=True)
    assert sysctl.get(ROUTE_LOCALNET) == "1"
    assert "block incoming localnet connections" in ipt.chains(V4, "filter")["KUBE-FIREWALL"][0]
    # Off (or IPv6): no sysctl, no loopback exception in the nodeports jump.
    ipt2, sysctl2 = FakeIptables(), FakeSysctl({ROUTE_LOCALNET: "0"})
    off = IptOptions(cluster_cidrs=(CLUSTER_CIDR,), localhost_nodeports=False)
    IptablesBackend(ipt2, off, sysctl=sysctl2).sync(st, set(), full=True)
    assert sysctl2.get(ROUTE_LOCALNET) == "0"
    assert "! -d 127.0.0.0/8 -j KUBE-NODEPORTS" in ipt2.chains(V4, "nat")["KUBE-SERVICES"][-1]


KUBELET = (  # what kubelet writes (pkg/kubelet/kubelet_network_linux.go): the localnet guard is its own
    "*filter\n:KUBE-FIREWALL - [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\n"
    '-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 '
    "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n"
    "-A INPUT -j KUBE-FIREWALL\n-A OUTPUT -j KUBE-FIREWALL\nCOMMIT\n"
)


def test_cleanup_removes_our_layout_and_nothing_else() -> None:
    ipt = FakeIptables()
    ipt.restore(V4, "*filter\n:DOCKER - [0:0]\n-A FORWARD -j DOCKER\nCOMMIT\n")
    ipt.restore(V4, KUBELET)
    kubelet_filter = ipt.chains(V4, "filter")
    be = IptablesBackend(ipt, OPTS)
    be.sync(two_services(), set(), full=True)
    assert be.cleanup() is True
    # Exactly what was there before us: kubelet's CVE-2020-8558 guard and its jumps, Docker's chain.
    assert ipt.chains(V4, "filter") == kubelet_filter
    # KUBE-MARK-MASQ is shared with kubelet (upstream never deletes it); everything else of ours goes.
    assert {c: r for c, r in ipt.chains(V4, "nat").items() if r} == {"KUBE-MARK-MASQ": ["-j MARK --or-mark 0x4000"]}
    assert set(ipt.chains(V4, "nat")) == {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", "KUBE-MARK-MASQ"}
    assert cleanup_leftovers(ipt, V4) is False  # nothing left: no restore at all
    assert be.sync(two_services(), set(), full=False).full  # and the backend starts over


def test_without_localhost_nodeports_kubelets_guard_is_left_alone() -> None:
    ipt = FakeIptables()
    ipt.restore(V4, KUBELET)
    off = IptOptions(cluster_cidrs=(CLUSTER_CIDR,), localhost_nodeports=False)
    IptablesBackend(ipt, off).sync(two_services(), set(), full=True)
    filt = ipt.chains(V4, "filter")
    assert "block incoming localnet connections" in filt["KUBE-FIREWALL"][0]
    assert filt["INPUT"].count("-j KUBE-FIREWALL") == 1


def test_a_chain_of_ours_someone_else_jumps_to_is_left_intact() -> None:
    ipt = FakeIptables()
    be = IptablesBackend(ipt, OPTS)
    be.sync(two_services(), set(), full=True)
    ipt.restore(V4, "*nat\n:OTHER - [0:0]\n-A OTHER -j KUBE-POSTROUTING\nCOMMIT\n")
    be.cleanup()
    assert ipt.chains(V4, "nat")["KUBE-POSTROUTING"]  # not flushed under someone's feet
    assert not [c for c in ipt.chains(V4, "nat") if c.startswith(("KUBE-SVC-", "KUBE-SEP-", "KUBE-SERVICES"))]


def test_upstream_leftovers_are_cleaned_including_retired_chain_names() -> None:
    ipt = FakeIptables()
    ipt.restore(
        V4,
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-XLB-ABC - [0:0]\n:KUBE-MARK-DROP - [0:0]\n"
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\n'
        "-A KUBE-SERVICES -j KUBE-XLB-ABC\nCOMMIT\n",
    )
    assert cleanup_leftovers(ipt, V4) is True
    assert set(ipt.chains(V4, "nat")) == {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", "KUBE-MARK-DROP"}


def test_basic_ruleset_matches_golden() -> None:
    # Regenerate with KUBEPROXY_UPDATE_GOLDEN=1 and review the diff like code.
    golden = GOLDEN / "iptables-basic.txt"
    text = render_state(state_with(*basic_objects()), OPTS).text()
    if os.environ.get("KUBEPROXY_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text.splitlines() == golden.read_text().splitlines()


def test_render_subcommand_prints_iptables_save_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kubeproxy.cli import main

    (tmp_path / "svc.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns1}\n"
        "spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n"
    )
    assert main(["render", "--proxy-mode=iptables", f"--manifests={tmp_path}", "--hostname-override=node1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("*filter\n") and '"ns1/web:http has no endpoints"' in out and "*nat\n" in out


def test_rule_counts_follow_the_kernel_through_partial_syncs() -> None:
    st, ipt = two_services(), FakeIptables()
    be = IptablesBackend(ipt, OPTS)

    def in_kernel(table: str) -> int:
        return sum(len(r) for c, r in ipt.chains(V4, table).items())

    be.sync(st, set(), full=True)
    assert be.rule_counts == {"filter": in_kernel("filter"), "nat": in_kernel("nat")}
    st.on_endpoint_slice(("ns1", "s1"), endpoint_slice("s1", "svc1", ["10.244.1.2"]))
    st.on_service(NamespacedName("ns1", "svc3"), service("svc3", "10.96.0.30"))
    out = be.sync(st, st.commit().changed, full=False)
    assert be.rule_counts == {"filter": in_kernel("filter"), "nat": in_kernel("nat")} == out.rules_total
    assert out.rules_written is not None and 0 < out.rules_written["nat"] < be.rule_counts["nat"]


def test_a_cold_start_in_large_cluster_mode_renders_each_service_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubeproxy.backends.iptables import backend as backend_mod

    calls: list[object] = []
    real = backend_mod.render_service

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(args[0])
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(backend_mod, "render_service", counting)
    ips = [f"10.244.{i // 250}.{i % 250 + 1}" for i in range(1001)]
    st = state_with(
        node(), service("big", "10.96.0.99"), endpoint_slice("b", "big", ips), service("svc1", "10.96.0.10")
    )
    IptablesBackend(FakeIptables(), OPTS).sync(st, set(), full=True)
    assert len(calls) == 2  # two Services, one render each


def test_comments_fit_the_kernels_limit_whatever_the_names() -> None:
    from kubeproxy.backends.iptables.render import MAX_COMMENT

    long = "s" * 250
    st = state_with(node(), service(long, "10.96.0.77"), endpoint_slice("l", long, ["10.244.1.2"]))
    rs = render_state(st, OPTS)
    comments = [
        r.split("--comment ", 1)[1]
        for t in rs.tables.values()
        for rules in t.values()
        for r in rules
        if "--comment" in r
    ]
    texts = [c[1:].split('"', 1)[0] if c.startswith('"') else c.split()[0] for c in comments]
    assert any(long in t for t in texts) and max(len(t) for t in texts) == MAX_COMMENT


@pytest.mark.parametrize(
    ("spec", "active"),
    [((), True), (("all",), True), (("127.0.0.1/32",), True), (("127.0.0.0/8",), True), (("0.0.0.0/1",), True),
     (("primary",), False), (("10.0.0.0/8",), False), (("128.0.0.0/1",), False)],
)  # fmt: skip
def test_localhost_nodeports_follow_upstreams_loopback_rule(spec: tuple[str, ...], active: bool) -> None:
    assert IptOptions(nodeport_addresses=spec).localhost_nodeports_active is active
    assert IptOptions(family=V6, nodeport_addresses=spec).localhost_nodeports_active is False


def test_a_partial_sync_that_crosses_into_large_cluster_mode_rewrites_everything() -> None:
    st, ipt = (
        state_with(node(), service("big", "10.96.0.99"), endpoint_slice("b", "big", ["10.244.1.2"])),
        FakeIptables(),
    )
    be = IptablesBackend(ipt, OPTS)
    be.sync(st, set(), full=True)
    ips = [f"10.244.{i // 250}.{i % 250 + 1}" for i in range(1001)]
    st.on_endpoint_slice(("ns1", "b"), endpoint_slice("b", "big", ips))
    assert be.sync(st, st.commit().changed, full=False).full
    sep = [r for c, rules in ours(ipt, V4, "nat").items() if c.startswith("KUBE-SEP-") for r in rules]
    assert len(sep) == 2002 and not any("comment" in r for r in sep)
    kernel_matches_render(ipt, st)
