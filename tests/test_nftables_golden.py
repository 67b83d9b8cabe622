"""Golden test: the whole rendered table for the basic scenario, compared line by line.

Regenerate after an intended change with ``KUBEPROXY_UPDATE_GOLDEN=1 pytest tests/test_nftables_golden.py``
and review the diff like code.
"""

from __future__ import annotations

import os
from pathlib import Path

from builders import CLUSTER_CIDR, state_with
from flows import basic_objects
from kubeproxy.backends.nftables.render import NftOptions
from kubeproxy.kernel.nft import FakeNft
from kubeproxy.tools.render import render_state

GOLDEN = Path(__file__).parent / "golden" / "nftables-basic.nft"


def test_basic_ruleset_matches_golden() -> None:
    text = render_state(state_with(*basic_objects()), NftOptions(cluster_cidrs=(CLUSTER_CIDR,))).text()
    if os.environ.get("KUBEPROXY_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text.splitlines() == GOLDEN.read_text().splitlines()


def test_golden_text_is_a_valid_transaction_for_the_fake_kernel() -> None:
    # The canonical text is itself a loadable transaction (the real-kernel load is a lab test).
    nft = FakeNft()
    nft.run(GOLDEN.read_text())
    assert nft.list_table("ip", "kube-proxy") is not None
