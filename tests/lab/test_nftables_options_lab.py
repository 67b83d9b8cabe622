"""Proxy options with real packets: local-traffic detection modes (NodeCIDR, BridgeInterface,
InterfaceNamePrefix; ClusterCIDR is the default table), masqueradeAll and nodePortAddresses, in
both families. The same rows run through the tracer in tests/test_nftables_options.py."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from builders import state_with
from flowlab import check_flow, flow_lab
from flows import ALL_OPTION_FLOWS, Flow, variant_objects, variant_options
from kubeproxy.backends.nftables.backend import NftablesBackend
from kubeproxy.kernel.netif import LocalAddresses
from kubeproxy.kernel.nft import NftCli
from kubeproxy.lab.cluster import Lab
from kubeproxy.lab.netns import lab_unavailable_reason

_REASON = lab_unavailable_reason()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with flow_lab(f"opt{os.getpid() % 100000}") as built:
        yield built


@pytest.mark.parametrize("flow", [f for f in ALL_OPTION_FLOWS if f.lab], ids=lambda f: f.id)
def test_option_flows_with_real_packets(lab: Lab, flow: Flow) -> None:
    backend = NftablesBackend(
        NftCli(netns=lab.node_ns),
        variant_options(flow.variant, flow.family),
        interface_addresses=LocalAddresses(netns=lab.node_ns),
    )
    try:
        backend.sync(state_with(*variant_objects(flow.variant, flow.family)), set(), full=True)
        check_flow(lab, flow)
    finally:
        backend.cleanup()
