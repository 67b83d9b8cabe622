"""Composition root: builds the source, the state, the backends and the runner, and runs them.

Invariants (DESIGN.md section 5):
- nothing is programmed until the source has delivered its initial lists of Services and
  EndpointSlices (``ProxyState.is_initialized``);
- a failed sync is logged, counted and retried, and forces the next sync to be a full one;
- SIGTERM/SIGINT stop the process WITHOUT touching the rules (traffic keeps flowing while the
  proxy restarts); only ``cleanup`` removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from kubeproxy.backends.base import Backend
from kubeproxy.backends.conntrack import CleanupResult, ConntrackReconciler
from kubeproxy.backends.iptables.backend import IptablesBackend, cleanup_leftovers
from kubeproxy.backends.iptables.render import IptOptions
from kubeproxy.backends.nftables.backend import NftablesBackend
from kubeproxy.backends.nftables.render import TABLE, NftOptions
from kubeproxy.config import ConfigError, DetectLocalMode, ProxyConfig, ProxyMode
from kubeproxy.kernel import nft as kernel_nft
from kubeproxy.kernel.conntrack import Conntrack, ConntrackCli
from kubeproxy.kernel.errors import KernelError
from kubeproxy.kernel.iptables import Iptables, IptablesCli, available_modes, detect_mode
from kubeproxy.kernel.netif import LocalAddresses
from kubeproxy.kernel.nft import Nft, NftCli
from kubeproxy.kernel.sysctl import ProcSysctl, Sysctl, SysctlError, apply_conntrack_sysctls, apply_oom_score_adj
from kubeproxy.model import objects
from kubeproxy.model.service import IPFamily, NamespacedName, family_of
from kubeproxy.observe import logging as klog
from kubeproxy.observe.health import ProxyHealthTracker
from kubeproxy.observe.metrics import ProxyMetrics, network_programming_durations
from kubeproxy.runner import SyncRunner
from kubeproxy.servers.healthcheck import ServiceHealthServer
from kubeproxy.servers.metrics import MetricsServer
from kubeproxy.servers.proxyhealth import ProxyHealthServer
from kubeproxy.sources import kubeconfig
from kubeproxy.sources.api import ApiSource
from kubeproxy.sources.events import Change
from kubeproxy.sources.manifests import ManifestDirectory
from kubeproxy.state.snapshot import ProxyState, UpdateResult

log = logging.getLogger("kubeproxy.daemon")

# Called after every sync that the kernel accepted for all families: (state, what changed, was it full).
# A hook's failure is logged and never fails the sync (the rules are in already).
AfterSync = Callable[[ProxyState, UpdateResult, bool], Awaitable[None]]


def local_detection(cfg: ProxyConfig, family: IPFamily) -> dict[str, Any]:
    """Backend option fields for ``--detect-local-mode`` in one family."""
    mode = cfg.detect_local_mode
    if mode is DetectLocalMode.BRIDGE_INTERFACE:
        return {"local_interface": cfg.pod_bridge_interface}
    if mode is DetectLocalMode.INTERFACE_NAME_PREFIX:
        return {"local_interface": cfg.pod_interface_name_prefix + "*"}
    if mode is DetectLocalMode.NODE_CIDR:
        return {"node_cidr": True}
    return {"cluster_cidrs": tuple(c for c in cfg.cluster_cidrs if family_of(c.split("/")[0]) is family)}


def build_backends(
    cfg: ProxyConfig,
    nft: Nft | None = None,
    *,
    iptables: Iptables | None = None,
    interface_addresses: Callable[[], Sequence[str]] | None = None,
    sysctl: Sysctl | None = None,
) -> list[Backend]:
    """One backend per IP family for ``cfg.mode``: nftables needs ``nft``, iptables ``iptables``
    (and ``sysctl``, the node's, for route_localnet)."""
    if cfg.mode not in (ProxyMode.NFTABLES, ProxyMode.IPTABLES):
        raise ConfigError(f"--proxy-mode={cfg.mode.value} is not implemented yet (nftables and iptables are)")
    if cfg.detect_local_mode is DetectLocalMode.CLUSTER_CIDR and not cfg.cluster_cidrs:
        log.info("no --cluster-cidr: traffic from outside the cluster to ClusterIPs is not masqueraded")
    common: dict[str, Any] = {
        "masquerade_bit": cfg.masquerade_bit,
        "masquerade_all": cfg.masquerade_all,
        "nodeport_addresses": cfg.nodeport_addresses,
    }
    backends: list[Backend] = []
    if cfg.mode is ProxyMode.IPTABLES:
        if iptables is None:
            raise ConfigError("iptables mode needs an iptables adapter")
        for family in (IPFamily.V4, IPFamily.V6):
            ipt_opts = IptOptions(
                family=family,
                localhost_nodeports=cfg.localhost_nodeports,
                tcp_be_liberal=cfg.conntrack.tcp_be_liberal,
                **common,
                **local_detection(cfg, family),
            )
            local = interface_addresses or LocalAddresses(netns=getattr(iptables, "netns", None))
            backends.append(IptablesBackend(iptables, ipt_opts, interface_addresses=local, sysctl=sysctl))
        return backends
    if nft is None:
        raise ConfigError("nftables mode needs an nft adapter")
    if "localhost" in cfg.nodeport_addresses:
        log.warning("nodePortAddresses: nftables mode never accepts NodePorts on loopback addresses value=localhost")
    for family in (IPFamily.V4, IPFamily.V6):
        opts = NftOptions(family=family, **common, **local_detection(cfg, family))
        local = interface_addresses or LocalAddresses(netns=getattr(nft, "netns", None))
        backends.append(NftablesBackend(nft, opts, interface_addresses=local))
    return backends


def remove_other_modes(cfg: ProxyConfig, *, nft: Nft | None, iptables: Sequence[Iptables]) -> None:
    """Upstream's cleanupLeftovers on start: the modes not in force leave nothing behind.

    nftables mode removes the iptables layout (``iptables`` adapters: the detected backend, or the
    ones given); iptables mode removes our nftables tables. Failures are logged, never fatal: the
    rules of the mode in force are already programmed when this runs (after the first sync, so a
    switch never leaves the node without rules)."""
    if cfg.mode is ProxyMode.IPTABLES:
        if nft is None:
            return
        for family in (IPFamily.V4, IPFamily.V6):
            try:
                if nft.delete_table(family.nft_family, TABLE):
                    log.info("removed the nftables mode's table (switched to iptables) family=%s", family.nft_family)
            except KernelError as exc:
                log.warning("cannot remove nftables leftovers family=%s error=%r", family.nft_family, str(exc))
        return
    for ipt in iptables:
        for family in (IPFamily.V4, IPFamily.V6):
            try:
                if cleanup_leftovers(ipt, family):
                    log.info(
                        "removed iptables mode leftovers (switched to %s) family=%s backend=%s",
                        cfg.mode.value,
                        family.nft_family,
                        ipt.mode.value,
                    )
            except KernelError as exc:
                log.warning(
                    "cannot remove iptables leftovers family=%s backend=%s error=%r",
                    family.nft_family,
                    ipt.mode.value,
                    str(exc),
                )


class Proxy:
    """State + backends + runner; fed by a source's changes."""

    def __init__(self, cfg: ProxyConfig, backends: Sequence[Backend]) -> None:
        self.cfg = cfg
        self.state = ProxyState(node_name=cfg.node_name)
        self.backends = backends
        families = [b.opts.family for b in backends]
        self.started_wall = time.time()
        self.metrics = ProxyMetrics(families, mode=cfg.mode.value)
        # Upstream's healthz rule: a family is unhealthy once a queued change waits > 2 x syncPeriod.
        self.health = ProxyHealthTracker(families, timeout=2 * cfg.sync_period)
        # As upstream's SyncLoop start: every family counts as updated now, so a first sync that never
        # succeeds turns /healthz and /livez unhealthy after the timeout instead of never.
        for family in families:
            self.health.updated(family)
        self.metrics.sync_queued(self.started_wall)
        self.runner = SyncRunner(
            self.sync,
            min_interval=cfg.min_sync_period,
            retry_interval=cfg.sync_period,
            max_interval=cfg.full_sync_period,
        )
        self._need_full = True
        self._last_full = 0.0
        self.synced = asyncio.Event()  # set after the first successful sync (tests, demo)
        self.after_sync: list[AfterSync] = []

    def on_change(self, change: Change) -> None:
        kind, ns, name = change.key
        new = change.new
        if kind == "Service":
            pending = self.state.on_service(NamespacedName(ns, name), new if isinstance(new, objects.Service) else None)
            self.metrics.add_changes(services=1)
        elif kind == "EndpointSlice":
            pending = self.state.on_endpoint_slice((ns, name), new if isinstance(new, objects.EndpointSlice) else None)
            self.metrics.add_changes(endpoints=1)
        elif kind == "Node":
            if name != self.state.node_name:
                return
            pending = self.state.on_node(new if isinstance(new, objects.Node) else None)
        else:
            return
        self._publish_pending()
        if pending:
            self._request()

    def _publish_pending(self) -> None:
        services, endpoints = self.state.pending_changes()
        self.metrics.set_pending(endpoints=endpoints, services=services)

    def _request(self) -> None:
        # Upstream queues health updates (and the last-queued timestamp) only once initialized: before
        # the initial lists are complete nothing is due, and the proxy counts as starting, not stuck.
        if self.state.is_initialized:
            self.health.queued_update()
            self.metrics.sync_queued(time.time())
        self.runner.request()

    async def watch_tables(self, stop: asyncio.Event, interval: float) -> None:
        """Re-create our rules when someone removes them (``nft flush ruleset``, ``iptables -F``).

        Upstream e2e "should recreate its rules if they are deleted". Every ``interval`` (syncPeriod)
        each backend checks something that costs the same at 10 or 10k Services (nftables: table
        names; iptables: the canary chain in mangle); a miss forces a full sync, which rebuilds
        everything from our state.
        """
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
                return
            if not self.synced.is_set():
                continue
            for backend in self.backends:
                try:
                    present = await asyncio.to_thread(backend.present)
                except KernelError as exc:
                    log.warning("cannot check our rules family=%s error=%r", backend.family, str(exc))
                    continue
                if not present:
                    log.warning("our rules are gone; re-creating them with a full sync family=%s", backend.family)
                    self._need_full = True
                    self._request()
                    break

    def on_synced(self) -> None:
        self.state.services_synced = self.state.slices_synced = True
        log.info("initial state complete pending_changes=%d", self.state.pending())
        # Everything after the initial list is long-lived: keep it out of the cyclic GC's way.
        gc.collect()
        gc.freeze()
        self._request()

    async def sync(self) -> float | None:
        if not self.state.is_initialized:
            log.debug("not syncing: initial state not complete")
            return None
        start = time.monotonic()
        result = self.state.commit()
        full = self._need_full or result.node_changed or (start - self._last_full >= self.cfg.full_sync_period)
        self._need_full = True  # until this sync succeeds for every backend
        self._publish_pending()
        followups: list[float] = []
        for backend in self.backends:
            family = backend.opts.family
            began = time.monotonic()
            try:
                outcome = await asyncio.to_thread(backend.sync, self.state, result.changed, full=full)
            except KernelError as exc:
                self.metrics.observe_sync(family, full=full, seconds=time.monotonic() - began)
                self.metrics.sync_failed(family, partial=not full)
                log.error("sync failed family=%s error=%r", backend.family, str(exc))
                raise
            self._record_success(family, result, full=outcome.full, began=began, committed=start)
            if outcome.rules_total is not None and outcome.rules_written is not None:
                self.metrics.set_iptables_rules(family, total=outcome.rules_total, written=outcome.rules_written)
            if outcome.followup_after is not None:
                followups.append(outcome.followup_after)
            log.log(
                klog.V2,
                "synced family=%s full=%s services=%d commands=%d elapsed=%.3fs",
                backend.family,
                outcome.full,
                outcome.services_rendered,
                outcome.commands,
                time.monotonic() - start,
            )
        self._need_full = False
        if full:
            self._last_full = start
        for hook in self.after_sync:
            try:
                await hook(self.state, result, full)
            except Exception:
                log.exception("post-sync step failed step=%s", getattr(hook, "__qualname__", hook))
        self.synced.set()
        return min(followups) if followups else None

    def _record_success(
        self, family: IPFamily, result: UpdateResult, *, full: bool, began: float, committed: float
    ) -> None:
        """Metrics and health after ``family``'s rules were programmed: its sync began at ``began``;
        the changes it programmed are those committed at ``committed``."""
        now = time.time()
        self.metrics.observe_sync(family, full=full, seconds=time.monotonic() - began)
        self.metrics.sync_succeeded(family, now)
        self.health.updated(family, since=committed)
        triggers = [t for fam, t in result.trigger_times if fam is family]
        for latency in network_programming_durations(triggers, now=now, not_before=self.started_wall):
            self.metrics.observe_network_programming(family, latency)
        internal, external = self.state.no_local_endpoints(family)
        self.metrics.set_no_local_endpoints(family, internal=internal, external=external)

    def record_conntrack(self, result: CleanupResult) -> None:
        self.metrics.observe_conntrack(result.family, seconds=result.seconds, deleted=result.deleted)


class ConfigFileChanged(Exception):
    """The --config file changed: exit, so that the supervisor restarts us with the new content."""


async def watch_config_file(path: Path, stop: asyncio.Event, interval: float = 2.0) -> None:
    """Upstream watches ``--config`` (fsnotify) and exits with an error when it is written or renamed;
    the DaemonSet restarts the pod, which then reads the new configuration. A ConfigMap update arrives
    as an atomic symlink swap, so we compare content, not inotify events (polling: cheap, and it also
    sees a file replaced on another mount)."""

    def read() -> bytes | None:
        try:
            return path.read_bytes()
        except OSError:
            return None

    initial = await asyncio.to_thread(read)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
            return
        if await asyncio.to_thread(read) != initial:
            raise ConfigFileChanged(f"content of the configuration file changed; exiting to load it path={path}")


def build_source(cfg: ProxyConfig) -> ManifestDirectory | ApiSource:
    """The manifest directory when one is given, else the API server (kubeconfig, master or in-cluster)."""
    if cfg.manifests is not None:
        return ManifestDirectory(cfg.manifests)
    return ApiSource(kubeconfig.resolve(cfg.kubeconfig, cfg.master), cfg.node_name)


async def run(
    cfg: ProxyConfig,
    *,
    nft: Nft | None = None,
    iptables: Iptables | None = None,
    conntrack: Conntrack | None = None,
    sysctl: Sysctl | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    source = build_source(cfg)
    # Conntrack, sysctls and the other modes' cleanup default to this namespace's kernel only when
    # the data plane does too (no adapter injected for the mode in force): a run against a fake or
    # another namespace's adapters (tests, the lab) never touches the host unless given adapters.
    if cfg.mode is ProxyMode.IPTABLES:
        real_kernel = iptables is None
        if iptables is None:
            try:
                iptables = IptablesCli(detect_mode())
            except KernelError as exc:  # a bad KUBE_PROXY_IPTABLES_MODE, or no iptables binaries
                raise ConfigError(f"iptables mode: {exc}") from exc
        real_kernel = real_kernel and isinstance(iptables, IptablesCli)
        others_nft = nft if nft is not None else (NftCli() if real_kernel else None)
        leftover_ipts: list[Iptables] = []
    else:
        real_kernel = nft is None
        nft = nft or NftCli()
        real_kernel = real_kernel and isinstance(nft, kernel_nft.NftCli)
        others_nft = None
        leftover_ipts = [iptables] if iptables is not None else []
    if sysctl is None and real_kernel:
        sysctl = ProcSysctl()
    proxy = Proxy(cfg, build_backends(cfg, nft, iptables=iptables, sysctl=sysctl))
    # Upstream's two servers, each on its own thread: /healthz + /livez (healthzBindAddress) and
    # /metrics, /proxyMode, /configz (metricsBindAddress). A bind failure is retried every 5 s, or
    # fatal with bindAddressHardFail -- raised by start(), before anything is programmed.
    servers: dict[str, ProxyHealthServer | MetricsServer] = {}
    if cfg.healthz_bind_address:
        servers["healthz"] = ProxyHealthServer(
            cfg.healthz_bind_address,
            proxy.health,
            lambda: proxy.state.node_eligible,
            proxy.metrics,
            hard_fail=cfg.bind_address_hard_fail,
        )
    if cfg.metrics_bind_address:
        servers["metrics"] = MetricsServer(
            cfg.metrics_bind_address,
            proxy.metrics,
            proxy_mode=cfg.mode.value,
            configz=dict(cfg.configz),
            hard_fail=cfg.bind_address_hard_fail,
        )
    try:
        for server in servers.values():
            server.start()
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    if sysctl is not None:
        # Upstream tunes conntrack at startup; we do it once the initial state is complete, just
        # after the first sync, so that a start that fails (bad manifests, no API access) changes
        # nothing on the node -- not its rules, not its sysctls.
        node_sysctl, tuned = sysctl, False

        async def tune_conntrack(_state: ProxyState, _result: UpdateResult, _full: bool) -> None:
            nonlocal tuned
            if not tuned:
                tuned = True
                await asyncio.to_thread(apply_conntrack_sysctls, node_sysctl, cfg.conntrack)

        proxy.after_sync.insert(0, tune_conntrack)
    if real_kernel and cfg.oom_score_adj is not None:
        try:
            apply_oom_score_adj(cfg.oom_score_adj)
        except SysctlError as exc:
            log.warning("cannot set oom_score_adj value=%d error=%r", cfg.oom_score_adj, str(exc))
    switched = False

    async def remove_leftovers(_state: ProxyState, _result: UpdateResult, _full: bool) -> None:
        nonlocal switched
        if switched:
            return
        switched = True
        ipts = leftover_ipts
        if cfg.mode is ProxyMode.NFTABLES and real_kernel and not ipts:
            # The backend the host's iptables use (upstream's image picks it the same way).
            try:
                ipts = [IptablesCli(await asyncio.to_thread(detect_mode))] if available_modes() else []
            except KernelError as exc:
                log.warning("cannot look for iptables leftovers error=%r", str(exc))
        await asyncio.to_thread(remove_other_modes, cfg, nft=others_nft, iptables=ipts)

    proxy.after_sync.append(remove_leftovers)
    if conntrack is None and real_kernel:
        conntrack = ConntrackCli()
    if conntrack is not None:
        ct_cleanup = ConntrackReconciler(
            conntrack, interface_addresses=LocalAddresses() if real_kernel else None, on_result=proxy.record_conntrack
        )
        proxy.after_sync.append(ct_cleanup.after_sync)
    log.info(
        "starting kube-proxy mode=%s node=%s source=%s cluster_cidrs=%s",
        cfg.mode.value,
        cfg.node_name,
        f"manifests {cfg.manifests}" if isinstance(source, ManifestDirectory) else f"api {source.settings.server}",
        ",".join(cfg.cluster_cidrs) or "-",
    )
    # Node-level setup, servers and post-sync steps attach here; each extra is a named coroutine
    # that runs until ``stop`` is set.
    extras: dict[str, Coroutine[Any, Any, None]] = {}
    # healthCheckNodePort listeners (ETP=Local LoadBalancers), on their own thread. Updated after
    # every successful sync, the first included (an update that arrives before the server has started
    # is applied when it starts). "Proxy healthy" is upstream's healthz rule: no requested sync has
    # been waiting longer than 2 x syncPeriod.
    service_health = ServiceHealthServer(cfg.node_name, proxy.health.is_healthy)
    # First among the post-sync steps: load balancers must learn about endpoint changes before any
    # slower step (conntrack cleanup) runs.
    proxy.after_sync.insert(0, service_health.after_sync)
    extras["service-health"] = service_health.serve(stop)
    extras["table-watch"] = proxy.watch_tables(stop, cfg.sync_period)
    if cfg.config_file is not None:
        extras["config-watch"] = watch_config_file(cfg.config_file, stop)
    for name, server in servers.items():
        extras[name] = server.serve(stop)  # already listening: serve() keeps them until stop
    tasks = [
        asyncio.create_task(source.run(proxy.on_change, proxy.on_synced, stop=stop), name="source"),
        asyncio.create_task(proxy.runner.run(stop), name="runner"),
        *(asyncio.create_task(coro, name=name) for name, coro in extras.items()),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                stop.set()
                raise task.exception()  # type: ignore[misc]
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # serve() stops its server; these calls (idempotent) cover a serve task cancelled before
        # it first ran.
        for server in servers.values():
            await asyncio.to_thread(server.stop)
    log.info("stopped; rules left in place")
    return 0


def cleanup(nft: Nft | None = None, iptables: Sequence[Iptables] | None = None) -> int:
    """``--cleanup``: remove everything any of our modes installed, both families; exit status.

    nftables tables, and the iptables layout through every installed iptables backend (nft and
    legacy: an explicit cleanup should not depend on which one the host seems to use)."""
    nft = nft or NftCli()
    ipts = list(iptables) if iptables is not None else [IptablesCli(mode) for mode in available_modes()]
    status = 0
    for family in (IPFamily.V4, IPFamily.V6):
        try:
            removed = nft.delete_table(family.nft_family, TABLE)
            log.info("cleanup nftables family=%s removed=%s", family.nft_family, removed)
        except KernelError as exc:
            log.error("cleanup failed family=%s error=%r", family.nft_family, str(exc))
            status = 1
        for ipt in ipts:
            try:
                removed = cleanup_leftovers(ipt, family)
                log.info("cleanup iptables family=%s backend=%s removed=%s", family.nft_family, ipt.mode.value, removed)
            except KernelError as exc:
                log.error("cleanup failed family=%s backend=%s error=%r", family.nft_family, ipt.mode.value, str(exc))
                status = 1
    return status


def init_only(cfg: ProxyConfig, sysctl: Sysctl | None = None) -> int:
    """``--init-only``: the setup that needs full root privileges (conntrack sysctls), then exit.

    Upstream runs this in a privileged init container so that the long-running kube-proxy needs
    only CAP_NET_ADMIN. nftables mode needs no other root-only step (no route_localnet).
    """
    report = apply_conntrack_sysctls(sysctl or ProcSysctl(), cfg.conntrack)
    if report.failed:
        log.error("init failed: some sysctls could not be set names=%s", ",".join(sorted(report.failed)))
        return 1
    log.info("init done written=%d unchanged=%d", len(report.written), len(report.unchanged))
    return 0
