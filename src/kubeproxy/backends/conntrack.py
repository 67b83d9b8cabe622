"""UDP conntrack cleanup, shared by every proxy mode (upstream pkg/proxy/conntrack/cleanup.go).

UDP has no connection teardown, so a conntrack entry keeps DNATing a client's datagrams to the
endpoint its first datagram was sent to for as long as the client keeps sending (a DNS client
talking to a deleted CoreDNS pod, kubernetes#19029). After a successful sync in which a UDP Service
changed, and after every full sync, the entries that no longer lead to a serving endpoint are
deleted, so the client's next datagram is load-balanced afresh by the rules just programmed.

``stale_flows`` is the pure planner. A UDP entry is stale when
- its ORIGINAL destination address and port are a UDP Service address of this family (ClusterIP,
  ExternalIP, LoadBalancer IP) and port, and its REPLY source is not one of that Service port's
  serving endpoints; or
- its original destination port is a UDP NodePort, its original destination is a local address,
  and its reply source is not one of that Service port's serving endpoints.
"Serving" is ``Endpoint.serving``: traffic policies, topology and termination are deliberately
ignored, as upstream does, so that a change to the Service never breaks a flow that a TCP client
would keep (a terminating but serving endpoint keeps its flows). An entry that was never DNATed
(its reply source is the Service address itself: the first datagram arrived before any endpoint
existed) is stale by the same rule once the Service has endpoints. TCP is never touched.

The decision depends only on (protocol, original destination and port, reply source) -- exactly the
key ``Conntrack.delete`` matches on, so deleting by that key removes no live flow.

``ConntrackReconciler`` runs the plan against a ``Conntrack`` adapter for each family; its
``after_sync`` is the daemon's post-sync hook.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

from kubeproxy.kernel.conntrack import Conntrack, Flow
from kubeproxy.kernel.errors import KernelError
from kubeproxy.model.service import IPFamily, Protocol, family_of
from kubeproxy.observe.logging import V2
from kubeproxy.state.snapshot import ProxyState, UpdateResult

__all__ = ["CleanupResult", "ConntrackReconciler", "UdpServiceIndex", "stale_flows"]

log = logging.getLogger("kubeproxy.conntrack")

UDP = Protocol.UDP.nft  # "udp", as conntrack spells it


@dataclass(frozen=True, slots=True)
class UdpServiceIndex:
    """Per family: which endpoint addresses may answer each UDP Service address:port and NodePort."""

    family: IPFamily
    service_ips: dict[tuple[str, int], frozenset[str]]  # (Service address, port) -> serving endpoint IPs
    node_ports: dict[int, frozenset[str]]  # NodePort -> serving endpoint IPs

    @classmethod
    def build(cls, state: ProxyState, family: IPFamily) -> UdpServiceIndex:
        service_ips: dict[tuple[str, int], set[str]] = {}
        node_ports: dict[int, set[str]] = {}
        for ports in state.services.values():
            for svc in ports.values():
                # A Service exists in a family only with a ClusterIP of it (upstream's per-family
                # proxiers): a single-stack IPv4 NodePort is no NodePort for IPv6 flows.
                if svc.protocol is not Protocol.UDP or svc.cluster_ip(family) is None:
                    continue
                serving = {ep.ip for ep in state.service_endpoints(svc) if ep.serving and family_of(ep.ip) is family}
                for ip in (*svc.cluster_ips, *svc.external_ips, *svc.load_balancer_ips):
                    if family_of(ip) is family:
                        # Two Services may claim one external address: a flow to either's endpoint lives.
                        service_ips.setdefault((ip, svc.port), set()).update(serving)
                if svc.node_port:
                    node_ports.setdefault(svc.node_port, set()).update(serving)
        return cls(
            family=family,
            service_ips={k: frozenset(v) for k, v in service_ips.items()},
            node_ports={k: frozenset(v) for k, v in node_ports.items()},
        )

    @property
    def empty(self) -> bool:
        """No UDP Service of this family: nothing can be stale, the table need not be read."""
        return not self.service_ips and not self.node_ports

    def is_stale(self, flow: Flow, local_addresses: Collection[str]) -> bool:
        if flow.protocol != UDP or flow.family is not self.family:
            return False
        serving = self.service_ips.get((flow.orig_dst, flow.orig_dport))
        if serving is not None and flow.reply_src not in serving:
            return True
        serving = self.node_ports.get(flow.orig_dport)
        return serving is not None and flow.orig_dst in local_addresses and flow.reply_src not in serving


def stale_flows(
    state: ProxyState, family: IPFamily, flows: Iterable[Flow], *, local_addresses: Collection[str]
) -> list[Flow]:
    """The UDP entries of ``family`` among ``flows`` that no longer lead to a serving endpoint."""
    index = UdpServiceIndex.build(state, family)
    local = frozenset(local_addresses)
    return [flow for flow in flows if index.is_stale(flow, local)]


@dataclass
class CleanupResult:
    family: IPFamily
    listed: int = 0
    deleted: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class ConntrackReconciler:
    """Deletes stale UDP conntrack entries after syncs; counts what it did (for metrics)."""

    conntrack: Conntrack
    families: tuple[IPFamily, ...] = (IPFamily.V4, IPFamily.V6)
    # Every address of the node's interfaces (kernel/netif.LocalAddresses); None: the Node's addresses only.
    interface_addresses: Callable[[], Sequence[str]] | None = None
    runs: int = 0
    deleted_total: int = 0
    errors: int = 0
    last: list[CleanupResult] = field(default_factory=list)
    # Called with every family's result (the daemon feeds the conntrack_reconciler_* metrics).
    on_result: Callable[[CleanupResult], None] | None = None

    def plan(self, state: ProxyState) -> list[tuple[UdpServiceIndex, frozenset[str]]]:
        """Snapshot what the cleanup needs from ``state`` (call it where ``state`` cannot change)."""
        out = []
        for family in self.families:
            index = UdpServiceIndex.build(state, family)
            if not index.empty:
                out.append((index, frozenset(ip for ip in state.node.addresses if family_of(ip) is family)))
        return out

    def _interface_addresses(self) -> frozenset[str]:
        if self.interface_addresses is None:
            return frozenset()
        try:
            return frozenset(self.interface_addresses())
        except KernelError as exc:
            # NodePort flows to the Node's own addresses are still recognised.
            log.warning("conntrack cleanup: cannot read local addresses error=%r", str(exc))
            return frozenset()

    def execute(self, plan: list[tuple[UdpServiceIndex, frozenset[str]]]) -> list[CleanupResult]:
        """List and delete, family by family (blocking). A family's failure does not stop the other.

        NodePort flows count when sent to a local address: the Node's addresses and, when
        ``interface_addresses`` is set, every address of the node's interfaces (NodePorts may be
        served on more than the Node's primary address, depending on mode and nodePortAddresses).
        """
        interfaces = self._interface_addresses() if plan else frozenset()
        results = []
        for index, node_local in plan:
            local = node_local | interfaces
            start = time.monotonic()
            result = CleanupResult(index.family)
            try:
                flows = self.conntrack.list_flows(index.family, UDP)
                result.listed = len(flows)
                stale = [flow for flow in flows if index.is_stale(flow, local)]
                result.deleted = self.conntrack.delete(stale) if stale else 0
            except KernelError as exc:
                result.error = str(exc)
            result.seconds = time.monotonic() - start
            results.append(result)
        return results

    def reconcile(self, state: ProxyState) -> list[CleanupResult]:
        """Plan and execute in the caller's thread."""
        return self._record(self.execute(self.plan(state)))

    def _record(self, results: list[CleanupResult]) -> list[CleanupResult]:
        self.runs += 1
        self.last = results
        for r in results:
            self.deleted_total += r.deleted
            if self.on_result is not None:
                self.on_result(r)
            if r.error is not None:
                self.errors += 1
                log.error("conntrack cleanup failed family=%s error=%r", r.family, r.error)
            else:
                log.log(
                    V2,
                    "conntrack cleanup family=%s udp_entries=%d deleted=%d elapsed=%.3fs",
                    r.family,
                    r.listed,
                    r.deleted,
                    r.seconds,
                )
        return results

    async def after_sync(self, state: ProxyState, result: UpdateResult, full: bool) -> None:
        """Post-sync hook: runs when a UDP Service changed, and after every full sync."""
        if not (full or result.udp_changed):
            return
        # The index is built on the event loop, where ``state`` is only changed by the sync that is
        # awaiting this hook; the kernel work then runs on a worker thread.
        plan = self.plan(state)
        if plan:
            self._record(await asyncio.to_thread(self.execute, plan))
