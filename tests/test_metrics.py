"""ProxyMetrics against upstream's metric inventory: names, types, label names, help, buckets, as the
text exposition shows them, per proxy mode; Go number formatting; and the trigger-time -> latency
helper."""

from __future__ import annotations

import enum

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from exposition import Exposition
from kubeproxy.model.service import IPFamily
from kubeproxy.observe.metrics import (
    COMMON_FAMILIES,
    CONTENT_TYPE,
    LAST_CHANGE_TRIGGER_TIME,
    METRIC_FAMILIES,
    MODE_FAMILIES,
    ProxyMetrics,
    SLIMetrics,
    families_for,
    family_label,
    go_float,
    network_programming_durations,
    parse_trigger_time,
    render_text,
)

# Upstream's kubeproxy_* families (pkg/proxy/metrics/metrics.go at 1.33+, as listed in the generated
# Kubernetes metrics reference): name -> (type, label names, help as exposed).
UPSTREAM: dict[str, tuple[str, frozenset[str], str]] = {
    "kubeproxy_sync_proxy_rules_duration_seconds": (
        "histogram",
        frozenset({"ip_family"}),
        "[ALPHA] SyncProxyRules latency in seconds",
    ),
    "kubeproxy_sync_full_proxy_rules_duration_seconds": (
        "histogram",
        frozenset({"ip_family"}),
        "[ALPHA] SyncProxyRules latency in seconds for full resyncs",
    ),
    "kubeproxy_sync_partial_proxy_rules_duration_seconds": (
        "histogram",
        frozenset({"ip_family"}),
        "[ALPHA] SyncProxyRules latency in seconds for partial resyncs",
    ),
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds": (
        "gauge",
        frozenset({"ip_family"}),
        "[ALPHA] The last time proxy rules were successfully synced",
    ),
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds": (
        "gauge",
        frozenset({"ip_family"}),
        "[ALPHA] The last time a sync of proxy rules was queued",
    ),
    "kubeproxy_network_programming_duration_seconds": (
        "histogram",
        frozenset({"ip_family"}),
        "[ALPHA] In Cluster Network Programming Latency in seconds",
    ),
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending": (
        "gauge",
        frozenset(),
        "[ALPHA] Pending proxy rules Endpoint changes",
    ),
    "kubeproxy_sync_proxy_rules_endpoint_changes_total": (
        "counter",
        frozenset(),
        "[ALPHA] Cumulative proxy rules Endpoint changes",
    ),
    "kubeproxy_sync_proxy_rules_service_changes_pending": (
        "gauge",
        frozenset(),
        "[ALPHA] Pending proxy rules Service changes",
    ),
    "kubeproxy_sync_proxy_rules_service_changes_total": (
        "counter",
        frozenset(),
        "[ALPHA] Cumulative proxy rules Service changes",
    ),
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total": (
        "gauge",
        frozenset({"ip_family", "traffic_policy"}),
        "[ALPHA] Number of services with a Local traffic policy and no endpoints",
    ),
    "kubeproxy_conntrack_reconciler_sync_duration_seconds": (
        "histogram",
        frozenset({"ip_family"}),
        "[ALPHA] ReconcileConntrackFlowsLatency latency in seconds",
    ),
    "kubeproxy_conntrack_reconciler_deleted_entries_total": (
        "counter",
        frozenset({"ip_family"}),
        "[ALPHA] Cumulative conntrack flows deleted by conntrack reconciler",
    ),
    "kubeproxy_proxy_healthz_total": ("counter", frozenset({"code"}), "[ALPHA] Cumulative proxy healthz HTTP status"),
    "kubeproxy_proxy_livez_total": ("counter", frozenset({"code"}), "[ALPHA] Cumulative proxy livez HTTP status"),
}
# Registered only in the mode in force (upstream's RegisterMetrics(mode)).
UPSTREAM_NFTABLES: dict[str, tuple[str, frozenset[str], str]] = {
    "kubeproxy_sync_proxy_rules_nftables_sync_failures_total": (
        "counter",
        frozenset({"ip_family"}),
        "[ALPHA] Cumulative proxy nftables sync failures",
    ),
    "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total": (
        "counter",
        frozenset({"ip_family"}),
        "[ALPHA] Cumulative proxy nftables cleanup failures",
    ),
}
UPSTREAM_IPTABLES: dict[str, tuple[str, frozenset[str], str]] = {
    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total": (
        "counter",
        frozenset({"ip_family"}),
        "[ALPHA] Cumulative proxy iptables restore failures",
    ),
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total": (
        "counter",
        frozenset({"ip_family"}),
        "[ALPHA] Cumulative proxy iptables partial restore failures",
    ),
    "kubeproxy_sync_proxy_rules_iptables_total": (
        "gauge",
        frozenset({"ip_family", "table"}),
        "[ALPHA] Total number of iptables rules owned by kube-proxy",
    ),
    "kubeproxy_sync_proxy_rules_iptables_last": (
        "gauge",
        frozenset({"ip_family", "table"}),
        "[ALPHA] Number of iptables rules written by kube-proxy in last sync",
    ),
}
UPSTREAM_BY_MODE = {"nftables": UPSTREAM_NFTABLES, "iptables": UPSTREAM_IPTABLES}

# prometheus.ExponentialBuckets(0.001, 2, 15), as Go prints the le label.
SYNC_LE = [
    "0.001",
    "0.002",
    "0.004",
    "0.008",
    "0.016",
    "0.032",
    "0.064",
    "0.128",
    "0.256",
    "0.512",
    "1.024",
    "2.048",
    "4.096",
    "8.192",
    "16.384",
    "+Inf",
]
# MergeBuckets(Linear(0.25,0.25,2), Linear(1,1,59), Linear(60,5,12), Linear(120,30,7)) with its leading 0,
# plus our 5-100 ms buckets (programming here takes tens of milliseconds).
NETWORK_LE = [
    "0",
    "0.005",
    "0.01",
    "0.025",
    "0.05",
    "0.1",
    "0.25",
    "0.5",
    *[str(s) for s in range(1, 60)],
    *[str(s) for s in range(60, 120, 5)],
    *[str(s) for s in range(120, 301, 30)],
    "+Inf",
]


def exposition(metrics: ProxyMetrics) -> Exposition:
    body, content_type = metrics.exposition()
    assert content_type == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    return Exposition(body.decode())


def exercised(mode: str = "nftables") -> ProxyMetrics:
    """Every recording call made once, so every family of ``mode`` has a series."""
    m = ProxyMetrics([IPFamily.V4, IPFamily.V6], mode=mode, process_collectors=False)
    m.observe_sync(IPFamily.V4, full=True, seconds=0.02)
    m.observe_sync(IPFamily.V6, full=False, seconds=0.003)
    m.sync_succeeded(IPFamily.V4, 1_763_712_000.5)
    m.sync_queued(1_763_712_000.25)
    m.observe_network_programming(IPFamily.V4, 1.5)
    m.set_pending(endpoints=3, services=1)
    m.add_changes(endpoints=5, services=2)
    m.set_no_local_endpoints(IPFamily.V4, internal=1, external=2)
    m.sync_failed(IPFamily.V6, partial=True)
    m.cleanup_failed(IPFamily.V4)
    m.set_iptables_rules(IPFamily.V4, total={"filter": 7, "nat": 40}, written={"filter": 7, "nat": 12})
    m.observe_conntrack(IPFamily.V4, seconds=0.01, deleted=4)
    m.count_health("/healthz", 200)
    m.count_health("livez", 503)
    return m


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_every_upstream_family_with_its_type_labels_and_help(mode: str) -> None:
    exp = exposition(exercised(mode))
    expected = UPSTREAM | UPSTREAM_BY_MODE[mode]
    ours = {name for name in exp.types if name.startswith("kubeproxy_")}
    assert ours == set(expected)  # and so none of the other mode's families
    for name, (mtype, labels, help_text) in expected.items():
        assert exp.types[name] == mtype, name
        assert exp.label_names(name) == labels, name
        assert exp.helps[name] == help_text, name


def test_the_declared_families_are_upstreams_per_mode() -> None:
    assert MODE_FAMILIES.keys() == UPSTREAM_BY_MODE.keys()
    assert {f.name for f in COMMON_FAMILIES} == set(UPSTREAM)
    for mode, upstream in UPSTREAM_BY_MODE.items():
        assert {f.name for f in MODE_FAMILIES[mode]} == set(upstream), mode
        assert families_for(mode) == COMMON_FAMILIES + MODE_FAMILIES[mode]
    assert {f.name for f in METRIC_FAMILIES} == set(UPSTREAM) | set(UPSTREAM_NFTABLES) | set(UPSTREAM_IPTABLES)
    assert len({f.name for f in METRIC_FAMILIES}) == len(METRIC_FAMILIES)


class Mode(enum.StrEnum):  # as kubeproxy.config.ProxyMode, without importing the config layer
    NFTABLES = "nftables"
    IPTABLES = "iptables"


@pytest.mark.parametrize("mode", ["nftables", Mode.NFTABLES, "iptables", Mode.IPTABLES])
def test_mode_is_taken_as_a_string_or_a_proxy_mode(mode: str) -> None:
    m = ProxyMetrics([IPFamily.V4], mode=mode, process_collectors=False)
    assert m.mode == str(mode)
    assert type(m.mode) is str
    assert ProxyMetrics([IPFamily.V4], process_collectors=False).mode == "nftables"


@pytest.mark.parametrize("mode", ["ipvs", "kernelspace", "", "NFTABLES", "nft"])
def test_unknown_modes_are_refused(mode: str) -> None:
    with pytest.raises(ValueError, match="proxy mode"):
        ProxyMetrics([IPFamily.V4], mode=mode, process_collectors=False)
    with pytest.raises(ValueError):
        families_for(mode)


def test_iptables_sync_failures_count_restores_and_partial_restores() -> None:
    m = ProxyMetrics([IPFamily.V4, IPFamily.V6], mode="iptables", process_collectors=False)
    restore = "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"
    partial = "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total"
    m.sync_failed(IPFamily.V4)  # a full sync: not a partial restore failure
    exp = exposition(m)
    assert exp.value(restore, ip_family="IPv4") == 1
    assert partial not in exp.types  # no series yet, as Go's vectors
    m.sync_failed(IPFamily.V4, partial=True)
    m.sync_failed(IPFamily.V6, partial=True)
    m.sync_failed(IPFamily.V4, partial=False)
    exp = exposition(m)
    assert exp.value(restore, ip_family="IPv4") == 3
    assert exp.value(restore, ip_family="IPv6") == 1
    assert exp.value(partial, ip_family="IPv4") == 1
    assert exp.value(partial, ip_family="IPv6") == 1
    # Cleanup failures are nftables-only: a no-op here, and still no nftables family.
    m.cleanup_failed(IPFamily.V4)
    exp = exposition(m)
    assert not [name for name in exp.types if "nftables" in name]
    with pytest.raises(ValueError):
        m.cleanup_failed(5)


def test_nftables_sync_failures_ignore_partial_and_iptables_rules_are_a_no_op() -> None:
    m = ProxyMetrics([IPFamily.V4], process_collectors=False)
    m.sync_failed(IPFamily.V4)
    m.sync_failed(IPFamily.V4, partial=True)
    m.set_iptables_rules(IPFamily.V4, total={"filter": 3, "nat": 9}, written={"nat": 2})
    exp = exposition(m)
    assert exp.value("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", ip_family="IPv4") == 2
    assert not [name for name in exp.types if "iptables" in name]


def test_iptables_rule_counts_per_table_and_family() -> None:
    m = ProxyMetrics([IPFamily.V4, IPFamily.V6], mode="iptables", process_collectors=False)
    total, last = "kubeproxy_sync_proxy_rules_iptables_total", "kubeproxy_sync_proxy_rules_iptables_last"
    m.set_iptables_rules(IPFamily.V4, total={"filter": 7, "nat": 40}, written={"filter": 7, "nat": 40})
    m.set_iptables_rules("IPv6", total={"filter": 5, "nat": 20}, written={"filter": 5, "nat": 20})
    # A partial sync rewrites fewer nat rules than kube-proxy owns.
    m.set_iptables_rules(IPFamily.V4, total={"filter": 8, "nat": 44}, written={"filter": 8, "nat": 6})
    exp = exposition(m)
    assert exp.value(total, ip_family="IPv4", table="filter") == 8
    assert exp.value(total, ip_family="IPv4", table="nat") == 44
    assert exp.value(last, ip_family="IPv4", table="filter") == 8
    assert exp.value(last, ip_family="IPv4", table="nat") == 6
    assert exp.value(total, ip_family="IPv6", table="filter") == 5
    assert exp.value(total, ip_family="IPv6", table="nat") == 20
    assert exp.value(last, ip_family="IPv6", table="nat") == 20
    assert len([s for s in exp.samples if s[0] in (total, last)]) == 8
    # Only the tables given are set.
    m.set_iptables_rules(IPFamily.V4, total={"nat": 45}, written={})
    exp = exposition(m)
    assert exp.value(total, ip_family="IPv4", table="nat") == 45
    assert exp.value(total, ip_family="IPv4", table="filter") == 8
    assert exp.value(last, ip_family="IPv4", table="nat") == 6
    assert 'kubeproxy_sync_proxy_rules_iptables_last{ip_family="IPv4",table="filter"} 8\n' in exp.text
    with pytest.raises(ValueError):
        m.set_iptables_rules(IPFamily.V4, total={"nat": -1}, written={})
    with pytest.raises(ValueError):
        m.set_iptables_rules(5, total={"nat": 1}, written={})


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_no_openmetrics_extras_and_no_empty_families(mode: str) -> None:
    exp = exposition(ProxyMetrics([IPFamily.V4], mode=mode, process_collectors=False))
    assert "_created" not in exp.text
    # Unlabelled families exist from the start at 0 (Go registers plain counters/gauges that way);
    # labelled ones appear with their first series, as Go's vectors do.
    assert set(exp.types) == {
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "kubeproxy_sync_proxy_rules_service_changes_total",
    }
    assert exp.value("kubeproxy_sync_proxy_rules_endpoint_changes_total") == 0
    assert "_created" not in exposition(exercised(mode)).text


def test_histogram_buckets_as_upstream_prints_them() -> None:
    exp = exposition(exercised())
    for family in (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "kubeproxy_conntrack_reconciler_sync_duration_seconds",
    ):
        assert exp.le_values(family, ip_family="IPv4") == SYNC_LE, family
    assert exp.le_values("kubeproxy_sync_partial_proxy_rules_duration_seconds", ip_family="IPv6") == SYNC_LE
    assert exp.le_values("kubeproxy_network_programming_duration_seconds", ip_family="IPv4") == NETWORK_LE
    assert len(NETWORK_LE) == 87  # upstream's 81 upper bounds, our 5, and +Inf


def test_histogram_series_are_laid_out_like_go() -> None:
    text = exposition(exercised()).text
    block = [line for line in text.splitlines() if line.startswith("kubeproxy_sync_proxy_rules_duration_seconds")]
    v4 = [line for line in block if 'ip_family="IPv4"' in line]
    v6 = [line for line in block if 'ip_family="IPv6"' in line]
    assert block == v4 + v6  # series sorted by label value
    assert v4[0] == 'kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="0.001"} 0'
    assert v4[-2:] == [
        'kubeproxy_sync_proxy_rules_duration_seconds_sum{ip_family="IPv4"} 0.02',
        'kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"} 1',
    ]
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert names == sorted(names)


def test_recorded_values_land_in_the_right_series() -> None:
    exp = exposition(exercised())
    full, partial = (
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
    )
    assert exp.value(f"{full}_count", ip_family="IPv4") == 1
    assert exp.value(f"{partial}_count", ip_family="IPv6") == 1
    assert not [s for s in exp.samples if s[0] == f"{full}_count" and s[1] == {"ip_family": "IPv6"}]
    assert exp.value(f"{full}_bucket", ip_family="IPv4", le="0.016") == 0
    assert exp.value(f"{full}_bucket", ip_family="IPv4", le="0.032") == 1
    assert exp.value("kubeproxy_sync_proxy_rules_duration_seconds_count", ip_family="IPv6") == 1
    assert exp.value("kubeproxy_sync_proxy_rules_last_timestamp_seconds", ip_family="IPv4") == 1_763_712_000.5
    # sync_queued without a family stamps every family the proxy runs.
    for family in ("IPv4", "IPv6"):
        assert (
            exp.value("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", ip_family=family) == 1_763_712_000.25
        )
    assert exp.value("kubeproxy_network_programming_duration_seconds_bucket", ip_family="IPv4", le="1") == 0
    assert exp.value("kubeproxy_network_programming_duration_seconds_bucket", ip_family="IPv4", le="2") == 1
    assert exp.value("kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 3
    assert exp.value("kubeproxy_sync_proxy_rules_service_changes_pending") == 1
    assert exp.value("kubeproxy_sync_proxy_rules_endpoint_changes_total") == 5
    assert exp.value("kubeproxy_sync_proxy_rules_service_changes_total") == 2
    no_local = "kubeproxy_sync_proxy_rules_no_local_endpoints_total"
    assert exp.value(no_local, ip_family="IPv4", traffic_policy="internal") == 1
    assert exp.value(no_local, ip_family="IPv4", traffic_policy="external") == 2
    assert exp.value("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", ip_family="IPv6") == 1
    assert exp.value("kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total", ip_family="IPv4") == 1
    assert exp.value("kubeproxy_conntrack_reconciler_deleted_entries_total", ip_family="IPv4") == 4
    assert exp.value("kubeproxy_proxy_healthz_total", code="200") == 1
    assert exp.value("kubeproxy_proxy_livez_total", code="503") == 1
    iptables = exposition(exercised("iptables"))
    assert iptables.value("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", ip_family="IPv6") == 1
    assert iptables.value("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", ip_family="IPv6") == 1
    assert iptables.value("kubeproxy_sync_proxy_rules_iptables_total", ip_family="IPv4", table="nat") == 40
    assert iptables.value("kubeproxy_sync_proxy_rules_iptables_last", ip_family="IPv4", table="nat") == 12


def test_conntrack_counter_exists_after_a_reconcile_that_deleted_nothing() -> None:
    m = ProxyMetrics([IPFamily.V6], process_collectors=False)
    m.observe_conntrack(IPFamily.V6, seconds=0.001, deleted=0)
    assert exposition(m).value("kubeproxy_conntrack_reconciler_deleted_entries_total", ip_family="IPv6") == 0


def test_instances_are_independent_and_leave_the_global_registry_alone() -> None:
    before = {m.name for m in REGISTRY.collect()}
    a, b = ProxyMetrics([IPFamily.V4]), ProxyMetrics([IPFamily.V4])
    a.add_changes(services=7)
    assert exposition(a).value("kubeproxy_sync_proxy_rules_service_changes_total") == 7
    assert exposition(b).value("kubeproxy_sync_proxy_rules_service_changes_total") == 0
    assert {m.name for m in REGISTRY.collect()} == before


def test_process_families_are_served() -> None:
    exp = exposition(ProxyMetrics([IPFamily.V4]))
    assert exp.types["process_cpu_seconds_total"] == "counter"
    assert exp.types["process_resident_memory_bytes"] == "gauge"
    assert exp.types["process_start_time_seconds"] == "gauge"
    assert exp.value("process_start_time_seconds") > 0


def test_families_and_arguments_are_checked() -> None:
    assert family_label(IPFamily.V4) == family_label(4) == family_label("IPv4") == "IPv4"
    assert family_label(IPFamily.V6) == "IPv6"
    for bad in (5, "ipv4", "v4", ""):
        with pytest.raises(ValueError):
            family_label(bad)
    m = ProxyMetrics([IPFamily.V4], process_collectors=False)
    with pytest.raises(ValueError):
        m.count_health("/readyz", 200)
    with pytest.raises(ValueError):
        m.add_changes(endpoints=-1)
    with pytest.raises(ValueError):
        ProxyMetrics([], process_collectors=False)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0"),
        (1.0, "1"),
        (0.25, "0.25"),
        (300.0, "300"),
        (123456.0, "123456"),
        (1e6, "1e+06"),
        (1234567.0, "1.234567e+06"),
        (1_763_481_600.0, "1.7634816e+09"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (16.384, "16.384"),
        (-2.5, "-2.5"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
        (float("nan"), "NaN"),
    ],
)
def test_numbers_are_spelled_like_go(value: float, text: str) -> None:
    assert go_float(value) == text


def test_label_values_and_help_are_escaped() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("odd", 'help with \\ and\nnewline "quoted"', ("who",), registry=registry)
    gauge.labels('a "b"\\c\nd').set(1)
    text = render_text(registry).decode()
    assert '# HELP odd help with \\\\ and\\nnewline "quoted"\n' in text
    assert 'odd{who="a \\"b\\"\\\\c\\nd"} 1\n' in text
    Exposition(text)


def test_sli_metrics_record_and_reset() -> None:
    slis = SLIMetrics()
    assert slis.exposition()[0] == b""
    slis.observe("ping", "healthz", success=True)
    slis.observe("ping", "healthz", success=True)
    exp = Exposition(slis.exposition()[0].decode())
    assert exp.types == {"kubernetes_healthcheck": "gauge", "kubernetes_healthchecks_total": "counter"}
    assert exp.value("kubernetes_healthcheck", name="ping", type="healthz") == 1
    assert exp.value("kubernetes_healthchecks_total", name="ping", status="success", type="healthz") == 2
    slis.observe("ping", "healthz", success=False)
    exp = Exposition(slis.exposition()[0].decode())
    assert exp.value("kubernetes_healthcheck", name="ping", type="healthz") == 0
    assert exp.value("kubernetes_healthchecks_total", name="ping", status="error", type="healthz") == 1
    slis.reset()
    assert slis.exposition()[0] == b""


# -- EndpointSlice trigger times -------------------------------------------------------------------

T0 = 1_795_248_000.0  # 2026-11-21T08:00:00Z


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-21T08:00:00Z", T0),
        ("2026-11-21T08:00:00.5Z", T0 + 0.5),
        ("2026-11-21T08:00:00.123456789Z", T0 + 0.123456789),
        ("2026-11-21T09:30:00+01:30", T0),
        ("2026-11-21T03:00:00-05:00", T0),
        ("2026-11-21T08:00:00.250+00:00", T0 + 0.25),
    ],
)
def test_trigger_times_parse(value: str, expected: float) -> None:
    parsed = parse_trigger_time(value)
    assert parsed is not None
    assert parsed == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "yesterday",
        "2026-11-21 08:00:00Z",  # RFC 3339 wants the T
        "2026-11-21T08:00:00",  # no zone
        "2026-02-30T08:00:00Z",
        "2026-11-21T24:00:00Z",
        "2026-11-21T08:00:00+25:00",
        "1763712000",
    ],
)
def test_unparsable_trigger_times_are_none(value: str) -> None:
    assert parse_trigger_time(value) is None


def test_network_programming_durations() -> None:
    now = T0 + 10
    values = [
        "2026-11-21T08:00:00Z",  # 10 s ago
        "2026-11-21T08:00:09.5Z",  # 0.5 s ago
        "garbage",  # skipped
        "2026-11-21T08:00:11Z",  # in the future (clock skew): skipped
    ]
    assert network_programming_durations(values, now=now) == pytest.approx([10.0, 0.5])
    # Triggers from before the proxy started are not latencies of this proxy.
    assert network_programming_durations(values, now=now, not_before=T0 + 5) == pytest.approx([0.5])
    assert LAST_CHANGE_TRIGGER_TIME == "endpoints.kubernetes.io/last-change-trigger-time"
