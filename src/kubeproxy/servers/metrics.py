"""The metrics server (``metricsBindAddress``, default ``127.0.0.1:10249``; empty disables it).

Paths, as upstream's ``serveMetrics`` (cmd/kube-proxy/app/server.go) installs them:
- ``/metrics``: the Prometheus text exposition of ``ProxyMetrics`` (gzip when the scraper accepts it,
  as Go's promhttp does);
- ``/metrics/slis``: component-base's health-check SLIs; ``DELETE`` resets them (``metrics reset``);
- ``/healthz``: the generic apiserver-style ping, NOT the proxy's health: ``ok``; ``?verbose`` lists
  the checks (``[+]ping ok`` ... ``healthz check passed``); ``?exclude=ping`` skips one;
  ``/healthz/ping`` runs the ping check alone;
- ``/proxyMode``: the mode name as plain text (``nftables``), no newline;
- ``/configz``: every registered component config as JSON keyed by its registered name; kube-proxy
  registers its configuration as ``kubeproxy.config.k8s.io``. ``configz`` is that configuration as a
  JSON-able mapping (the v1alpha1 ``KubeProxyConfiguration`` document); it is encoded once, here, so
  a value JSON cannot carry fails at construction rather than on a request.
Not served: ``/debug/pprof`` and ``/debug/flags/v`` (``enableProfiling``; Go-specific), ``/flagz`` and
``/statusz`` (alpha feature gates).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from kubeproxy.observe.metrics import ProxyMetrics, SLIMetrics
from kubeproxy.servers.threaded import NOSNIFF, TEXT_PLAIN, Handler, ThreadedHTTPServer

__all__ = ["CONFIGZ_NAME", "MetricsServer"]

CONFIGZ_NAME = "kubeproxy.config.k8s.io"  # kubeproxyconfig.GroupName, what upstream registers /configz under
PING = "ping"  # the only check upstream's metrics-port /healthz has


def _text(body: str, *, status: int = 200, nosniff: bool = True) -> web.Response:
    return web.Response(
        status=status, text=body, content_type=TEXT_PLAIN, charset="utf-8", headers=NOSNIFF if nosniff else None
    )


class MetricsServer(ThreadedHTTPServer):
    """``/metrics``, ``/metrics/slis``, ``/healthz``, ``/proxyMode`` and ``/configz`` on a thread of their own."""

    name = "metrics"

    def __init__(
        self,
        bind_address: str,
        metrics: ProxyMetrics,
        *,
        proxy_mode: str,
        configz: Mapping[str, Any],
        hard_fail: bool = False,
        retry_interval: float = 5.0,
    ) -> None:
        super().__init__(bind_address, hard_fail=hard_fail, retry_interval=retry_interval)
        self.metrics = metrics
        self.slis = SLIMetrics()
        self.proxy_mode = proxy_mode
        # Go's json.Marshal output: compact. TypeError/ValueError here for a value JSON cannot hold.
        self._configz = json.dumps({CONFIGZ_NAME: configz}, separators=(",", ":"), allow_nan=False).encode()

    def routes(self) -> Mapping[str, Handler]:
        return {
            "/metrics": self._metrics,
            "/metrics/slis": self._slis,
            "/healthz": self._healthz,
            f"/healthz/{PING}": self._ping,
            "/proxyMode": self._proxy_mode,
            "/configz": self._configz_handler,
        }

    def _metrics(self, _request: web.BaseRequest) -> web.Response:
        body, content_type = self.metrics.exposition()
        response = web.Response(body=body, headers={"Content-Type": content_type})
        response.enable_compression()  # only when the request's Accept-Encoding allows it
        return response

    def _slis(self, request: web.BaseRequest) -> web.Response:
        if request.method == "DELETE":
            self.slis.reset()
            return _text("metrics reset\n", nosniff=False)
        body, content_type = self.slis.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    def _healthz(self, request: web.BaseRequest) -> web.Response:
        # apiserver's healthz handler with its default single check, "ping" (which always passes).
        excluded = set(request.query.getall("exclude", []))
        lines: list[str] = []
        if PING in excluded:
            excluded.discard(PING)
            lines.append(f"[+]{PING} excluded: ok\n")
        else:
            self.slis.observe(PING, "healthz", success=True)
            lines.append(f"[+]{PING} ok\n")
        if excluded:
            names = ",".join(json.dumps(name) for name in sorted(excluded))
            lines.append(f"warn: some health checks cannot be excluded: no matches for {names}\n")
        if "verbose" not in request.query:
            return _text("ok")
        return _text("".join(lines) + "healthz check passed\n")

    def _ping(self, _request: web.BaseRequest) -> web.Response:
        return _text("ok", nosniff=False)

    def _proxy_mode(self, _request: web.BaseRequest) -> web.Response:
        return _text(self.proxy_mode)

    def _configz_handler(self, _request: web.BaseRequest) -> web.Response:
        return web.Response(body=self._configz, content_type="application/json", headers=NOSNIFF)
