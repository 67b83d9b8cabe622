"""Chain names match upstream's hashAndTruncate vectors (reference/upstream.md section 4.4)."""

from kubeproxy.backends.nftables import names
from kubeproxy.model.service import Protocol, ServicePortName


def test_upstream_vectors() -> None:
    spn = ServicePortName("ns1", "svc1", "p80", Protocol.TCP)
    assert names.service_base(spn) == "ULMVA6XW-ns1/svc1/tcp/p80"
    assert names.endpoint_base(spn, "10.180.0.1", 80).startswith("5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80")


def test_long_names_are_truncated_within_nft_limits() -> None:
    spn = ServicePortName("n" * 63, "s" * 253, "p" * 15, Protocol.UDP)
    base = names.service_base(spn)
    assert len(base) == 240 and base.endswith("...")
    assert base != names.service_base(ServicePortName("n" * 63, "s" * 252 + "t", "p" * 15, Protocol.UDP))


def test_service_chains_are_recognised_by_slash() -> None:
    assert names.is_service_chain("service-ULMVA6XW-ns1/svc1/tcp/p80")
    assert not names.is_service_chain("services")
