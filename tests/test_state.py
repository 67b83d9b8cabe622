"""State layer: coalescing trackers, slice merging, categorization, invalid input isolation."""

from __future__ import annotations

import logging

import pytest

from builders import endpoint_slice, node, service, state_with
from kubeproxy.model import objects
from kubeproxy.model.endpoint import Endpoint
from kubeproxy.model.service import (
    InvalidObject,
    IPFamily,
    NamespacedName,
    Protocol,
    ServicePort,
    ServicePortName,
    parse_ip,
    service_ports,
)
from kubeproxy.state.snapshot import ProxyState
from kubeproxy.state.topology import NodeTopology, categorize
from kubeproxy.state.trackers import PendingChanges

SVC1 = NamespacedName("ns1", "svc1")


def fresh() -> ProxyState:
    st = ProxyState(node_name="node1")
    st.services_synced = st.slices_synced = True
    return st


def test_pending_changes_coalesce_and_drop_noops() -> None:
    applied: dict[str, int] = {"a": 1}
    pc: PendingChanges[str, int] = PendingChanges(applied)
    assert pc.set("a", 2)
    assert pc.set("a", 3)
    assert pc.drain() == {"a": (1, 3)}  # oldest previous, newest current
    assert not pc.set("a", 1)  # back to what is applied: nothing pending
    pc.set("b", 5)
    assert not pc.set("b", None)  # add then delete before a sync: no change at all
    assert len(pc) == 0


def test_add_then_delete_before_sync_costs_nothing() -> None:
    st = fresh()
    st.on_service(SVC1, service("svc1", "10.96.0.10"))
    st.on_service(SVC1, None)
    assert st.pending() == 0
    assert st.commit().changed == frozenset()


def test_identical_update_is_not_a_change() -> None:
    st = state_with(service("svc1", "10.96.0.10"))
    assert not st.on_service(SVC1, service("svc1", "10.96.0.10"))


def test_slices_of_one_service_merge_and_deduplicate_preferring_ready() -> None:
    st = state_with(
        service("svc1", "10.96.0.10"),
        endpoint_slice("s1", "svc1", ["10.244.1.3", "10.244.1.2"]),
        endpoint_slice("s2", "svc1", ["10.244.1.2", "10.244.2.9"], conditions={"ready": False}),
    )
    eps = st.endpoints[SVC1][("p80", Protocol.TCP)]
    assert [(e.ip, e.ready) for e in eps] == [("10.244.1.2", True), ("10.244.1.3", True), ("10.244.2.9", False)]


def test_slice_owner_change_moves_endpoints() -> None:
    st = state_with(
        service("svc1", "10.96.0.10"), service("svc2", "10.96.0.20"), endpoint_slice("s", "svc1", ["10.244.1.2"])
    )
    st.on_endpoint_slice(("ns1", "s"), endpoint_slice("s", "svc2", ["10.244.1.2"]))
    result = st.commit()
    assert result.changed == {SVC1, NamespacedName("ns1", "svc2")}
    assert SVC1 not in st.endpoints


def test_ignored_services() -> None:
    assert service_ports(service("h", "None")) == {}
    ext = objects.from_builtins(
        "Service",
        {"metadata": {"name": "e", "namespace": "n"}, "spec": {"type": "ExternalName", "externalName": "x.example"}},
    )
    assert isinstance(ext, objects.Service) and service_ports(ext) == {}
    labelled = objects.from_builtins(
        "Service",
        {"metadata": {"name": "l", "namespace": "n", "labels": {"service.kubernetes.io/service-proxy-name": "other"}},
         "spec": {"clusterIP": "10.96.0.7", "ports": [{"port": 80}]}},
    )  # fmt: skip
    assert isinstance(labelled, objects.Service) and service_ports(labelled) == {}


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"clusterIP": "10.96.0.999", "ports": [{"port": 80}]}, "invalid IP address"),
        ({"clusterIP": "10.96.0.9", "ports": [{"port": 0}]}, "out of range"),
        ({"clusterIP": "10.96.0.9", "ports": [{"port": 80, "protocol": "ICMP"}]}, "unsupported protocol"),
        ({"clusterIP": "10.96.0.9", "ports": [{"port": 80, "name": 'a"; drop'}]}, "not a valid IANA"),
        ({"clusterIP": "10.96.0.9", "ports": [{"port": 80}, {"port": 81}]}, "name is required"),
    ],
)
def test_invalid_service_is_skipped_with_reason_and_others_survive(
    spec: dict[str, object], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad = objects.from_builtins("Service", {"metadata": {"name": "bad", "namespace": "ns1"}, "spec": spec})
    assert isinstance(bad, objects.Service)
    st = fresh()
    with caplog.at_level(logging.WARNING):
        st.on_service(NamespacedName("ns1", "bad"), bad)
        st.on_service(SVC1, service("svc1", "10.96.0.10"))
    st.commit()
    assert list(st.services) == [SVC1]
    assert any("ns1/bad" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def test_invalid_name_cannot_reach_a_ruleset() -> None:
    bad = objects.from_builtins(
        "Service",
        {
            "metadata": {"name": "x\n}add rule", "namespace": "ns1"},
            "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80}]},
        },
    )
    st = fresh()
    assert isinstance(bad, objects.Service)
    st.on_service(NamespacedName("ns1", "x\n}add rule"), bad)
    st.commit()
    assert st.services == {}


def test_invalid_endpoint_slice_is_skipped() -> None:
    bad = objects.from_builtins(
        "EndpointSlice",
        {"metadata": {"name": "s", "namespace": "ns1", "labels": {"kubernetes.io/service-name": "svc1"}},
         "addressType": "IPv4", "endpoints": [{"addresses": ["not-an-ip"]}], "ports": [{"name": "p80", "port": 80}]},
    )  # fmt: skip
    assert isinstance(bad, objects.EndpointSlice)
    st = state_with(service("svc1", "10.96.0.10"), bad, endpoint_slice("ok", "svc1", ["10.244.1.2"]))
    assert [e.ip for e in st.endpoints[SVC1][("p80", Protocol.TCP)]] == ["10.244.1.2"]
    assert "EndpointSlice ns1/s" in st.rejected


def test_node_change_is_reported() -> None:
    st = state_with(node())
    assert st.node.addresses == ("192.168.50.1",)
    st.on_node(node(ip="192.168.50.9"))
    assert st.commit().node_changed


def test_node_eligibility_for_healthz_follows_deletion_and_the_autoscaler_taint() -> None:
    st = ProxyState(node_name="node1")
    assert not st.node_eligible  # no Node object yet
    st.on_node(node())
    assert st.node_eligible
    st.on_node(node(taints=[{"key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule"}]))
    assert not st.node_eligible
    st.on_node(node(taints=[{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]))
    assert st.node_eligible
    st.on_node(node(deleting=True))
    assert not st.node_eligible
    st.on_node(None)
    assert not st.node_eligible
    st.on_node(node())
    st.commit()
    # A taint alone changes nothing that is programmed: no sync needed.
    assert not st.on_node(node(taints=[{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]))


def test_trigger_times_are_those_of_the_slice_updates_since_the_last_commit() -> None:
    st = state_with(service("svc1", "10.96.0.1"))
    st.on_endpoint_slice(("ns1", "a"), endpoint_slice("a", "svc1", ["10.244.1.2"], trigger_time="2026-11-21T08:00:00Z"))
    six = endpoint_slice("b6", "svc1", ["fd00:10:244::1:2"], address_type="IPv6", trigger_time="2026-11-21T08:00:01Z")
    st.on_endpoint_slice(("ns1", "b6"), six)
    assert set(st.commit().trigger_times) == {
        (IPFamily.V4, "2026-11-21T08:00:00Z"),
        (IPFamily.V6, "2026-11-21T08:00:01Z"),
    }
    # Slice "a" changes again: only its new time counts, not b6's old one.
    st.on_endpoint_slice(("ns1", "a"), endpoint_slice("a", "svc1", ["10.244.1.3"], trigger_time="2026-11-21T09:00:00Z"))
    assert st.commit().trigger_times == ((IPFamily.V4, "2026-11-21T09:00:00Z"),)
    # A deletion's annotation is not a trigger.
    st.on_endpoint_slice(("ns1", "a"), None)
    assert st.commit().trigger_times == ()


def test_pending_change_counts() -> None:
    st = ProxyState(node_name="node1")
    st.on_service(NamespacedName("ns1", "svc1"), service("svc1", "10.96.0.1"))
    st.on_service(NamespacedName("ns1", "svc2"), service("svc2", "10.96.0.2"))
    st.on_endpoint_slice(("ns1", "a"), endpoint_slice("a", "svc1", ["10.244.1.2"]))
    assert st.pending_changes() == (2, 1)
    st.commit()
    assert st.pending_changes() == (0, 0)


def _port(**kw: object) -> ServicePort:
    return ServicePort(
        name=ServicePortName("ns1", "svc", "p", Protocol.TCP),
        port=80,
        cluster_ips=("10.96.0.1",),
        **kw,  # type: ignore[arg-type]
    )


def test_categorize_cluster_policy_ready_first_then_terminating() -> None:
    me = NodeTopology("node1")
    ready = Endpoint("10.244.1.2", 80, node_name="node2")
    term = Endpoint("10.244.1.3", 80, ready=False, serving=True, terminating=True, node_name="node1")
    dead = Endpoint("10.244.1.4", 80, ready=False, serving=False, terminating=True)
    assert categorize([ready, term, dead], _port(), me).cluster == (ready,)
    c = categorize([term, dead], _port(), me)
    assert (c.cluster, c.has_any) == ((term,), True)
    assert categorize([dead], _port(), me).has_any is False


def test_categorize_local_policy() -> None:
    me = NodeTopology("node1")
    remote = Endpoint("10.244.2.2", 80, node_name="node2")
    local = Endpoint("10.244.1.2", 80, node_name="node1")
    c = categorize([remote, local], _port(internal_policy_local=True), me)
    assert (c.cluster, c.local, c.all_reachable) == ((), (local,), (local,))
    c = categorize([remote], _port(internal_policy_local=True), me)
    assert (c.local, c.has_any) == ((), True)  # exists elsewhere: DROP, not REJECT


def test_categorize_topology_hints() -> None:
    me = NodeTopology("node1", zone="a")
    in_zone = Endpoint("10.244.1.2", 80, zone_hints=frozenset({"a"}))
    other = Endpoint("10.244.2.2", 80, zone_hints=frozenset({"b"}))
    assert categorize([in_zone, other], _port(), me).cluster == (in_zone,)
    unhinted = Endpoint("10.244.3.2", 80)
    assert categorize([in_zone, other, unhinted], _port(), me).cluster == (in_zone, other, unhinted)


def test_no_local_endpoints_counts_local_policies_that_drop_on_this_node() -> None:
    itp = service("itp", "10.96.0.1", internalTrafficPolicy="Local")
    etp = service(
        "etp", "10.96.0.2", type="NodePort", externalTrafficPolicy="Local",
        ports=[{"name": "p80", "port": 80, "nodePort": 30080}],
    )  # fmt: skip
    both_empty = service("empty", "10.96.0.3", internalTrafficPolicy="Local")  # no endpoints at all: REJECT, not DROP
    served = service("served", "10.96.0.4", internalTrafficPolicy="Local")
    st = state_with(
        itp, etp, both_empty, served,
        endpoint_slice("itp-1", "itp", ["10.244.2.2"], node="node2"),
        endpoint_slice("etp-1", "etp", ["10.244.2.3"], node="node2"),
        endpoint_slice("served-1", "served", ["10.244.1.4"], node="node1"),
    )  # fmt: skip
    assert st.no_local_endpoints(IPFamily.V4) == (1, 1)
    assert st.no_local_endpoints(IPFamily.V6) == (0, 0)  # single-stack IPv4 Services
    st.on_endpoint_slice(("ns1", "etp-1"), endpoint_slice("etp-1", "etp", ["10.244.1.3"], node="node1"))
    st.commit()
    assert st.no_local_endpoints(IPFamily.V4) == (1, 0)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("255.255.255.255", "255.255.255.255"),
        (" 10.1.2.3", "10.1.2.3"),
        ("fd00:10:244:0:0:0:0:1", "fd00:10:244::1"),
        ("FD00::A", "fd00::a"),
    ],
)
def test_ip_addresses_are_canonical(text: str, canonical: str) -> None:
    assert parse_ip(text, "x") == canonical


@pytest.mark.parametrize(
    "text", ["010.1.2.3", "256.1.2.3", "1.2.3", "1.2.3.4.5", "\u0661.2.3.4", "", "fe80::1%eth0", "fd00::1%1"]
)
def test_invalid_ip_addresses_are_refused(text: str) -> None:
    # Unicode digits match a naive \d: they must never reach a ruleset.
    with pytest.raises(InvalidObject, match="invalid IP address"):
        parse_ip(text, "x")


def test_two_ports_with_one_port_number_and_protocol_are_refused() -> None:
    # The API server refuses them; from manifests they would claim one address:port twice.
    svc = service("web", "10.96.0.10", ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}])
    with pytest.raises(InvalidObject, match="duplicate port 80/TCP"):
        service_ports(svc)
    ok = service("web", "10.96.0.10", ports=[{"name": "a", "port": 53}, {"name": "b", "port": 53, "protocol": "UDP"}])
    assert len(service_ports(ok)) == 2
