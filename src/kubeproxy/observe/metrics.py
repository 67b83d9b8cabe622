"""Prometheus metrics: upstream kube-proxy's ``kubeproxy_*`` families, and their text exposition.

Names, types, label names, help texts and histogram buckets are upstream's (pkg/proxy/metrics at the
1.33+ layout, where most families carry ``ip_family``), so dashboards and alerts written for
kube-proxy keep working. ``ProxyMetrics`` owns its own ``CollectorRegistry`` (never the global one),
so every test gets fresh counters; the daemon makes one and passes it to the servers.

As upstream's ``RegisterMetrics(mode)``, the families common to every mode (``COMMON_FAMILIES``) are
served always and the mode-specific ones (``MODE_FAMILIES``) only for the mode in force: nftables
mode adds ``..._nftables_sync_failures_total`` and ``..._nftables_cleanup_failures_total``; iptables
mode adds ``..._iptables_restore_failures_total``, ``..._iptables_partial_restore_failures_total``
and the rule-count gauges ``..._iptables_total{table}`` / ``..._iptables_last{table}``. Upstream's
nfacct-backed iptables counters (``kubeproxy_iptables_*_packets_total``) and the IPVS families are
not served.

The exposition is written here rather than by ``prometheus_client.generate_latest`` because the
library's output differs from what upstream's Go client serves in ways scrapers can see:
- it adds ``*_created`` series (OpenMetrics) next to counters and histograms; upstream has none;
- it prints ``le="1.0"`` where Go prints ``le="1"``: a different label value, so a query for
  ``..._bucket{le="1"}`` written against upstream would match nothing on Prometheus 2;
- it prints HELP/TYPE lines for labelled families that have no series yet; Go omits them;
- it announces the text format 1.0.0; we serve 0.0.4, as upstream's handler does by default.
So ``render_text`` formats numbers like Go's ``strconv.FormatFloat(v, 'g', -1, 64)``, orders
families by name and series by label values (Go's registry does both), writes ``le`` last, and
drops ``_created``. Help texts carry the ``[ALPHA]``/``[BETA]`` prefix upstream's component-base
metrics framework adds.

Families are labelled ``IPv4``/``IPv6`` (``v1.IPFamily``). This package sits below
``kubeproxy.model`` in the layering, so it takes a family as ``4``/``6`` (``IPFamily`` is an
``IntEnum``, so ``IPFamily.V4`` works as is) or as the label string itself.
"""

from __future__ import annotations

import calendar
import decimal
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.registry import Collector

__all__ = [
    "COMMON_FAMILIES",
    "CONTENT_TYPE",
    "IPV4",
    "IPV6",
    "LAST_CHANGE_TRIGGER_TIME",
    "METRIC_FAMILIES",
    "MODE_FAMILIES",
    "PROXY_MODES",
    "FamilyLike",
    "MetricFamily",
    "ProxyMetrics",
    "SLIMetrics",
    "families_for",
    "family_label",
    "go_float",
    "network_programming_durations",
    "parse_trigger_time",
    "render_text",
]

# What upstream's promhttp handler answers for the Prometheus text format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

IPV4 = "IPv4"
IPV6 = "IPv6"
FamilyLike = int | str  # 4 / 6 (IPFamily.V4 / V6) or "IPv4" / "IPv6"

# EndpointSlice annotation the EndpointSlice controller sets to the time of the Pod/Service change
# that triggered the slice update; network programming latency is measured from it.
LAST_CHANGE_TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"

SUBSYSTEM = "kubeproxy"


def family_label(family: FamilyLike) -> str:
    """``"IPv4"``/``"IPv6"`` for 4/6 (or an ``IPFamily``) or for the label itself; ValueError otherwise."""
    if isinstance(family, str):
        if family in (IPV4, IPV6):
            return family
    elif family == 4:
        return IPV4
    elif family == 6:
        return IPV6
    raise ValueError(f"not an IP family: {family!r}")


def _exponential(start: float, factor: float, count: int) -> tuple[float, ...]:
    # prometheus.ExponentialBuckets; round() keeps 0.001 * 2**k free of float noise (0.008 not
    # 0.008000000000000002), so the le label reads as upstream's.
    return tuple(round(start * factor**i, 12) for i in range(count))


def _linear(start: float, width: float, count: int) -> tuple[float, ...]:
    return tuple(start + width * i for i in range(count))


# ExponentialBuckets(0.001, 2, 15): 1 ms .. 16.384 s.
SYNC_BUCKETS = _exponential(0.001, 2, 15)
# component-base MergeBuckets starts from a zero-filled slice of length 1, so upstream's network
# programming histogram has a le="0" bucket before 0.25 s: 0, 0.25, 0.5, 1..59, 60..115/5, 120..300/30.
# We add 5, 10, 25, 50 and 100 ms: a one-endpoint change is programmed here in 10-50 ms (make bench),
# which upstream's buckets would all lump into "under 0.25 s". Every upstream bucket is still there,
# so queries written for upstream's histogram keep working.
NETWORK_PROGRAMMING_BUCKETS = (
    0.0,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    *_linear(0.25, 0.25, 2),
    *_linear(1, 1, 59),
    *_linear(60, 5, 12),
    *_linear(120, 30, 7),
)
# The conntrack reconciler histogram (PR #130200) shows 1 ms doubling buckets, like the sync ones.
CONNTRACK_BUCKETS = SYNC_BUCKETS


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """One upstream metric family: full name, Prometheus type, label names, help (without prefix)."""

    name: str
    type: str  # "counter" | "gauge" | "histogram"
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()
    stability: str = "ALPHA"


def _kp(name: str) -> str:
    return f"{SUBSYSTEM}_{name}"


# The kubeproxy_* families we serve, as upstream declares them (pkg/proxy/metrics/metrics.go and the
# generated Kubernetes metrics reference): first those of every mode, then those of one mode only.
COMMON_FAMILIES: tuple[MetricFamily, ...] = (
    MetricFamily(
        _kp("sync_proxy_rules_duration_seconds"),
        "histogram",
        ("ip_family",),
        "SyncProxyRules latency in seconds",
        SYNC_BUCKETS,
    ),
    MetricFamily(
        _kp("sync_full_proxy_rules_duration_seconds"),
        "histogram",
        ("ip_family",),
        "SyncProxyRules latency in seconds for full resyncs",
        SYNC_BUCKETS,
    ),
    MetricFamily(
        _kp("sync_partial_proxy_rules_duration_seconds"),
        "histogram",
        ("ip_family",),
        "SyncProxyRules latency in seconds for partial resyncs",
        SYNC_BUCKETS,
    ),
    MetricFamily(
        _kp("sync_proxy_rules_last_timestamp_seconds"),
        "gauge",
        ("ip_family",),
        "The last time proxy rules were successfully synced",
    ),
    MetricFamily(
        _kp("sync_proxy_rules_last_queued_timestamp_seconds"),
        "gauge",
        ("ip_family",),
        "The last time a sync of proxy rules was queued",
    ),
    MetricFamily(
        _kp("network_programming_duration_seconds"),
        "histogram",
        ("ip_family",),
        "In Cluster Network Programming Latency in seconds",
        NETWORK_PROGRAMMING_BUCKETS,
    ),
    MetricFamily(_kp("sync_proxy_rules_endpoint_changes_pending"), "gauge", (), "Pending proxy rules Endpoint changes"),
    MetricFamily(
        _kp("sync_proxy_rules_endpoint_changes_total"), "counter", (), "Cumulative proxy rules Endpoint changes"
    ),
    MetricFamily(_kp("sync_proxy_rules_service_changes_pending"), "gauge", (), "Pending proxy rules Service changes"),
    MetricFamily(
        _kp("sync_proxy_rules_service_changes_total"), "counter", (), "Cumulative proxy rules Service changes"
    ),
    MetricFamily(
        _kp("sync_proxy_rules_no_local_endpoints_total"),
        "gauge",
        ("ip_family", "traffic_policy"),
        "Number of services with a Local traffic policy and no endpoints",
    ),
    MetricFamily(
        _kp("conntrack_reconciler_sync_duration_seconds"),
        "histogram",
        ("ip_family",),
        "ReconcileConntrackFlowsLatency latency in seconds",
        CONNTRACK_BUCKETS,
    ),
    MetricFamily(
        _kp("conntrack_reconciler_deleted_entries_total"),
        "counter",
        ("ip_family",),
        "Cumulative conntrack flows deleted by conntrack reconciler",
    ),
    MetricFamily(_kp("proxy_healthz_total"), "counter", ("code",), "Cumulative proxy healthz HTTP status"),
    MetricFamily(_kp("proxy_livez_total"), "counter", ("code",), "Cumulative proxy livez HTTP status"),
)

NFTABLES_FAMILIES: tuple[MetricFamily, ...] = (
    MetricFamily(
        _kp("sync_proxy_rules_nftables_sync_failures_total"),
        "counter",
        ("ip_family",),
        "Cumulative proxy nftables sync failures",
    ),
    MetricFamily(
        _kp("sync_proxy_rules_nftables_cleanup_failures_total"),
        "counter",
        ("ip_family",),
        "Cumulative proxy nftables cleanup failures",
    ),
)

IPTABLES_FAMILIES: tuple[MetricFamily, ...] = (
    MetricFamily(
        _kp("sync_proxy_rules_iptables_restore_failures_total"),
        "counter",
        ("ip_family",),
        "Cumulative proxy iptables restore failures",
    ),
    MetricFamily(
        _kp("sync_proxy_rules_iptables_partial_restore_failures_total"),
        "counter",
        ("ip_family",),
        "Cumulative proxy iptables partial restore failures",
    ),
    MetricFamily(
        _kp("sync_proxy_rules_iptables_total"),
        "gauge",
        ("ip_family", "table"),
        "Total number of iptables rules owned by kube-proxy",
    ),
    MetricFamily(
        _kp("sync_proxy_rules_iptables_last"),
        "gauge",
        ("ip_family", "table"),
        "Number of iptables rules written by kube-proxy in last sync",
    ),
)

# Mode -> the families served only in that mode (upstream's switch in RegisterMetrics).
MODE_FAMILIES: dict[str, tuple[MetricFamily, ...]] = {
    "nftables": NFTABLES_FAMILIES,
    "iptables": IPTABLES_FAMILIES,
}
PROXY_MODES: tuple[str, ...] = tuple(MODE_FAMILIES)

# Every family of every mode (no single ProxyMetrics serves them all; see ``families_for``).
METRIC_FAMILIES: tuple[MetricFamily, ...] = COMMON_FAMILIES + tuple(f for fs in MODE_FAMILIES.values() for f in fs)


def families_for(mode: str) -> tuple[MetricFamily, ...]:
    """The families ``ProxyMetrics`` serves in ``mode`` ("nftables" or "iptables"); ValueError otherwise."""
    if mode not in MODE_FAMILIES:
        raise ValueError(f"not a proxy mode with metrics: {mode!r} (expected one of {', '.join(PROXY_MODES)})")
    return COMMON_FAMILIES + MODE_FAMILIES[mode]


def _help(family: MetricFamily) -> str:
    return f"[{family.stability}] {family.help}"


def _make(family: MetricFamily, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
    if family.type == "counter":
        # prometheus_client wants the name without "_total" and adds it back to the sample name.
        return Counter(family.name.removesuffix("_total"), _help(family), family.labels, registry=registry)
    if family.type == "gauge":
        return Gauge(family.name, _help(family), family.labels, registry=registry)
    return Histogram(family.name, _help(family), family.labels, registry=registry, buckets=family.buckets)


class ProxyMetrics:
    """Upstream's kube-proxy metrics in a registry of their own, with the calls the daemon makes.

    Thread-safe (prometheus_client metrics lock internally): the daemon's loop records, the metrics
    server's thread renders. ``families`` are the IP families this proxy runs; they are what the
    calls that take ``family=None`` apply to. ``mode`` ("nftables" or "iptables") selects the
    mode-specific families (``families_for``); the calls that record into another mode's families
    are no-ops. Labelled families show no series until first recorded into, as Go's vectors.
    """

    def __init__(
        self,
        families: Iterable[FamilyLike] = (IPV4,),
        *,
        mode: str = "nftables",
        process_collectors: bool = True,
    ) -> None:
        served = families_for(mode)
        self._mode = str(mode)  # a ProxyMode (StrEnum) becomes its plain value
        self.families: tuple[str, ...] = tuple(sorted({family_label(f) for f in families}))
        if not self.families:
            raise ValueError("ProxyMetrics needs at least one IP family")
        self.registry = CollectorRegistry(auto_describe=True)
        if process_collectors:
            # Upstream serves Go runtime and process_* families; process_* names are the same here.
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        m = {f.name: _make(f, self.registry) for f in served}
        self._sync_duration = _histogram(m, "sync_proxy_rules_duration_seconds")
        self._sync_full = _histogram(m, "sync_full_proxy_rules_duration_seconds")
        self._sync_partial = _histogram(m, "sync_partial_proxy_rules_duration_seconds")
        self._last_sync = _gauge(m, "sync_proxy_rules_last_timestamp_seconds")
        self._last_queued = _gauge(m, "sync_proxy_rules_last_queued_timestamp_seconds")
        self._network_programming = _histogram(m, "network_programming_duration_seconds")
        self._endpoints_pending = _gauge(m, "sync_proxy_rules_endpoint_changes_pending")
        self._endpoints_total = _counter(m, "sync_proxy_rules_endpoint_changes_total")
        self._services_pending = _gauge(m, "sync_proxy_rules_service_changes_pending")
        self._services_total = _counter(m, "sync_proxy_rules_service_changes_total")
        self._no_local = _gauge(m, "sync_proxy_rules_no_local_endpoints_total")
        self._conntrack_duration = _histogram(m, "conntrack_reconciler_sync_duration_seconds")
        self._conntrack_deleted = _counter(m, "conntrack_reconciler_deleted_entries_total")
        self._healthz = _counter(m, "proxy_healthz_total")
        self._livez = _counter(m, "proxy_livez_total")
        nftables, iptables = self._mode == "nftables", self._mode == "iptables"
        self._nft_sync_failures = _counter(m, "sync_proxy_rules_nftables_sync_failures_total") if nftables else None
        self._nft_cleanup_failures = (
            _counter(m, "sync_proxy_rules_nftables_cleanup_failures_total") if nftables else None
        )
        self._ipt_restore_failures = (
            _counter(m, "sync_proxy_rules_iptables_restore_failures_total") if iptables else None
        )
        self._ipt_partial_restore_failures = (
            _counter(m, "sync_proxy_rules_iptables_partial_restore_failures_total") if iptables else None
        )
        self._ipt_rules_total = _gauge(m, "sync_proxy_rules_iptables_total") if iptables else None
        self._ipt_rules_last = _gauge(m, "sync_proxy_rules_iptables_last") if iptables else None

    @property
    def mode(self) -> str:
        """The proxy mode whose families are served: "nftables" or "iptables"."""
        return self._mode

    def _targets(self, family: FamilyLike | None) -> tuple[str, ...]:
        return self.families if family is None else (family_label(family),)

    # -- sync loop -------------------------------------------------------------------------------
    def observe_sync(self, family: FamilyLike, *, full: bool, seconds: float) -> None:
        """One syncProxyRules run of ``family`` took ``seconds`` (successful or not, as upstream)."""
        label = family_label(family)
        self._sync_duration.labels(label).observe(seconds)
        (self._sync_full if full else self._sync_partial).labels(label).observe(seconds)

    def sync_succeeded(self, family: FamilyLike, wall_ts: float) -> None:
        """Rules of ``family`` were programmed successfully at ``wall_ts`` (Unix seconds)."""
        self._last_sync.labels(family_label(family)).set(wall_ts)

    def sync_queued(self, wall_ts: float, family: FamilyLike | None = None) -> None:
        """A sync was requested at ``wall_ts``: a change arrived, or the sync loop started (upstream
        sets this once at SyncLoop start, "as the informers are syncing"). None = every family."""
        for label in self._targets(family):
            self._last_queued.labels(label).set(wall_ts)

    def observe_network_programming(self, family: FamilyLike, seconds: float) -> None:
        """One EndpointSlice change (its trigger time) reached the kernel after ``seconds``."""
        self._network_programming.labels(family_label(family)).observe(seconds)

    def set_pending(self, *, endpoints: int, services: int) -> None:
        """Changes received and not yet synced (upstream: the change trackers' pending counts)."""
        self._endpoints_pending.set(endpoints)
        self._services_pending.set(services)

    def add_changes(self, *, endpoints: int = 0, services: int = 0) -> None:
        """Count changes as they arrive (cumulative)."""
        if endpoints < 0 or services < 0:
            raise ValueError("change counts only grow")
        self._endpoints_total.inc(endpoints)
        self._services_total.inc(services)

    def set_no_local_endpoints(self, family: FamilyLike, *, internal: int, external: int) -> None:
        """Services with a Local internal/external traffic policy and no local endpoint, this sync."""
        label = family_label(family)
        self._no_local.labels(label, "internal").set(internal)
        self._no_local.labels(label, "external").set(external)

    def sync_failed(self, family: FamilyLike, *, partial: bool = False) -> None:
        """Programming the rules of ``family`` failed; ``partial``: the failed sync was a partial one.

        nftables mode: the nft transaction failed (``..._nftables_sync_failures_total``, whatever
        ``partial``). iptables mode: iptables-restore failed (``..._iptables_restore_failures_total``),
        and, when ``partial``, also ``..._iptables_partial_restore_failures_total`` (upstream counts
        a failed partial sync there, and falls back to a full sync next)."""
        label = family_label(family)
        if self._nft_sync_failures is not None:
            self._nft_sync_failures.labels(label).inc()
        if self._ipt_restore_failures is not None:
            self._ipt_restore_failures.labels(label).inc()
        if partial and self._ipt_partial_restore_failures is not None:
            self._ipt_partial_restore_failures.labels(label).inc()

    def cleanup_failed(self, family: FamilyLike) -> None:
        """Deleting stale chains/sets of ``family`` failed (nftables mode; a no-op in iptables mode,
        which upstream has no cleanup-failure family for: its stale chains go in the restore)."""
        label = family_label(family)
        if self._nft_cleanup_failures is not None:
            self._nft_cleanup_failures.labels(label).inc()

    def set_iptables_rules(self, family: FamilyLike, *, total: Mapping[str, int], written: Mapping[str, int]) -> None:
        """iptables mode: rules of ``family`` per table (upstream: ``filter`` and ``nat``): ``total``
        owned by kube-proxy (``..._iptables_total``) and ``written`` by the last sync
        (``..._iptables_last``); only the tables given are set. A no-op in nftables mode."""
        label = family_label(family)
        if any(count < 0 for count in (*total.values(), *written.values())):
            raise ValueError("rule counts cannot be negative")
        if self._ipt_rules_total is None or self._ipt_rules_last is None:
            return
        for table, count in total.items():
            self._ipt_rules_total.labels(label, table).set(count)
        for table, count in written.items():
            self._ipt_rules_last.labels(label, table).set(count)

    def observe_conntrack(self, family: FamilyLike, *, seconds: float, deleted: int) -> None:
        """One conntrack reconcile of ``family``: how long it took and how many flows it deleted.
        The counter is touched even for 0, so the series exists from the first reconcile on."""
        label = family_label(family)
        self._conntrack_duration.labels(label).observe(seconds)
        self._conntrack_deleted.labels(label).inc(deleted)

    # -- health server -----------------------------------------------------------------------------
    def count_health(self, path: str, code: int) -> None:
        """One answer of the proxy health server: ``path`` is ``/healthz`` or ``/livez``."""
        counter = {"/healthz": self._healthz, "/livez": self._livez}.get("/" + path.lstrip("/"))
        if counter is None:
            raise ValueError(f"not a proxy health path: {path!r}")
        counter.labels(str(code)).inc()

    # -- exposition --------------------------------------------------------------------------------
    def exposition(self) -> tuple[bytes, str]:
        """The ``/metrics`` body and its Content-Type."""
        return render_text(self.registry), CONTENT_TYPE


def _counter(m: dict[str, Counter | Gauge | Histogram], name: str) -> Counter:
    metric = m[_kp(name)]
    assert isinstance(metric, Counter)
    return metric


def _gauge(m: dict[str, Counter | Gauge | Histogram], name: str) -> Gauge:
    metric = m[_kp(name)]
    assert isinstance(metric, Gauge)
    return metric


def _histogram(m: dict[str, Counter | Gauge | Histogram], name: str) -> Histogram:
    metric = m[_kp(name)]
    assert isinstance(metric, Histogram)
    return metric


class SLIMetrics:
    """``/metrics/slis``: component-base's health-check SLIs (``kubernetes_healthcheck`` and
    ``kubernetes_healthchecks_total``), recorded for every check a ``/healthz`` request runs."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._status = Gauge(
            "kubernetes_healthcheck",
            "[BETA] This metric records the result of a single healthcheck.",
            ("name", "type"),
            registry=self.registry,
        )
        self._total = Counter(
            "kubernetes_healthchecks",
            "[BETA] This metric records the results of all healthcheck.",
            ("name", "type", "status"),
            registry=self.registry,
        )

    def observe(self, name: str, check_type: str, *, success: bool) -> None:
        self._status.labels(name, check_type).set(1 if success else 0)
        self._total.labels(name, check_type, "success" if success else "error").inc()

    def reset(self) -> None:
        """Forget every series (upstream's ``DELETE /metrics/slis``)."""
        self._status.clear()
        self._total.clear()

    def exposition(self) -> tuple[bytes, str]:
        return render_text(self.registry), CONTENT_TYPE


# -- text exposition (Prometheus text format 0.0.4, as Go's expfmt writes it) ----------------------

_TYPE_MAP = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram", "unknown": "untyped"}
_OPENMETRICS_ONLY = ("_created", "_gsum", "_gcount")


def go_float(value: float) -> str:
    """``value`` as Go's ``strconv.FormatFloat(value, 'g', -1, 64)`` (and expfmt's Inf/NaN) spells it:
    the shortest digits that round-trip, in exponent form when the decimal exponent is < -4 or >= 6
    (``1``, ``0.25``, ``300``, ``1e+06``, ``1.7634816e+09``, ``0.0001``, ``1e-05``)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    sign = "-" if value < 0 else ""
    # repr() gives the shortest round-tripping digits, like Go's shortest formatting.
    _sign, digit_tuple, exponent = decimal.Decimal(repr(abs(value))).as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple)).lstrip("0")
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)
    digits = stripped
    point = len(digits) + exponent  # position of the decimal point relative to the digits
    exp10 = point - 1
    if exp10 < -4 or exp10 >= 6:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{mantissa}e{'+' if exp10 >= 0 else '-'}{abs(exp10):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return f"{sign}{digits}{'0' * (point - len(digits))}"
    return f"{sign}{digits[:point]}.{digits[point:]}"


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _escape_help(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n")


def _series_key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "le"))


def _line(name: str, labels: dict[str, str], value: float) -> str:
    pairs = [(k, labels[k]) for k in sorted(labels) if k != "le"]
    if "le" in labels:
        pairs.append(("le", go_float(float(labels["le"]))))  # Go appends le after the sorted labels
    label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs)
    return f"{name}{{{label_text}}} {go_float(value)}\n" if pairs else f"{name} {go_float(value)}\n"


def render_text(registry: Collector) -> bytes:
    """``registry`` in the Prometheus text format 0.0.4, laid out as upstream's Go handler does."""
    families: list[tuple[str, str, str, list[str]]] = []
    for metric in registry.collect():
        mtype = _TYPE_MAP.get(metric.type, metric.type)
        name = metric.name + {"counter": "_total", "info": "_info"}.get(metric.type, "")
        # Group samples per series (label set without le), keeping the bucket order within a series.
        series: dict[tuple[tuple[str, str], ...], list[tuple[str, dict[str, str], float]]] = {}
        for sample in metric.samples:
            if any(sample.name == metric.name + suffix for suffix in _OPENMETRICS_ONLY):
                continue
            series.setdefault(_series_key(sample.labels), []).append((sample.name, sample.labels, sample.value))
        if not series:
            continue  # a labelled family without series: Go's registry serves nothing for it
        lines: list[str] = []
        for key in sorted(series):
            samples = series[key]
            if mtype == "histogram":
                # Go writes the buckets, then _sum, then _count.
                order = {"_bucket": 0, "_sum": 1, "_count": 2}
                samples = sorted(samples, key=lambda s: order.get(s[0][len(metric.name) :], 3))
            lines.extend(_line(n, labels, value) for n, labels, value in samples)
        families.append((name, mtype, metric.documentation, lines))
    out: list[str] = []
    for name, mtype, documentation, lines in sorted(families, key=lambda f: f[0]):
        out.append(f"# HELP {name} {_escape_help(documentation)}\n")
        out.append(f"# TYPE {name} {mtype}\n")
        out.extend(lines)
    return "".join(out).encode()


# -- network programming latency -------------------------------------------------------------------

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})$",
    re.ASCII,
)


def parse_trigger_time(value: str) -> float | None:
    """An RFC 3339 timestamp (``2026-11-21T08:00:00Z``, ``...00.123456789Z``, ``...00+01:00``) as
    Unix seconds; None if it is not one (upstream logs and ignores an unparsable annotation)."""
    match = _RFC3339.match(value.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, zone = match.group(7), match.group(8)
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]):
        return None
    if hour > 23 or minute > 59 or second > 59:  # Go rejects leap seconds too
        return None
    offset = 0
    if zone != "Z":
        zone_hours, zone_minutes = int(zone[1:3]), int(zone[4:6])
        if zone_hours > 23 or zone_minutes > 59:
            return None
        offset = (zone_hours * 60 + zone_minutes) * 60 * (1 if zone[0] == "+" else -1)
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)) - offset
    return seconds + (int(fraction[:9].ljust(9, "0")) / 1e9 if fraction else 0.0)


def network_programming_durations(
    trigger_times: Iterable[str], *, now: float, not_before: float | None = None
) -> list[float]:
    """Seconds from each EndpointSlice trigger time to ``now`` (both Unix wall-clock seconds).

    Skipped: values that do not parse; values in the future (clock skew between the control plane
    and this node -- upstream would record them as negative latencies in its ``le="0"`` bucket); and,
    with ``not_before``, values older than it (upstream ignores triggers from before its change
    tracker started, so a restart does not report the age of every slice as a latency).
    """
    out: list[float] = []
    for value in trigger_times:
        at = parse_trigger_time(value)
        if at is None or at > now or (not_before is not None and at <= not_before):
            continue
        out.append(now - at)
    return out
