"""Local interface addresses (what ``nodePortAddresses`` CIDRs select from), read with ``ip -j addr``.

``LocalAddresses`` is a callable returning every address configured on any interface of the
namespace (``netns`` set: that lab namespace, via ``ip -n``), loopback included; callers filter.
Failures raise ``NetifError`` (a ``KernelError``).
"""

from __future__ import annotations

import json
import subprocess

from kubeproxy.kernel.binaries import path_of
from kubeproxy.kernel.errors import KernelError


class NetifError(KernelError):
    pass


class LocalAddresses:
    def __init__(self, *, netns: str | None = None, timeout: float = 30) -> None:
        self._argv = [path_of("ip"), *(["-n", netns] if netns else []), "-j", "addr", "show"]
        self._timeout = timeout

    def __call__(self) -> list[str]:
        try:
            proc = subprocess.run(self._argv, capture_output=True, text=True, timeout=self._timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NetifError(f"cannot run {' '.join(self._argv)}: {exc}") from exc
        if proc.returncode != 0:
            raise NetifError(f"{' '.join(self._argv)} failed (exit {proc.returncode}): {proc.stderr.strip()[:2000]}")
        try:
            links = json.loads(proc.stdout or "[]")
        except ValueError as exc:
            raise NetifError(f"ip -j addr printed invalid JSON: {exc}") from exc
        out: list[str] = []
        for link in links:
            for info in link.get("addr_info", []):
                local = info.get("local")
                if isinstance(local, str) and info.get("scope") != "link" and local not in out:
                    out.append(local)
        return out
