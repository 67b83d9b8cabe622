"""Backend equivalence as a property: nftables and iptables mode answer every probe alike.

The packet-flow tables (tests/test_flow_tables.py) prove both modes on hand-written rows; this test
draws random states instead (hypothesis) and compares the two modes' tracers with each other, so a
renderer bug that no row happens to touch still shows up as a disagreement.

What is generated (IPv4 terms of DESIGN.md's address plan; IPv6 is the same state translated with
``flows.to_family``, i.e. ``flows.v6``):

- the node: node1 in zone-a at 192.168.50.1 (``flows.node_addresses`` adds 192.168.50.201 and the
  loopback as further local addresses), with spec.podCIDRs 10.244.1.0/26 for the NodeCIDR variant;
- 1-6 Services in ns1: unique ClusterIPs from 10.96.0.0/24; type ClusterIP, NodePort or LoadBalancer
  (nodePorts unique in 30000-30050; a LoadBalancer may have none, as with
  allocateLoadBalancerNodePorts false; its status ingress IP is unique in 198.51.100.0/24, with
  ipMode unset, VIP or Proxy, plus loadBalancerSourceRanges from 203.0.113.0/24, 192.168.50.0/24 and
  192.0.2.0/24); externalIPs from a small shared pool (two Services may share one, but never on the
  same port and protocol: such a conflict is resolved differently by the two layouts -- nftables'
  first Service owns the map key, iptables falls through to the next Service's rule when the first
  one's KUBE-EXT-* does not DNAT -- and is not a state worth defining); 1-2 ports (TCP/UDP/SCTP on
  80/53/443, distinct names and port/protocol pairs); externalTrafficPolicy Cluster/Local (NodePort
  and LoadBalancer only, as the API server validates); internalTrafficPolicy Cluster/Local;
  sessionAffinity None/ClientIP; trafficDistribution none/PreferSameZone/PreferSameNode;
- per Service an EndpointSlice (or none) with 0-4 endpoints from 10.244.1.2-10.244.1.9 on node1 or
  node2: ready, serving-terminating or not-serving-terminating, optional zone, optional zone and node
  hints; each Service port is in the slice or not (target port 8080 or 8443).

Every state is rendered with the default options (local traffic by cluster CIDR 10.244.0.0/16) and
with one variant of ``flows.OPTION_VARIANTS`` (``flows.variant_options``), in both families. Probes:
sources {10.244.1.100 (a pod, iif kp4-client), 203.0.113.10 (outside, iif eth0), 192.168.50.1 (the
node itself)} x {tcp, udp, sctp} x destinations {every ClusterIP, externalIP and LB IP (ipMode
Proxy included), 192.168.50.1; 192.168.50.201 too when nodePortAddresses is given explicitly} x
ports {every Service port and nodePort of the state, plus an unused one}. The tracers' node IPs are
``flows.node_addresses``.

Deliberate differences between upstream's modes (reference/upstream.md section 4.6), and the only
ones tolerated -- each normalised by ``known_difference`` from the rules that actually decided, or
kept out of the probes, and each shown to exist by a deterministic test below:

1. cluster-ips-check: nftables mode REJECTs a packet to a ClusterIP on a port/protocol no Service
   defines ("Traffic ... to unused ports of ClusterIPs rejected"); iptables mode has no such rule
   and leaves the packet alone. Tolerated only when the nft verdict came from the
   ``cluster-ips-check`` rule and iptables answers ("", no masquerade).
2. Localhost NodePorts: iptables mode (IPv4, localhostNodePorts, nodePortAddresses covering
   127.0.0.0/8 -- its default "all" does) answers NodePorts on 127.0.0.1 through route_localnet;
   nftables mode never does. Not normalised: no probe goes to a loopback address. (For the same
   reason of deliberately different defaults -- nodePortAddresses unset means "primary" in nftables
   mode and every local address in iptables mode -- the node's second IP is probed only when a
   variant sets nodePortAddresses explicitly.)
3. loadBalancerSourceRanges without usable endpoints: nftables mode checks the LB firewall before
   DNAT and before the endpoint check, so a source outside the ranges is DROPped; iptables mode only
   builds KUBE-FW-* for a Service port with endpoints, so the packet meets the "has no endpoints"
   REJECT in KUBE-EXTERNAL-SERVICES. Tolerated only when nft's verdict came from a ``firewall-*``
   chain's drop and iptables' from a "has no endpoints" REJECT in KUBE-EXTERNAL-SERVICES.
4. The node connecting to an externalIP or LB IP of a Service without usable endpoints: nftables
   mode answers from ``filter-output`` or ``filter-output-pre-dnat`` (REJECT through
   ``no-endpoint-services``, or DROP in the LB firewall chain); iptables mode hooks its "has no
   endpoints" rules for external destinations (``KUBE-EXTERNAL-SERVICES``) only from INPUT and
   FORWARD, so the node's own packet is left alone
   (routed towards that IP). Both are upstream's layouts. Tolerated only when iptables answers ("",
   no masquerade), nft's packet went through the output hooks and its verdict came from
   ``reject-chain`` after ``service-endpoints-check`` or from a ``firewall-*`` chain's drop.
5. A NodePort without usable endpoints on a node address that nodePortAddresses excludes: iptables
   mode's "has no (local) endpoints" rule for NodePorts matches ``-m addrtype --dst-type LOCAL``
   whatever nodePortAddresses says (upstream writes it so), nftables mode checks only
   ``@nodeport-ips``. Tolerated only when nft answers ("", no masquerade) and iptables' verdict came
   from such a NodePort rule in ``KUBE-EXTERNAL-SERVICES``. (On a real kernel the difference hardly
   shows: nothing listens on that port, so TCP clients are refused either way.)
6. Hairpin masquerading: iptables mode masquerades a packet whose source is the chosen endpoint
   itself for every endpoint (``KUBE-SEP-* -s <ep> -j KUBE-MARK-MASQ``), nftables mode only for
   endpoints on this node (``hairpin-connections``). Not normalised: no probe source is an endpoint
   IP (the three sources above never are).

Differences 4 and 5 were found by this property (shrunk cases are the fixed tests below); they are
upstream's behaviour in each mode, and listed with the others in src/kubeproxy/backends/iptables/README.md.

``EQUIVALENCE_EXAMPLES`` sets the examples per family (default keeps the file within ~10 s on two
cores). A failure prints hypothesis' reproduction hint (``@reproduce_failure`` / seed) as usual.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from builders import CLUSTER_CIDR, node, state_with
from flows import (
    FAMILIES,
    GONE,
    IIF,
    NODE_IP,
    NODE_POD_CIDR,
    OPTION_VARIANTS,
    OUTSIDE,
    POD_CLIENT,
    SECOND_NODE_IP,
    TERMINATING,
    V4,
    ZONE,
    addr,
    node_addresses,
    to_family,
    variant_options,
)
from kubeproxy.backends.trace import DROP, REJECT, Packet, TraceResult
from kubeproxy.model import objects
from kubeproxy.model.service import IPFamily
from modes import IPTABLES, NFTABLES, Mode

EXAMPLES = int(os.environ.get("EQUIVALENCE_EXAMPLES", "35"))  # per family

DEFAULT = ""  # the default options (not a key of OPTION_VARIANTS)
SOURCES = (POD_CLIENT, OUTSIDE, NODE_IP)
PROTOCOLS = ("tcp", "udp", "sctp")
SERVICE_PORTS = (80, 53, 443)
UNUSED_PORT = 9999
SOURCE_RANGES = ("203.0.113.0/24", "192.168.50.0/24", "192.0.2.0/24")
EXTERNAL_IPS = tuple(f"198.51.100.{n}" for n in range(100, 104))
ENDPOINT_IPS = tuple(f"10.244.1.{n}" for n in range(2, 10))
CONDITIONS: dict[str, dict[str, bool]] = {
    "ready": {"ready": True},
    "serving-terminating": TERMINATING,
    "not-serving-terminating": GONE,
}

CLUSTER_IPS_CHECK = "cluster-ips-check"
FIREWALL_FIRST = "firewall before endpoint check"
HOST_TO_EXTERNAL = "host to an external IP without endpoints"
NODEPORT_ADDRESS = "NodePort without endpoints on an excluded address"


# --- the deliberate differences -------------------------------------------------------------------


def _last_rule(result: TraceResult) -> tuple[str, str]:
    """(chain, rule) of the last rule that matched: the one that gave a REJECT/DROP its verdict."""
    if not result.matched:
        return "", ""
    chain, _, rule = result.matched[-1].partition(": ")
    return chain, rule


@dataclass(frozen=True)
class Where:
    """What the normaliser must know about a probe's destination in its state."""

    destination: str
    external: frozenset[str]  # externalIPs and LB IPs of the state (this family)
    nodeport_ips: frozenset[str] | None  # nftables' @nodeport-ips; None: NodePorts on every local address


def where_of(state: Any, nft_rules: Any, packet: Packet) -> Where:
    ports = [p for svc in state.services.values() for p in svc.values()]
    external = frozenset(ip for p in ports for ip in (*p.external_ips, *p.load_balancer_ips))
    nodeport_ips = nft_rules.elements.get("nodeport-ips")
    match_all = any(r.startswith("fib daddr type local") for r in nft_rules.chains["services"])
    return Where(packet.destination, external, None if match_all else frozenset(nodeport_ips or ()))


def known_difference(nft: TraceResult, ipt: TraceResult, where: Where | None = None) -> str | None:
    """Which deliberate difference explains nft and ipt disagreeing on one packet (None: none does).

    Differences 4 and 5 also need to know where the packet went (``where``): without it, never."""
    nft_chain, nft_rule = _last_rule(nft)
    ipt_chain, ipt_rule = _last_rule(ipt)
    if (
        (nft.output, nft.masquerade) == (REJECT, False)
        and nft_chain == CLUSTER_IPS_CHECK
        and nft_rule.endswith(" daddr @cluster-ips reject")
        and (ipt.output, ipt.masquerade) == ("", False)
    ):
        return CLUSTER_IPS_CHECK
    if (
        (nft.output, nft.masquerade) == (DROP, False)
        and nft_chain.startswith("firewall-")
        and nft_chain != "firewall-check"
        and nft_rule == "drop"
        and (ipt.output, ipt.masquerade) == (REJECT, False)
        and ipt_chain == "filter KUBE-EXTERNAL-SERVICES"
        and "has no endpoints" in ipt_rule
        and ipt_rule.endswith("-j REJECT")
    ):
        return FIREWALL_FIRST
    nft_host = any(m.startswith(("filter-output: ", "filter-output-pre-dnat: ")) for m in nft.matched)
    nft_chains = [m.partition(": ")[0] for m in nft.matched]
    if (
        where is not None
        and where.destination in where.external
        and (ipt.output, ipt.masquerade) == ("", False)
        and nft_host
        and (
            ((nft.output, nft_chain, nft_rule) == (REJECT, "reject-chain", "reject")
             and nft_chains[-2:-1] == ["service-endpoints-check"])
            or (nft.output == DROP and nft_chain.startswith("firewall-") and nft_chain != "firewall-check"
                and nft_rule == "drop")
        )
    ):  # fmt: skip
        return HOST_TO_EXTERNAL
    if (
        where is not None
        and where.nodeport_ips is not None
        and where.destination not in where.nodeport_ips
        and (nft.output, nft.masquerade) == ("", False)
        and ipt.output in (REJECT, DROP)
        and ipt_chain == "filter KUBE-EXTERNAL-SERVICES"
        and "endpoints" in ipt_rule
        and " -m addrtype --dst-type LOCAL " in ipt_rule
    ):
        return NODEPORT_ADDRESS
    return None


# --- random states --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """Services and EndpointSlices in IPv4 terms (the node is added per option variant)."""

    objects: tuple[objects.KubeObject, ...]

    def services(self) -> list[objects.Service]:
        return [o for o in self.objects if isinstance(o, objects.Service)]


def _service(
    name: str, cluster_ip: str, svc_type: str, ports: list[dict[str, Any]], spec: dict[str, Any], *, ingress: Any
) -> objects.Service:
    body: dict[str, Any] = {
        "metadata": {"name": name, "namespace": "ns1"},
        "spec": {"type": svc_type, "clusterIP": cluster_ip, "ports": ports, **spec},
    }
    if ingress is not None:
        body["status"] = {"loadBalancer": {"ingress": [ingress]}}
    obj = objects.from_builtins("Service", body)
    assert isinstance(obj, objects.Service)
    return obj


def _slice(name: str, service_name: str, endpoints: list[dict[str, Any]], ports: list[dict[str, Any]]) -> Any:
    obj = objects.from_builtins(
        "EndpointSlice",
        {
            "metadata": {"name": name, "namespace": "ns1", "labels": {objects.SERVICE_NAME_LABEL: service_name}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        },
    )
    assert isinstance(obj, objects.EndpointSlice)
    return obj


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    count = draw(st.integers(1, 6))
    cluster_ips = draw(st.lists(st.integers(1, 254), min_size=count, max_size=count, unique=True))
    lb_ips = draw(st.lists(st.integers(1, 99), min_size=count, max_size=count, unique=True))
    node_ports = draw(st.lists(st.integers(30000, 30050), min_size=2 * count, max_size=2 * count, unique=True))
    out: list[objects.KubeObject] = []
    claimed: set[tuple[str, str, int]] = set()  # (externalIP, protocol, port) already served
    for i in range(count):
        name = f"svc{i + 1}"
        svc_type = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
        pairs = draw(
            st.lists(
                st.tuples(st.sampled_from(["TCP", "UDP", "SCTP"]), st.sampled_from(SERVICE_PORTS)),
                min_size=1,
                max_size=2,
                unique=True,
            )
        )
        ports: list[dict[str, Any]] = []
        for j, (protocol, number) in enumerate(pairs):
            port: dict[str, Any] = {"name": f"p{j + 1}", "port": number, "protocol": protocol}
            if svc_type == "NodePort" or (svc_type == "LoadBalancer" and draw(st.booleans())):
                port["nodePort"] = node_ports[2 * i + j]
            ports.append(port)
        spec: dict[str, Any] = {
            "internalTrafficPolicy": draw(st.sampled_from(["Cluster", "Local"])),
            "sessionAffinity": draw(st.sampled_from(["None", "ClientIP"])),
        }
        # An externalIP may serve several Services, but never on the same port and protocol: two
        # Services claiming one IP:port is a conflict each mode resolves its own way (see the report).
        keys = {(p["protocol"], p["port"]) for p in ports}
        free = [ip for ip in EXTERNAL_IPS if not {(ip, *k) for k in keys} & claimed]
        if free and (external_ips := draw(st.lists(st.sampled_from(free), max_size=2, unique=True))):
            spec["externalIPs"] = external_ips
            claimed.update((ip, *k) for ip in external_ips for k in keys)
        if traffic_distribution := draw(st.sampled_from(["", "PreferSameZone", "PreferSameNode"])):
            spec["trafficDistribution"] = traffic_distribution
        ingress: dict[str, str] | None = None
        if svc_type != "ClusterIP":
            spec["externalTrafficPolicy"] = draw(st.sampled_from(["Cluster", "Local"]))
        if svc_type == "LoadBalancer":
            ingress = {"ip": f"198.51.100.{lb_ips[i]}"}
            if ip_mode := draw(st.sampled_from(["", "VIP", "Proxy"])):
                ingress["ipMode"] = ip_mode
            if ranges := draw(st.lists(st.sampled_from(SOURCE_RANGES), max_size=2, unique=True)):
                spec["loadBalancerSourceRanges"] = ranges
        out.append(_service(name, f"10.96.0.{cluster_ips[i]}", svc_type, ports, spec, ingress=ingress))

        endpoints: list[dict[str, Any]] = []
        for ip in draw(st.lists(st.sampled_from(ENDPOINT_IPS), max_size=4, unique=True)):
            ep: dict[str, Any] = {
                "addresses": [ip],
                "nodeName": draw(st.sampled_from(["node1", "node2"])),
                "conditions": CONDITIONS[draw(st.sampled_from(sorted(CONDITIONS)))],
            }
            if zone := draw(st.sampled_from(["", ZONE, "zone-b"])):
                ep["zone"] = zone
            hints: dict[str, Any] = {}
            if zone_hint := draw(st.sampled_from(["", ZONE, "zone-b"])):
                hints["forZones"] = [{"name": zone_hint}]
            if node_hint := draw(st.sampled_from(["", "node1", "node2"])):
                hints["forNodes"] = [{"name": node_hint}]
            if hints:
                ep["hints"] = hints
            endpoints.append(ep)
        slice_ports = [
            {"name": p["name"], "protocol": p["protocol"], "port": draw(st.sampled_from([8080, 8443]))}
            for p in ports
            if draw(st.booleans())
        ]
        if endpoints or draw(st.booleans()):
            out.append(_slice(f"{name}-x", name, endpoints, slice_ports))
    return Scenario(tuple(out))


# --- render and probe -----------------------------------------------------------------------------


def the_node(variant: str) -> objects.Node:
    pod_cidrs = [NODE_POD_CIDR] if variant == "NodeCIDR" else None
    return node(labels={objects.TOPOLOGY_ZONE_LABEL: ZONE}, pod_cidrs=pod_cidrs)


def options(mode: Mode, variant: str, family: IPFamily) -> Any:
    if variant == DEFAULT:
        return mode.options(family=family, cluster_cidrs=(addr(CLUSTER_CIDR, family),))
    return variant_options(variant, family, mode.options)


def probes(scenario: Scenario, variant: str, family: IPFamily) -> list[Packet]:
    destinations: list[str] = []
    ports = {UNUSED_PORT}
    for svc in scenario.services():
        destinations.append(svc.spec.clusterIP)
        destinations += svc.spec.externalIPs or []
        if svc.status is not None and svc.status.loadBalancer is not None:
            destinations += [i.ip for i in svc.status.loadBalancer.ingress or [] if i.ip]
        for p in svc.spec.ports or []:
            ports |= {p.port, p.nodePort} - {0}
    destinations.append(NODE_IP)
    if variant and "nodeport_addresses" in OPTION_VARIANTS[variant]:
        destinations.append(SECOND_NODE_IP)
    assert not any(d.startswith("127.") for d in destinations)  # difference 2
    targets = [addr(d, family) for d in dict.fromkeys(destinations)]
    return [
        Packet(addr(source, family), protocol, destination, port, iif=IIF.get(source))
        for source in SOURCES
        for protocol in PROTOCOLS
        for destination in targets
        for port in sorted(ports)
    ]


@dataclass(frozen=True)
class Mismatch:
    packet: Packet
    nft: TraceResult
    ipt: TraceResult

    def __str__(self) -> str:
        p = self.packet
        lines = [
            f"{p.source} -> {p.destination}:{p.port}/{p.protocol} (iif {p.iif}):",
            f"  nftables: {self.nft.output!r} masquerade={self.nft.masquerade}",
            *(f"    {m}" for m in self.nft.matched),
            f"  iptables: {self.ipt.output!r} masquerade={self.ipt.masquerade}",
            *(f"    {m}" for m in self.ipt.matched),
        ]
        return "\n".join(lines)


def compare(scenario: Scenario, variant: str, family: IPFamily) -> tuple[list[Mismatch], dict[str, int]]:
    """Every probe through both modes: the disagreements no deliberate difference explains, and how
    often each deliberate difference was tolerated."""
    state = state_with(*(to_family(o, family) for o in (the_node(variant), *scenario.objects)))
    local = node_addresses(family)
    nft_rules = NFTABLES.render(state, options(NFTABLES, variant, family), local)
    ipt_rules = IPTABLES.render(state, options(IPTABLES, variant, family), local)
    mismatches: list[Mismatch] = []
    tolerated: dict[str, int] = {}
    for packet in probes(scenario, variant, family):
        nft = NFTABLES.trace(nft_rules, packet, local)
        ipt = IPTABLES.trace(ipt_rules, packet, local)
        if (nft.output, nft.masquerade) == (ipt.output, ipt.masquerade):
            continue
        if (why := known_difference(nft, ipt, where_of(state, nft_rules, packet))) is not None:
            tolerated[why] = tolerated.get(why, 0) + 1
            continue
        mismatches.append(Mismatch(packet, nft, ipt))
    return mismatches, tolerated


def describe(scenario: Scenario, variant: str, family: IPFamily) -> str:
    objs = [msgspec.to_builtins(to_family(o, family)) for o in scenario.objects]
    return f"variant {variant or 'default'!r}, {family.name}, objects:\n" + "\n".join(map(str, objs))


def _family_id(family: IPFamily) -> str:
    return "ipv4" if family is V4 else "ipv6"


# --- the property ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES, ids=_family_id)
@settings(max_examples=EXAMPLES, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios(), variant=st.sampled_from(sorted(OPTION_VARIANTS)))
def test_modes_agree_on_random_states(family: IPFamily, scenario: Scenario, variant: str) -> None:
    for opts in (DEFAULT, variant):
        mismatches, _ = compare(scenario, opts, family)
        if mismatches:
            note(describe(scenario, opts, family))
            shown = "\n".join(str(m) for m in mismatches[:5])
            pytest.fail(f"{len(mismatches)} probe(s) differ, first ones:\n{shown}")


# --- the deliberate differences exist (the normaliser cannot hide everything) ---------------------


def _trace_both(
    objs: Sequence[objects.KubeObject], packet: Packet, family: IPFamily, variant: str = DEFAULT
) -> tuple[TraceResult, TraceResult]:
    nft, ipt, _where = _trace_both_where(objs, packet, family, variant)
    return nft, ipt


def _trace_both_where(
    objs: Sequence[objects.KubeObject], packet: Packet, family: IPFamily, variant: str = DEFAULT
) -> tuple[TraceResult, TraceResult, Where]:
    state = state_with(*(to_family(o, family) for o in (the_node(variant), *objs)))
    local = node_addresses(family)
    rulesets = [mode.render(state, options(mode, variant, family), local) for mode in (NFTABLES, IPTABLES)]
    nft, ipt = (mode.trace(rs, packet, local) for mode, rs in zip((NFTABLES, IPTABLES), rulesets, strict=True))
    return nft, ipt, where_of(state, rulesets[0], packet)


def _web(name: str = "web", cluster_ip: str = "10.96.0.10", svc_type: str = "ClusterIP", **spec: Any) -> Any:
    port: dict[str, Any] = {"name": "p1", "port": 80, "protocol": "TCP"}
    if svc_type != "ClusterIP":
        port["nodePort"] = 30010
    ingress = {"ip": "198.51.100.10"} if svc_type == "LoadBalancer" else None
    return _service(name, cluster_ip, svc_type, [port], spec, ingress=ingress)


def _web_slice(ip: str, node_name: str = "node1", name: str = "web") -> Any:
    endpoints = [{"addresses": [ip], "nodeName": node_name, "conditions": {"ready": True}}]
    return _slice(f"{name}-x", name, endpoints, [{"name": "p1", "protocol": "TCP", "port": 8080}])


def _packet(source: str, protocol: str, destination: str, port: int, family: IPFamily) -> Packet:
    return Packet(addr(source, family), protocol, addr(destination, family), port, iif=IIF.get(source))


@pytest.mark.parametrize("family", FAMILIES, ids=_family_id)
@pytest.mark.parametrize(("protocol", "port"), [("tcp", 81), ("udp", 80)], ids=["undefined-port", "other-protocol"])
def test_difference_cluster_ips_check(family: IPFamily, protocol: str, port: int) -> None:
    objs = [_web(), _web_slice("10.244.1.2")]
    nft, ipt = _trace_both(objs, _packet(POD_CLIENT, protocol, "10.96.0.10", port, family), family)
    assert (nft.output, nft.masquerade) == (REJECT, False), nft.matched
    assert (ipt.output, ipt.masquerade) == ("", False), ipt.matched
    assert known_difference(nft, ipt) == CLUSTER_IPS_CHECK


@pytest.mark.parametrize("family", FAMILIES, ids=_family_id)
def test_difference_firewall_before_endpoint_check(family: IPFamily) -> None:
    # An LB IP with loadBalancerSourceRanges and no endpoints at all; the pod is outside the ranges.
    objs = [_web(svc_type="LoadBalancer", loadBalancerSourceRanges=["203.0.113.0/24"])]
    nft, ipt = _trace_both(objs, _packet(POD_CLIENT, "tcp", "198.51.100.10", 80, family), family)
    assert (nft.output, nft.masquerade) == (DROP, False), nft.matched
    assert (ipt.output, ipt.masquerade) == (REJECT, False), ipt.matched
    assert known_difference(nft, ipt) == FIREWALL_FIRST
    # A source inside the ranges meets the same no-endpoints REJECT in both modes.
    nft, ipt = _trace_both(objs, _packet(OUTSIDE, "tcp", "198.51.100.10", 80, family), family)
    assert (nft.output, nft.masquerade) == (ipt.output, ipt.masquerade) == (REJECT, False)


def test_difference_localhost_nodeports_is_kept_out_of_the_probes() -> None:
    # IPv4 only: iptables mode answers NodePorts on 127.0.0.1, nftables mode never. Not normalised,
    # so the property test must never probe a loopback destination.
    objs = [_web(svc_type="NodePort"), _web_slice("10.244.1.2")]
    nft, ipt = _trace_both(objs, _packet(NODE_IP, "tcp", "127.0.0.1", 30010, V4), V4)
    assert (nft.output, nft.masquerade) == ("", False), nft.matched
    assert (ipt.output, ipt.masquerade) == ("10.244.1.2:8080", True), ipt.matched
    assert known_difference(nft, ipt) is None


@pytest.mark.parametrize("family", FAMILIES, ids=_family_id)
def test_difference_hairpin_of_remote_endpoint_is_kept_out_of_the_probes(family: IPFamily) -> None:
    # The pod behind the Service (on node2, says its slice) reaches itself: iptables mode
    # masquerades, nftables mode only for endpoints on this node. Not normalised, so no probe source
    # is ever an endpoint IP.
    objs = [_web(), _web_slice("10.244.1.5", "node2")]
    nft, ipt = _trace_both(objs, _packet("10.244.1.5", "tcp", "10.96.0.10", 80, family), family)
    target = "10.244.1.5:8080" if family is V4 else "[fd00:10:244::1:5]:8080"
    assert (nft.output, nft.masquerade) == (target, False), nft.matched
    assert (ipt.output, ipt.masquerade) == (target, True), ipt.matched
    assert known_difference(nft, ipt) is None
    assert "10.244.1.5" not in SOURCES


def test_normaliser_rejects_lookalikes() -> None:
    # The same outputs for other reasons are not excused: the deciding rule must be the deliberate one.
    reject_chain = TraceResult(
        REJECT, False, ("filter-forward: ct state new jump cluster-ips-check", "reject-chain: reject")
    )
    assert known_difference(reject_chain, TraceResult("", False)) is None
    cluster_check = TraceResult(REJECT, False, ("cluster-ips-check: ip daddr @cluster-ips reject",))
    assert known_difference(cluster_check, TraceResult("", True)) is None
    assert known_difference(cluster_check, TraceResult("10.244.1.2:8080", False)) is None
    local_drop = TraceResult(DROP, False, ("service-endpoints-check: ip daddr . meta l4proto . th dport vmap x",))
    ipt_reject = TraceResult(
        REJECT, False, ('filter KUBE-EXTERNAL-SERVICES: -m comment --comment "ns1/web:p1 has no endpoints" -j REJECT',)
    )
    assert known_difference(local_drop, ipt_reject) is None
    firewall_drop = TraceResult(DROP, False, ("firewall-ABCDEFGH-ns1/web/tcp/p1: drop",))
    assert known_difference(firewall_drop, ipt_reject) == FIREWALL_FIRST
    ipt_other_reject = TraceResult(REJECT, False, ("filter KUBE-SERVICES: -m comment --comment x -j REJECT",))
    assert known_difference(firewall_drop, ipt_other_reject) is None


@pytest.mark.parametrize("family", FAMILIES, ids=_family_id)
def test_compare_counts_what_it_tolerates(family: IPFamily) -> None:
    # The property test's own comparison on a fixed state: the tolerated difference does occur (so
    # the normaliser is exercised), and nothing else differs.
    mismatches, tolerated = compare(Scenario((_web(), _web_slice("10.244.1.2"))), DEFAULT, family)
    assert not mismatches, "\n".join(map(str, mismatches))
    assert set(tolerated) == {CLUSTER_IPS_CHECK}


# --- differences found by the property test (upstream's in each mode) -----------------------------
# Shrunk cases of differences 4 and 5: the raw answers differ, and the normaliser names them.


@pytest.mark.parametrize("family", FAMILIES, ids=_family_id)
def test_node_to_external_ip_of_a_service_without_endpoints(family: IPFamily) -> None:
    """nftables: REJECT (filter-output -> service-endpoints-check; @no-endpoint-services holds
    externalIPs and LB IPs). iptables: untouched -- the externalIP's "has no endpoints" REJECT sits
    in KUBE-EXTERNAL-SERVICES, which only INPUT and FORWARD jump to, and a host-originated packet to
    a non-local externalIP/LB IP passes neither (upstream's iptablesJumpChains, the same)."""
    objs = [_web(externalIPs=["198.51.100.100"])]
    packet = _packet(NODE_IP, "tcp", "198.51.100.100", 80, family)
    nft, ipt, where = _trace_both_where(objs, packet, family)
    assert (nft.output, ipt.output) == (REJECT, "")
    assert known_difference(nft, ipt, where) == HOST_TO_EXTERNAL
    assert known_difference(nft, ipt) is None  # never without knowing the destination
    # The same answers for a ClusterIP would be a bug (the node must get "connection refused").
    assert known_difference(nft, ipt, replace(where, destination=addr("10.96.0.10", family))) is None


@pytest.mark.parametrize("family", FAMILIES, ids=_family_id)
def test_node_to_firewalled_lb_ip_of_a_service_without_endpoints(family: IPFamily) -> None:
    """The same with loadBalancerSourceRanges not holding the node: nftables DROPs in firewall-*
    (before DNAT, whatever the endpoints), iptables leaves it alone (no KUBE-FW-* without endpoints,
    no KUBE-EXTERNAL-SERVICES on OUTPUT)."""
    objs = [_web(svc_type="LoadBalancer", loadBalancerSourceRanges=["203.0.113.0/24"])]
    packet = _packet(NODE_IP, "tcp", "198.51.100.10", 80, family)
    nft, ipt, where = _trace_both_where(objs, packet, family)
    assert (nft.output, ipt.output) == (DROP, "")
    assert known_difference(nft, ipt, where) == HOST_TO_EXTERNAL


@pytest.mark.parametrize("family", FAMILIES, ids=_family_id)
@pytest.mark.parametrize(
    ("variant", "destination"),
    [("nodePortAddresses primary", SECOND_NODE_IP), ("nodePortAddresses CIDR", NODE_IP)],
    ids=["primary", "cidr"],
)
def test_nodeport_without_endpoints_on_an_address_nodeport_addresses_excludes(
    family: IPFamily, variant: str, destination: str
) -> None:
    """nftables: untouched (nodeport-endpoints-check matches only @nodeport-ips). iptables: REJECT
    -- the NodePort's "has no endpoints" rule in KUBE-EXTERNAL-SERVICES matches ``-m addrtype
    --dst-type LOCAL`` on every local address whatever nodePortAddresses says (upstream's
    iptables proxier writes it the same way), while KUBE-NODEPORTS is reached only from the
    nodePortAddresses IPs. (With endpoints both modes leave such a packet alone.)"""
    objs = [_web(svc_type="NodePort")]
    packet = _packet(OUTSIDE, "tcp", destination, 30010, family)
    nft, ipt, where = _trace_both_where(objs, packet, family, variant)
    assert (nft.output, ipt.output) == ("", REJECT)
    assert known_difference(nft, ipt, where) == NODEPORT_ADDRESS
    # On an address NodePorts do answer on, nftables must reject too: no excuse there.
    assert (
        where.nodeport_ips and known_difference(nft, ipt, replace(where, destination=min(where.nodeport_ips))) is None
    )
