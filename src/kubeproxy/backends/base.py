"""What the daemon needs from any backend (one instance per IP family).

``sync`` programs the kernel from the state (a full sync rewrites everything ours, a partial one
only the changed Services) and raises ``KernelError`` when the kernel refused; ``present`` says
whether our rules are still there (someone may flush them); ``cleanup`` removes everything the
backend ever installed (``--cleanup``, mode switches).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

from kubeproxy.backends.options import ProxyOptions
from kubeproxy.model.service import NamespacedName
from kubeproxy.state.snapshot import ProxyState


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    full: bool
    commands: int
    services_rendered: int
    followup_after: float | None  # ask the runner for another sync after this many seconds
    # iptables mode's metrics (upstream's sync_proxy_rules_iptables_total / _last): table -> our rules
    # in the kernel after this sync, and rules this sync wrote. None for modes without them.
    rules_total: Mapping[str, int] | None = None
    rules_written: Mapping[str, int] | None = None


class Backend(Protocol):
    @property
    def opts(self) -> ProxyOptions: ...

    @property
    def family(self) -> str:
        """Family label for logs: ``ip`` / ``ip6``."""
        ...

    def sync(self, state: ProxyState, changed: Collection[NamespacedName], *, full: bool) -> SyncOutcome: ...

    def present(self) -> bool:
        """Are our rules still in the kernel? (cheap: called every syncPeriod)"""
        ...

    def cleanup(self) -> bool:
        """Remove everything this backend installed; True if there was something."""
        ...
