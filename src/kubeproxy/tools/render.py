"""``kube-proxy render``: the ruleset the proxy would program for a manifest directory.

A dry run: reads the manifests exactly as the daemon does, renders with the same pure renderer as
the backend of ``--proxy-mode`` (nftables: an nft script; iptables: iptables-save text), prints the
canonical text (``--family ip|ip6``). Touches no kernel state.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import overload

from kubeproxy.backends.iptables import render as ipt_render
from kubeproxy.backends.iptables.render import IptOptions, IptRuleset
from kubeproxy.backends.nftables.render import NftOptions, Ruleset, render_all
from kubeproxy.config import parse_cluster_cidrs
from kubeproxy.model import objects
from kubeproxy.model.service import IPFamily, NamespacedName, family_of
from kubeproxy.sources.manifests import ManifestDirectory
from kubeproxy.state.snapshot import ProxyState


def state_from_manifests(root: Path, node_name: str) -> ProxyState:
    state = ProxyState(node_name=node_name)
    for (kind, ns, name), obj in ManifestDirectory(root).scan().items():
        if kind == "Service" and isinstance(obj, objects.Service):
            state.on_service(NamespacedName(ns, name), obj)
        elif kind == "EndpointSlice" and isinstance(obj, objects.EndpointSlice):
            state.on_endpoint_slice((ns, name), obj)
        elif kind == "Node" and isinstance(obj, objects.Node) and name == node_name:
            state.on_node(obj)
    state.services_synced = state.slices_synced = True
    state.commit()
    return state


@overload
def render_state(state: ProxyState, opts: NftOptions, interface_addresses: Sequence[str] = ()) -> Ruleset: ...
@overload
def render_state(state: ProxyState, opts: IptOptions, interface_addresses: Sequence[str] = ()) -> IptRuleset: ...
def render_state(
    state: ProxyState, opts: NftOptions | IptOptions, interface_addresses: Sequence[str] = ()
) -> Ruleset | IptRuleset:
    """The rules the backend of ``opts``' mode would program for ``state`` (``interface_addresses``: the
    node's local addresses, which nodePortAddresses CIDRs select from)."""
    node = state.node
    if isinstance(opts, IptOptions):
        ipt_opts = opts.for_node(node.pod_cidrs)
        args = (state.services, state.service_endpoints, ipt_opts, node.topology, node.addresses)
        return ipt_render.render_all(*args, interface_addresses=interface_addresses)
    nft_opts = opts.for_node(node.pod_cidrs)
    return render_all(
        state.services, state.service_endpoints, nft_opts, node.topology, node.addresses,
        interface_addresses=interface_addresses,
    )  # fmt: skip


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="kube-proxy render", allow_abbrev=False)
    p.add_argument("--manifests", type=Path, required=True)
    p.add_argument("--hostname-override", required=True)
    p.add_argument("--cluster-cidr", default="")
    p.add_argument("--family", choices=["ip", "ip6"], default="ip")
    p.add_argument("--masquerade-all", action="store_true")
    p.add_argument("--proxy-mode", choices=["nftables", "iptables"], default="nftables")
    args = p.parse_args(list(argv))
    family = IPFamily.V4 if args.family == "ip" else IPFamily.V6
    cidrs = tuple(c for c in parse_cluster_cidrs(args.cluster_cidr) if family_of(c.split("/")[0]) is family)
    cls = IptOptions if args.proxy_mode == "iptables" else NftOptions
    opts = cls(family=family, cluster_cidrs=cidrs, masquerade_all=args.masquerade_all)
    sys.stdout.write(render_state(state_from_manifests(args.manifests, args.hostname_override.lower()), opts).text())
    return 0
