"""nftables-specific option checks; the option rows themselves run through every mode's tracer in
tests/test_flow_tables.py and with real packets in tests/lab/test_nftables_options_lab.py."""

from __future__ import annotations

import pytest

from builders import state_with
from flows import variant_objects
from kubeproxy.backends.nftables.render import NftOptions, nodeport_addresses
from kubeproxy.backends.nftables.tracer import Packet, TraceError, trace
from kubeproxy.model.service import IPFamily
from kubeproxy.tools.render import render_state


def test_interface_detection_needs_the_input_interface() -> None:
    rs = render_state(state_with(*variant_objects("BridgeInterface", IPFamily.V4)), NftOptions(local_interface="cbr0"))
    with pytest.raises(TraceError, match="interface"):
        trace(rs, Packet("10.244.1.100", "tcp", "10.96.0.20", 80), ["192.168.50.1"])


@pytest.mark.parametrize(
    ("spec", "family", "expected"),
    [
        ((), IPFamily.V4, ("192.168.50.1",)),  # nftables' default: primary
        (("primary",), IPFamily.V6, ("fd00:50::1",)),
        (("10.0.0.0/8",), IPFamily.V4, ("10.1.2.3",)),
        (("10.0.0.0/8",), IPFamily.V6, ()),  # no IPv6 CIDR given: every IPv6 address (match-all rule)
        (("127.0.0.0/8", "10.0.0.0/8"), IPFamily.V4, ("10.1.2.3",)),  # loopback never
        (("all",), IPFamily.V4, ()),
        (("primary", "10.0.0.0/8"), IPFamily.V4, ("192.168.50.1", "10.1.2.3")),
    ],
)
def test_nodeport_addresses(spec: tuple[str, ...], family: IPFamily, expected: tuple[str, ...]) -> None:
    opts = NftOptions(family=family, nodeport_addresses=spec)
    node = ["192.168.50.1", "fd00:50::1"]
    interfaces = ["127.0.0.1", "192.168.50.1", "10.1.2.3", "::1", "fd00:50::1"]
    assert nodeport_addresses(node, opts, interfaces) == expected
    assert opts.nodeport_match_all is (not expected and "localhost" not in spec)
