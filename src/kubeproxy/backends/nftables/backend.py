"""nftables backend: the one place that turns rendered fragments into kernel transactions.

Each ``sync`` sends exactly ONE ``nft -f -`` transaction (atomic: all or nothing).
- Full sync (first sync, after any failure, after a Node change): read the table back once
  (chains and set/map elements), rewrite the static skeleton and every Service chain, and send only
  the element differences against what the kernel really holds, so a restart does not re-add
  100k unchanged elements (upstream PR #130119 learned this the hard way).
- Partial sync: re-render only the changed Services and send only their chain rewrites and
  element differences, computed against our record of the kernel; unchanged Services' chains are
  never touched.
- Stale Service chains are flushed (their map elements deleted) in the sync that retires them and
  deleted in a later transaction at least ``STALE_CHAIN_DELAY`` seconds on, as upstream does: older
  kernels do not notice at once that a chain lost its last reference.
Bookkeeping is committed only after the kernel accepted the transaction, so a failed sync leaves
our record equal to the kernel and the retry (a full sync) starts from the truth.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import msgspec

from kubeproxy.backends.base import SyncOutcome
from kubeproxy.backends.nftables import names
from kubeproxy.backends.nftables.render import (
    BASE_CHAINS,
    EMPTY,
    LOAD_BALANCE,
    LOAD_BALANCE_CHAINS,
    SERVICE_ENDPOINTS,
    TABLE,
    Element,
    Fragment,
    NftOptions,
    affinity_set_declaration,
    chain_add_command,
    declarations,
    element_command,
    render_service,
    render_static_elements,
    static_chains,
    table_commands,
)
from kubeproxy.backends.options import in_force
from kubeproxy.kernel.errors import KernelError
from kubeproxy.kernel.nft import Nft, NftError
from kubeproxy.model.service import NamespacedName
from kubeproxy.state.snapshot import ProxyState

log = logging.getLogger("kubeproxy.nftables")

STALE_CHAIN_DELAY = 1.0
_ELEMENTS_PER_COMMAND = 500

Owner = NamespacedName | None  # None: the static part (node addresses)
ElemKey = tuple[str, str]  # (set or map name, key text)
# Who claims an element, with the value each wants. Nearly every element has one claimant: that is
# kept as a (owner, value) pair, 56 bytes instead of a 232-byte dict (120k elements at 10k Services).
Claims = dict[Owner, str | None] | tuple[Owner, str | None]


def _claims_dict(claims: Claims | None) -> dict[Owner, str | None]:
    if claims is None:
        return {}
    if isinstance(claims, tuple):
        return {claims[0]: claims[1]}
    return dict(claims)


def _compact(claims: dict[Owner, str | None]) -> Claims:
    return next(iter(claims.items())) if len(claims) == 1 else claims


def _element_values(fragment: Fragment) -> dict[ElemKey, str | None]:
    """One value per element key of a fragment: the smallest, as ``render.assemble`` picks it, if the
    Service wants one key twice (e.g. its ClusterIP also listed among its externalIPs)."""
    if len(fragment.elements) == len({(s, k) for s, k, _v in fragment.elements}):
        return {(set_name, key): value for set_name, key, value in fragment.elements}
    out: dict[ElemKey, str | None] = {}
    for set_name, key, value in sorted(fragment.elements, key=lambda e: (e[0], e[1], e[2] or "")):
        out.setdefault((set_name, key), value)
    return out


def _json_value(value: Any) -> str:
    if isinstance(value, dict):
        if "concat" in value:
            return " . ".join(_json_value(v) for v in value["concat"])
        if "prefix" in value:
            return f"{value['prefix']['addr']}/{value['prefix']['len']}"
        for verb in ("goto", "jump"):
            if verb in value:
                return f"{verb} {value[verb]['target']}"
        if len(value) == 1:
            return str(next(iter(value)))  # {"drop": null}, {"accept": null}
    return str(value)


# ``nft -j list table`` read lean: only the fields we use, with every set element and rule body left as
# raw JSON (zero-copy slices of the output) until it is turned into our text form one at a time. A
# generic json.loads of a 100k-element table took ~95 MB (13 MB of JSON); this takes what the keys do.
class _Named(msgspec.Struct):
    name: str


class _SetEntry(msgspec.Struct):
    name: str
    elem: list[msgspec.Raw] = msgspec.field(default_factory=list)
    timeout: int | None = None


class _RuleEntry(msgspec.Struct):
    chain: str
    expr: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))


class _Item(msgspec.Struct):
    chain: _Named | None = None
    set: _SetEntry | None = None
    map: _SetEntry | None = None
    rule: _RuleEntry | None = None


class TableDoc(msgspec.Struct):
    nftables: list[_Item] = msgspec.field(default_factory=list)


_TABLE_DECODER = msgspec.json.Decoder(TableDoc)


def decode_table(raw: bytes | None) -> TableDoc | None:
    """An ``nft -j list table`` document (None: no table)."""
    if raw is None:
        return None
    try:
        return _TABLE_DECODER.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise NftError(f"nft -j list table printed unexpected JSON: {exc}") from exc


def parse_table(doc: TableDoc | None) -> tuple[set[str], dict[str, dict[str, str | None]]]:
    """Chains and set/map elements of an ``nft -j list table`` document, as our text keys."""
    chains: set[str] = set()
    elements: dict[str, dict[str, str | None]] = {}
    for item in doc.nftables if doc else ():
        if item.chain is not None:
            chains.add(item.chain.name)
        for entry, is_map in ((item.set, False), (item.map, True)):
            if entry is None:
                continue
            elems = elements.setdefault(entry.name, {})
            for raw in entry.elem:
                e = msgspec.json.decode(raw)
                if isinstance(e, dict) and "elem" in e:  # elements with timeouts/comments
                    e = e["elem"]["val"]
                if is_map and isinstance(e, list):
                    elems[_json_value(e[0])] = _json_value(e[1])
                else:
                    elems[_json_value(e)] = None
    return chains, elements


def load_balance_chains_in(doc: TableDoc | None) -> set[str]:
    """The ``load-balance-<n>`` chains of an ``nft -j list table`` document that hold exactly the one
    rule we write there: ``dnat to daddr . l4proto . dport . numgen random mod n map @service-endpoints``.

    A full sync leaves these alone instead of rewriting them: nft 1.0.6 refuses to add a rule using
    ``service-endpoints`` once that map is in the kernel (it misreads the map's typeof), so a chain that
    is already right must not be flushed and re-added, and a wrong one is fixed by re-creating the table.
    """
    rules: dict[str, list[Any]] = {}
    for item in doc.nftables if doc else ():
        if item.rule is not None and item.rule.chain.startswith(f"{LOAD_BALANCE}-"):
            rules.setdefault(item.rule.chain, []).append(msgspec.json.decode(item.rule.expr))
    out = set()
    for chain, exprs in rules.items():
        n = chain.removeprefix(f"{LOAD_BALANCE}-")
        if len(exprs) != 1 or not n.isdigit() or not isinstance(exprs[0], list) or len(exprs[0]) != 1:
            continue
        try:
            mapping = exprs[0][0]["dnat"]["addr"]["map"]
            key = mapping["key"]["concat"]
            ok = (
                mapping["data"] == f"@{SERVICE_ENDPOINTS}"
                and len(key) == 4
                and key[0]["payload"]["field"] == "daddr"
                and key[0]["payload"]["protocol"] in ("ip", "ip6")
                and key[1] == {"meta": {"key": "l4proto"}}
                and key[2] == {"payload": {"protocol": "th", "field": "dport"}}
                and key[3]["numgen"]["mod"] == int(n)
                and key[3]["numgen"].get("mode") == "random"
                and not key[3]["numgen"].get("offset")
            )
        except (KeyError, TypeError, IndexError):
            continue
        if ok:
            out.add(chain)
    return out


class NftablesBackend:
    def __init__(
        self,
        nft: Nft,
        opts: NftOptions,
        *,
        interface_addresses: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        """``interface_addresses`` lists the node's local addresses (nodePortAddresses CIDRs); it is
        called on every sync, and only when CIDRs (other than match-all ones) are configured."""
        self.nft = nft
        self.configured = opts
        self.opts = opts  # in force: NodeCIDR detection resolves against the Node (NftOptions.for_node)
        self._interface_addresses = interface_addresses
        self._local_addresses: tuple[str, ...] = ()
        self._warned_no_pod_cidr = False
        self.family = opts.nft_family
        self._fragments: dict[NamespacedName, Fragment] = {}
        self._owners: dict[ElemKey, Claims] = {}
        self._static_elements: frozenset[Element] = frozenset()
        self._kernel_elements: dict[str, dict[str, str | None]] = {}
        self._kernel_chains: set[str] = set()
        self._stale: dict[str, float] = {}  # flushed service chain -> monotonic time flushed
        self._kernel_sets: dict[str, str] = {}  # per-Service (affinity) sets in the kernel -> declaration
        self._synced_once = False
        # Has this process ever programmed (or taken over) our table? See the first-sync fallback in sync().
        self._adopted = False

    # -- helpers -----------------------------------------------------------------------------
    def _skeleton(self, keep: Collection[str] = ()) -> list[str]:
        """The table, its sets and maps, and every static chain rewritten, except the chains in
        ``keep`` (load-balance chains the kernel already holds as we would write them)."""
        fam = self.family
        lines = table_commands(fam, declarations(self.opts))
        chains = static_chains(self.opts)
        # Create every chain first: rules may jump to chains that come later alphabetically.
        lines += [chain_add_command(fam, name) for name in sorted(chains)]
        for name in sorted(chains):
            if name in keep:
                continue
            lines.append(f"flush chain {fam} {TABLE} {name}")
            lines += [f"add rule {fam} {TABLE} {name} {rule}" for rule in chains[name]]
        return lines

    def _chain_lines(self, name: str, rules: Iterable[str]) -> list[str]:
        fam = self.family
        return [
            f"add chain {fam} {TABLE} {name}",
            f"flush chain {fam} {TABLE} {name}",
            *(f"add rule {fam} {TABLE} {name} {rule}" for rule in rules),
        ]

    def _element_lines(self, verb: str, by_set: dict[str, list[tuple[str, str | None]]]) -> list[str]:
        lines: list[str] = []
        for set_name in sorted(by_set):
            items = sorted(by_set[set_name])
            for start in range(0, len(items), _ELEMENTS_PER_COMMAND):
                chunk = items[start : start + _ELEMENTS_PER_COMMAND]
                body = ", ".join(k if v is None or verb == "delete" else f"{k} : {v}" for k, v in chunk)
                lines.append(element_command(verb, self.family, set_name, body, None))
        return lines

    @staticmethod
    def _effective(owners: Claims) -> str | None:
        # Two objects may claim one key (e.g. two Services with the same IP and port in
        # manifests): the first by name wins, deterministically, until it goes away.
        if isinstance(owners, tuple):
            return owners[1]
        if len(owners) == 1:
            return next(iter(owners.values()))
        # The static part first, then Services in the order render.assemble takes them.
        first = min(owners, key=lambda o: (0, "", "") if o is None else (1, o.namespace, o.name))
        return owners[first]

    def _fragment(self, state: ProxyState, key: NamespacedName) -> Fragment:
        ports = state.services.get(key)
        if not ports:
            return EMPTY
        return render_service(
            ports.values(), state.service_endpoints, self.opts, state.node.topology, state.node.addresses
        )

    # -- sync --------------------------------------------------------------------------------
    def sync(self, state: ProxyState, changed: Collection[NamespacedName], *, full: bool) -> SyncOutcome:
        full = full or not self._synced_once
        self.opts, changed_opts = in_force(self.configured, self.opts, state.node.pod_cidrs, family=self.family)
        full = full or changed_opts
        if self.opts.node_cidr and not self.opts.cluster_cidrs and not self._warned_no_pod_cidr:
            log.warning(
                "detect-local-mode NodeCIDR: the Node has no podCIDRs of this family yet; local traffic is not "
                "detected until it has family=%s",
                self.family,
            )
            self._warned_no_pod_cidr = True
        if self._interface_addresses is not None and self.opts.nodeport_cidrs and not self.opts.nodeport_match_all:
            # Cheap (one `ip -j addr`), and only with nodePortAddresses CIDRs: re-read every sync so an
            # address added to the node gets its NodePorts without waiting for a full sync.
            try:
                self._local_addresses = tuple(self._interface_addresses())
            except KernelError as exc:
                log.warning("cannot list local addresses, keeping the last known error=%r", str(exc))
        now = time.monotonic()
        lines: list[str] = []
        stale = dict(self._stale)
        chain_lines: list[str] = []
        written_chains: set[str] = set()

        # A partial sync must cost what changed, not what the table holds: changes are staged in
        # small overlays (per element key, per Service) over our records and merged into them only
        # after the kernel accepted the transaction. A full sync starts from an empty record and
        # from what the kernel really holds.
        doc: TableDoc | None = None
        if full:
            doc = decode_table(self.nft.list_table(self.family, TABLE))
            kernel_chains, kernel_elements = parse_table(doc)
            kernel_sets = self._affinity_sets_of(doc)
            # The kernel fills affinity sets itself (client addresses): never reconcile their elements.
            kernel_elements = {k: v for k, v in kernel_elements.items() if k not in kernel_sets}
            keep = load_balance_chains_in(doc)
            if SERVICE_ENDPOINTS in kernel_elements and not keep.issuperset(LOAD_BALANCE_CHAINS):
                # A load-balance chain is missing or altered, and nft cannot write one next to the
                # map the kernel holds (see load_balance_chains_in): replace the whole table, in this
                # same transaction, so that there is no moment without rules.
                log.warning(
                    "a load-balance chain is missing or altered; re-creating the table in one transaction family=%s",
                    self.family,
                )
                lines.append(f"delete table {self.family} {TABLE}")
                kernel_chains, kernel_elements, kernel_sets, keep = set(), {}, {}, set()
            lines += self._skeleton(keep=keep)
            targets: Collection[NamespacedName] = sorted(state.services)
            base_owners: dict[ElemKey, Claims] = {}
            base_fragments: dict[NamespacedName, Fragment] = {}
            old_static: frozenset[Element] = frozenset()
        else:
            kernel_chains, kernel_elements = self._kernel_chains, self._kernel_elements
            kernel_sets = self._kernel_sets
            targets = sorted(set(changed))
            base_owners, base_fragments, old_static = self._owners, self._fragments, self._static_elements
        owner_updates: dict[ElemKey, Claims] = {}  # an empty dict: nobody claims the element any more
        fragment_updates: dict[NamespacedName, Fragment] = {}

        def claim(key: ElemKey, owner: Owner, value: str | None) -> None:
            current = owner_updates[key] if key in owner_updates else base_owners.get(key)
            if not current:  # the usual case, and every element of a full sync: no dict at all
                owner_updates[key] = (owner, value)
                return
            claims = _claims_dict(current)
            claims[owner] = value
            owner_updates[key] = _compact(claims)

        def unclaim(key: ElemKey, owner: Owner) -> None:
            claims = _claims_dict(owner_updates[key] if key in owner_updates else base_owners.get(key))
            claims.pop(owner, None)
            owner_updates[key] = _compact(claims) if claims else {}

        static = render_static_elements(state.node.addresses, self.opts, self._local_addresses)
        for set_name, key, _value in old_static - static:
            unclaim((set_name, key), None)
        for set_name, key, value in static:
            claim((set_name, key), None, value)

        set_lines: list[str] = []  # before any chain is written
        new_sets = dict(kernel_sets)
        gone_sets: set[str] = set()
        for svc in targets:
            new = self._fragment(state, svc)
            old = base_fragments.get(svc, EMPTY)
            fragment_updates[svc] = new
            rewrite: set[str] = set()
            for set_name, decl in new.sets.items():
                if set_name not in kernel_sets:
                    set_lines.append(f"add set {self.family} {TABLE} {set_name} {{ {decl} ; }}")
                elif kernel_sets[set_name] != decl:
                    # A new timeout: the set is re-created, after emptying every chain that refers to it.
                    referers = [c for c in kernel_chains if names.is_service_chain(c) and f"-{svc}/" in c]
                    set_lines += [f"flush chain {self.family} {TABLE} {c}" for c in sorted(referers)]
                    set_lines += [
                        f"delete set {self.family} {TABLE} {set_name}",
                        f"add set {self.family} {TABLE} {set_name} {{ {decl} ; }}",
                    ]
                    rewrite.update(referers)
                new_sets[set_name] = decl
            gone_sets |= old.sets.keys() - new.sets.keys()
            for name, rules in new.chains.items():
                if full or old.chains.get(name) != rules or name not in kernel_chains or name in rewrite:
                    chain_lines += self._chain_lines(name, rules)
                    written_chains.add(name)
                stale.pop(name, None)
            for name in old.chains.keys() - new.chains.keys():
                stale.setdefault(name, now)
            old_values, new_values = _element_values(old), _element_values(new)
            for elem_key in old_values.keys() - new_values.keys():
                unclaim(elem_key, svc)
            for elem_key, value in new_values.items():
                if elem_key not in old_values or old_values[elem_key] != value:
                    claim(elem_key, svc, value)

        if full:
            gone_sets |= kernel_sets.keys()
        gone_sets -= {name for frag in fragment_updates.values() for name in frag.sets}
        gone_sets &= kernel_sets.keys()
        for name in gone_sets:
            new_sets.pop(name, None)
        touched: set[ElemKey] = set(owner_updates)
        if full:
            for name in kernel_chains:
                if names.is_service_chain(name) and name not in written_chains:
                    stale.setdefault(name, now)
                elif name.startswith(f"{LOAD_BALANCE}-") and name not in LOAD_BALANCE_CHAINS:
                    stale.setdefault(name, now)  # left by a version with more load-balance chains
            # Elements in the kernel that nobody owns any more must go too.
            touched |= {(s, k) for s, elems in kernel_elements.items() for k in elems}

        adds: dict[str, list[tuple[str, str | None]]] = {}
        deletes: dict[str, list[tuple[str, str | None]]] = {}
        # Copy-on-write per set: a partial sync must not pay for copying 100k untouched elements.
        new_kernel = dict(kernel_elements)
        copied: set[str] = set()

        def writable(set_name: str) -> dict[str, str | None]:
            if set_name not in copied:
                new_kernel[set_name] = dict(new_kernel.get(set_name, {}))
                copied.add(set_name)
            return new_kernel[set_name]

        for set_name, key in touched:
            owners: Claims | None = owner_updates.get((set_name, key), base_owners.get((set_name, key)))
            have = kernel_elements.get(set_name, {})
            want = self._effective(owners) if owners else None
            if key in have and (not owners or have[key] != want):
                deletes.setdefault(set_name, []).append((key, None))
                del writable(set_name)[key]
            if owners and (key not in have or have[key] != want):
                adds.setdefault(set_name, []).append((key, want))
                writable(set_name)[key] = want

        # Order matters inside one transaction: chains exist before elements point at them;
        # elements stop pointing at a chain before it is flushed; deletion comes a sync later.
        lines += set_lines
        lines += chain_lines
        lines += self._element_lines("delete", deletes)
        lines += self._element_lines("add", adds)
        due = [name for name, since in stale.items() if now - since >= STALE_CHAIN_DELAY and name in kernel_chains]
        newly_stale = [name for name in stale if name not in self._stale or full]
        for name in sorted(newly_stale):
            if name in kernel_chains and name not in due:
                lines.append(f"flush chain {self.family} {TABLE} {name}")
        for name in sorted(due):
            lines.append(f"flush chain {self.family} {TABLE} {name}")
            lines.append(f"delete chain {self.family} {TABLE} {name}")
        # Last: sets nothing refers to any more (their chains were rewritten or flushed above).
        lines += [f"delete set {self.family} {TABLE} {name}" for name in sorted(gone_sets)]

        if lines:
            script = "\n".join(lines) + "\n"
            log.debug("applying nftables transaction family=%s commands=%d", self.family, len(lines))
            if log.isEnabledFor(logging.DEBUG - 5):
                log.log(logging.DEBUG - 5, "transaction:\n%s", script)
            try:
                self.nft.run(script)  # raises NftError; nothing below runs then
            except NftError as exc:
                # Our records stay as they were, but the options in force may already be new: make
                # sure the retry is a full sync whoever calls us next.
                self._synced_once = False
                if full and not self._adopted and doc is not None:
                    return self._take_over(state, changed, exc)
                raise

        # Commit bookkeeping only now that the kernel holds it.
        if full:
            self._kernel_chains = set(kernel_chains) | set(static_chains(self.opts)) | set(BASE_CHAINS)
            self._owners, self._fragments = {}, {}
        self._kernel_chains |= written_chains
        for name in due:
            stale.pop(name, None)
            self._kernel_chains.discard(name)
        for elem_key, elem_owners in owner_updates.items():
            if elem_owners:
                self._owners[elem_key] = elem_owners
            else:
                self._owners.pop(elem_key, None)
        for svc, frag in fragment_updates.items():
            if frag is EMPTY:
                self._fragments.pop(svc, None)
            else:
                self._fragments[svc] = frag
        self._kernel_elements = new_kernel
        self._kernel_sets = new_sets
        self._static_elements = static
        self._stale = stale
        self._synced_once = True
        self._adopted = True
        followup = STALE_CHAIN_DELAY if stale else None
        return SyncOutcome(full=full, commands=len(lines), services_rendered=len(targets), followup_after=followup)

    def _take_over(self, state: ProxyState, changed: Collection[NamespacedName], error: NftError) -> SyncOutcome:
        """The first full sync of this process was refused by a table of our name that we cannot
        update in place: one written by another kube-proxy (upstream's nftables mode, or another
        version of ours) with base chains at other hooks or priorities, or sets of other types (the
        kernel refuses to change those). Replace it once: delete it, then program ours from scratch.
        Traffic to Services pauses between the two transactions (once, at the switch-over)."""
        log.warning(
            "existing nftables table is not ours to update in place (another kube-proxy's?); re-creating it "
            "family=%s error=%r",
            self.family,
            str(error).splitlines()[0] if str(error) else "",
        )
        self._adopted = True
        self.nft.delete_table(self.family, TABLE)
        return self.sync(state, changed, full=True)

    def _affinity_sets_of(self, doc: TableDoc | None) -> dict[str, str]:
        """Affinity sets in an ``nft -j list table`` document, with the declaration we would write."""
        out: dict[str, str] = {}
        prefix = f"{names.AFFINITY}-"
        for item in doc.nftables if doc else ():
            entry = item.set
            if entry is not None and entry.name.startswith(prefix):
                timeout = entry.timeout
                out[entry.name] = affinity_set_declaration(self.opts, timeout) if timeout else "?"
        return out

    def present(self) -> bool:
        """Is our table still in the kernel? Lists table names only: the same cost at 10 or 10k Services."""
        return self.nft.has_table(self.family, TABLE)

    def cleanup(self) -> bool:
        """Remove everything this backend installed (``--cleanup``); True if there was something."""
        try:
            return self.nft.delete_table(self.family, TABLE)
        except NftError as exc:
            log.error("cleanup failed family=%s error=%r", self.family, str(exc))
            raise
        finally:
            self._synced_once = False
