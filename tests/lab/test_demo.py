"""``make demo`` runs in CI too: the table it prints must show the behaviours it claims."""

from __future__ import annotations

import re

import pytest

from kubeproxy.lab import demo
from kubeproxy.lab.netns import lab_unavailable_reason, run

_REASON = lab_unavailable_reason()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def test_demo_shows_spread_nodeport_refusal_and_follows_the_change(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main([]) == 0
    out = capsys.readouterr().out
    before, after = out.split("== scaling demo/web")
    assert re.search(r"web-1\s+\d+/40", before) and re.search(r"web-2\s+\d+/40", before)
    assert re.search(r"shop-1\s+\d+/40", before) and re.search(r"shop-2\s+\d+/40", before)
    assert re.search(r"REFUSED\s+5/5", before)
    assert "web-1" not in after.split("== where to look")[0].split("traffic followed")[1]
    assert re.search(r"web-3\s+\d+/40", after)
    assert "nft list table ip kube-proxy" in out
    assert not [ns for ns in run(["ip", "netns", "list"]).stdout.split() if ns.startswith("kpl-demo")]
