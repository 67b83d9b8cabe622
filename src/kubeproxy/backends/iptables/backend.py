"""iptables backend: the one place that turns rendered fragments into ``iptables-restore`` input.

Each ``sync`` makes exactly ONE ``iptables-restore --noflush`` call per family (``ip6tables-restore``
for IPv6), with a ``*filter`` and a ``*nat`` block (plus ``*mangle`` for the canary on full syncs).
Every chain we write is declared (``:CHAIN - [0:0]``), which flushes it, then refilled.

- Full sync (first sync, after a failure, a Node change, large-cluster mode switching, hourly):
  read ``iptables-save`` of nat and filter once, write every chain of ours, put our jump rules in
  the built-in chains when they are missing or out of order (the rest of those chains is never
  touched), and flush + delete service chains (``KUBE-SVC-``/``SVL-``/``EXT-``/``FW-``/``SEP-``)
  the kernel holds but the state no longer needs.
- Partial sync (upstream KEP-3453, "MinimizeIPTablesRestore"): only changed Services are
  re-rendered; only their chains whose content changed are written, shared chains
  (``KUBE-SERVICES``, ``KUBE-NODEPORTS``, ...) only when one of their rules changed, and retired
  chains are deleted in the same input. iptables-nft needs ~15 s to restore 49k rules here
  (reference/dependencies.md section 3), so what a partial sync sends must be proportional to the
  change, not to the cluster.
Bookkeeping is committed only after the kernel accepted the input. A failed restore may still have
applied an earlier ``*table`` block (each block is its own kernel transaction), so after a failure
the next sync is a full one, which reads the kernel back and rewrites everything of ours.

The canary chain ``KUBE-PROXY-CANARY`` (mangle, nat, filter) lets ``present`` notice that someone
flushed the tables (upstream's ``iptables.Monitor``), checked on the small mangle table only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence

from kubeproxy.backends.base import SyncOutcome
from kubeproxy.backends.iptables import names
from kubeproxy.backends.iptables.render import (
    BUILTIN_CHAINS,
    CANARY,
    EMPTY,
    FILTER,
    KUBE_SERVICES,
    LARGE_CLUSTER_ENDPOINTS,
    MANGLE,
    NAT,
    SHARED_CHAINS,
    ChainKey,
    Fragment,
    IptOptions,
    Rules,
    builtin_jumps,
    nodeports_jumps,
    render_service,
    static_chains,
)
from kubeproxy.backends.options import in_force
from kubeproxy.kernel.errors import KernelError
from kubeproxy.kernel.iptables import Iptables
from kubeproxy.kernel.sysctl import Sysctl
from kubeproxy.model.service import IPFamily, NamespacedName
from kubeproxy.state.snapshot import ProxyState

log = logging.getLogger("kubeproxy.iptables")

ROUTE_LOCALNET = "net/ipv4/conf/all/route_localnet"

# Chains of our layout that are not per-Service and that cleanup removes. KUBE-FIREWALL and
# KUBE-MARK-MASQ are shared with kubelet (it owns KUBE-FIREWALL's localnet DROP rule, the
# CVE-2020-8558 guard, and its jumps from INPUT/OUTPUT): as upstream, we write them but never
# delete them.
STATIC_CHAINS = {
    FILTER: ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL",
             CANARY),
    NAT: ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", CANARY),
    MANGLE: (CANARY,),
}  # fmt: skip


def _target(rule: str) -> str | None:
    words = rule.split()
    for i, word in enumerate(words[:-1]):
        if word in ("-j", "--jump", "-g", "--goto"):
            return words[i + 1]
    return None


def _comment_of(rule: str) -> str:
    if "--comment " not in rule:
        return ""
    rest = rule.split("--comment ", 1)[1]
    if rest.startswith('"'):
        return rest[1:].split('"', 1)[0]
    return rest.split()[0]


def _same_rule(ours: str, saved: str) -> bool:
    """Does a rule as iptables-save printed it look like one of our jump rules? (save reorders
    matches and normalises addresses, so compare what identifies a jump: target and comment)."""
    return _target(ours) == _target(saved) and _comment_of(ours) == _comment_of(saved)


# IPVS mode's own chains (upstream pkg/proxy/ipvs): removed with ours when another mode starts.
IPVS_CHAINS = {
    FILTER: ("KUBE-NODE-PORT", "KUBE-SOURCE-RANGES-FIREWALL", "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER"),
    NAT: ("KUBE-NODE-PORT", "KUBE-LOAD-BALANCER"),
}


def is_service_chain(chain: str) -> bool:
    """Per-Service chains, ours and upstream's retired ``KUBE-XLB-`` ones."""
    return names.is_service_chain(chain) or chain.startswith("KUBE-XLB-")


def is_ours(table: str, chain: str) -> bool:
    """Chains of our layout, of upstream's IPVS mode, and per-Service chains (retired ones included)."""
    return chain in STATIC_CHAINS.get(table, ()) or chain in IPVS_CHAINS.get(table, ()) or is_service_chain(chain)


def cleanup_input(existing: Mapping[str, Mapping[str, Sequence[str]]]) -> str:
    """iptables-restore input that removes our layout from ``existing`` (table -> chain -> saved
    rules): the built-in chains' jumps to our chains are deleted, our chains flushed and deleted. A
    chain of ours that someone else's chain still jumps to is left as it is, and so is everything
    not ours (kubelet's KUBE-FIREWALL and its jumps included). Empty when there is nothing of ours."""
    blocks: list[str] = []
    for table in (FILTER, NAT, MANGLE):
        chains = existing.get(table, {})
        builtin = set(BUILTIN_CHAINS[table])
        ours = {c for c in chains if is_ours(table, c)}
        kept = {
            _target(rule)
            for chain, rules in chains.items()
            if chain not in ours and chain not in builtin
            for rule in rules
        }
        gone = sorted(ours - kept)
        if not gone:
            continue
        lines = [f"*{table}", *(f":{c} - [0:0]" for c in gone)]
        lines += [f"-D {chain} {rule}" for chain in sorted(builtin & chains.keys()) for rule in chains[chain]
                  if _target(rule) in gone]  # fmt: skip
        lines += [f"-X {c}" for c in gone]
        lines.append("COMMIT")
        blocks.append("\n".join(lines))
    return "\n".join(blocks) + "\n" if blocks else ""


class IptablesBackend:
    def __init__(
        self,
        ipt: Iptables,
        opts: IptOptions,
        *,
        interface_addresses: Callable[[], Sequence[str]] | None = None,
        sysctl: Sysctl | None = None,
    ) -> None:
        """``interface_addresses`` lists the node's local addresses (nodePortAddresses CIDRs);
        ``sysctl`` (the node's) gets ``route_localnet=1`` for localhost NodePorts."""
        self.ipt = ipt
        self.configured = opts
        self.opts = opts  # in force (NodeCIDR detection resolves against the Node)
        self.family = opts.family.nft_family
        self._interface_addresses = interface_addresses
        self._local_addresses: tuple[str, ...] = ()
        self._sysctl = sysctl
        self._fragments: dict[NamespacedName, Fragment] = {}  # non-empty ones only
        self._endpoints = 0  # sum of the fragments' endpoints (large-cluster mode)
        self._chains: dict[ChainKey, Rules] = {}  # what the kernel holds of ours, as we wrote it
        self._large = False
        self._synced_once = False
        # table -> our rules in the kernel after the last sync (kept incrementally; metrics, bench)
        self._owned: dict[str, int] = {}  # set to zeros by the first (full) sync

    @property
    def rule_counts(self) -> dict[str, int]:
        return dict(self._owned)

    # -- helpers -----------------------------------------------------------------------------
    def _fragment(self, state: ProxyState, key: NamespacedName, *, comments: bool) -> Fragment:
        ports = state.services.get(key)
        if not ports:
            return EMPTY
        return render_service(
            ports.values(),
            state.service_endpoints,
            self.opts,
            state.node.topology,
            state.node.addresses,
            comments=comments,
        )

    def _shared(
        self,
        key: ChainKey,
        fragments: Mapping[NamespacedName, Fragment],
        order: Sequence[NamespacedName],
        state: ProxyState,
    ) -> Rules:
        rules: list[str] = []
        for svc in order:
            rules += fragments[svc].shared.get(key, ())
        if key == (NAT, KUBE_SERVICES):
            rules += nodeports_jumps(self.opts, state.node.addresses, self._local_addresses)
        return tuple(rules)

    def _count_endpoints(self, state: ProxyState) -> int:
        v6 = self.opts.family is IPFamily.V6
        return sum(
            1
            for ports in state.services.values()
            for port in ports.values()
            for ep in state.service_endpoints(port)
            if (":" in ep.ip) is v6
        )

    def _set_large(self, large: bool) -> None:
        if large != self._large:
            log.info(
                "large cluster mode family=%s enabled=%s (endpoints > %d)", self.family, large, LARGE_CLUSTER_ENDPOINTS
            )
        self._large = large

    def _refresh_addresses(self) -> None:
        if self._interface_addresses is None or self.opts.nodeport_match_all or not self.opts.nodeport_cidrs:
            return
        try:
            self._local_addresses = tuple(self._interface_addresses())
        except KernelError as exc:
            log.warning("cannot list local addresses, keeping the last known error=%r", str(exc))

    def _route_localnet(self) -> None:
        if self._sysctl is None or not self.opts.localhost_nodeports_active:
            return
        try:
            if self._sysctl.get(ROUTE_LOCALNET).strip() != "1":
                self._sysctl.set(ROUTE_LOCALNET, "1")
                log.info("localhost NodePorts: set %s=1", ROUTE_LOCALNET)
        except KernelError as exc:
            # Upstream refuses to start; we keep going (NodePorts on 127.0.0.1 just do not answer).
            log.error("cannot set %s; NodePorts on 127.0.0.1 will not answer error=%r", ROUTE_LOCALNET, str(exc))

    # -- sync --------------------------------------------------------------------------------
    def sync(self, state: ProxyState, changed: Collection[NamespacedName], *, full: bool) -> SyncOutcome:
        full = full or not self._synced_once
        self.opts, changed_opts = in_force(self.configured, self.opts, state.node.pod_cidrs, family=self.family)
        full = full or changed_opts
        self._refresh_addresses()

        # Large-cluster mode follows upstream: above 1000 endpoints, no per-endpoint comments; switching
        # it rewrites everything. A full sync decides it before rendering (a cold start renders once;
        # upstream counts the endpoints of every Service port of this family, whatever the traffic
        # policies); a partial one from the running total, so it costs what changed.
        if full:
            self._set_large(self._count_endpoints(state) > LARGE_CLUSTER_ENDPOINTS)
        targets = sorted(state.services) if full else sorted(set(changed))
        new_fragments = {svc: self._fragment(state, svc, comments=not self._large) for svc in targets}
        if not full:
            total = self._endpoints + sum(
                frag.endpoints - self._fragments.get(svc, EMPTY).endpoints for svc, frag in new_fragments.items()
            )
            if (total > LARGE_CLUSTER_ENDPOINTS) != self._large:
                self._set_large(not self._large)
                full, targets = True, sorted(state.services)
                new_fragments = {svc: self._fragment(state, svc, comments=not self._large) for svc in targets}

        def merged() -> dict[NamespacedName, Fragment]:
            """Every Service's fragment after this sync (built only when a shared chain needs it)."""
            base = {} if full else self._fragments
            return {svc: f for svc, f in {**base, **new_fragments}.items() if f is not EMPTY}

        # What to write: chain -> rules.
        writes: dict[ChainKey, Rules] = {}
        retired: set[ChainKey] = set()
        existing: dict[str, dict[str, list[str]]] = {}
        if full:
            for table in (FILTER, NAT):
                existing[table] = self.ipt.chains(self.opts.family, table)
            self._route_localnet()
            for key, rules in static_chains(self.opts).items():
                writes[key] = rules
            fragments = merged()
            order = sorted(fragments)
            for key in SHARED_CHAINS:
                writes[key] = self._shared(key, fragments, order, state)
            for frag in fragments.values():
                for name, rules in frag.chains.items():
                    writes[(NAT, name)] = rules
            for table in (FILTER, NAT):
                retired |= {(table, c) for c in existing[table] if is_service_chain(c) and (table, c) not in writes}
        else:
            touched: set[ChainKey] = set()
            for svc, new in new_fragments.items():
                old = self._fragments.get(svc, EMPTY)
                touched |= set(old.shared) | set(new.shared)
                for name, rules in new.chains.items():
                    if self._chains.get((NAT, name)) != rules:
                        writes[(NAT, name)] = rules
                for name in old.chains.keys() - new.chains.keys():
                    retired.add((NAT, name))
            if not self.opts.nodeport_match_all:
                # The nodeports jumps at the end of nat KUBE-SERVICES follow the node's addresses.
                touched.add((NAT, KUBE_SERVICES))
            fragments = merged() if touched else {}
            order = sorted(fragments)
            for key in touched:
                rules = self._shared(key, fragments, order, state)
                if self._chains.get(key) != rules:
                    writes[key] = rules
            # A chain another Service still writes is not retired (two Services cannot share one,
            # but be safe).
            retired = {key for key in retired if key not in writes}

        restore = self._restore_input(writes, retired, existing if full else None, full=full)
        if restore:
            log.debug("applying iptables-restore family=%s lines=%d", self.family, restore.count("\n"))
            if log.isEnabledFor(logging.DEBUG - 5):
                log.log(logging.DEBUG - 5, "restore input:\n%s", restore)
            try:
                self.ipt.restore(self.opts.family, restore)
            except KernelError:
                self._synced_once = False
                raise

        # Commit bookkeeping (rule counts kept incrementally: a partial sync costs what it changed).
        written = dict.fromkeys((FILTER, NAT), 0)
        if full:
            self._chains = {}
            self._owned = dict.fromkeys((FILTER, NAT), 0)
            for (table, _chain), rules in builtin_jumps(self.opts).items():
                self._owned[table] += len(rules)
        for key, rules in writes.items():
            self._owned[key[0]] += len(rules) - len(self._chains.get(key, ()))
            written[key[0]] += len(rules)
        self._chains.update(writes)
        for key in retired:
            self._owned[key[0]] -= len(self._chains.pop(key, ()))
        if full:
            self._fragments, self._endpoints = {}, 0
        for svc, frag in new_fragments.items():
            self._endpoints += frag.endpoints - self._fragments.pop(svc, EMPTY).endpoints
            if frag is not EMPTY:
                self._fragments[svc] = frag
        self._synced_once = True
        return SyncOutcome(
            full=full,
            commands=restore.count("\n"),
            services_rendered=len(targets),
            followup_after=None,
            rules_total=self.rule_counts,
            rules_written=written,
        )

    def _restore_input(
        self,
        writes: Mapping[ChainKey, Rules],
        retired: Collection[ChainKey],
        existing: Mapping[str, Mapping[str, Sequence[str]]] | None,
        *,
        full: bool,
    ) -> str:
        blocks: list[str] = []
        jumps = builtin_jumps(self.opts)
        for table in (FILTER, NAT):
            chains = sorted(name for t, name in writes if t == table)
            gone = sorted(name for t, name in retired if t == table)
            jump_lines: list[str] = []
            if existing is not None:
                jump_lines = self._jump_fixes(table, existing.get(table, {}), jumps)
            if not (chains or gone or jump_lines or full):
                continue
            lines = [f"*{table}"]
            if full:
                lines.append(f":{CANARY} - [0:0]")
            lines += [f":{name} - [0:0]" for name in (*chains, *gone)]
            for name in chains:
                lines += [f"-A {name} {rule}" for rule in writes[(table, name)]]
            lines += jump_lines
            lines += [f"-X {name}" for name in gone]
            lines.append("COMMIT")
            blocks.append("\n".join(lines))
        if full:
            blocks.append(f"*{MANGLE}\n:{CANARY} - [0:0]\nCOMMIT")
        return "\n".join(blocks) + "\n" if blocks else ""

    @staticmethod
    def _jump_fixes(table: str, existing: Mapping[str, Sequence[str]], jumps: Mapping[ChainKey, Rules]) -> list[str]:
        """Our jump rules in the built-in chains; other rules there are never touched.

        When all of ours are there (anywhere: other components may have prepended theirs since),
        nothing is written, as upstream's EnsureRule. Otherwise ours are deleted (as saved) and
        inserted again at the top, in our order."""
        lines: list[str] = []
        for (t, chain), ours in jumps.items():
            if t != table:
                continue
            saved = list(existing.get(chain, ()))
            if all(any(_same_rule(o, s) for s in saved) for o in ours):
                continue
            lines += [f"-D {chain} {rule}" for rule in saved if any(_same_rule(o, rule) for o in ours)]
            # Head inserts in reverse order: iptables-nft 1.8.9 refuses "-I CHAIN N" when rule N was
            # added earlier in the same input.
            lines += [f"-I {chain} {rule}" for rule in reversed(ours)]
        return lines

    def present(self) -> bool:
        """Is our canary still in the (small) mangle table? Upstream's Monitor does the same."""
        return CANARY in self.ipt.chains(self.opts.family, MANGLE)

    def cleanup(self) -> bool:
        """Remove our layout (``--cleanup``, switching to another mode); True if there was something."""
        self._synced_once = False
        self._chains, self._fragments = {}, {}
        return cleanup_leftovers(self.ipt, self.opts.family)


def cleanup_leftovers(ipt: Iptables, family: IPFamily) -> bool:
    """Remove another kube-proxy's (or our own earlier run's) iptables layout; True if there was one."""
    existing = {table: ipt.chains(family, table) for table in (FILTER, NAT, MANGLE)}
    text = cleanup_input(existing)
    if text:
        ipt.restore(family, text)
    return bool(text)
