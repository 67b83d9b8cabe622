"""The packet-flow tables through every mode's tracer: the same rows, the same answers.

``BASIC_FLOWS`` (the default options) and ``OPTION_FLOWS`` (local-traffic detection, masqueradeAll,
nodePortAddresses) are rendered by each mode's pure renderer and interpreted rule by rule by its
tracer, in both families. Where upstream's modes differ on purpose a row says so
(``Flow.iptables``); every other row must give the same answer everywhere. The same rows run with
real packets in tests/lab/test_nftables_lab.py and tests/lab/test_iptables_lab.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from builders import CLUSTER_CIDR, state_with
from flows import (
    ALL_FLOWS,
    ALL_OPTION_FLOWS,
    NODE_IP,
    Flow,
    addr,
    expected,
    iif_of,
    node_addresses,
    objects_for,
    variant_objects,
    variant_options,
)
from kubeproxy.backends.trace import Packet
from kubeproxy.model.service import IPFamily
from modes import MODES, Mode

_RULESETS: dict[tuple[str, IPFamily], Any] = {}


def basic_ruleset(mode: Mode, family: IPFamily) -> Any:
    if (mode.name, family) not in _RULESETS:
        opts = mode.options(family=family, cluster_cidrs=(addr(CLUSTER_CIDR, family),))
        _RULESETS[(mode.name, family)] = mode.render(state_with(*objects_for(family)), opts)
    return _RULESETS[(mode.name, family)]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("flow", ALL_FLOWS, ids=lambda f: f.id)
def test_flows(mode: Mode, flow: Flow) -> None:
    node_ip = addr(NODE_IP, flow.family)
    packet = Packet(flow.source, flow.protocol, flow.destination, flow.port)
    result = mode.trace(basic_ruleset(mode, flow.family), packet, [node_ip])
    assert (result.output, result.masquerade) == expected(flow, mode.name), result.matched


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("flow", ALL_OPTION_FLOWS, ids=lambda f: f.id)
def test_option_flows(mode: Mode, flow: Flow) -> None:
    state = state_with(*variant_objects(flow.variant, flow.family))
    local = node_addresses(flow.family)
    rs = mode.render(state, variant_options(flow.variant, flow.family, mode.options), local)
    packet = Packet(flow.source, flow.protocol, flow.destination, flow.port, iif=iif_of(flow))
    result = mode.trace(rs, packet, local)
    assert (result.output, result.masquerade) == expected(flow, mode.name), result.matched


def test_deliberate_differences_are_few_and_named() -> None:
    # Guards against papering over a real bug with a per-mode expectation.
    differing = {f.name for f in [*ALL_FLOWS, *ALL_OPTION_FLOWS] if f.iptables is not None}
    assert differing == {
        "pod to ClusterIP on an undefined port",
        "pod to ClusterIP over UDP (TCP-only Service)",
        "node to NodePort on loopback",
    }
