"""Pure nftables renderer: proxy state -> the ruleset we want in the kernel, as data and as text.

Nothing here touches the kernel. ``render_static`` gives the table's skeleton (sets, maps, base and
static chains) and ``render_service`` gives one Service's ``Fragment`` (its chains and the map/set
elements it owns), so a partial sync re-renders only changed Services. ``Ruleset.text()`` is the
canonical, sorted dump used by golden tests, the tracer and dry-run diffs.

Shape (see README.md beside this file for the measurements behind it):
- dispatch is one lookup in a few big named maps (``service-ips``, ``service-nodeports``,
  ``no-endpoint-*``); there are no per-service anonymous maps, whose kernel cost is quadratic;
- load balancing of most Services is map data, not rules: their ``service-ips`` element points at
  one of the shared chains ``load-balance-<n>`` (n = the number of endpoints), whose single rule
  DNATs through ONE map, ``service-endpoints``, keyed by ``daddr . proto . port . numgen random
  mod n``; an endpoint change is then an element change, never a rule change (rule changes make
  the kernel validate the whole table). Services that need their own chain (a NodePort, whose
  destination is any node address; session affinity; more than ``MAX_MAPPED_ENDPOINTS``
  endpoints) keep one rule per endpoint drawing ``numgen random mod (n-i) == 0`` (the nft
  analogue of iptables' ``statistic --probability 1/(n-i)``);
- masquerading uses the packet mark bit (default bit 14) exactly like upstream, plus a
  ``hairpin-connections`` set for pods that reach themselves through a Service.
Dispatch semantics (REJECT when a Service has no usable endpoint anywhere, DROP when a Local
policy has none on this node) follow upstream's nftables proxier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from kubeproxy.backends.nftables import names
from kubeproxy.backends.options import ProxyOptions
from kubeproxy.backends.semantics import Verdict, plan_port
from kubeproxy.model.endpoint import Endpoint
from kubeproxy.model.service import IPFamily, NamespacedName, ServicePort, ServicePortName
from kubeproxy.state.topology import NodeTopology

TABLE = "kube-proxy"
TABLE_COMMENT = "rules for kube-proxy"

# Sets and maps: name -> declaration body, per family (filled in by ``declarations``).
CLUSTER_IPS = "cluster-ips"
NODEPORT_IPS = "nodeport-ips"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
HAIRPIN = "hairpin-connections"
FIREWALL_IPS = "firewall-ips"
SERVICE_ENDPOINTS = "service-endpoints"

# Services with up to this many endpoints (in the set a chain balances over) are balanced through
# ``service-endpoints`` by the shared chain ``load-balance-<n>``; there is one such chain per n, each
# holding one rule that refers to the map (element updates cost in proportion to those rules).
MAX_MAPPED_ENDPOINTS = 64
LOAD_BALANCE = "load-balance"
LOAD_BALANCE_CHAINS = tuple(f"{LOAD_BALANCE}-{n}" for n in range(1, MAX_MAPPED_ENDPOINTS + 1))

REJECT_CHAIN = "reject-chain"
VERDICT_REJECT = f"goto {REJECT_CHAIN}"
VERDICT_DROP = "drop"
_VERDICTS: dict[Verdict | None, str] = {Verdict.REJECT: VERDICT_REJECT, Verdict.DROP: VERDICT_DROP}

# Base chains: name -> (type, hook, priority). Names follow upstream ("<type>-<hook>"). Priorities are
# numeric (dstnat = -100, srcnat = 100): nft 1.0.6 accepts the "dstnat" keyword only on prerouting.
BASE_CHAINS: dict[str, tuple[str, str, str]] = {
    # loadBalancerSourceRanges are checked before DNAT (dstnat - 10), on the original destination.
    "filter-prerouting-pre-dnat": ("filter", "prerouting", "-110"),
    "filter-output-pre-dnat": ("filter", "output", "-110"),
    "filter-input": ("filter", "input", "0"),
    "filter-forward": ("filter", "forward", "0"),
    "filter-output": ("filter", "output", "0"),
    "nat-prerouting": ("nat", "prerouting", "-100"),
    "nat-output": ("nat", "output", "-100"),
    "nat-postrouting": ("nat", "postrouting", "100"),
}


_LOOPBACK = {IPFamily.V4: "127.0.0.0/8", IPFamily.V6: "::1"}


@dataclass(frozen=True, slots=True)
class NftOptions(ProxyOptions):
    """Backend settings for one IP family (one table); nft syntax on top of ``ProxyOptions``."""

    @property
    def nft_family(self) -> str:
        return self.family.nft_family

    @property
    def ip(self) -> str:
        """The payload protocol keyword: ``ip`` or ``ip6``."""
        return self.family.nft_family

    @property
    def addr_type(self) -> str:
        return "ipv4_addr" if self.family is IPFamily.V4 else "ipv6_addr"

    @property
    def mark(self) -> str:
        return f"0x{self.mark_value:08x}"

    def local_match(self, *, local: bool) -> str | None:
        """Match for pod (local) traffic, or its negation; None when local traffic is undetectable."""
        if self.local_interface:
            # Config validation allows only [A-Za-z0-9._-] (plus the trailing "*"): safe inside quotes.
            return f'iifname "{self.local_interface}"' if local else f'iifname != "{self.local_interface}"'
        if not self.cluster_cidrs:
            return None
        cidrs = self.cluster_cidrs[0] if len(self.cluster_cidrs) == 1 else "{ " + ", ".join(self.cluster_cidrs) + " }"
        return f"{self.ip} saddr {cidrs}" if local else f"{self.ip} saddr != {cidrs}"


Element = tuple[str, str, str | None]  # (set or map name, key text, value text or None for sets)


@dataclass(frozen=True, slots=True)
class Fragment:
    """Everything one Service owns in the table: its chains and its set/map elements."""

    chains: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    elements: frozenset[Element] = frozenset()
    sets: Mapping[str, str] = field(default_factory=dict)  # per-Service sets (session affinity): name -> declaration


EMPTY = Fragment()


@dataclass(frozen=True, slots=True)
class Ruleset:
    """A whole table as data."""

    family: str
    declarations: Mapping[str, str]
    chains: Mapping[str, tuple[str, ...]]
    elements: Mapping[str, Mapping[str, str | None]]

    def text(self) -> str:
        """Canonical nft script: table, sets/maps, chains, rules (chain order kept), sorted elements."""
        fam = self.family
        out = table_commands(fam, self.declarations)
        for name in sorted(self.chains):
            out.append(chain_add_command(fam, name))
        for name in sorted(self.chains):
            out.extend(f"add rule {fam} {TABLE} {name} {rule}" for rule in self.chains[name])
        for name in sorted(self.elements):
            for key in sorted(self.elements[name]):
                out.append(element_command("add", fam, name, key, self.elements[name][key]))
        return "\n".join(out) + "\n"


def table_commands(family: str, decls: Mapping[str, str]) -> list[str]:
    """``add table`` and one ``add set``/``add map`` per declaration (a map's type has a ':')."""
    out = [f'add table {family} {TABLE} {{ comment "{TABLE_COMMENT}" ; }}']
    for name in sorted(decls):
        kind = "map" if ":" in decls[name].split(";")[0] else "set"
        out.append(f"add {kind} {family} {TABLE} {name} {{ {decls[name]} ; }}")
    return out


def chain_add_command(family: str, name: str) -> str:
    if name in BASE_CHAINS:
        ctype, hook, prio = BASE_CHAINS[name]
        return f"add chain {family} {TABLE} {name} {{ type {ctype} hook {hook} priority {prio} ; policy accept ; }}"
    return f"add chain {family} {TABLE} {name}"


def element_command(verb: str, family: str, set_name: str, key: str, value: str | None) -> str:
    body = key if value is None or verb == "delete" else f"{key} : {value}"
    return f"{verb} element {family} {TABLE} {set_name} {{ {body} }}"


def declarations(opts: NftOptions) -> dict[str, str]:
    a = opts.addr_type
    return {
        CLUSTER_IPS: f'type {a} ; comment "Active ClusterIPs"',
        NODEPORT_IPS: f'type {a} ; comment "IPs that accept NodePort traffic"',
        SERVICE_IPS: f'type {a} . inet_proto . inet_service : verdict ; comment "ClusterIP and ExternalIP traffic"',
        SERVICE_NODEPORTS: 'type inet_proto . inet_service : verdict ; comment "NodePort traffic"',
        NO_ENDPOINT_SERVICES: (
            f'type {a} . inet_proto . inet_service : verdict ; comment "drop or reject: services without endpoints"'
        ),
        NO_ENDPOINT_NODEPORTS: (
            'type inet_proto . inet_service : verdict ; comment "drop or reject: nodeports without endpoints"'
        ),
        HAIRPIN: f'type {a} . {a} . inet_proto . inet_service ; comment "pods reaching themselves through a Service"',
        FIREWALL_IPS: (
            f'type {a} . inet_proto . inet_service : verdict ; comment "LB IPs with loadBalancerSourceRanges"'
        ),
        # typeof, because the slot (a numgen value) has no named type; the modulus in a typeof only
        # describes the key, each load-balance-<n> chain draws with its own. Caveat (nft 1.0.6): once
        # the map is in the kernel, nft reads this typeof back as a conflict ("ip vs. th") and refuses
        # any NEW rule that uses the map, so the backend writes load-balance-<n> chains only when they
        # are missing ("tcp dport" would avoid that, but makes nft add a hidden "meta l4proto tcp").
        SERVICE_ENDPOINTS: (
            f"typeof {opts.ip} daddr . meta l4proto . th dport . numgen random mod 1 : {opts.ip} daddr . th dport ; "
            'comment "service address, protocol, port and slot -> endpoint"'
        ),
    }


def static_chains(opts: NftOptions) -> dict[str, tuple[str, ...]]:
    ip, mark = opts.ip, opts.mark
    new = "ct state new"
    services: list[str] = []
    if opts.masquerade_all:
        services.append(f"{ip} daddr @{CLUSTER_IPS} meta mark set meta mark | {mark}")
    elif (not_local := opts.local_match(local=False)) is not None:
        # Traffic to a ClusterIP from outside the cluster CIDR is masqueraded so replies return here.
        services.append(f"{ip} daddr @{CLUSTER_IPS} {not_local} meta mark set meta mark | {mark}")
    if opts.nodeport_match_all:
        # Any local address but loopback: nftables mode never serves NodePorts on 127.0.0.1/::1.
        nodeport_dest = f"fib daddr type local {ip} daddr != {_LOOPBACK[opts.family]}"
        nodeport_check = f"{ip} daddr != {_LOOPBACK[opts.family]}"  # filter-input: local already
    else:
        nodeport_dest = nodeport_check = f"{ip} daddr @{NODEPORT_IPS}"
    services += [
        f"{ip} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}",
        f"{nodeport_dest} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}",
    ]
    balancing = {
        chain: (f"dnat to {ip} daddr . meta l4proto . th dport . numgen random mod {n} map @{SERVICE_ENDPOINTS}",)
        for n, chain in enumerate(LOAD_BALANCE_CHAINS, 1)
    }
    return balancing | {
        "filter-input": (f"{new} jump nodeport-endpoints-check", f"{new} jump service-endpoints-check"),
        "filter-forward": (f"{new} jump service-endpoints-check", f"{new} jump cluster-ips-check"),
        "filter-output": (f"{new} jump service-endpoints-check", f"{new} jump cluster-ips-check"),
        "filter-prerouting-pre-dnat": (f"{new} jump firewall-check",),
        "filter-output-pre-dnat": (f"{new} jump firewall-check",),
        "firewall-check": (f"{ip} daddr . meta l4proto . th dport vmap @{FIREWALL_IPS}",),
        "nat-prerouting": ("jump services",),
        "nat-output": ("jump services",),
        "nat-postrouting": ("jump masquerading",),
        "services": tuple(services),
        "masquerading": (
            # Clear the bit before masquerading so a packet that loops back is not SNATed twice.
            f"meta mark & {mark} != 0 meta mark set meta mark ^ {mark} masquerade fully-random",
            f"ct status dnat {ip} saddr . {ip} daddr . meta l4proto . th dport @{HAIRPIN} masquerade fully-random",
        ),
        "service-endpoints-check": (f"{ip} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}",),
        "nodeport-endpoints-check": (f"{nodeport_check} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}",),
        REJECT_CHAIN: ("reject",),
        # A ClusterIP on a port no Service defines: nothing DNATed it, so refuse it clearly.
        "cluster-ips-check": (f"{ip} daddr @{CLUSTER_IPS} reject",),
    }


def nodeport_addresses(
    node_addresses: Sequence[str], opts: NftOptions, interface_addresses: Sequence[str] = ()
) -> tuple[str, ...]:
    """The ``nodeport-ips`` of this family (empty when NodePorts match every local address).

    Loopback addresses never qualify in nftables mode (upstream serves localhost NodePorts only in
    iptables mode, through route_localnet).
    """
    return opts.nodeport_ips(node_addresses, interface_addresses)


def render_static_elements(
    node_addresses: Sequence[str], opts: NftOptions, interface_addresses: Sequence[str] = ()
) -> frozenset[Element]:
    return frozenset((NODEPORT_IPS, ip, None) for ip in nodeport_addresses(node_addresses, opts, interface_addresses))


def load_balance_rules(endpoints: Sequence[Endpoint], proto: str) -> tuple[str, ...]:
    """Uniform choice without registers or maps: rule i fires with probability 1/(n-i)."""
    n = len(endpoints)
    rules = []
    for i, ep in enumerate(endpoints):
        pick = f"numgen random mod {n - i} == 0 " if i < n - 1 else ""
        rules.append(f"{pick}meta l4proto {proto} dnat to {ep}")
    return tuple(rules)


def mapped_elements(
    addresses: Iterable[str], proto: str, port: int, endpoints: Sequence[Endpoint]
) -> Iterator[Element]:
    """``service-endpoints`` elements: slot i of every address the Service answers on -> endpoint i."""
    for addr in addresses:
        for slot, ep in enumerate(endpoints):
            yield SERVICE_ENDPOINTS, f"{addr} . {proto} . {port} . {slot}", f"{ep.ip} . {ep.port}"


def firewall_rules(sources: Sequence[str], opts: NftOptions) -> tuple[str, ...]:
    """``loadBalancerSourceRanges`` as a chain: allowed sources return, the rest is dropped.

    One ``return`` rule per allowed prefix instead of upstream's inline anonymous set: no per-Service
    set in the kernel (DESIGN.md section 3). ``sources`` come from ``semantics.firewall_sources``
    (the ranges of this family, plus the LB IPs when a node IP is in a range, as upstream).
    """
    if not sources:
        return ()
    return (*(f"{opts.ip} saddr {src} return" for src in sources), "drop")


def affinity_set_declaration(opts: NftOptions, timeout: int) -> str:
    return f"type {opts.addr_type} ; flags dynamic,timeout ; timeout {timeout}s"


def affinity_rules(
    svc: ServicePort,
    endpoints: Sequence[Endpoint],
    opts: NftOptions,
    chains: dict[str, tuple[str, ...]],
    sets: dict[str, str],
) -> tuple[str, ...]:
    """sessionAffinity ClientIP, upstream's shape: a client seen by an endpoint recently goes back to it.

    Per endpoint a dynamic set ``affinity-<endpoint>`` (entries expire after timeoutSeconds) and a chain
    ``endpoint-<endpoint>`` that refreshes the client's entry and DNATs. The Service chain first sends known
    clients to their endpoint, then picks one at random (register-free, as without affinity).
    """
    assert svc.affinity_timeout is not None
    proto, ip = svc.protocol.nft, opts.ip
    rules: list[str] = []
    picks: list[str] = []
    n = len(endpoints)
    for i, ep in enumerate(endpoints):
        base = names.endpoint_base(svc.name, ep.ip, ep.port)
        chain, aff = f"{names.ENDPOINT}-{base}", f"{names.AFFINITY}-{base}"
        sets[aff] = affinity_set_declaration(opts, svc.affinity_timeout)
        chains[chain] = (f"update @{aff} {{ {ip} saddr }}", f"meta l4proto {proto} dnat to {ep}")
        rules.append(f"{ip} saddr @{aff} goto {chain}")
        picks.append(f"numgen random mod {n - i} == 0 goto {chain}" if i < n - 1 else f"goto {chain}")
    return (*rules, *picks)


def render_service_port(
    svc: ServicePort,
    endpoints: Sequence[Endpoint],
    opts: NftOptions,
    node: NodeTopology,
    node_ips: Sequence[str] = (),
) -> tuple[dict[str, tuple[str, ...]], set[Element], dict[str, str]]:
    chains: dict[str, tuple[str, ...]] = {}
    elements: set[Element] = set()
    plan = plan_port(svc, endpoints, opts.family, node, node_ips)
    if plan is None:
        return chains, elements, {}  # not a Service of this family
    cat, cluster_ip = plan.endpoints, plan.cluster_ip
    spn, proto, port = svc.name, svc.protocol.nft, svc.port
    base = names.service_base(spn)
    cluster_chain, local_chain, external_chain = (f"{p}-{base}" for p in (names.SERVICE, names.LOCAL, names.EXTERNAL))

    sets: dict[str, str] = {}

    def balance(eps: Sequence[Endpoint]) -> tuple[str, ...]:
        if svc.affinity_timeout is None:
            return load_balance_rules(eps, proto)
        return affinity_rules(svc, eps, opts, chains, sets)

    lb_ips, external_ips = plan.load_balancer_ips, plan.external_ips
    # Balanced through the shared map when every way into the cluster endpoints carries a
    # destination address the map is keyed by (a NodePort's is any node address).
    mapped = 0 < len(cat.cluster) <= MAX_MAPPED_ENDPOINTS and svc.affinity_timeout is None and not svc.node_port
    if mapped:
        cluster_chain = f"{LOAD_BALANCE}-{len(cat.cluster)}"
    elif cat.cluster:
        chains[cluster_chain] = balance(cat.cluster)
    if cat.local:
        chains[local_chain] = balance(cat.local)
    for ep in cat.all_reachable:
        if ep.node_name == node.name:
            elements.add((HAIRPIN, f"{ep.ip} . {ep.ip} . {proto} . {ep.port}", None))

    internal_chain = local_chain if svc.internal_policy_local else cluster_chain
    external_policy_chain = local_chain if svc.external_policy_local else cluster_chain
    internal_verdict = _VERDICTS.get(plan.internal_verdict)
    external_verdict = _VERDICTS.get(plan.external_verdict)

    elements.add((CLUSTER_IPS, cluster_ip, None))
    key = f"{cluster_ip} . {proto} . {port}"
    if internal_verdict is None:
        elements.add((SERVICE_IPS, key, f"goto {internal_chain}"))
    else:
        elements.add((NO_ENDPOINT_SERVICES, key, internal_verdict))

    if plan.externally_accessible:
        rules: list[str] = []
        if not svc.external_policy_local:
            rules.append(f"meta mark set meta mark | {opts.mark}")  # may cross nodes: masquerade
        else:
            if (local_src := opts.local_match(local=True)) is not None:
                # Pod traffic to an external destination ignores traffic policy (as if it went out
                # to the load balancer and came back).
                rules.append(f"{local_src} goto {cluster_chain}")
            rules.append(f"fib saddr type local meta mark set meta mark | {opts.mark}")
            rules.append(f"fib saddr type local goto {cluster_chain}")
        if external_verdict is None:
            rules.append(f"goto {external_policy_chain}")
        chains[external_chain] = tuple(rules)

    if lb_ips and (fw_rules := firewall_rules(plan.firewall_sources, opts)):
        firewall_chain = f"{names.FIREWALL}-{base}"
        chains[firewall_chain] = fw_rules
        for ip in lb_ips:
            elements.add((FIREWALL_IPS, f"{ip} . {proto} . {port}", f"goto {firewall_chain}"))
    for ip in dict.fromkeys([*external_ips, *lb_ips]):
        ext_key = f"{ip} . {proto} . {port}"
        if cat.has_any:
            elements.add((SERVICE_IPS, ext_key, f"goto {external_chain}"))
        if external_verdict is not None:
            elements.add((NO_ENDPOINT_SERVICES, ext_key, external_verdict))
    if svc.node_port:
        np_key = f"{proto} . {svc.node_port}"
        if cat.has_any:
            elements.add((SERVICE_NODEPORTS, np_key, f"goto {external_chain}"))
        if external_verdict is not None:
            elements.add((NO_ENDPOINT_NODEPORTS, np_key, external_verdict))
    if mapped:
        # Map keys for exactly the destinations that reach load-balance-<n>: the ClusterIP when
        # internal traffic uses the cluster endpoints; external and LB IPs when the external chain
        # goes there (ETP=Cluster with endpoints, or ETP=Local's pod and node shortcuts).
        addresses = [cluster_ip] if internal_verdict is None and internal_chain == cluster_chain else []
        if cat.has_any and plan.externally_accessible and (svc.external_policy_local or external_verdict is None):
            addresses += [*external_ips, *lb_ips]
        elements.update(mapped_elements(dict.fromkeys(addresses), proto, port, cat.cluster))
    return chains, elements, sets


def render_service(
    ports: Iterable[ServicePort],
    endpoints_of: Callable[[ServicePort], Sequence[Endpoint]],
    opts: NftOptions,
    node: NodeTopology,
    node_ips: Sequence[str] = (),
) -> Fragment:
    """One Service (all its ports) as a Fragment."""
    chains: dict[str, tuple[str, ...]] = {}
    elements: set[Element] = set()
    sets: dict[str, str] = {}
    for svc in sorted(ports, key=lambda p: p.name):
        port_chains, port_elements, port_sets = render_service_port(svc, endpoints_of(svc), opts, node, node_ips)
        chains.update(port_chains)
        elements |= port_elements
        sets.update(port_sets)
    if not (chains or elements):
        return EMPTY
    return Fragment(chains=chains, elements=frozenset(elements), sets=sets)


def assemble(
    opts: NftOptions,
    static_elements: Iterable[Element],
    fragments: Iterable[Fragment],
) -> Ruleset:
    """Combine the skeleton and Service fragments into a whole table (first owner of a key wins)."""
    chains: dict[str, tuple[str, ...]] = dict(static_chains(opts))
    decls = declarations(opts)
    elements: dict[str, dict[str, str | None]] = {name: {} for name in decls}
    for set_name, key, value in static_elements:
        elements[set_name][key] = value
    for frag in fragments:
        chains.update(frag.chains)
        for set_name, decl in frag.sets.items():
            decls.setdefault(set_name, decl)
            elements.setdefault(set_name, {})
        for set_name, key, value in sorted(frag.elements, key=lambda e: (e[0], e[1], e[2] or "")):
            elements[set_name].setdefault(key, value)
    return Ruleset(family=opts.nft_family, declarations=decls, chains=chains, elements=elements)


def render_all(
    services: Mapping[NamespacedName, Mapping[ServicePortName, ServicePort]],
    endpoints_of: Callable[[ServicePort], Sequence[Endpoint]],
    opts: NftOptions,
    node: NodeTopology,
    node_addresses: Sequence[str],
    *,
    interface_addresses: Sequence[str] = (),
) -> Ruleset:
    """The whole table for a state (golden tests, dry-run, the tracer)."""
    fragments = [
        render_service(services[k].values(), endpoints_of, opts, node, node_addresses) for k in sorted(services)
    ]
    return assemble(opts, render_static_elements(node_addresses, opts, interface_addresses), fragments)
