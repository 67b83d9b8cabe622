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
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from kubeproxy.backends.nftables.backend import NftablesBackend
from kubeproxy.backends.nftables.render import NftOptions
from kubeproxy.config import ConfigError, ProxyConfig, ProxyMode
from kubeproxy.kernel.errors import KernelError
from kubeproxy.kernel.nft import Nft, NftCli
from kubeproxy.model import objects
from kubeproxy.model.service import IPFamily, NamespacedName, family_of
from kubeproxy.runner import SyncRunner
from kubeproxy.sources import kubeconfig
from kubeproxy.sources.api import ApiSource
from kubeproxy.sources.events import Change
from kubeproxy.sources.manifests import ManifestDirectory
from kubeproxy.state.snapshot import ProxyState, UpdateResult

log = logging.getLogger("kubeproxy.daemon")

# Called after every sync that the kernel accepted for all families: (state, what changed, was it full).
# A hook's failure is logged and never fails the sync (the rules are in already).
AfterSync = Callable[[ProxyState, UpdateResult, bool], Awaitable[None]]


def build_backends(cfg: ProxyConfig, nft: Nft) -> list[NftablesBackend]:
    if cfg.mode is not ProxyMode.NFTABLES:
        raise ConfigError(f"--proxy-mode={cfg.mode.value} is not implemented yet (nftables is)")
    backends = []
    for family in (IPFamily.V4, IPFamily.V6):
        opts = NftOptions(
            family=family,
            masquerade_bit=cfg.masquerade_bit,
            masquerade_all=cfg.masquerade_all,
            cluster_cidrs=tuple(c for c in cfg.cluster_cidrs if family_of(c.split("/")[0]) is family),
        )
        backends.append(NftablesBackend(nft, opts))
    return backends


class Proxy:
    """State + backends + runner; fed by a source's changes."""

    def __init__(self, cfg: ProxyConfig, backends: list[NftablesBackend]) -> None:
        self.cfg = cfg
        self.state = ProxyState(node_name=cfg.node_name)
        self.backends = backends
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
        elif kind == "EndpointSlice":
            pending = self.state.on_endpoint_slice((ns, name), new if isinstance(new, objects.EndpointSlice) else None)
        elif kind == "Node":
            if name != self.state.node_name:
                return
            pending = self.state.on_node(new if isinstance(new, objects.Node) else None)
        else:
            return
        if pending:
            self.runner.request()

    def on_synced(self) -> None:
        self.state.services_synced = self.state.slices_synced = True
        log.info("initial state complete pending_changes=%d", self.state.pending())
        # Everything after the initial list is long-lived: keep it out of the cyclic GC's way.
        gc.collect()
        gc.freeze()
        self.runner.request()

    async def sync(self) -> float | None:
        if not self.state.is_initialized:
            log.debug("not syncing: initial state not complete")
            return None
        start = time.monotonic()
        result = self.state.commit()
        full = self._need_full or result.node_changed or (start - self._last_full >= self.cfg.full_sync_period)
        self._need_full = True  # until this sync succeeds for every backend
        followups: list[float] = []
        for backend in self.backends:
            try:
                outcome = await asyncio.to_thread(backend.sync, self.state, result.changed, full=full)
            except KernelError as exc:
                log.error("sync failed family=%s error=%r", backend.family, str(exc))
                raise
            if outcome.followup_after is not None:
                followups.append(outcome.followup_after)
            log.info(
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


def build_source(cfg: ProxyConfig) -> ManifestDirectory | ApiSource:
    """The manifest directory when one is given, else the API server (kubeconfig, master or in-cluster)."""
    if cfg.manifests is not None:
        return ManifestDirectory(cfg.manifests)
    return ApiSource(kubeconfig.resolve(cfg.kubeconfig, cfg.master), cfg.node_name)


async def run(cfg: ProxyConfig, *, nft: Nft | None = None, stop: asyncio.Event | None = None) -> int:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    source = build_source(cfg)
    proxy = Proxy(cfg, build_backends(cfg, nft or NftCli()))
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
    log.info("stopped; rules left in place")
    return 0


def cleanup(nft: Nft | None = None) -> int:
    """``--cleanup``: remove every table we installed (both families); exit status."""
    nft = nft or NftCli()
    status = 0
    for family in (IPFamily.V4, IPFamily.V6):
        try:
            removed = nft.delete_table(family.nft_family, "kube-proxy")
            log.info("cleanup family=%s removed=%s", family.nft_family, removed)
        except KernelError as exc:
            log.error("cleanup failed family=%s error=%r", family.nft_family, str(exc))
            status = 1
    return status
