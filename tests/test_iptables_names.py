"""iptables chain names are upstream's, bit for bit (reference/upstream.md section 3.2)."""

from __future__ import annotations

from kubeproxy.backends.iptables import names
from kubeproxy.model.service import Protocol, ServicePortName

SPN = ServicePortName("ns1", "svc1", "p80", Protocol.TCP)


def test_upstream_vectors() -> None:
    assert names.SVC + names.service_hash(SPN) == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert names.endpoint_chain(SPN, "10.180.0.1", 80) == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert names.endpoint_chain(SPN, "10.180.0.2", 80) == "KUBE-SEP-LXVODXWDISEETFEF"


def test_names_fit_iptables_and_differ_by_protocol_and_port_name() -> None:
    long = ServicePortName("n" * 63, "s" * 63, "p" * 15, Protocol.SCTP)
    for name in (names.SVC + names.service_hash(long), names.endpoint_chain(long, "fd00::1", 65535)):
        assert len(name) <= 28  # iptables' chain-name limit
    udp = ServicePortName("ns1", "svc1", "p80", Protocol.UDP)
    unnamed = ServicePortName("ns1", "svc1", "", Protocol.TCP)
    assert len({names.service_hash(s) for s in (SPN, udp, unnamed)}) == 3
    assert names.endpoint_text("fd00::1", 80) == "[fd00::1]:80"
