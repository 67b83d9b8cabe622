"""Logging: klog's header, one line per event with key=value details, and verbosity levels that
match upstream's use (--v=0 startup and problems, --v=2 sync summaries, --v=4 debug, --v=6 the
applied transaction)."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from builders import endpoint_slice, service
from kubeproxy.config import ProxyConfig
from kubeproxy.daemon import Proxy, build_backends
from kubeproxy.kernel.nft import FakeNft
from kubeproxy.observe import logging as klog
from kubeproxy.sources.events import Change, ChangeType, ObjectKey

HEADER = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+\] ")


@pytest.fixture(autouse=True)
def _restore_root_logger() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)


def one_sync(verbosity: int) -> None:
    klog.setup(verbosity)
    cfg = ProxyConfig(hostname_override="node1")
    proxy = Proxy(cfg, build_backends(cfg, FakeNft()))
    proxy.on_change(Change(ChangeType.ADDED, ObjectKey("Service", "ns1", "web"), None, service("web", "10.96.0.10")))
    slice_ = endpoint_slice("web-1", "web", ["10.244.1.2"])
    proxy.on_change(Change(ChangeType.ADDED, ObjectKey("EndpointSlice", "ns1", "web-1"), None, slice_))
    proxy.on_synced()
    asyncio.run(proxy.sync())


def test_default_verbosity_is_quiet_about_routine_syncs(capsys: pytest.CaptureFixture[str]) -> None:
    one_sync(0)
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(HEADER.match(line) for line in lines), lines
    assert not any("] synced " in line or "transaction" in line for line in lines)


def test_v2_logs_one_klog_line_per_sync_and_family(capsys: pytest.CaptureFixture[str]) -> None:
    one_sync(2)
    lines = capsys.readouterr().err.splitlines()
    assert all(HEADER.match(line) for line in lines), lines
    synced = [line for line in lines if "] synced " in line]
    assert len(synced) == 2  # one per family
    assert synced[0].startswith("I")
    assert re.search(r"synced family=ip full=True services=\d+ commands=\d+ elapsed=\d", synced[0])
    assert not any("transaction" in line for line in lines)


def test_v6_also_logs_the_applied_transaction(capsys: pytest.CaptureFixture[str]) -> None:
    one_sync(6)
    err = capsys.readouterr().err
    assert "applying nftables transaction family=ip " in err
    text = err.split("transaction:\n", 1)[1]
    assert text.startswith("add table ip kube-proxy") and "10.244.1.2" in text


def test_v4_is_debug_without_transactions(capsys: pytest.CaptureFixture[str]) -> None:
    one_sync(4)
    err = capsys.readouterr().err
    assert "applying nftables transaction" in err and "transaction:\n" not in err
