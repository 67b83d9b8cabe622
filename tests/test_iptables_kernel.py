"""The iptables kernel boundary: FakeIptables semantics, backend detection, and (marker ``lab``) the
real ``iptables-{nft,legacy}-{restore,save}`` binaries, each test in its own throw-away network
namespace (netfilter state is per namespace: the host's rules are never read or written)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator

import pytest

from kubeproxy.kernel import iptables as ipt
from kubeproxy.kernel.errors import KernelError
from kubeproxy.kernel.iptables import (
    FakeIptables,
    IptablesCli,
    IptablesError,
    IptablesMode,
    available_modes,
    decide_mode,
    detect_mode,
    parse_save,
    tool_name,
)
from kubeproxy.lab.netns import lab_unavailable_reason, run
from kubeproxy.model.service import IPFamily

V4, V6 = IPFamily.V4, IPFamily.V6

# A small kube-proxy-like ruleset: one Service with two endpoints (affinity on the first), one
# Service without endpoints, the masquerade mark chains and the filter-table companions.
KUBE_INPUT = """\
*filter
:KUBE-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p has no endpoints" -m tcp -p tcp -d 10.0.0.2 --dport 80 -j REJECT
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SVC-X - [0:0]
:KUBE-SEP-Y - [0:0]
:KUBE-SEP-Z - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 10.0.0.1 --dport 80 -j KUBE-SVC-X
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-X -m comment --comment "ns1/svc1:p80 -> 10.1.0.2:8080" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-Y
-A KUBE-SVC-X -m comment --comment "ns1/svc1:p80 -> 10.1.0.3:8080" -j KUBE-SEP-Z
-A KUBE-SEP-Y -m comment --comment ns1/svc1:p80 -s 10.1.0.2 -j KUBE-MARK-MASQ
-A KUBE-SEP-Y -m comment --comment ns1/svc1:p80 -m recent --name KUBE-SEP-Y --set --rsource -m tcp -p tcp -j DNAT --to-destination 10.1.0.2:8080
-A KUBE-SEP-Z -m comment --comment ns1/svc1:p80 -m recent --name KUBE-SEP-Y --rcheck --seconds 10800 --reap --rsource -j KUBE-SEP-Y
-A KUBE-SEP-Z -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.1.0.3:8080
COMMIT
"""  # noqa: E501

# What both backends' save printed for some of the lines above (iptables 1.8.9): addresses first
# with a prefix length, then -p, then the matches in input order; comments quoted unless they
# are only [A-Za-z0-9._-].
KUBE_SAVED = {
    ("nat", "KUBE-SERVICES"): [
        '-d 10.0.0.1/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-X',
        '-m comment --comment "kubernetes service nodeports" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
    ],
    ("nat", "KUBE-SVC-X"): [
        '-m comment --comment "ns1/svc1:p80 -> 10.1.0.2:8080" -m statistic --mode random --probability 0.50000000000 '
        "-j KUBE-SEP-Y",
        '-m comment --comment "ns1/svc1:p80 -> 10.1.0.3:8080" -j KUBE-SEP-Z',
    ],
    ("nat", "KUBE-SEP-Y"): [
        '-s 10.1.0.2/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ',
        '-p tcp -m comment --comment "ns1/svc1:p80" -m recent --set --name KUBE-SEP-Y --mask 255.255.255.255 '
        "--rsource -m tcp -j DNAT --to-destination 10.1.0.2:8080",
    ],
    ("nat", "KUBE-SEP-Z"): [
        '-m comment --comment "ns1/svc1:p80" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-Y '
        "--mask 255.255.255.255 --rsource -j KUBE-SEP-Y",
        '-p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.1.0.3:8080',
    ],
    ("nat", "KUBE-MARK-MASQ"): ["-j MARK --set-xmark 0x4000/0x4000"],
    ("nat", "KUBE-POSTROUTING"): [
        "-m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-j MARK --set-xmark 0x4000/0x0",
        '-m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE',
    ],
    ("filter", "KUBE-SERVICES"): [
        '-d 10.0.0.2/32 -p tcp -m comment --comment "ns2/svc2:p has no endpoints" -m tcp --dport 80 '
        "-j REJECT --reject-with icmp-port-unreachable",
    ],
    ("filter", "KUBE-FORWARD"): [
        "-m conntrack --ctstate INVALID -j DROP",
        "-m mark --mark 0x4000/0x4000 -j ACCEPT",
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ],
}


def block(table: str, *lines: str) -> str:
    return "\n".join([f"*{table}", *lines, "COMMIT"]) + "\n"


# ----------------------------------------------------------------------------------------------
# FakeIptables


def test_fake_is_an_iptables_and_errors_are_kernel_errors() -> None:
    fake: ipt.Iptables = FakeIptables()
    assert fake.mode is IptablesMode.NFT
    assert FakeIptables(IptablesMode.LEGACY).mode is IptablesMode.LEGACY
    assert issubclass(IptablesError, KernelError)


def test_fake_touched_table_has_builtin_chains_with_accept_policy() -> None:
    fake = FakeIptables()
    assert fake.chains(V4, "nat") == {}
    assert fake.save(V4, "nat") == ""
    fake.restore(V4, block("nat") + block("filter") + block("mangle"))
    assert fake.chains(V4, "nat") == {"PREROUTING": [], "INPUT": [], "OUTPUT": [], "POSTROUTING": []}
    assert list(fake.chains(V4, "filter")) == ["INPUT", "FORWARD", "OUTPUT"]
    assert list(fake.chains(V4, "mangle")) == ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"]
    assert ":FORWARD ACCEPT [0:0]" in fake.save(V4, "filter")
    assert fake.chains(V6, "nat") == {}  # families are separate


def test_fake_loads_the_kube_ruleset_verbatim() -> None:
    fake = FakeIptables()
    fake.restore(V4, KUBE_INPUT)
    nat = fake.chains(V4, "nat")
    assert nat["KUBE-SVC-X"][1] == '-m comment --comment "ns1/svc1:p80 -> 10.1.0.3:8080" -j KUBE-SEP-Z'
    assert nat["KUBE-SEP-Y"][0] == "-m comment --comment ns1/svc1:p80 -s 10.1.0.2 -j KUBE-MARK-MASQ"  # not normalised
    assert {chain: len(rules) for (table, chain), rules in KUBE_SAVED.items() if table == "nat"} == {
        chain: len(nat[chain]) for (table, chain) in KUBE_SAVED if table == "nat"
    }
    assert len(fake.chains(V4, "filter")["KUBE-FORWARD"]) == 3


def test_fake_save_format() -> None:
    fake = FakeIptables()
    fake.restore(
        V4,
        block(
            "nat",
            ":KUBE-SVC-B - [0:0]",
            ":KUBE-SVC-A - [0:0]",
            ":OUTPUT DROP [0:0]",
            "-A KUBE-SVC-B -j ACCEPT",
            "-A KUBE-SVC-A",
            "-A OUTPUT -j KUBE-SVC-B",
        ),
    )
    assert fake.save(V4, "nat") == (
        "*nat\n"
        ":PREROUTING ACCEPT [0:0]\n"
        ":INPUT ACCEPT [0:0]\n"
        ":OUTPUT DROP [0:0]\n"
        ":POSTROUTING ACCEPT [0:0]\n"
        ":KUBE-SVC-A - [0:0]\n"
        ":KUBE-SVC-B - [0:0]\n"
        "-A OUTPUT -j KUBE-SVC-B\n"
        "-A KUBE-SVC-A\n"
        "-A KUBE-SVC-B -j ACCEPT\n"
        "COMMIT\n"
    )
    fake.restore(V4, block("filter"))
    assert fake.dump(V4) == fake.save(V4, "filter") + fake.save(V4, "nat")
    assert fake.dump(V6) == ""


def test_fake_redeclared_user_chain_is_flushed_builtin_policy_line_is_not() -> None:
    fake = FakeIptables()
    fake.restore(V4, block("filter", ":KUBE-A - [0:0]", "-A KUBE-A -j ACCEPT", "-A INPUT -j KUBE-A"))
    fake.restore(V4, block("filter", ":INPUT DROP [0:0]", ":KUBE-A - [0:0]", "-A KUBE-A -j DROP"))
    chains = fake.chains(V4, "filter")
    assert chains["INPUT"] == ["-j KUBE-A"]  # built-in kept its rule (--noflush)
    assert chains["KUBE-A"] == ["-j DROP"]  # user chain flushed, then refilled
    assert ":INPUT DROP [0:0]" in fake.save(V4, "filter")
    # Declaring a chain that exists is the same as flushing it; other chains are untouched.
    fake.restore(V4, block("filter", ":KUBE-A - [0:0]"))
    assert fake.chains(V4, "filter") == {"INPUT": ["-j KUBE-A"], "FORWARD": [], "OUTPUT": [], "KUBE-A": []}


def test_fake_refused_block_changes_nothing_and_names_the_line() -> None:
    fake = FakeIptables()
    fake.restore(V4, KUBE_INPUT)
    before = fake.dump(V4)
    bad = block("nat", ":KUBE-SVC-X - [0:0]", "-A KUBE-SVC-X -j ACCEPT", "-A KUBE-SERVICES -j KUBE-SVC-NOPE")
    with pytest.raises(IptablesError, match=r"^line 4: .*KUBE-SVC-NOPE.*: -A KUBE-SERVICES -j KUBE-SVC-NOPE$") as exc:
        fake.restore(V4, bad)
    assert exc.value.returncode == 1
    assert fake.dump(V4) == before  # the flush of KUBE-SVC-X and its new rule were not applied


def test_fake_commits_each_table_block_on_its_own_like_the_kernel() -> None:
    # Measured with both backends: blocks before the refused one stay applied.
    fake = FakeIptables()
    text = block("filter", ":KUBE-A - [0:0]") + block("nat", ":KUBE-B - [0:0]", "-A KUBE-B -j KUBE-NOPE")
    with pytest.raises(IptablesError, match="line 6"):
        fake.restore(V4, text)
    assert "KUBE-A" in fake.chains(V4, "filter")
    assert fake.chains(V4, "nat") == {}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("-A INPUT -j ACCEPT\n", "not inside a \\*table block"),
        (":KUBE-A - [0:0]\n", "not inside a \\*table block"),
        ("*filter\n:KUBE-A - [0:0]\n", "COMMIT expected"),
        ("*filter\n*nat\nCOMMIT\n", "COMMIT expected"),
        ("COMMIT\n", "not inside"),
        (block("nosuch"), "table 'nosuch' does not exist"),
        (block("filter", "-A KUBE-MISSING -j ACCEPT"), "no chain KUBE-MISSING"),
        (block("filter", "-N INPUT"), "already exists"),
        (block("filter", ":KUBE-A ACCEPT [0:0]"), "cannot set policy"),
        (block("filter", ":INPUT - [0:0]"), "bad policy"),
        (block("filter", "-A INPUT -j NOSUCH"), "jump target 'NOSUCH'"),
        (block("filter", "-A INPUT -j OUTPUT"), "jump target 'OUTPUT'"),  # built-ins are not jump targets
        (block("filter", "-A INPUT -g ACCEPT"), "goto target 'ACCEPT'"),
        (block("filter", ":KUBE-A - [0:0]", "-A KUBE-A -j KUBE-B", ":KUBE-B - [0:0]"), "jump target 'KUBE-B'"),
        (block("filter", '-A INPUT -m comment --comment "unterminated -j ACCEPT'), "bad quoting"),
        (block("filter", "-Z INPUT"), "unsupported command"),
        (block("filter", "-D INPUT -j ACCEPT"), "no such rule"),
        (block("filter", "-D INPUT 1"), "no rule number 1"),
        (block("filter", "-I INPUT 2 -j ACCEPT"), "index 2 out of range"),
        (block("filter", "-X INPUT"), "built-in"),
        (block("filter", "-X KUBE-MISSING"), "no chain KUBE-MISSING"),
        (block("filter", "bogus"), "unknown command"),
    ],
)
def test_fake_refuses_what_the_kernel_refuses(text: str, reason: str) -> None:
    fake = FakeIptables()
    with pytest.raises(IptablesError, match=reason):
        fake.restore(V4, text)
    assert fake.dump(V4) == ""


def test_fake_standard_targets_and_user_chain_jumps() -> None:
    fake = FakeIptables()
    targets = ["ACCEPT", "DROP", "REJECT", "RETURN", "MARK", "MASQUERADE", "DNAT", "SNAT", "LOG", "CONNMARK"]
    fake.restore(
        V4,
        block(
            "nat",
            ":KUBE-A - [0:0]",
            ":KUBE-B - [0:0]",
            *(f"-A KUBE-A -j {t}" for t in targets),
            "-A KUBE-A --jump KUBE-B",
            "-A KUBE-A -g KUBE-B",
        ),
    )
    assert len(fake.chains(V4, "nat")["KUBE-A"]) == len(targets) + 2


def test_fake_delete_chain_refused_while_referenced_or_not_empty() -> None:
    fake = FakeIptables()
    fake.restore(V4, block("nat", ":KUBE-SVC-X - [0:0]", ":KUBE-SEP-Y - [0:0]", "-A KUBE-SVC-X -j KUBE-SEP-Y"))
    with pytest.raises(IptablesError, match="referenced from KUBE-SVC-X"):
        fake.restore(V4, block("nat", "-X KUBE-SEP-Y"))
    with pytest.raises(IptablesError, match="not empty"):
        fake.restore(V4, block("nat", "-X KUBE-SVC-X"))
    # Referenced via -g counts too.
    fake.restore(V4, block("nat", ":KUBE-SVC-X - [0:0]", "-A KUBE-SVC-X -g KUBE-SEP-Y"))
    with pytest.raises(IptablesError, match="referenced"):
        fake.restore(V4, block("nat", "-X KUBE-SEP-Y"))
    # Upstream's pattern for stale chains: declare (flush) the referrer and the stale chain, then -X.
    fake.restore(V4, block("nat", ":KUBE-SVC-X - [0:0]", ":KUBE-SEP-Y - [0:0]", "-X KUBE-SEP-Y"))
    assert fake.chains(V4, "nat")["KUBE-SVC-X"] == []
    assert "KUBE-SEP-Y" not in fake.chains(V4, "nat")
    fake.restore(V4, block("nat", "--delete-chain KUBE-SVC-X"))
    assert list(fake.chains(V4, "nat")) == ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]


def test_fake_delete_rule_by_spec_and_by_number() -> None:
    fake = FakeIptables()
    rules = ["-s 1.1.1.1 -j ACCEPT", "-s 2.2.2.2 -j ACCEPT", "-s 1.1.1.1 -j ACCEPT", "-s 3.3.3.3 -j DROP"]
    fake.restore(V4, block("filter", ":KUBE-A - [0:0]", *(f"-A KUBE-A {r}" for r in rules)))
    fake.restore(V4, block("filter", "-D KUBE-A -s 1.1.1.1 -j ACCEPT"))  # the first equal rule only
    assert fake.chains(V4, "filter")["KUBE-A"] == rules[1:]
    fake.restore(V4, block("filter", "-D KUBE-A 2"))
    assert fake.chains(V4, "filter")["KUBE-A"] == [rules[1], rules[3]]
    fake.restore(V4, block("filter", "--delete KUBE-A -s 3.3.3.3 -j DROP"))
    assert fake.chains(V4, "filter")["KUBE-A"] == [rules[1]]
    with pytest.raises(IptablesError, match="no such rule"):
        fake.restore(V4, block("filter", "-D KUBE-A -s 2.2.2.2/32 -j ACCEPT"))  # text, not parsed rule


def test_fake_insert_position() -> None:
    fake = FakeIptables()
    fake.restore(V4, block("filter", ":KUBE-A - [0:0]", "-A KUBE-A -s 1.1.1.1", "-A KUBE-A -s 2.2.2.2"))
    fake.restore(
        V4,
        block(
            "filter",
            "-I KUBE-A 2 -s 3.3.3.3 -j ACCEPT",
            "-I KUBE-A -s 4.4.4.4 -j ACCEPT",
            "-I KUBE-A 5 -s 5.5.5.5",
            "--insert KUBE-A 1",
        ),
    )
    assert fake.chains(V4, "filter")["KUBE-A"] == [
        "",
        "-s 4.4.4.4 -j ACCEPT",
        "-s 1.1.1.1",
        "-s 3.3.3.3 -j ACCEPT",
        "-s 2.2.2.2",
        "-s 5.5.5.5",
    ]


def test_fake_new_chain_flush_and_policy_commands() -> None:
    fake = FakeIptables()
    fake.restore(V4, block("filter", "-N KUBE-A", "-A KUBE-A -j ACCEPT", "-A INPUT -j KUBE-A", "-P FORWARD DROP"))
    assert ":FORWARD DROP [0:0]" in fake.save(V4, "filter")
    fake.restore(V4, block("filter", "-F KUBE-A"))
    assert fake.chains(V4, "filter")["KUBE-A"] == []
    assert fake.chains(V4, "filter")["INPUT"] == ["-j KUBE-A"]
    fake.restore(V4, block("filter", "-F"))
    assert all(rules == [] for rules in fake.chains(V4, "filter").values())


def test_fake_ignores_comments_and_blank_lines() -> None:
    fake = FakeIptables()
    fake.restore(V4, "# generated\n\n*filter\n  # inside\n:KUBE-A - [0:0]\n\nCOMMIT\n# done\n")
    assert "KUBE-A" in fake.chains(V4, "filter")


def test_fake_fail_next_and_restores_recorded() -> None:
    fake = FakeIptables()
    fake.restore(V4, block("filter", ":KUBE-A - [0:0]"))
    fake.fail_next = "iptables-restore: line 3 failed"
    with pytest.raises(IptablesError, match="line 3 failed"):
        fake.restore(V6, block("filter", ":KUBE-B - [0:0]"))
    assert fake.fail_next is None
    assert fake.chains(V6, "filter") == {}
    with pytest.raises(IptablesError):
        fake.restore(V4, block("filter", "-A KUBE-MISSING"))
    fake.restore(V6, block("filter", ":KUBE-B - [0:0]"))
    assert [family for family, _ in fake.restores] == [V4, V6, V4, V6]
    assert fake.restores[0] == (V4, block("filter", ":KUBE-A - [0:0]"))
    assert "KUBE-B" in fake.chains(V6, "filter")


def test_parse_save_reads_real_save_output() -> None:
    text = (
        "# Generated by iptables-nft-save v1.8.9 (nf_tables) on Sat Nov 21 08:44:54 2026\n"
        "*nat\n"
        ":PREROUTING ACCEPT [12:720]\n"
        ":KUBE-SVC-X - [0:0]\n"
        ":KUBE-EMPTY - [0:0]\n"
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SVC-X\n'
        "-A KUBE-SVC-X -j ACCEPT\n"
        "-A KUBE-SVC-X\n"
        "COMMIT\n"
        "# Completed on Sat Nov 21 08:44:54 2026\n"
        "*filter\n"
        ":INPUT ACCEPT [0:0]\n"
        "-A INPUT -j DROP\n"
        "COMMIT\n"
    )
    assert parse_save(text, "nat") == {
        "PREROUTING": ['-m comment --comment "kubernetes service portals" -j KUBE-SVC-X'],
        "KUBE-SVC-X": ["-j ACCEPT", ""],
        "KUBE-EMPTY": [],
    }
    assert parse_save(text, "filter") == {"INPUT": ["-j DROP"]}
    assert parse_save(text, "mangle") == {}
    assert parse_save("", "nat") == {}
    assert set(parse_save(text)) == {"PREROUTING", "KUBE-SVC-X", "KUBE-EMPTY", "INPUT"}


# ----------------------------------------------------------------------------------------------
# Binary names and backend detection (no binaries run)


def test_tool_names() -> None:
    assert tool_name(V4, IptablesMode.NFT, "restore") == "iptables-nft-restore"
    assert tool_name(V6, IptablesMode.LEGACY, "save") == "ip6tables-legacy-save"
    assert tool_name(V6, IptablesMode.NFT) == "ip6tables-nft"
    assert IptablesCli(IptablesMode.LEGACY).binary(V6, "restore").endswith("ip6tables-legacy-restore")


def test_detect_mode_env_override(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kubeproxy.iptables"):
        assert detect_mode(env={"KUBE_PROXY_IPTABLES_MODE": "legacy"}) is IptablesMode.LEGACY
        assert detect_mode(env={"KUBE_PROXY_IPTABLES_MODE": "nft"}) is IptablesMode.NFT
    assert "iptables backend detected mode=legacy reason=env-KUBE_PROXY_IPTABLES_MODE" in caplog.text


def test_detect_mode_env_override_bad_value() -> None:
    with pytest.raises(IptablesError, match="'iptables-legacy'"):
        detect_mode(env={"KUBE_PROXY_IPTABLES_MODE": "iptables-legacy"})


def test_decide_mode_follows_the_wrapper() -> None:
    hint = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
    canary = "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n"
    rules = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\n-A INPUT -j DROP\nCOMMIT\n"
    decide = decide_mode
    assert decide(nft_mangle=["", hint], legacy_saves=[canary], nft_saves=[])[0] is IptablesMode.NFT
    assert decide(nft_mangle=["", ""], legacy_saves=["", canary], nft_saves=[rules])[0] is IptablesMode.LEGACY
    assert decide(nft_mangle=[], legacy_saves=[rules], nft_saves=[""]) == (
        IptablesMode.LEGACY,
        "more-legacy-rules legacy_rules=2 nft_rules=0",
    )
    assert decide(nft_mangle=[], legacy_saves=[rules], nft_saves=[rules])[0] is IptablesMode.NFT  # tie
    assert decide(nft_mangle=[], legacy_saves=[], nft_saves=[]) == (
        IptablesMode.NFT,
        "default legacy_rules=0 nft_rules=0",
    )
    # A hint must be a chain declaration, not a mention in a rule or comment.
    mention = "*mangle\n-A PREROUTING -m comment --comment KUBE-IPTABLES-HINT\nCOMMIT\n"
    assert decide(nft_mangle=[mention], legacy_saves=[mention], nft_saves=[])[1].startswith("more-legacy-rules")


def test_detect_mode_without_binaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipt, "find", lambda name: None)
    with pytest.raises(IptablesError, match="no iptables backend installed"):
        detect_mode(env={})
    assert available_modes() == []


def test_detect_mode_counts_a_missing_backend_as_empty(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Only legacy installed (and it has rules): the probes of nft binaries find nothing.
    monkeypatch.setattr(ipt, "find", lambda name: f"/usr/sbin/{name}" if "legacy" in name else None)
    calls: list[tuple[str | None, str, list[str]]] = []

    def probe(netns: str | None, name: str, args: list[str]) -> str:
        calls.append((netns, name, args))
        if ipt.find(name) is None:
            return ""
        return "*filter\n-A INPUT -j ACCEPT\nCOMMIT\n" if name.startswith("iptables-") else ""

    monkeypatch.setattr(ipt, "_probe", probe)
    with caplog.at_level(logging.INFO, logger="kubeproxy.iptables"):
        assert detect_mode(netns="ns1", env={}) is IptablesMode.LEGACY
    assert "iptables backend detected mode=legacy reason=more-legacy-rules legacy_rules=1 nft_rules=0" in caplog.text
    assert calls[0] == ("ns1", "iptables-nft-save", ["-t", "mangle"])
    assert ("ns1", "iptables-legacy-save", []) in calls  # legacy saves all tables: -t mangle would create it
    assert available_modes() == [IptablesMode.LEGACY]


def test_cli_translates_a_missing_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipt, "find", lambda name: f"/nonexistent/{name}")
    cli = IptablesCli(IptablesMode.NFT)
    with pytest.raises(IptablesError, match="cannot run /nonexistent/iptables-nft-restore --noflush"):
        cli.restore(V4, block("filter"))
    with pytest.raises(IptablesError, match="cannot run /nonexistent/ip6tables-nft-save -t nat"):
        cli.chains(V6, "nat")


# ----------------------------------------------------------------------------------------------
# Real binaries, each test in its own namespace

_REASON = lab_unavailable_reason()
lab = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]
MODES = [
    pytest.param(mode, marks=[*lab, pytest.mark.skipif(mode not in available_modes(), reason=f"no {mode.value}")])
    for mode in IptablesMode
]


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kpipt-{secrets.token_hex(4)}"
    run(["ip", "netns", "add", name], timeout=10)
    try:
        yield name
    finally:
        run(["ip", "netns", "delete", name], timeout=10)


@pytest.mark.parametrize("mode", MODES)
def test_real_restore_and_chains(mode: IptablesMode, netns: str) -> None:
    cli = IptablesCli(mode, netns=netns)
    assert cli.chains(V4, "nosuchtable") == {}
    cli.restore(V4, KUBE_INPUT)
    for (table, chain), rules in KUBE_SAVED.items():
        assert cli.chains(V4, table)[chain] == rules, (table, chain)
    nat = cli.chains(V4, "nat")
    assert list(nat)[:4] == ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]
    assert list(nat)[4:] == sorted(list(nat)[4:])  # then user chains, sorted
    # The fake holds the same chains with the same number of rules (text is not normalised there).
    fake = FakeIptables(mode)
    fake.restore(V4, KUBE_INPUT)
    for table in ("filter", "nat"):
        real = {c: len(r) for c, r in cli.chains(V4, table).items()}
        assert real == {c: len(r) for c, r in fake.chains(V4, table).items()}
    # Nothing leaked into the other family.
    assert "KUBE-SERVICES" not in cli.chains(V6, "nat")


@pytest.mark.parametrize("mode", MODES)
def test_real_refused_restore_raises_and_changes_nothing(mode: IptablesMode, netns: str) -> None:
    cli = IptablesCli(mode, netns=netns)
    cli.restore(V4, KUBE_INPUT)
    before = {t: cli.chains(V4, t) for t in ("filter", "nat")}
    bad = block("nat", ":KUBE-SVC-X - [0:0]", "-A KUBE-SVC-X -j KUBE-SEP-NOPE")
    with pytest.raises(IptablesError) as exc:
        cli.restore(V4, bad)
    err = exc.value
    assert err.returncode not in (None, 0)
    assert "KUBE-SEP-NOPE" in err.stderr
    assert "Error occurred at line" in err.stderr
    assert str(err).startswith(f"iptables-{mode.value}-restore --noflush failed (exit {err.returncode}): ")
    assert {t: cli.chains(V4, t) for t in ("filter", "nat")} == before
    # A block committed before the refused one stays applied (the fake models the same).
    with pytest.raises(IptablesError):
        cli.restore(V4, block("filter", ":KUBE-EARLIER - [0:0]") + bad)
    assert "KUBE-EARLIER" in cli.chains(V4, "filter")
    assert cli.chains(V4, "nat") == before["nat"]


@pytest.mark.parametrize("mode", MODES)
def test_real_ip6tables(mode: IptablesMode, netns: str) -> None:
    cli = IptablesCli(mode, netns=netns)
    cli.restore(
        V6,
        block(
            "nat",
            ":KUBE-SERVICES - [0:0]",
            ":KUBE-SVC-X - [0:0]",
            "-A KUBE-SERVICES -m comment --comment svc -m tcp -p tcp -d fd00:10:96::1 --dport 80 -j KUBE-SVC-X",
            "-A KUBE-SVC-X -m tcp -p tcp -j DNAT --to-destination [fd00:10:244::2]:8080",
        ),
    )
    nat6 = cli.chains(V6, "nat")
    assert nat6["KUBE-SERVICES"] == [
        # A comment of only [A-Za-z0-9._-] is printed unquoted (xtables_save_string), any other quoted.
        "-d fd00:10:96::1/128 -p tcp -m comment --comment svc -m tcp --dport 80 -j KUBE-SVC-X"
    ]
    assert nat6["KUBE-SVC-X"] == ["-p tcp -m tcp -j DNAT --to-destination [fd00:10:244::2]:8080"]
    assert "KUBE-SVC-X" not in cli.chains(V4, "nat")
    assert cli.save(V6, "nat").startswith("# Generated by ip6tables-")


@pytest.mark.parametrize("mode", MODES)
def test_real_save_of_a_missing_table_is_empty(mode: IptablesMode, netns: str) -> None:
    cli = IptablesCli(mode, netns=netns)
    assert cli.save(V4, "nosuchtable") == ""
    assert cli.save(V6, "nosuchtable") == ""


@pytest.mark.lab
@pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
def test_real_detect_mode_in_a_namespace(netns: str) -> None:
    if available_modes() != [IptablesMode.NFT, IptablesMode.LEGACY]:
        pytest.skip("needs both iptables backends")
    nft = IptablesCli(IptablesMode.NFT, netns=netns)
    legacy = IptablesCli(IptablesMode.LEGACY, netns=netns)
    assert detect_mode(netns=netns, env={}) is IptablesMode.NFT  # nothing anywhere: the default
    legacy.restore(V4, block("filter", "-A INPUT -j ACCEPT"))
    assert detect_mode(netns=netns, env={}) is IptablesMode.LEGACY  # more legacy rules
    nft.restore(V4, block("filter", "-A INPUT -j ACCEPT", "-A INPUT -j ACCEPT"))
    assert detect_mode(netns=netns, env={}) is IptablesMode.NFT  # more nft rules
    legacy.restore(V6, block("mangle", ":KUBE-IPTABLES-HINT - [0:0]"))
    assert detect_mode(netns=netns, env={}) is IptablesMode.LEGACY  # kubelet's hint beats counts
    nft.restore(V4, block("mangle", ":KUBE-KUBELET-CANARY - [0:0]"))
    assert detect_mode(netns=netns, env={}) is IptablesMode.NFT  # the nft hint is checked first
    assert detect_mode(netns=netns, env={"KUBE_PROXY_IPTABLES_MODE": "legacy"}) is IptablesMode.LEGACY
