"""Lab pieces that need no root: naming, address checks, probe parsing and argument validation."""

from __future__ import annotations

import pytest

from kubeproxy.lab import podserver
from kubeproxy.lab.cluster import Lab, _safe_name
from kubeproxy.lab.netns import LabError, call_in_netns, lab_unavailable_reason
from kubeproxy.lab.probe import Outcome, _parse, spread


def test_safe_names_are_short_valid_and_distinct() -> None:
    names = ["pod-a", "Pod-A", "pod_a", "pod.a", "x" * 60, "x" * 61, "ä"]
    safe = [_safe_name(n, 19) for n in names]
    assert len(set(safe)) == len(names)
    for s in safe:
        assert 0 < len(s) <= 19
        assert all(c.isascii() and (c.isalnum() or c == "-") for c in s)
    assert _safe_name("pod-a", 19) == "pod-a"


def test_lab_validates_its_arguments_before_building() -> None:
    for kwargs in [{"tag": "Bad-Tag"}, {"tag": "x" * 13}, {"node_ip": "fd00::1"}, {"pod_cidr": "10.244.1.0/31"},
                   {"pod_cidr": "10.244.1.1/24"}, {"ipv6": True, "node_ip6": "192.168.50.1"}]:  # fmt: skip
        with pytest.raises(LabError):
            Lab(**kwargs)  # type: ignore[arg-type]
    lab = Lab(tag="abc123")
    assert (lab.node_ns, lab.client_ns, lab.gateway_ip) == ("kpl-abc123-node", "kpl-abc123-client", "10.244.1.1")
    assert lab.gateway_ip6 is None
    with pytest.raises(LabError, match="not running"):
        lab.add_pod("pod-a", "10.244.1.2")


def test_answer_parsing() -> None:
    ok = _parse(b"pod-a 10.244.1.1\n")
    assert (ok.outcome, ok.answer, ok.seen_client_ip) == (Outcome.OK, "pod-a", "10.244.1.1")
    assert _parse(b"").outcome is Outcome.ERROR
    assert _parse(b"garbage").outcome is Outcome.ERROR


def test_spread_and_call_in_netns_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="protocol"):
        spread("kpl-x-node", "10.0.0.1", 80, 1, protocol="sctp")
    with pytest.raises(ValueError, match="not an IP"):
        spread("kpl-x-node", "nope", 80, 1)
    with pytest.raises(LabError):
        call_in_netns("../etc", print)
    with pytest.raises(LabError, match="not available"):
        call_in_netns("kpl-does-not-exist-anywhere", print)


def test_podserver_rejects_bad_arguments() -> None:
    for argv in [["--name", "x"], ["--name", "a b", "--tcp", "80"], ["--name", "x", "--udp", "70000"]]:
        with pytest.raises(SystemExit):
            podserver.main(argv)


def test_unavailable_reason_is_none_or_a_sentence() -> None:
    reason = lab_unavailable_reason()
    assert reason is None or (isinstance(reason, str) and len(reason) > 10)
