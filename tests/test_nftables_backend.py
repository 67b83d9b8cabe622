"""nftables backend against the fake kernel: what each transaction contains, and recovery."""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import CLUSTER_CIDR, endpoint_slice, node, service, state_with
from kubeproxy.backends.nftables import backend as backend_mod
from kubeproxy.backends.nftables.backend import NftablesBackend
from kubeproxy.backends.nftables.render import NftOptions
from kubeproxy.kernel.nft import FakeNft, NftError
from kubeproxy.model.service import NamespacedName
from kubeproxy.state.snapshot import ProxyState
from kubeproxy.tools.render import render_state

OPTS = NftOptions(cluster_cidrs=(CLUSTER_CIDR,))
SVC1, SVC2 = NamespacedName("ns1", "svc1"), NamespacedName("ns1", "svc2")
SVC_WEB = NamespacedName("ns1", "web")


def two_services(*, node_ports: bool = False) -> ProxyState:
    """Two ClusterIP Services (balanced through the endpoint map), or with ``node_ports`` two NodePort
    Services (which keep a chain per Service)."""

    def svc(name: str, ip: str, node_port: int) -> Any:
        if not node_ports:
            return service(name, ip)
        return service(name, ip, type="NodePort", ports=[{"name": "p80", "port": 80, "nodePort": node_port}])

    return state_with(
        node(),
        svc("svc1", "10.96.0.10", 30010),
        endpoint_slice("s1", "svc1", ["10.244.1.2", "10.244.1.3"]),
        svc("svc2", "10.96.0.20", 30020),
        endpoint_slice("s2", "svc2", ["10.244.1.4"]),
    )


def kernel_matches_render(nft: FakeNft, st: ProxyState, opts: NftOptions = OPTS) -> None:
    """The fake kernel holds exactly what the pure renderer says the table should be."""
    want = FakeNft()
    want.run(render_state(st, opts).text())
    assert nft.dump() == want.dump()


def test_first_sync_is_full_and_programs_everything() -> None:
    st, nft = two_services(), FakeNft()
    out = NftablesBackend(nft, OPTS).sync(st, set(), full=False)
    assert out.full
    kernel_matches_render(nft, st)


@pytest.mark.parametrize("node_ports", [False, True], ids=["mapped", "chains"])
def test_partial_sync_touches_only_the_changed_service(node_ports: bool) -> None:
    st, nft = two_services(node_ports=node_ports), FakeNft()
    be = NftablesBackend(nft, OPTS)
    be.sync(st, set(), full=True)
    st.on_endpoint_slice(("ns1", "s1"), endpoint_slice("s1", "svc1", ["10.244.1.2"]))
    result = st.commit()
    out = be.sync(st, result.changed, full=False)
    tx = nft.transactions[-1]
    assert not out.full and out.services_rendered == 1
    assert "10.96.0.20" not in tx and "svc2" not in tx
    if node_ports:
        assert "add rule ip kube-proxy service-" in tx and "svc1" in tx
    else:
        assert "10.96.0.10" in tx
        # An endpoint change of a Service balanced through the map is element changes only: no
        # rule is written (each rule change makes the kernel validate the whole table).
        assert "add rule" not in tx and "chain" not in tx, tx
        assert "delete element ip kube-proxy service-endpoints { 10.96.0.10 . tcp . 80 . 1 }" in tx
    assert "add table" not in tx  # no skeleton rewrite on partial syncs
    assert "delete element ip kube-proxy hairpin-connections { 10.244.1.3 . 10.244.1.3 . tcp . 80 }" in tx
    kernel_matches_render(nft, st)


def test_unchanged_partial_sync_sends_nothing() -> None:
    st, nft = two_services(), FakeNft()
    be = NftablesBackend(nft, OPTS)
    be.sync(st, set(), full=True)
    n = len(nft.transactions)
    assert be.sync(st, {SVC1}, full=False).commands == 0
    assert len(nft.transactions) == n


def test_removed_service_chain_is_flushed_now_and_deleted_later(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(backend_mod.time, "monotonic", lambda: clock[0])
    st, nft = two_services(node_ports=True), FakeNft()
    be = NftablesBackend(nft, OPTS)
    be.sync(st, set(), full=True)
    st.on_service(SVC2, None)
    out = be.sync(st, st.commit().changed, full=False)
    assert out.followup_after == backend_mod.STALE_CHAIN_DELAY
    table = nft.tables[("ip", "kube-proxy")]
    stale = [c for c in table.chains if "svc2" in c]
    assert stale and all(table.chains[c] == [] for c in stale)
    clock[0] += 0.5
    be.sync(st, set(), full=False)
    assert all(c in table.chains for c in stale)  # not yet
    clock[0] += 1.0
    out = be.sync(st, set(), full=False)
    table = nft.tables[("ip", "kube-proxy")]
    assert not [c for c in table.chains if "svc2" in c] and out.followup_after is None
    kernel_matches_render(nft, st)


def test_service_readded_before_deletion_keeps_its_chain() -> None:
    st, nft = two_services(), FakeNft()
    be = NftablesBackend(nft, OPTS)
    be.sync(st, set(), full=True)
    st.on_service(SVC2, None)
    be.sync(st, st.commit().changed, full=False)
    st.on_service(SVC2, service("svc2", "10.96.0.20"))
    out = be.sync(st, st.commit().changed, full=False)
    assert out.followup_after is None
    kernel_matches_render(nft, st)


def test_restart_converges_without_readding_unchanged_elements() -> None:
    st, nft = two_services(), FakeNft()
    NftablesBackend(nft, OPTS).sync(st, set(), full=True)
    # A new process (restart) with one endpoint changed meanwhile.
    st.on_endpoint_slice(("ns1", "s2"), endpoint_slice("s2", "svc2", ["10.244.1.5"]))
    st.commit()
    NftablesBackend(nft, OPTS).sync(st, set(), full=True)
    elements = [line for line in nft.transactions[-1].splitlines() if " element " in line]
    assert all(any(s in line for s in ("10.96.0.20", "10.244.1.4", "10.244.1.5")) for line in elements), elements
    kernel_matches_render(nft, st)


def test_leftover_chains_from_an_earlier_run_are_removed_by_full_sync() -> None:
    nft = FakeNft()
    NftablesBackend(nft, OPTS).sync(two_services(), set(), full=True)
    only_svc1 = state_with(
        node(), service("svc1", "10.96.0.10"), endpoint_slice("s1", "svc1", ["10.244.1.2", "10.244.1.3"])
    )
    NftablesBackend(nft, OPTS).sync(only_svc1, set(), full=True)
    table = nft.tables[("ip", "kube-proxy")]
    assert all(table.chains[c] == [] for c in table.chains if "svc2" in c)
    assert not any("10.96.0.20" in k for elems in table.elements.values() for k in elems)


class FailingOnce(FakeNft):
    def __init__(self) -> None:
        super().__init__()
        self.fail_next = False

    def run(self, script: str) -> None:
        if self.fail_next:
            self.fail_next = False
            raise NftError("simulated kernel failure")
        super().run(script)


def test_failed_sync_leaves_bookkeeping_equal_to_kernel_and_full_resync_repairs() -> None:
    st, nft = two_services(), FailingOnce()
    be = NftablesBackend(nft, OPTS)
    be.sync(st, set(), full=True)
    st.on_endpoint_slice(("ns1", "s1"), endpoint_slice("s1", "svc1", ["10.244.1.9"]))
    changed = st.commit().changed
    nft.fail_next = True
    with pytest.raises(NftError):
        be.sync(st, changed, full=False)
    be.sync(st, set(), full=True)  # what the daemon does after a failure
    kernel_matches_render(nft, st)


def test_two_services_claiming_one_key_first_wins_until_it_goes() -> None:
    st = state_with(
        node(),
        service("aaa", "10.96.0.10"),
        endpoint_slice("a", "aaa", ["10.244.1.2"]),
        service("bbb", "10.96.0.10"),
        endpoint_slice("b", "bbb", ["10.244.1.3"]),
    )
    nft = FakeNft()
    be = NftablesBackend(nft, OPTS)
    be.sync(st, set(), full=True)
    elems = nft.tables[("ip", "kube-proxy")].elements["service-endpoints"]
    assert str(elems["10.96.0.10 . tcp . 80 . 0"]).startswith("10.244.1.2 ")  # aaa's endpoint
    st.on_service(NamespacedName("ns1", "aaa"), None)
    be.sync(st, st.commit().changed, full=False)
    elems = nft.tables[("ip", "kube-proxy")].elements["service-endpoints"]
    assert str(elems["10.96.0.10 . tcp . 80 . 0"]).startswith("10.244.1.3 ")  # bbb's
    assert "10.96.0.10" in nft.tables[("ip", "kube-proxy")].elements["cluster-ips"]


def test_cleanup_removes_the_table() -> None:
    nft = FakeNft()
    be = NftablesBackend(nft, OPTS)
    be.sync(two_services(), set(), full=True)
    assert be.cleanup() is True
    assert nft.list_table("ip", "kube-proxy") is None


def _affine(timeout: int) -> Any:
    return service(
        "svc1",
        "10.96.0.10",
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": timeout}},
    )


def test_affinity_timeout_change_recreates_the_sets_and_restart_keeps_learned_clients() -> None:
    st, nft = two_services(), FakeNft()
    st.on_service(SVC1, _affine(60))
    st.commit()
    be = NftablesBackend(nft, OPTS)
    be.sync(st, set(), full=True)
    kernel_matches_render(nft, st)
    sets = [n for n in nft.tables[("ip", "kube-proxy")].sets if n.startswith("affinity-")]
    assert sets and all("timeout 60s" in nft.tables[("ip", "kube-proxy")].sets[n] for n in sets)
    st.on_service(SVC1, _affine(120))
    be.sync(st, st.commit().changed, full=False)
    kernel_matches_render(nft, st)  # the dump includes set declarations: 120 s now
    # The kernel learns a client; a restarted proxy's full sync must not forget it.
    nft.tables[("ip", "kube-proxy")].elements[sets[0]]["203.0.113.10"] = None
    NftablesBackend(nft, OPTS).sync(st, set(), full=True)
    assert "203.0.113.10" in nft.tables[("ip", "kube-proxy")].elements[sets[0]]
    # Affinity off: the sets go, in the same transaction that stops referring to them.
    st.on_service(SVC1, service("svc1", "10.96.0.10"))
    st.commit()
    be2 = NftablesBackend(nft, OPTS)
    be2.sync(st, set(), full=True)
    assert not [n for n in nft.tables[("ip", "kube-proxy")].sets if n.startswith("affinity-")]


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["svc", "affinity", "slice", "delete-svc", "delete-slice", "node"]),
            st.integers(min_value=0, max_value=3),  # which Service
            st.lists(st.integers(min_value=2, max_value=6), max_size=3),  # endpoint host bytes
        ),
        max_size=12,
    )
)
def test_any_sequence_of_partial_syncs_leaves_the_kernel_equal_to_a_fresh_render(
    steps: list[tuple[str, int, list[int]]],
) -> None:
    state, nft = two_services(), FakeNft()
    be = NftablesBackend(nft, OPTS)
    be.sync(state, set(), full=True)
    clock = [1000.0]
    for op, i, hosts in steps:
        name = f"svc{i}"
        if op == "svc":
            kind = "NodePort" if i % 2 else "ClusterIP"
            ports = [{"name": "p80", "port": 80, "nodePort": 30000 + i}] if kind == "NodePort" else None
            state.on_service(
                NamespacedName("ns1", name), service(name, f"10.96.0.{10 + i % 2}", type=kind, ports=ports)
            )
        elif op == "affinity":  # ClientIP affinity; the timeout varies, so sets get re-created too
            affinity = {"clientIP": {"timeoutSeconds": 60 + len(hosts)}}
            svc = service(name, f"10.96.0.{10 + i % 2}", sessionAffinity="ClientIP", sessionAffinityConfig=affinity)
            state.on_service(NamespacedName("ns1", name), svc)
        elif op == "slice":
            state.on_endpoint_slice(("ns1", f"s{i}"), endpoint_slice(f"s{i}", name, [f"10.244.1.{h}" for h in hosts]))
        elif op == "delete-svc":
            state.on_service(NamespacedName("ns1", name), None)
        elif op == "delete-slice":
            state.on_endpoint_slice(("ns1", f"s{i}"), None)
        else:
            state.on_node(node(ip=f"192.168.50.{1 + i}"))
        result = state.commit()
        with mock.patch.object(backend_mod.time, "monotonic", lambda: clock[0]):
            out = be.sync(state, result.changed, full=result.node_changed)
            if out.followup_after is not None:  # what the runner does: sync again after the delay
                clock[0] += out.followup_after
                assert be.sync(state, set(), full=False).followup_after is None
        kernel_matches_render(nft, state)


def test_node_cidr_change_survives_a_failed_transaction() -> None:
    # NodeCIDR detection follows the Node; if the sync carrying the change fails, the next one (even
    # one a caller asks to be partial) must still rewrite the chains that match on the pod CIDR.
    opts = NftOptions(node_cidr=True)
    st = state_with(node(pod_cidrs=["10.244.1.0/24"]), service("svc1", "10.96.0.10"))
    nft = FailingOnce()
    be = NftablesBackend(nft, opts)
    be.sync(st, set(), full=True)
    st.on_node(node(pod_cidrs=["10.244.9.0/24"]))
    st.commit()
    nft.fail_next = True
    with pytest.raises(NftError):
        be.sync(st, set(), full=False)
    assert be.sync(st, set(), full=False).full
    assert "ip saddr != 10.244.9.0/24" in "".join(nft.tables[("ip", "kube-proxy")].chains["services"])
    kernel_matches_render(nft, st, opts)


def test_restart_keeps_the_load_balance_chains_nft_could_not_rewrite() -> None:
    # nft 1.0.6 refuses a new rule using service-endpoints once the map is in the kernel (the fake
    # models that): a restart must leave the load-balance chains alone, and still converge.
    st, nft = two_services(), FakeNft()
    NftablesBackend(nft, OPTS).sync(st, set(), full=True)
    with pytest.raises(NftError, match=r"ip vs\. th"):
        nft.run(
            "add rule ip kube-proxy load-balance-3 "
            "dnat to ip daddr . meta l4proto . th dport . numgen random mod 3 map @service-endpoints\n"
        )
    out = NftablesBackend(nft, OPTS).sync(st, set(), full=True)
    assert out.full and "load-balance" not in "".join(
        line for line in nft.transactions[-1].splitlines(keepends=True) if not line.startswith("add chain")
    )
    kernel_matches_render(nft, st)


def test_an_altered_load_balance_chain_makes_the_full_sync_recreate_the_table() -> None:
    st, nft = two_services(), FakeNft()
    be = NftablesBackend(nft, OPTS)
    be.sync(st, set(), full=True)
    nft.run("flush chain ip kube-proxy load-balance-2\n")  # someone else's doing
    before = len(nft.transactions)
    out = be.sync(st, set(), full=True)
    assert out.full
    # Deleted and programmed from scratch in ONE transaction: never a moment without rules.
    assert len(nft.transactions) == before + 1
    assert nft.transactions[-1].startswith("delete table ip kube-proxy\nadd table")
    kernel_matches_render(nft, st)


def test_load_balance_chains_of_another_version_are_retired(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(backend_mod.time, "monotonic", lambda: clock[0])
    st, nft = two_services(), FakeNft()
    NftablesBackend(nft, OPTS).sync(st, set(), full=True)
    nft.run("add chain ip kube-proxy load-balance-99\n")  # e.g. from a version with more of them
    be = NftablesBackend(nft, OPTS)
    assert be.sync(st, set(), full=True).followup_after == backend_mod.STALE_CHAIN_DELAY
    assert nft.tables[("ip", "kube-proxy")].chains["load-balance-99"] == []  # flushed now, deleted later
    clock[0] += backend_mod.STALE_CHAIN_DELAY
    be.sync(st, set(), full=False)
    kernel_matches_render(nft, st)


def test_partial_syncs_agree_with_the_renderer_when_a_service_wants_one_key_twice() -> None:
    # A Service listing its own ClusterIP among its externalIPs wants two values for one key; a
    # partial sync must end where a fresh render does (found by review: the key was dropped).
    st = state_with(
        node(),
        service("web", "10.96.0.10", externalIPs=["10.96.0.10"]),
        endpoint_slice("s1", "web", ["10.244.2.2", "10.244.2.3"], node="node2"),
    )
    nft = FakeNft()
    be = NftablesBackend(nft, OPTS)
    be.sync(st, set(), full=True)
    kernel_matches_render(nft, st)
    for policy in ("Local", "Cluster"):
        st.on_service(SVC_WEB, service("web", "10.96.0.10", externalIPs=["10.96.0.10"], internalTrafficPolicy=policy))
        be.sync(st, st.commit().changed, full=False)
        kernel_matches_render(nft, st)


def test_two_namespaces_claiming_one_key_resolve_as_the_renderer_does() -> None:
    # "a/x" and "a-b/y": the string "a-b/y" sorts first, the (namespace, name) pair "a" first.
    st = state_with(
        node(),
        service("x", "10.96.0.10", namespace="a"),
        endpoint_slice("sx", "x", ["10.244.1.2"], namespace="a"),
        service("y", "10.96.0.10", namespace="a-b"),
        endpoint_slice("sy", "y", ["10.244.1.3", "10.244.1.4"], namespace="a-b"),
    )
    nft = FakeNft()
    NftablesBackend(nft, OPTS).sync(st, set(), full=True)
    kernel_matches_render(nft, st)


def _lb_doc(chain: str, *rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"nftables": [{"rule": {"chain": chain, "expr": expr}} for expr in rules]}


def _lb_expr(
    mod: int, data: str = "@service-endpoints", mode: str = "random", field: str = "daddr"
) -> list[dict[str, Any]]:
    key = [
        {"payload": {"protocol": "ip", "field": field}},
        {"meta": {"key": "l4proto"}},
        {"payload": {"protocol": "th", "field": "dport"}},
        {"numgen": {"mode": mode, "mod": mod, "offset": 0}},
    ]
    return [{"dnat": {"addr": {"map": {"key": {"concat": key}, "data": data}}}}]


@pytest.mark.parametrize(
    ("doc", "kept"),
    [
        (_lb_doc("load-balance-3", _lb_expr(3)), {"load-balance-3"}),
        (_lb_doc("load-balance-3", _lb_expr(2)), set()),  # another modulus
        (_lb_doc("load-balance-3", _lb_expr(3, data="@other")), set()),
        (_lb_doc("load-balance-3", _lb_expr(3, mode="inc")), set()),
        (_lb_doc("load-balance-3", _lb_expr(3), _lb_expr(3)), set()),  # two rules
        (_lb_doc("load-balance-x", _lb_expr(3)), set()),
        (_lb_doc("load-balance-3", [{"accept": None}]), set()),
        (_lb_doc("load-balance-3", _lb_expr(3, field="saddr")), set()),
        (None, set()),
    ],
)
def test_load_balance_chains_are_kept_only_when_exactly_right(doc: Any, kept: set[str]) -> None:
    raw = None if doc is None else json.dumps(doc).encode()
    assert backend_mod.load_balance_chains_in(backend_mod.decode_table(raw)) == kept
