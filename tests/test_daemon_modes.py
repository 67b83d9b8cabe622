"""The daemon in iptables mode and across modes, with fake kernels: backends per mode, metrics per
mode, the other mode's leftovers removed, ``--cleanup`` of every mode."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from builders import endpoint_slice, node, service
from kubeproxy import daemon
from kubeproxy.backends.iptables.backend import IptablesBackend
from kubeproxy.backends.iptables.render import CANARY
from kubeproxy.config import ConfigError, ProxyConfig, ProxyMode
from kubeproxy.daemon import Proxy, build_backends, remove_other_modes
from kubeproxy.kernel.iptables import FakeIptables
from kubeproxy.kernel.nft import FakeNft
from kubeproxy.model.service import IPFamily
from kubeproxy.sources.events import Change, ChangeType, ObjectKey

V4, V6 = IPFamily.V4, IPFamily.V6


def cfg(mode: ProxyMode) -> ProxyConfig:
    return ProxyConfig(mode=mode, manifests=Path(), hostname_override="node1", cluster_cidrs=("10.244.0.0/16",))


def feed(proxy: Proxy) -> None:
    for kind, name, obj in (
        ("Node", "node1", node()),
        ("Service", "svc1", service("svc1", "10.96.0.10")),
        ("EndpointSlice", "s1", endpoint_slice("s1", "svc1", ["10.244.1.2"])),
    ):
        ns = "" if kind == "Node" else "ns1"
        proxy.on_change(Change(ChangeType.ADDED, ObjectKey(kind, ns, name), None, obj))  # type: ignore[arg-type]
    proxy.on_synced()


def test_iptables_mode_programs_both_families_and_exports_its_metrics() -> None:
    ipt = FakeIptables()
    config = cfg(ProxyMode.IPTABLES)
    proxy = Proxy(config, build_backends(config, iptables=ipt))
    assert all(isinstance(b, IptablesBackend) for b in proxy.backends)
    feed(proxy)
    asyncio.run(proxy.sync())
    assert any(c.startswith("KUBE-SVC-") for c in ipt.chains(V4, "nat"))
    assert CANARY in ipt.chains(V6, "mangle")
    text = proxy.metrics.exposition()[0].decode()
    assert 'kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"}' in text
    assert "nftables_sync_failures_total" not in text


def test_iptables_mode_needs_its_adapter_and_ipvs_is_refused() -> None:
    with pytest.raises(ConfigError, match="iptables adapter"):
        build_backends(cfg(ProxyMode.IPTABLES), FakeNft())
    with pytest.raises(ConfigError, match="not implemented"):
        build_backends(cfg(ProxyMode.IPVS), FakeNft())


def programmed_both() -> tuple[FakeNft, FakeIptables]:
    nft, ipt = FakeNft(), FakeIptables()
    for mode, kwargs in ((ProxyMode.NFTABLES, {"nft": nft}), (ProxyMode.IPTABLES, {"iptables": ipt})):
        config = cfg(mode)
        proxy = Proxy(config, build_backends(config, **kwargs))  # type: ignore[arg-type]
        feed(proxy)
        asyncio.run(proxy.sync())
    return nft, ipt


def test_nftables_mode_removes_the_iptables_layout() -> None:
    nft, ipt = programmed_both()
    remove_other_modes(cfg(ProxyMode.NFTABLES), nft=nft, iptables=[ipt])
    for family in (V4, V6):
        left = {c for t in ("filter", "nat", "mangle") for c in ipt.chains(family, t) if c.startswith("KUBE-")}
        assert left <= {"KUBE-FIREWALL", "KUBE-MARK-MASQ"}  # shared with kubelet: never deleted (upstream)
    assert ("ip", "kube-proxy") in nft.tables  # its own table stays


def test_iptables_mode_removes_the_nftables_tables() -> None:
    nft, ipt = programmed_both()
    remove_other_modes(cfg(ProxyMode.IPTABLES), nft=nft, iptables=[])
    assert nft.tables == {}
    assert any(c.startswith("KUBE-SVC-") for c in ipt.chains(V4, "nat"))


def test_cleanup_removes_every_modes_rules() -> None:
    nft, ipt = programmed_both()
    assert daemon.cleanup(nft, [ipt]) == 0
    assert nft.tables == {}
    left = {c for t in ("filter", "nat") for c in ipt.chains(V4, t) if c.startswith("KUBE-")}
    assert left <= {"KUBE-FIREWALL", "KUBE-MARK-MASQ"}


def test_a_failing_leftover_cleanup_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    _nft, ipt = programmed_both()
    ipt.fail_next = "simulated refusal"
    remove_other_modes(cfg(ProxyMode.NFTABLES), nft=None, iptables=[ipt])
    assert "cannot remove iptables leftovers" in caplog.text


def test_the_running_daemon_in_iptables_mode_and_its_switch_from_nftables() -> None:
    from kubeproxy.lab.apiserver import FakeApiServer
    from test_daemon import _api_objects
    from waiting import eventually

    with FakeApiServer() as server:
        _api_objects(server)
        nft, ipt = programmed_both()

        async def scenario() -> None:
            stop = asyncio.Event()
            config = ProxyConfig(
                mode=ProxyMode.IPTABLES, master=server.url, hostname_override="node1", min_sync_period=0.01
            )
            task = asyncio.create_task(daemon.run(config, nft=nft, iptables=ipt, stop=stop))
            # Programmed from the API server, then the nftables mode's tables are removed.
            await eventually(lambda: "10.244.1.2" in ipt.dump(V4) and nft.tables == {})
            stop.set()
            assert await task == 0

        asyncio.run(scenario())


def test_a_bad_iptables_backend_override_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubeproxy.cli import main

    # The override is checked before anything runs: nothing on this host is read or written.
    monkeypatch.setenv("KUBE_PROXY_IPTABLES_MODE", "bogus")
    assert main(["--proxy-mode=iptables", f"--manifests={tmp_path}", "--hostname-override=node1"]) == 2
    assert "invalid configuration: iptables mode: KUBE_PROXY_IPTABLES_MODE='bogus'" in capsys.readouterr().err
