"""The proxy health server (``healthzBindAddress``, default ``0.0.0.0:10256``): ``/healthz`` and ``/livez``.

Upstream behaviour (pkg/proxy/healthcheck/proxy_health.go):
- ``/livez``: 503 iff the proxy is unhealthy (a family's oldest unsynced change is older than the
  health timeout, see ``observe.health``), else 200;
- ``/healthz``: 503 iff unhealthy **or** the node is not eligible (its Node object is missing, is
  being deleted, or carries the cluster autoscaler's ``ToBeDeletedByClusterAutoscaler`` taint; that
  judgement is the caller's ``node_eligible``), so load balancers of externalTrafficPolicy=Cluster
  Services drain a node that is going away;
- body: Go's ``json.Marshal`` of ``ProxyHealth``, keys in this order, no spaces:
  ``{"lastUpdated","currentTime","nodeEligible" (/healthz only),"healthy","status"}``, where
  ``healthy`` is the proxy's own health (not the node's eligibility) and ``status`` maps
  ``"IPv4"``/``"IPv6"`` to ``{"lastUpdated","healthy"}`` for every family that has synced (omitted
  while none has). When the answer is 200, ``lastUpdated`` is reported as now -- upstream keeps this
  for compatibility with releases where it meant "the sync loop last ran".
- times are Go ``time.Time`` JSON: RFC 3339 with up to 9 fractional digits (trailing zeros dropped),
  in local time (``Z`` when local is UTC, as in containers); never-updated is Go's zero time
  ``0001-01-01T00:00:00Z``;
- headers ``Content-Type: application/json`` and ``X-Content-Type-Options: nosniff``;
- every answer is counted in ``kubeproxy_proxy_healthz_total{code}`` / ``kubeproxy_proxy_livez_total{code}``.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from kubeproxy.observe.health import ProxyHealth, ProxyHealthTracker
from kubeproxy.observe.metrics import ProxyMetrics
from kubeproxy.servers.threaded import NOSNIFF, Handler, ThreadedHTTPServer

__all__ = ["GO_ZERO_TIME", "ProxyHealthServer", "go_time", "health_document"]

log = logging.getLogger("kubeproxy.servers.proxyhealth")

GO_ZERO_TIME = "0001-01-01T00:00:00Z"


def go_time(ts: float | None, tz: datetime.tzinfo | None = None) -> str:
    """Unix seconds as Go's ``time.Time`` marshals to JSON (RFC 3339, fraction without trailing
    zeros, ``Z`` for UTC); ``tz`` None means the local zone, as Go's ``time.Now()``."""
    if ts is None:
        return GO_ZERO_TIME
    micros = round(ts * 1_000_000)  # Python keeps microseconds; round, so 0.1 s is not 0.099999
    seconds, micro = divmod(micros, 1_000_000)
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    moment = moment.astimezone(tz) if tz is not None else moment.astimezone()
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if micro:
        text += "." + f"{micro:06d}".rstrip("0")
    offset = moment.utcoffset() or datetime.timedelta(0)
    if not offset:
        return text + "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def health_document(
    health: ProxyHealth, *, node_eligible: bool | None, ok: bool, tz: datetime.tzinfo | None = None
) -> dict[str, Any]:
    """The JSON object upstream answers; ``node_eligible`` None leaves the key out (``/livez``);
    ``ok`` (the answer is 200) reports ``lastUpdated`` as the current time."""
    doc: dict[str, Any] = {
        "lastUpdated": go_time(health.current_time if ok else health.last_updated, tz),
        "currentTime": go_time(health.current_time, tz),
    }
    if node_eligible is not None:
        doc["nodeEligible"] = node_eligible
    doc["healthy"] = health.healthy
    if health.families:
        doc["status"] = {
            f.family: {"lastUpdated": go_time(f.last_updated, tz), "healthy": f.healthy} for f in health.families
        }
    return doc


class ProxyHealthServer(ThreadedHTTPServer):
    """``/healthz`` and ``/livez`` on ``bind_address``, on a thread of their own.

    ``node_eligible`` is called on the server thread for every ``/healthz`` request; it must be cheap
    and thread-safe (an exception counts as not eligible).
    """

    name = "healthz"

    def __init__(
        self,
        bind_address: str,
        tracker: ProxyHealthTracker,
        node_eligible: Callable[[], bool],
        metrics: ProxyMetrics | None,
        *,
        hard_fail: bool = False,
        retry_interval: float = 5.0,
        tz: datetime.tzinfo | None = None,
    ) -> None:
        super().__init__(bind_address, hard_fail=hard_fail, retry_interval=retry_interval)
        self.tracker = tracker
        self._node_eligible = node_eligible
        self._metrics = metrics
        self._tz = tz

    def routes(self) -> Mapping[str, Handler]:
        return {"/healthz": self._healthz, "/livez": self._livez}

    def _eligible(self) -> bool:
        try:
            return bool(self._node_eligible())
        except Exception:
            log.exception("node eligibility check raised; answering not eligible")
            return False

    def _healthz(self, _request: web.BaseRequest) -> web.Response:
        health = self.tracker.status()
        eligible = self._eligible()
        return self._answer("/healthz", health, ok=health.healthy and eligible, node_eligible=eligible)

    def _livez(self, _request: web.BaseRequest) -> web.Response:
        health = self.tracker.status()
        return self._answer("/livez", health, ok=health.healthy, node_eligible=None)

    def _answer(self, path: str, health: ProxyHealth, *, ok: bool, node_eligible: bool | None) -> web.Response:
        status = 200 if ok else 503
        if self._metrics is not None:
            self._metrics.count_health(path, status)
        body = json.dumps(
            health_document(health, node_eligible=node_eligible, ok=ok, tz=self._tz), separators=(",", ":")
        )
        return web.Response(status=status, body=body.encode(), content_type="application/json", headers=NOSNIFF)
