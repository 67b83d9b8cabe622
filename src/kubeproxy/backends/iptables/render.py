"""Pure iptables renderer: proxy state -> upstream's iptables layout, as data and as text.

Nothing here touches the kernel. The layout is upstream's (reference/upstream.md section 3), chain
for chain and rule for rule, so that every tutorial's ``iptables -t nat -L KUBE-SERVICES`` reads
the same on our nodes:

- nat ``KUBE-SERVICES`` dispatches ClusterIPs (``-j KUBE-SVC-…`` / ``KUBE-SVL-…``), ExternalIPs
  (``KUBE-EXT-…``) and LB IPs (``KUBE-FW-…`` with loadBalancerSourceRanges, else ``KUBE-EXT-…``),
  and ends with the jump to ``KUBE-NODEPORTS`` for local destinations;
- ``KUBE-SVC-…`` (Cluster policy) and ``KUBE-SVL-…`` (Local policy) pick an endpoint chain
  ``KUBE-SEP-…`` with ``statistic --probability 1/(n-i)``, after the ``recent`` checks of
  ClientIP affinity; ``KUBE-SEP-…`` masquerades hairpin traffic and DNATs;
- filter ``KUBE-SERVICES`` / ``KUBE-EXTERNAL-SERVICES`` REJECT (no endpoints) or DROP (Local
  policy, none here); ``KUBE-PROXY-FIREWALL`` drops what ``KUBE-FW-…`` did not let through;
  ``KUBE-NODEPORTS`` (filter) accepts healthCheckNodePorts;
- masquerading uses the packet mark (``KUBE-MARK-MASQ``, ``KUBE-POSTROUTING``), as upstream.

``render_service`` gives one Service's ``Fragment`` (its own chains plus its rules in the shared
chains), so a partial sync re-renders only changed Services; ``assemble`` joins fragments and the
static part into an ``IptRuleset`` whose ``text()`` is the canonical dump used by golden tests, the
tracer and dry-run diffs. Semantics (which endpoints, REJECT or DROP) come from
``backends.semantics``, shared with the nftables renderer.

Every name and comment from the API is a validated DNS-1123 name or IANA port name (the model
rejects anything else) and chain names are hashes, so no Service can inject iptables syntax.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from kubeproxy.backends.iptables import names
from kubeproxy.backends.options import ProxyOptions
from kubeproxy.backends.semantics import PortPlan, Verdict, plan_port
from kubeproxy.model.endpoint import Endpoint
from kubeproxy.model.service import IPFamily, NamespacedName, ServicePort, ServicePortName
from kubeproxy.state.topology import NodeTopology

FILTER = "filter"
NAT = "nat"
MANGLE = "mangle"

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_FIREWALL = "KUBE-FIREWALL"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
CANARY = "KUBE-PROXY-CANARY"

BUILTIN_CHAINS = {
    FILTER: ("INPUT", "FORWARD", "OUTPUT"),
    NAT: ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    MANGLE: ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
}
# Chains whose rules come from every Service: rewritten whole whenever any of their rules change.
SHARED_CHAINS: tuple[tuple[str, str], ...] = (
    (NAT, KUBE_SERVICES),
    (NAT, KUBE_NODEPORTS),
    (FILTER, KUBE_SERVICES),
    (FILTER, KUBE_EXTERNAL_SERVICES),
    (FILTER, KUBE_NODEPORTS),
    (FILTER, KUBE_PROXY_FIREWALL),
)
NODEPORTS_COMMENT = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"
# Upstream's "large cluster mode": above this many endpoints, per-endpoint comments are left out
# (the restore input shrinks by ~40%).
LARGE_CLUSTER_ENDPOINTS = 1000

_LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")


# The kernel's XT_MAX_COMMENT_LEN is 256 bytes with the NUL: a longer comment fails the whole restore.
MAX_COMMENT = 255


def comment(text: str) -> str:
    """``-m comment --comment``, quoted when it has a space (iptables-save prints it that way too).

    Cut to the kernel's limit: the API server keeps Service names to 63 characters, but a name as long
    as the model accepts (a 253-character DNS subdomain, from a manifest) must not fail every sync."""
    text = text[:MAX_COMMENT]
    return f'-m comment --comment "{text}"' if " " in text else f"-m comment --comment {text}"


@dataclass(frozen=True, slots=True)
class IptOptions(ProxyOptions):
    """iptables-mode settings for one family (one of iptables / ip6tables)."""

    # iptables mode answers NodePorts on every local address unless nodePortAddresses says otherwise.
    DEFAULT_NODEPORT_ADDRESSES: ClassVar[tuple[str, ...]] = ("all",)

    localhost_nodeports: bool = True  # iptables.localhostNodePorts (IPv4 only; needs route_localnet)
    # nf_conntrack_tcp_be_liberal=1 makes the INVALID-drop rule unnecessary (upstream reads the sysctl).
    tcp_be_liberal: bool = False

    @property
    def mark(self) -> str:
        return f"0x{self.mark_value:x}"

    @property
    def loopback(self) -> str:
        return "127.0.0.0/8" if self.family is IPFamily.V4 else "::1/128"

    def local_match(self, *, local: bool) -> str | None:
        """Match for pod (local) traffic, or its negation; None when local traffic is undetectable."""
        neg = "" if local else "! "
        if self.local_interface:
            # "veth*" (our InterfaceNamePrefix spelling) is "veth+" in iptables.
            iface = self.local_interface[:-1] + "+" if self.local_interface.endswith("*") else self.local_interface
            return f"{neg}-i {iface}"
        if not self.cluster_cidrs:
            return None
        return f"{neg}-s {self.cluster_cidrs[0]}"  # config allows one CIDR per family

    @property
    def localhost_nodeports_active(self) -> bool:
        """IPv4 NodePorts on 127.0.0.1 (upstream: localhostNodePorts and nodePortAddresses covers loopback)."""
        if self.family is not IPFamily.V4 or not self.localhost_nodeports:
            return False
        # Upstream's ContainsIPv4Loopback: a CIDR whose address is loopback, or one holding 127.0.0.0.
        nets = [ipaddress.IPv4Network(c) for c in self.nodeport_cidrs]
        return any(net.network_address.is_loopback or _LOOPBACK_V4.network_address in net for net in nets)


Rules = tuple[str, ...]
ChainKey = tuple[str, str]  # (table, chain)


@dataclass(frozen=True, slots=True)
class Fragment:
    """Everything one Service owns: its nat chains, and its rules in the shared chains (in order)."""

    chains: Mapping[str, Rules] = field(default_factory=dict)
    shared: Mapping[ChainKey, Rules] = field(default_factory=dict)
    endpoints: int = 0  # endpoints of this family over all ports (upstream's large-cluster-mode count)


EMPTY = Fragment()


@dataclass(frozen=True, slots=True)
class IptRuleset:
    """The rules of one family as data: table -> chain -> rules (text after ``-A CHAIN``).

    Built-in chains hold only our jump rules."""

    family: IPFamily
    tables: Mapping[str, Mapping[str, Rules]]

    def text(self) -> str:
        """Canonical iptables-save-like dump: per table, chain declarations, then rules in chain order
        (chains sorted by name, built-in chains first)."""
        out: list[str] = []
        for table in sorted(self.tables):
            chains = self.tables[table]
            builtin = [c for c in BUILTIN_CHAINS.get(table, ()) if c in chains]
            order = builtin + sorted(c for c in chains if c not in builtin)
            out.append(f"*{table}")
            out += [f":{c} ACCEPT [0:0]" if c in builtin else f":{c} - [0:0]" for c in order]
            out += [f"-A {c} {rule}" for c in order for rule in chains[c]]
            out.append("COMMIT")
        return "\n".join(out) + "\n"

    def rule_count(self, table: str) -> int:
        return sum(len(rules) for rules in self.tables.get(table, {}).values())


# -- static part -----------------------------------------------------------------------------


def builtin_jumps(opts: IptOptions) -> dict[ChainKey, Rules]:
    """Our rules in the built-in chains (upstream's jump rules and comments)."""
    new = "-m conntrack --ctstate NEW"
    firewall = f'{new} -m comment --comment "kubernetes load balancer firewall" -j {KUBE_PROXY_FIREWALL}'
    services = f'{new} -m comment --comment "kubernetes service portals" -j {KUBE_SERVICES}'
    external = f'{new} -m comment --comment "kubernetes externally-visible service portals" -j {KUBE_EXTERNAL_SERVICES}'
    localnet = (f"-j {KUBE_FIREWALL}",) if opts.localhost_nodeports_active else ()
    portals = f'-m comment --comment "kubernetes service portals" -j {KUBE_SERVICES}'
    return {
        (FILTER, "INPUT"): (
            firewall,
            f'-m comment --comment "kubernetes health check service ports" -j {KUBE_NODEPORTS}',
            external,
            *localnet,
        ),
        # Verdicts (REJECT/DROP) first, then KUBE-FORWARD's ACCEPTs.
        (FILTER, "FORWARD"): (
            firewall,
            services,
            external,
            f'-m comment --comment "kubernetes forwarding rules" -j {KUBE_FORWARD}',
        ),
        (FILTER, "OUTPUT"): (firewall, services, *localnet),
        (NAT, "PREROUTING"): (portals,),
        (NAT, "OUTPUT"): (portals,),
        (NAT, "POSTROUTING"): (f'-m comment --comment "kubernetes postrouting rules" -j {KUBE_POSTROUTING}',),
    }


def static_chains(opts: IptOptions) -> dict[ChainKey, Rules]:
    """Chains whose content depends only on the options."""
    mark = opts.mark
    forward: list[str] = []
    if not opts.tcp_be_liberal:
        forward.append("-m conntrack --ctstate INVALID -j DROP")
    forward += [
        f'-m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT',
        '-m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED '
        "-j ACCEPT",
    ]
    chains: dict[ChainKey, Rules] = {
        (NAT, KUBE_MARK_MASQ): (f"-j MARK --or-mark {mark}",),
        (NAT, KUBE_POSTROUTING): (
            f"-m mark ! --mark {mark}/{mark} -j RETURN",
            # Clear the bit so that a packet that loops back is not masqueraded twice.
            f"-j MARK --xor-mark {mark}",
            '-m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
        ),
        (FILTER, KUBE_FORWARD): tuple(forward),
    }
    if opts.localhost_nodeports_active:
        # route_localnet=1 lets 127.0.0.1 be DNATed; never let packets from elsewhere reach 127/8
        # that way (CVE-2020-8558, upstream #90259).
        chains[(FILTER, KUBE_FIREWALL)] = (
            '-m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 '
            "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        )
    return chains


def nodeports_jumps(opts: IptOptions, node_addresses: Sequence[str], interface_addresses: Sequence[str]) -> Rules:
    """The last rules of nat KUBE-SERVICES: local destinations go on to KUBE-NODEPORTS."""
    head = comment(NODEPORTS_COMMENT)
    if opts.nodeport_match_all:
        not_loopback = "" if opts.localhost_nodeports_active else f" ! -d {opts.loopback}"
        return (f"{head} -m addrtype --dst-type LOCAL{not_loopback} -j {KUBE_NODEPORTS}",)
    ips = opts.nodeport_ips(node_addresses, interface_addresses, loopback=opts.localhost_nodeports_active)
    return tuple(f"{head} -d {ip} -j {KUBE_NODEPORTS}" for ip in ips)


# -- one Service ------------------------------------------------------------------------------


def _probability(n: int) -> str:
    return f"{1 / n:0.10f}"


class _Writer:
    """Collects one Service's chains and shared-chain rules."""

    def __init__(self) -> None:
        self.chains: dict[str, list[str]] = {}
        self.shared: dict[ChainKey, list[str]] = {}

    def chain(self, name: str) -> list[str]:
        return self.chains.setdefault(name, [])

    def add(self, table: str, chain: str, rule: str) -> None:
        self.shared.setdefault((table, chain), []).append(rule)


def _dst(proto: str, ip: str, port: int) -> str:
    return f"-m {proto} -p {proto} -d {ip} --dport {port}"


def render_service_port(plan: PortPlan, opts: IptOptions, out: _Writer, *, comments: bool = True) -> None:
    """Write one Service port's rules into ``out``."""
    svc = plan.svc
    spn, proto, port = str(svc.name), svc.protocol.nft, svc.port
    h = names.service_hash(svc.name)
    svc_chain, svl_chain, ext_chain, fw_chain = names.SVC + h, names.SVL + h, names.EXT + h, names.FW + h
    cat = plan.endpoints
    internal_chain = svl_chain if svc.internal_policy_local else svc_chain
    external_policy_chain = svl_chain if svc.external_policy_local else svc_chain
    masq = f"-j {KUBE_MARK_MASQ}"

    def verdict_rule(verdict: Verdict, match: str) -> str:
        if verdict is Verdict.REJECT:
            return f"{comment(f'{spn} has no endpoints')} {match} -j REJECT"
        return f"{comment(f'{spn} has no local endpoints')} {match} -j DROP"

    seps = {(ep.ip, ep.port): names.endpoint_chain(svc.name, ep.ip, ep.port) for ep in cat.all_reachable}

    def endpoint_rules(chain: str, endpoints: Sequence[Endpoint]) -> None:
        rules = out.chain(chain)
        n = len(endpoints)
        notes = [f"{comment(f'{spn} -> {ep}')} " if comments else "" for ep in endpoints]
        if svc.affinity_timeout is not None:
            for ep, note in zip(endpoints, notes, strict=True):
                sep = seps[(ep.ip, ep.port)]
                rules.append(f"{note}-m recent --name {sep} --rcheck --seconds {svc.affinity_timeout} --reap -j {sep}")
        for i, (ep, note) in enumerate(zip(endpoints, notes, strict=True)):
            pick = f"-m statistic --mode random --probability {_probability(n - i)} " if i < n - 1 else ""
            rules.append(f"{note}{pick}-j {seps[(ep.ip, ep.port)]}")

    # Internal traffic: the ClusterIP.
    cluster_dst = _dst(proto, plan.cluster_ip, port)
    if plan.internal_verdict is None:
        cluster_match = f"{comment(f'{spn} cluster IP')} {cluster_dst}"
        out.add(NAT, KUBE_SERVICES, f"{cluster_match} -j {internal_chain}")
        if opts.masquerade_all:
            out.chain(internal_chain).append(f"{cluster_match} {masq}")
        elif (not_local := opts.local_match(local=False)) is not None:
            # Off-cluster traffic to a ClusterIP may bounce off-node: masquerade it.
            out.chain(internal_chain).append(f"{cluster_match} {not_local} {masq}")
    else:
        out.add(FILTER, KUBE_SERVICES, verdict_rule(plan.internal_verdict, cluster_dst))

    # Endpoint selection and endpoint chains.
    if cat.cluster:
        endpoint_rules(svc_chain, cat.cluster)
    if cat.local:
        endpoint_rules(svl_chain, cat.local)
    for ep in cat.all_reachable:
        rules = out.chain(names.endpoint_chain(svc.name, ep.ip, ep.port))
        note = f"{comment(spn)} " if comments else ""
        recent = (
            f"-m recent --name {names.endpoint_chain(svc.name, ep.ip, ep.port)} --set " if svc.affinity_timeout else ""
        )
        rules.append(f"{note}-s {ep.ip} {masq}")  # hairpin: a pod reaching itself through the Service
        rules.append(f"{note}{recent}-m {proto} -p {proto} -j DNAT --to-destination {ep}")

    # External traffic: NodePort, ExternalIPs, LB IPs.
    if plan.externally_accessible:
        ext = out.chain(ext_chain)
        if not svc.external_policy_local:
            ext.append(f"{comment(f'masquerade traffic for {spn} external destinations')} {masq}")
        else:
            if (local_src := opts.local_match(local=True)) is not None:
                # Pod traffic to an external destination ignores the traffic policy (as if it went
                # out to the load balancer and came back).
                ext.append(f"{comment(f'pod traffic for {spn} external destinations')} {local_src} -j {svc_chain}")
            ext.append(
                f"{comment(f'masquerade LOCAL traffic for {spn} external destinations')} "
                f"-m addrtype --src-type LOCAL {masq}"
            )
            ext.append(
                f"{comment(f'route LOCAL traffic for {spn} external destinations')} "
                f"-m addrtype --src-type LOCAL -j {svc_chain}"
            )
        if plan.external_verdict is None:
            ext.append(f"-j {external_policy_chain}")

    uses_firewall = plan.externally_accessible and bool(plan.firewall_sources)
    if uses_firewall:
        fw = out.chain(fw_chain)
        fw += [f"{comment(f'{spn} loadbalancer IP')} -s {src} -j {ext_chain}" for src in plan.firewall_sources]
        fw.append(comment(f"other traffic to {spn} will be dropped by {KUBE_PROXY_FIREWALL}"))

    for ip in plan.external_ips:
        if plan.has_any:
            out.add(NAT, KUBE_SERVICES, f"{comment(f'{spn} external IP')} {_dst(proto, ip, port)} -j {ext_chain}")
        if plan.external_verdict is not None:
            out.add(FILTER, KUBE_EXTERNAL_SERVICES, verdict_rule(plan.external_verdict, _dst(proto, ip, port)))
    for ip in plan.load_balancer_ips:
        if plan.has_any:
            target = fw_chain if uses_firewall else ext_chain
            out.add(NAT, KUBE_SERVICES, f"{comment(f'{spn} loadbalancer IP')} {_dst(proto, ip, port)} -j {target}")
        if uses_firewall:
            out.add(
                FILTER,
                KUBE_PROXY_FIREWALL,
                f"{comment(f'{spn} traffic not accepted by {fw_chain}')} {_dst(proto, ip, port)} -j DROP",
            )
    if plan.external_verdict is not None:
        for ip in plan.load_balancer_ips:
            out.add(FILTER, KUBE_EXTERNAL_SERVICES, verdict_rule(plan.external_verdict, _dst(proto, ip, port)))
    if svc.node_port:
        if plan.has_any:
            out.add(NAT, KUBE_NODEPORTS, f"{comment(spn)} -m {proto} -p {proto} --dport {svc.node_port} -j {ext_chain}")
        if plan.external_verdict is not None:
            out.add(
                FILTER,
                KUBE_EXTERNAL_SERVICES,
                verdict_rule(
                    plan.external_verdict, f"-m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {svc.node_port}"
                ),
            )
    if svc.health_check_node_port:
        # Let load balancers' health checks in even when the host firewall drops by default (#97225).
        out.add(
            FILTER,
            KUBE_NODEPORTS,
            f"{comment(f'{spn} health check node port')} -m tcp -p tcp --dport {svc.health_check_node_port} -j ACCEPT",
        )


def render_service(
    ports: Iterable[ServicePort],
    endpoints_of: Callable[[ServicePort], Sequence[Endpoint]],
    opts: IptOptions,
    node: NodeTopology,
    node_ips: Sequence[str] = (),
    *,
    comments: bool = True,
) -> Fragment:
    """One Service (all its ports) as a Fragment."""
    out = _Writer()
    endpoints = 0
    v6 = opts.family is IPFamily.V6
    for svc in sorted(ports, key=lambda p: p.name):
        eps = endpoints_of(svc)
        plan = plan_port(svc, eps, opts.family, node, node_ips)
        if plan is not None:
            render_service_port(plan, opts, out, comments=comments)
            endpoints += sum(1 for ep in eps if (":" in ep.ip) is v6)
    if not (out.chains or out.shared):
        return EMPTY
    return Fragment(
        chains={name: tuple(rules) for name, rules in out.chains.items()},
        shared={key: tuple(rules) for key, rules in out.shared.items()},
        endpoints=endpoints,
    )


def assemble(
    opts: IptOptions,
    fragments: Iterable[Fragment],
    *,
    node_addresses: Sequence[str] = (),
    interface_addresses: Sequence[str] = (),
) -> IptRuleset:
    """Combine the static part and Service fragments (in the given order) into the whole ruleset."""
    tables: dict[str, dict[str, Rules]] = {FILTER: {}, NAT: {}}
    shared: dict[ChainKey, list[str]] = {key: [] for key in SHARED_CHAINS}
    for frag in fragments:
        for name, rules in frag.chains.items():
            tables[NAT][name] = rules
        for key, rules in frag.shared.items():
            shared[key] += rules
    shared[(NAT, KUBE_SERVICES)] += nodeports_jumps(opts, node_addresses, interface_addresses)
    for (table, chain), rules in (*builtin_jumps(opts).items(), *static_chains(opts).items()):
        tables[table][chain] = rules
    for (table, chain), shared_rules in shared.items():
        tables[table][chain] = tuple(shared_rules)
    return IptRuleset(family=opts.family, tables=tables)


def render_all(
    services: Mapping[NamespacedName, Mapping[ServicePortName, ServicePort]],
    endpoints_of: Callable[[ServicePort], Sequence[Endpoint]],
    opts: IptOptions,
    node: NodeTopology,
    node_addresses: Sequence[str],
    *,
    interface_addresses: Sequence[str] = (),
) -> IptRuleset:
    """The whole ruleset for a state (golden tests, dry-run, the tracer), large-cluster mode included."""
    fragments = [
        render_service(services[k].values(), endpoints_of, opts, node, node_addresses) for k in sorted(services)
    ]
    if sum(f.endpoints for f in fragments) > LARGE_CLUSTER_ENDPOINTS:
        fragments = [
            render_service(services[k].values(), endpoints_of, opts, node, node_addresses, comments=False)
            for k in sorted(services)
        ]
    return assemble(opts, fragments, node_addresses=node_addresses, interface_addresses=interface_addresses)
