"""The proxy modes under test, behind one face: options class, pure render, tracer.

The packet-flow tables (tests/flows.py) run through every mode listed here, with the tracer and in
the lab; a flow's expected answer in a mode is ``flows.expected(flow, mode.name)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubeproxy.backends.iptables import tracer as ipt_tracer
from kubeproxy.backends.iptables.backend import IptablesBackend
from kubeproxy.backends.iptables.render import IptOptions
from kubeproxy.backends.nftables import tracer as nft_tracer
from kubeproxy.backends.nftables.backend import NftablesBackend
from kubeproxy.backends.nftables.render import NftOptions
from kubeproxy.backends.trace import Packet, TraceResult
from kubeproxy.kernel.iptables import IptablesCli, IptablesMode
from kubeproxy.kernel.nft import NftCli
from kubeproxy.state.snapshot import ProxyState
from kubeproxy.tools.render import render_state


@dataclass(frozen=True)
class Mode:
    name: str
    options: type[NftOptions] | type[IptOptions]

    def render(self, state: ProxyState, opts: Any, interface_addresses: Sequence[str] = ()) -> Any:
        return render_state(state, opts, interface_addresses)

    def trace(self, ruleset: Any, packet: Packet, node_ips: Sequence[str]) -> TraceResult:
        if self.name == "iptables":
            return ipt_tracer.trace(ruleset, packet, node_ips)
        return nft_tracer.trace(ruleset, packet, node_ips)

    def backend(self, netns: str, opts: Any, **kwargs: Any) -> NftablesBackend | IptablesBackend:
        """The mode's real backend programming namespace ``netns`` (iptables: the nft backend)."""
        if self.name == "iptables":
            return IptablesBackend(IptablesCli(IptablesMode.NFT, netns=netns), opts, **kwargs)
        return NftablesBackend(NftCli(netns=netns), opts, **kwargs)


NFTABLES = Mode("nftables", NftOptions)
IPTABLES = Mode("iptables", IptOptions)
MODES = [NFTABLES, IPTABLES]
