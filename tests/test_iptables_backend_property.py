"""Random sequences of states through partial syncs: the fake kernel always holds exactly what the
pure renderer says, and the backend's rule counts match it (states from the equivalence test)."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_backend_equivalence as eq
from builders import state_with
from flows import FAMILIES, node_addresses, to_family
from kubeproxy.backends.iptables.backend import IptablesBackend
from kubeproxy.kernel.iptables import FakeIptables
from kubeproxy.model.service import IPFamily, NamespacedName
from kubeproxy.state.snapshot import ProxyState
from test_iptables_backend import kernel_matches_render


def _apply(state: ProxyState, old: tuple[Any, ...], new: tuple[Any, ...]) -> None:
    def key(o: Any) -> tuple[str, str, str]:
        return (type(o).__name__, o.metadata.namespace, o.metadata.name)

    before, after = {key(o): o for o in old}, {key(o): o for o in new}
    for k in before.keys() | after.keys():
        kind, ns, name = k
        if before.get(k) == after.get(k):
            continue
        if kind == "Service":
            state.on_service(NamespacedName(ns, name), after.get(k))
        elif kind == "EndpointSlice":
            state.on_endpoint_slice((ns, name), after.get(k))


def _check(ipt: FakeIptables, state: ProxyState, opts: Any, local: list[str], be: IptablesBackend) -> None:
    kernel_matches_render(ipt, state, opts, local)
    in_kernel = {t: sum(len(r) for r in ipt.chains(opts.family, t).values()) for t in ("filter", "nat")}
    assert be.rule_counts == in_kernel


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    family=st.sampled_from(FAMILIES),
    steps=st.lists(eq.scenarios(), min_size=2, max_size=4),
    variant=st.sampled_from([eq.DEFAULT, *sorted(eq.OPTION_VARIANTS)]),
)
def test_partial_syncs_keep_the_kernel_equal_to_the_renderer(family: IPFamily, steps: list[Any], variant: str) -> None:
    opts = eq.options(eq.IPTABLES, variant, family)
    local = node_addresses(family)
    ipt = FakeIptables()
    be = IptablesBackend(ipt, opts, interface_addresses=lambda: local)
    states = [tuple(to_family(o, family) for o in s.objects) for s in steps]
    state = state_with(to_family(eq.the_node(variant), family), *states[0])
    be.sync(state, set(), full=True)
    _check(ipt, state, opts, local, be)
    for before, after in itertools.pairwise(states):
        _apply(state, before, after)
        assert not be.sync(state, state.commit().changed, full=False).full
        _check(ipt, state, opts, local, be)
