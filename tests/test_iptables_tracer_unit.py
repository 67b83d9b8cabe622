"""The iptables tracer on hand-written rulesets in upstream's layout (reference/upstream.md section 3).

The rulesets here are written by hand, not rendered, so these tests pin the tracer's semantics
(netfilter's hook order, random branches, marks, local addresses) independently of the renderer;
the renderer's own flow tests then run the shared packet-flow tables through this tracer.
Address plan (DESIGN.md section 4): node 192.168.50.1, pods 10.244.1.x, Services 10.96.0.x,
outside 203.0.113.10, LB/external IPs 198.51.100.x; IPv6 fd00:10:244::1:N, fd00:10:96::N, fd00:50::1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest

from kubeproxy.backends.iptables.tracer import DROP, REJECT, Packet, TraceError, TraceResult, trace
from kubeproxy.model.service import IPFamily

NODE = "192.168.50.1"
NODE6 = "fd00:50::1"
OUTSIDE = "203.0.113.10"
POD_CLIENT = "10.244.1.100"
CLUSTER_CIDR = "10.244.0.0/16"


@dataclass(frozen=True, slots=True)
class Rules:
    """Shaped like ``iptables.render.IptRuleset``."""

    family: IPFamily
    tables: Mapping[str, Mapping[str, tuple[str, ...]]]


Chains = Mapping[str, Sequence[str]]


def ruleset(
    nat: Chains, filter_: Chains | None = None, *, family: IPFamily = IPFamily.V4, nodeports: str = ""
) -> Rules:
    """Upstream's static chains plus ``nat``/``filter_`` (appended per chain); the nodeports jump last."""
    static_nat: dict[str, tuple[str, ...]] = {
        "PREROUTING": ('-m comment --comment "kubernetes service portals" -j KUBE-SERVICES',),
        "OUTPUT": ('-m comment --comment "kubernetes service portals" -j KUBE-SERVICES',),
        "POSTROUTING": ('-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',),
        "KUBE-MARK-MASQ": ("-j MARK --or-mark 0x4000",),
        "KUBE-POSTROUTING": (
            "-m mark ! --mark 0x4000/0x4000 -j RETURN",
            "-j MARK --xor-mark 0x4000",
            '-m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
        ),
        "KUBE-SERVICES": (),
        "KUBE-NODEPORTS": (),
    }
    new = "-m conntrack --ctstate NEW"
    static_filter: dict[str, tuple[str, ...]] = {
        "INPUT": (
            f'{new} -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
            '-m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS',
            f'{new} -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
            "-j KUBE-FIREWALL",
        ),
        "FORWARD": (
            f'{new} -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
            '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
            f'{new} -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
            f'{new} -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
        ),
        "OUTPUT": (
            f'{new} -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
            f'{new} -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
            "-j KUBE-FIREWALL",
        ),
        "KUBE-FIREWALL": (
            '! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections"'
            " -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        )
        if family is IPFamily.V4
        else (),
        "KUBE-FORWARD": (
            "-m conntrack --ctstate INVALID -j DROP",
            '-m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT',
            '-m comment --comment "kubernetes forwarding conntrack rule"'
            " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ),
        "KUBE-SERVICES": (),
        "KUBE-EXTERNAL-SERVICES": (),
        "KUBE-NODEPORTS": (),
        "KUBE-PROXY-FIREWALL": (),
    }
    for static, extra in ((static_nat, nat), (static_filter, filter_ or {})):
        for chain, rules in extra.items():
            static[chain] = static.get(chain, ()) + tuple(rules)
    static_nat["KUBE-SERVICES"] += (
        '-m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain"'
        f" -m addrtype --dst-type LOCAL{nodeports} -j KUBE-NODEPORTS",
    )
    return Rules(family, {"nat": static_nat, "filter": static_filter})


def balanced(svc: str, endpoints: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    """Upstream's load-balancing rules: rule i draws 1/(n-i); the last one is unconditional."""
    rules = []
    for i, (text, sep) in enumerate(endpoints):
        left = len(endpoints) - i
        draw = f" -m statistic --mode random --probability {1 / left:0.10f}" if left > 1 else ""
        rules.append(f'-m comment --comment "{svc} -> {text}"{draw} -j {sep}')
    return tuple(rules)


def sep(svc: str, ip: str, target: str, extra: str = "") -> tuple[str, ...]:
    """A KUBE-SEP chain: hairpin masquerade for the endpoint itself, then the DNAT."""
    return (
        f"-m comment --comment {svc} -s {ip} -j KUBE-MARK-MASQ",
        f"-m comment --comment {svc}{extra} -m tcp -p tcp -j DNAT --to-destination {target}",
    )


# One node's rules for several Services, written as upstream's proxier writes them.
SVC1, SVC2, SVC3, SVC4, SVC5, SVC6 = (f"ns1/svc{i}:http" for i in range(1, 7))
CLUSTER = ruleset(
    nat={
        "KUBE-SERVICES": (
            # svc1: ClusterIP + NodePort 30080 + external IP, 2 endpoints, ETP=Cluster.
            f'-m comment --comment "{SVC1} cluster IP" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-SVC-SVC1',
            f'-m comment --comment "{SVC1} external IP" -m tcp -p tcp -d 198.51.100.20 --dport 80 -j KUBE-EXT-SVC1',
            # svc3: LoadBalancer with loadBalancerSourceRanges 203.0.113.0/25.
            f'-m comment --comment "{SVC3} cluster IP" -m tcp -p tcp -d 10.96.0.13 --dport 80 -j KUBE-SVC-SVC3',
            f'-m comment --comment "{SVC3} loadbalancer IP" -m tcp -p tcp -d 198.51.100.30 --dport 80 -j KUBE-FW-SVC3',
            # svc4: ETP=Local, external IP and NodePort 30084; one local and one remote endpoint.
            f'-m comment --comment "{SVC4} cluster IP" -m tcp -p tcp -d 10.96.0.14 --dport 80 -j KUBE-SVC-SVC4',
            f'-m comment --comment "{SVC4} external IP" -m tcp -p tcp -d 198.51.100.40 --dport 80 -j KUBE-EXT-SVC4',
            # svc5: ETP=Local, external IP; its only endpoint is on another node.
            f'-m comment --comment "{SVC5} cluster IP" -m tcp -p tcp -d 10.96.0.15 --dport 80 -j KUBE-SVC-SVC5',
            f'-m comment --comment "{SVC5} external IP" -m tcp -p tcp -d 198.51.100.50 --dport 80 -j KUBE-EXT-SVC5',
            # svc6: ClientIP session affinity.
            f'-m comment --comment "{SVC6} cluster IP" -m tcp -p tcp -d 10.96.0.16 --dport 80 -j KUBE-SVC-SVC6',
        ),
        "KUBE-NODEPORTS": (
            f"-m comment --comment {SVC1} -m tcp -p tcp --dport 30080 -j KUBE-EXT-SVC1",
            f"-m comment --comment {SVC4} -m tcp -p tcp --dport 30084 -j KUBE-EXT-SVC4",
        ),
        # svc1
        "KUBE-SVC-SVC1": (
            f'-m comment --comment "{SVC1} cluster IP" -m tcp -p tcp -d 10.96.0.10 --dport 80'
            f" ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            *balanced(SVC1, [("10.244.1.2:8080", "KUBE-SEP-SVC1A"), ("10.244.1.3:8080", "KUBE-SEP-SVC1B")]),
        ),
        "KUBE-EXT-SVC1": (
            f'-m comment --comment "masquerade traffic for {SVC1} external destinations" -j KUBE-MARK-MASQ',
            "-j KUBE-SVC-SVC1",
        ),
        "KUBE-SEP-SVC1A": sep(SVC1, "10.244.1.2", "10.244.1.2:8080"),
        "KUBE-SEP-SVC1B": sep(SVC1, "10.244.1.3", "10.244.1.3:8080"),
        # svc3
        "KUBE-SVC-SVC3": (
            f'-m comment --comment "{SVC3} cluster IP" -m tcp -p tcp -d 10.96.0.13 --dport 80'
            f" ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            f'-m comment --comment "{SVC3} -> 10.244.1.4:8080" -j KUBE-SEP-SVC3A',
        ),
        "KUBE-FW-SVC3": (
            f'-m comment --comment "{SVC3} loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-SVC3',
            f'-m comment --comment "other traffic to {SVC3} will be dropped by KUBE-PROXY-FIREWALL"',
        ),
        "KUBE-EXT-SVC3": (
            f'-m comment --comment "masquerade traffic for {SVC3} external destinations" -j KUBE-MARK-MASQ',
            "-j KUBE-SVC-SVC3",
        ),
        "KUBE-SEP-SVC3A": sep(SVC3, "10.244.1.4", "10.244.1.4:8080"),
        # svc4
        "KUBE-SVC-SVC4": (
            f'-m comment --comment "{SVC4} cluster IP" -m tcp -p tcp -d 10.96.0.14 --dport 80'
            f" ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            *balanced(SVC4, [("10.244.1.5:8080", "KUBE-SEP-SVC4A"), ("10.244.2.5:8080", "KUBE-SEP-SVC4B")]),
        ),
        "KUBE-SVL-SVC4": (f'-m comment --comment "{SVC4} -> 10.244.1.5:8080" -j KUBE-SEP-SVC4A',),
        "KUBE-EXT-SVC4": (
            f'-m comment --comment "pod traffic for {SVC4} external destinations" -s {CLUSTER_CIDR} -j KUBE-SVC-SVC4',
            f'-m comment --comment "masquerade LOCAL traffic for {SVC4} external destinations"'
            " -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ",
            f'-m comment --comment "route LOCAL traffic for {SVC4} external destinations"'
            " -m addrtype --src-type LOCAL -j KUBE-SVC-SVC4",
            "-j KUBE-SVL-SVC4",
        ),
        "KUBE-SEP-SVC4A": sep(SVC4, "10.244.1.5", "10.244.1.5:8080"),
        "KUBE-SEP-SVC4B": sep(SVC4, "10.244.2.5", "10.244.2.5:8080"),
        # svc5: no KUBE-SVL chain (no local endpoints), so KUBE-EXT falls through un-DNATed.
        "KUBE-SVC-SVC5": (
            f'-m comment --comment "{SVC5} cluster IP" -m tcp -p tcp -d 10.96.0.15 --dport 80'
            f" ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            f'-m comment --comment "{SVC5} -> 10.244.2.6:8080" -j KUBE-SEP-SVC5A',
        ),
        "KUBE-EXT-SVC5": (
            f'-m comment --comment "pod traffic for {SVC5} external destinations" -s {CLUSTER_CIDR} -j KUBE-SVC-SVC5',
            f'-m comment --comment "masquerade LOCAL traffic for {SVC5} external destinations"'
            " -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ",
            f'-m comment --comment "route LOCAL traffic for {SVC5} external destinations"'
            " -m addrtype --src-type LOCAL -j KUBE-SVC-SVC5",
        ),
        "KUBE-SEP-SVC5A": sep(SVC5, "10.244.2.6", "10.244.2.6:8080"),
        # svc6: affinity checks first, then the usual draw; the DNAT records the client.
        "KUBE-SVC-SVC6": (
            f'-m comment --comment "{SVC6} cluster IP" -m tcp -p tcp -d 10.96.0.16 --dport 80'
            f" ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            f'-m comment --comment "{SVC6} -> 10.244.1.6:8080"'
            " -m recent --name KUBE-SEP-SVC6A --rcheck --seconds 10800 --reap -j KUBE-SEP-SVC6A",
            f'-m comment --comment "{SVC6} -> 10.244.1.7:8080"'
            " -m recent --name KUBE-SEP-SVC6B --rcheck --seconds 10800 --reap -j KUBE-SEP-SVC6B",
            *balanced(SVC6, [("10.244.1.6:8080", "KUBE-SEP-SVC6A"), ("10.244.1.7:8080", "KUBE-SEP-SVC6B")]),
        ),
        "KUBE-SEP-SVC6A": sep(SVC6, "10.244.1.6", "10.244.1.6:8080", " -m recent --name KUBE-SEP-SVC6A --set"),
        "KUBE-SEP-SVC6B": sep(SVC6, "10.244.1.7", "10.244.1.7:8080", " -m recent --name KUBE-SEP-SVC6B --set"),
    },
    filter_={
        # svc2: no endpoints at all (ClusterIP 10.96.0.11, NodePort 30081).
        "KUBE-SERVICES": (
            f'-m comment --comment "{SVC2} has no endpoints" -m tcp -p tcp -d 10.96.0.11 --dport 80 -j REJECT',
        ),
        "KUBE-EXTERNAL-SERVICES": (
            f'-m comment --comment "{SVC2} has no endpoints" -m addrtype --dst-type LOCAL'
            " -m tcp -p tcp --dport 30081 -j REJECT",
            f'-m comment --comment "{SVC5} has no local endpoints" -m tcp -p tcp -d 198.51.100.50 --dport 80 -j DROP',
        ),
        "KUBE-PROXY-FIREWALL": (
            f'-m comment --comment "{SVC3} traffic not accepted by KUBE-FW-SVC3"'
            " -m tcp -p tcp -d 198.51.100.30 --dport 80 -j DROP",
        ),
    },
)

SVC1_EPS = "10.244.1.2:8080, 10.244.1.3:8080"
SVC4_EPS = "10.244.1.5:8080, 10.244.2.5:8080"


@pytest.mark.parametrize(
    ("name", "source", "destination", "port", "output", "masquerade"),
    [
        ("pod to ClusterIP", POD_CLIENT, "10.96.0.10", 80, SVC1_EPS, False),
        ("outside to ClusterIP is masqueraded", OUTSIDE, "10.96.0.10", 80, SVC1_EPS, True),
        ("node to ClusterIP is masqueraded (not in the cluster CIDR)", NODE, "10.96.0.10", 80, SVC1_EPS, True),
        ("wrong port: untouched", POD_CLIENT, "10.96.0.10", 81, "", False),
        ("hairpin: an endpoint reaching itself", "10.244.1.2", "10.96.0.10", 80, SVC1_EPS, True),
        ("outside to NodePort", OUTSIDE, NODE, 30080, SVC1_EPS, True),
        ("pod to NodePort", POD_CLIENT, NODE, 30080, SVC1_EPS, True),
        ("node to localhost NodePort", "127.0.0.1", "127.0.0.1", 30080, SVC1_EPS, True),
        ("outside to a node port with no Service: delivered, not masqueraded", OUTSIDE, NODE, 22, "", False),
        ("outside to external IP", OUTSIDE, "198.51.100.20", 80, SVC1_EPS, True),
        ("forwarded, not ours", OUTSIDE, "203.0.113.99", 80, "", False),
        ("no endpoints: pod to ClusterIP", POD_CLIENT, "10.96.0.11", 80, REJECT, False),
        ("no endpoints: node to ClusterIP", NODE, "10.96.0.11", 80, REJECT, False),
        ("no endpoints: outside to NodePort", OUTSIDE, NODE, 30081, REJECT, False),
        (
            "LB in source range: DNATed, not dropped by the LB firewall",
            OUTSIDE,
            "198.51.100.30",
            80,
            "10.244.1.4:8080",
            True,
        ),
        ("LB outside source range: dropped", "203.0.113.200", "198.51.100.30", 80, DROP, False),
        ("LB ClusterIP is not firewalled", "203.0.113.200", "10.96.0.13", 80, "10.244.1.4:8080", True),
        (
            "ETP=Local: outside gets the local endpoint, client IP kept",
            OUTSIDE,
            "198.51.100.40",
            80,
            "10.244.1.5:8080",
            False,
        ),
        ("ETP=Local NodePort", OUTSIDE, NODE, 30084, "10.244.1.5:8080", False),
        ("ETP=Local: pods short-circuit to all endpoints", POD_CLIENT, "198.51.100.40", 80, SVC4_EPS, False),
        ("ETP=Local: the node short-circuits and is masqueraded", NODE, "198.51.100.40", 80, SVC4_EPS, True),
        ("ETP=Local, no local endpoint: outside dropped", OUTSIDE, "198.51.100.50", 80, DROP, False),
        ("ETP=Local, no local endpoint: pods still served", POD_CLIENT, "198.51.100.50", 80, "10.244.2.6:8080", False),
        (
            "affinity: a first connection may go anywhere",
            POD_CLIENT,
            "10.96.0.16",
            80,
            "10.244.1.6:8080, 10.244.1.7:8080",
            False,
        ),
        ("outside to localnet, not a NodePort: dropped by KUBE-FIREWALL", OUTSIDE, "127.0.0.1", 22, DROP, False),
    ],
)
def test_flows(name: str, source: str, destination: str, port: int, output: str, masquerade: bool) -> None:  # noqa: PLR0917
    iif = None if source in (NODE, "127.0.0.1") else "eth0"
    result = trace(CLUSTER, Packet(source, "tcp", destination, port, iif=iif), [NODE])
    assert (result.output, result.masquerade) == (output, masquerade), "\n".join(result.matched)


def test_matched_lines_name_table_and_chain() -> None:
    result = trace(CLUSTER, Packet(POD_CLIENT, "tcp", "10.96.0.10", 80), [NODE])
    assert result.matched[:2] == (
        'nat PREROUTING: -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        f'nat KUBE-SERVICES: -m comment --comment "{SVC1} cluster IP" -m tcp -p tcp -d 10.96.0.10 --dport 80'
        " -j KUBE-SVC-SVC1",
    )
    assert (
        f"nat KUBE-SEP-SVC1B: -m comment --comment {SVC1} -m tcp -p tcp -j DNAT --to-destination 10.244.1.3:8080"
        in (result.matched)
    )
    assert any(line.startswith("filter FORWARD: ") for line in result.matched)


def test_a_locally_delivered_packet_never_meets_postrouting() -> None:
    result = trace(CLUSTER, Packet(OUTSIDE, "tcp", NODE, 22, iif="eth0"), [NODE])
    assert not [line for line in result.matched if line.startswith("nat POSTROUTING")]
    assert any(line.startswith("filter INPUT: ") for line in result.matched)


def test_affinity_checks_never_match_a_first_connection() -> None:
    result = trace(CLUSTER, Packet(POD_CLIENT, "tcp", "10.96.0.16", 80), [NODE])
    assert not [line for line in result.matched if "--rcheck" in line]
    assert sum("--set" in line for line in result.matched) == 2  # the DNAT rule of each branch


def test_every_probability_branch_is_followed() -> None:
    eps = [(f"10.244.1.{n}:8080", f"KUBE-SEP-{n}") for n in (2, 3, 4)]
    rs = ruleset(
        nat={
            "KUBE-SERVICES": ("-m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-SVC-X",),
            "KUBE-SVC-X": balanced(SVC1, eps),
            **{chain: sep(SVC1, text.split(":")[0], text) for text, chain in eps},
        }
    )
    assert "--probability 0.3333333333" in rs.tables["nat"]["KUBE-SVC-X"][0]
    result = trace(rs, Packet(POD_CLIENT, "tcp", "10.96.0.10", 80), [NODE])
    assert result.output == "10.244.1.2:8080, 10.244.1.3:8080, 10.244.1.4:8080"


def test_targets_sort_by_address_then_port() -> None:
    eps = [("10.244.1.10:80", "KUBE-SEP-A"), ("10.244.1.9:90", "KUBE-SEP-B"), ("10.244.1.9:80", "KUBE-SEP-C")]
    rs = ruleset(
        nat={
            "KUBE-SERVICES": ("-m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-SVC-X",),
            "KUBE-SVC-X": balanced(SVC1, eps),
            **{chain: sep(SVC1, text.split(":")[0], text) for text, chain in eps},
        }
    )
    result = trace(rs, Packet(POD_CLIENT, "tcp", "10.96.0.10", 80), [NODE])
    assert result.output == "10.244.1.9:80, 10.244.1.9:90, 10.244.1.10:80"


def test_one_branchs_mark_does_not_leak_into_another() -> None:
    # The hairpin mark set on the way to 10.244.1.2 belongs to that target only: a (test-only)
    # filter rule dropping marked packets to 10.244.1.3 must not fire for the client 10.244.1.2.
    rs = ruleset(
        nat={
            "KUBE-SERVICES": ("-m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-SVC-X",),
            "KUBE-SVC-X": balanced(SVC1, [("a", "KUBE-SEP-A"), ("b", "KUBE-SEP-B")]),
            "KUBE-SEP-A": sep(SVC1, "10.244.1.2", "10.244.1.2:8080"),
            "KUBE-SEP-B": sep(SVC1, "10.244.1.3", "10.244.1.3:8080"),
        },
        filter_={"KUBE-PROXY-FIREWALL": ("-d 10.244.1.3 -m mark --mark 0x4000/0x4000 -j DROP",)},
    )
    result = trace(rs, Packet("10.244.1.2", "tcp", "10.96.0.10", 80), [NODE])
    assert (result.output, result.masquerade) == ("10.244.1.2:8080, 10.244.1.3:8080", True)
    assert trace(rs, Packet("10.244.1.3", "tcp", "10.96.0.10", 80), [NODE]).output == DROP


def test_filter_sees_the_translated_packet_and_its_conntrack_state() -> None:
    def run(filter_rule: str, destination: str = "10.96.0.10") -> str:
        rs = ruleset(
            nat={
                "KUBE-SERVICES": ("-m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-SEP-A",),
                "KUBE-SEP-A": sep(SVC1, "10.244.1.2", "10.244.1.2:8080"),
            },
            filter_={"KUBE-SERVICES": (filter_rule,)},
        )
        return trace(rs, Packet(POD_CLIENT, "tcp", destination, 80), [NODE]).output

    # A rule for packets nat did NOT translate (KUBE-FIREWALL's shape): a DNATed packet passes.
    not_dnatted = "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -m tcp -p tcp --dport 80 -j DROP"
    assert run(not_dnatted) == "10.244.1.2:8080"
    assert run(not_dnatted, destination="10.96.0.99") == DROP
    # Address and port are the translated ones.
    assert run("-m tcp -p tcp -d 10.96.0.10 --dport 80 -j DROP") == "10.244.1.2:8080"
    assert run("-m tcp -p tcp -d 10.244.1.2 --dport 80 -j DROP") == "10.244.1.2:8080"
    assert run("-m tcp -p tcp -d 10.244.1.2 --dport 8080 -j DROP") == DROP


def test_loopback_destinations_are_local() -> None:
    # Without a node IP at all, 127.0.0.1 still has addrtype LOCAL (the kernel's RTN_LOCAL).
    result = trace(CLUSTER, Packet("127.0.0.1", "tcp", "127.0.0.1", 30080), [])
    assert (result.output, result.masquerade) == (SVC1_EPS, True)
    # Upstream's rule for disabled localhost NodePorts excludes them explicitly.
    service_chains = ("KUBE-NODEPORTS", "KUBE-EXT-", "KUBE-SVC-", "KUBE-SEP-")
    nat = {chain: rules for chain, rules in CLUSTER.tables["nat"].items() if chain.startswith(service_chains)}
    no_localhost = ruleset(nat, nodeports=" ! -d 127.0.0.0/8")
    assert trace(no_localhost, Packet(NODE, "tcp", NODE, 30080), [NODE]).output == SVC1_EPS
    assert trace(no_localhost, Packet("127.0.0.1", "tcp", "127.0.0.1", 30080), [NODE]).output == ""


@pytest.mark.parametrize(
    ("iif", "masquerade"),
    [("veth1234", False), ("eth0", True)],
)
def test_interface_prefix_local_detection(iif: str, masquerade: bool) -> None:
    rs = interface_detected()
    result = trace(rs, Packet(POD_CLIENT, "tcp", "10.96.0.10", 80, iif=iif), [NODE])
    assert (result.output, result.masquerade) == ("10.244.1.2:8080", masquerade)


def interface_detected() -> Rules:
    """detect-local-mode=InterfaceNamePrefix: "not from a pod interface" is ``! -i veth+``."""
    return ruleset(
        nat={
            "KUBE-SERVICES": ("-m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-SVC-X",),
            "KUBE-SVC-X": ("-m tcp -p tcp -d 10.96.0.10 --dport 80 ! -i veth+ -j KUBE-MARK-MASQ", "-j KUBE-SEP-A"),
            "KUBE-SEP-A": sep(SVC1, "10.244.1.2", "10.244.1.2:8080"),
        }
    )


def test_host_originated_packets_have_no_input_interface() -> None:
    result = trace(interface_detected(), Packet(NODE, "tcp", "10.96.0.10", 80), [NODE])
    assert (result.output, result.masquerade) == ("10.244.1.2:8080", True)


def test_interface_rule_without_packet_interface_is_an_error() -> None:
    with pytest.raises(TraceError, match=r"! -i veth\+.*Packet.iif"):
        trace(interface_detected(), Packet(POD_CLIENT, "tcp", "10.96.0.10", 80), [NODE])


def test_ipv6() -> None:
    svc = "ns1/svc1:http"
    rs = ruleset(
        family=IPFamily.V6,
        nodeports=" ! -d ::1/128",
        nat={
            "KUBE-SERVICES": (
                f'-m comment --comment "{svc} cluster IP" -m tcp -p tcp -d fd00:10:96::10 --dport 80 -j KUBE-SVC-X',
            ),
            "KUBE-NODEPORTS": (f"-m comment --comment {svc} -m tcp -p tcp --dport 30080 -j KUBE-EXT-X",),
            "KUBE-SVC-X": (
                f'-m comment --comment "{svc} cluster IP" -m tcp -p tcp -d fd00:10:96::10 --dport 80'
                " ! -s fd00:10:244::/64 -j KUBE-MARK-MASQ",
                *balanced(svc, [("a", "KUBE-SEP-A"), ("b", "KUBE-SEP-B")]),
            ),
            "KUBE-EXT-X": ("-j KUBE-MARK-MASQ", "-j KUBE-SVC-X"),
            "KUBE-SEP-A": sep(svc, "fd00:10:244::1:2", "[fd00:10:244::1:2]:8080"),
            "KUBE-SEP-B": sep(svc, "fd00:10:244::1:3", "[fd00:10:244::1:3]:8080"),
        },
    )
    eps = "[fd00:10:244::1:2]:8080, [fd00:10:244::1:3]:8080"

    def run(source: str, destination: str, port: int) -> tuple[str, bool]:
        result = trace(rs, Packet(source, "tcp", destination, port, iif="eth0"), [NODE6, NODE])
        return result.output, result.masquerade

    assert run("fd00:10:244::1:64", "fd00:10:96::10", 80) == (eps, False)
    assert run("fd00:203:0:113::10", "fd00:10:96::10", 80) == (eps, True)
    assert run("fd00:10:244::1:2", "fd00:10:96::10", 80) == (eps, True)  # hairpin
    assert run("fd00:203:0:113::10", NODE6, 30080) == (eps, True)
    assert run("::1", "::1", 30080) == ("", False)  # IPv6 has no localhost NodePorts


# --- what the tracer refuses ----------------------------------------------------------------------


def with_rule(chain: str, rule: str, table: str = "nat") -> Rules:
    rs = ruleset({})
    tables = {name: dict(chains) for name, chains in rs.tables.items()}
    tables[table][chain] = (rule, *tables[table].get(chain, ()))
    return Rules(rs.family, tables)


def pod_trace(rs: Rules) -> TraceResult:
    return trace(rs, Packet(POD_CLIENT, "tcp", "10.96.0.10", 80, iif="eth0"), [NODE])


@pytest.mark.parametrize(
    ("rule", "error"),
    [
        ("-m tcp -p tcp -o eth0 -j ACCEPT", "unsupported option '-o'"),
        ("-m tcp -p tcp -d 10.96.0.10 --dport 80:90 -j ACCEPT", "--dport is not a number"),
        ("-p tcp --dport 80 -j ACCEPT", "--dport"),  # upstream always loads -m tcp
        ("-m tcp --dport 80 -j ACCEPT", "-m tcp needs -p tcp"),
        ("-m tcp -p udp --dport 80 -j ACCEPT", "-m tcp needs -p tcp"),
        ("-m physdev --physdev-in eth0 -j ACCEPT", "unsupported match module -m physdev"),
        ("-m addrtype --dst-type BROADCAST -j ACCEPT", "addrtype"),
        ("-m statistic --mode nth --every 2 -j ACCEPT", "--every"),
        ("-m conntrack --ctstate UNTRACKED -j ACCEPT", "--ctstate UNTRACKED"),
        ("-m recent --name X --update --seconds 10 -j ACCEPT", "--update"),
        ("-d 10.96.0.10,10.96.0.11 -j ACCEPT", "not an address"),
        ("-d fd00:10:96::10 -j ACCEPT", "not an IPv4 address"),
        ("-j REJECT --reject-with icmp-port-unreachable", "arguments for -j REJECT"),
        ("-j MARK --set-xmark 0x4000/0x4000", "arguments for -j MARK"),
        ("-m tcp -p tcp -j DNAT --to-destination 10.244.1.2", "--to-destination"),
        ("-j DNAT --to-destination 10.244.1.2:80", "needs -p"),
        ("-m tcp -p tcp -j DNAT --to-destination [fd00::1]:80", "does not fit an IPv4 ruleset"),
        ("-m tcp -p tcp -j SNAT --to-source 192.168.50.1", "arguments for -j SNAT"),
        ("-j DROP", "outside the filter table"),
        ("-g KUBE-MARK-MASQ", "unsupported option '-g'"),
        ('-m comment --comment "unterminated -j ACCEPT', "cannot tokenize"),
        ("-j PREROUTING", "built-in chain"),
    ],
)
def test_unsupported_shapes_are_errors_naming_the_rule(rule: str, error: str) -> None:
    with pytest.raises(TraceError, match="nat KUBE-SERVICES: ") as info:
        pod_trace(with_rule("KUBE-SERVICES", rule))
    assert rule in str(info.value) and error in str(info.value)


def test_masquerade_outside_postrouting_is_an_error() -> None:
    with pytest.raises(TraceError, match="MASQUERADE reached from nat PREROUTING"):
        pod_trace(with_rule("KUBE-SERVICES", "-j MASQUERADE"))


def test_dnat_in_filter_is_an_error() -> None:
    with pytest.raises(TraceError, match="outside the nat table"):
        pod_trace(with_rule("KUBE-SERVICES", "-m tcp -p tcp -j DNAT --to-destination 10.244.1.2:80", table="filter"))


def test_jump_to_unknown_chain_is_an_error() -> None:
    with pytest.raises(TraceError, match="unknown chain nat KUBE-SVC-MISSING"):
        pod_trace(with_rule("KUBE-SERVICES", "-j KUBE-SVC-MISSING"))


def test_jump_loop_is_an_error() -> None:
    rs = with_rule("KUBE-LOOP", "-j KUBE-LOOP")
    rs = Rules(rs.family, {**rs.tables, "nat": {**rs.tables["nat"], "KUBE-SERVICES": ("-j KUBE-LOOP",)}})
    with pytest.raises(TraceError, match="jump depth"):
        pod_trace(rs)


def test_a_random_branch_that_drops_is_an_error() -> None:
    rule = "-m statistic --mode random --probability 0.5000000000 -j DROP"
    with pytest.raises(TraceError, match="random branch"):
        pod_trace(with_rule("KUBE-SERVICES", rule, table="filter"))


def test_branches_that_dnat_while_the_rest_do_not_is_an_error() -> None:
    # A KUBE-SVC chain missing its final unconditional rule.
    rs = ruleset(
        nat={
            "KUBE-SERVICES": ("-m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-SVC-X",),
            "KUBE-SVC-X": ("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-A",),
            "KUBE-SEP-A": sep(SVC1, "10.244.1.2", "10.244.1.2:8080"),
        }
    )
    with pytest.raises(TraceError, match="untranslated"):
        pod_trace(rs)


def test_missing_builtin_chains_have_no_rules() -> None:
    rs = Rules(IPFamily.V4, {"nat": {"KUBE-SEP-A": sep(SVC1, "10.244.1.2", "10.244.1.2:8080")}})
    assert pod_trace(rs) == TraceResult("", False, ())


def test_packet_of_the_other_family_is_an_error() -> None:
    with pytest.raises(TraceError, match="not IPv4"):
        trace(CLUSTER, Packet("fd00:10:244::1:64", "tcp", "fd00:10:96::10", 80), [NODE])
