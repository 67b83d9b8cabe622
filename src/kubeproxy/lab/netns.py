"""Low-level network-namespace plumbing for the lab: run commands and Python code inside a namespace.

Job: the only place in the lab that enters a namespace. Commands go through ``ip netns exec NS``;
Python code goes through :func:`call_in_netns`, which moves one fresh thread (never the caller's
thread, never the process) into the namespace with ``setns(2)``.

Invariants:
- Nothing here creates addresses, routes, links or sysctls; this module only runs what callers ask.
- :func:`call_in_netns` runs the callable only after it has verified that the thread really is in
  the requested namespace (same nsfs inode), so a failed ``setns`` can never make lab code act on the
  host's namespace.
- Every failure of a command we run surfaces as :class:`LabError` naming the command and its stderr.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kubeproxy.kernel.netns import NETNS_RUN_DIR, NetnsError, netns_path, run_in_netns

__all__ = [
    "NETNS_RUN_DIR",
    "LabError",
    "call_in_netns",
    "ip_binary",
    "lab_unavailable_reason",
    "netns_exists",
    "run",
]

T = TypeVar("T")

# Prefix of the throw-away namespace lab_unavailable_reason() creates; distinct from the "kpl-" lab
# prefix so a probe can never be mistaken for a lab namespace.
PROBE_PREFIX = "kplprobe-"


class LabError(Exception):
    """The lab could not do what was asked (a command failed, a namespace is missing, ...)."""


def ip_binary() -> str:
    """Path of the iproute2 ``ip`` binary, also when /usr/sbin is not on PATH (common for non-login root)."""
    found = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise LabError("the lab needs the iproute2 'ip' binary, which is not installed")
    return found


def _resolve(argv: list[str]) -> list[str]:
    # `ip` may live in /usr/sbin, which a sudo-less or cron PATH lacks; resolve it so callers can say "ip".
    if argv and argv[0] == "ip":
        return [ip_binary(), *argv[1:]]
    return argv


def run(
    argv: list[str],
    *,
    netns: str | None = None,
    input: str | None = None,
    check: bool = True,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (inside ``ip netns exec NETNS`` when ``netns`` is given) and capture its output.

    Raises :class:`LabError` when the program is missing, times out, or (with ``check``) exits non-zero.
    """
    full = _resolve(argv)
    if netns is not None:
        full = [ip_binary(), "netns", "exec", netns, *full]
    where = f" in netns {netns}" if netns is not None else ""
    try:
        proc = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise LabError(f"cannot run {shlex.join(argv)}{where}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{shlex.join(argv)}{where} timed out after {timeout:g} s") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"{shlex.join(argv)}{where} failed with exit code {proc.returncode}: {detail}")
    return proc


def netns_exists(netns: str) -> bool:
    """True when a named namespace ``netns`` exists (as created by ``ip netns add``)."""
    return _netns_path(netns).exists()


def _netns_path(netns: str) -> Path:
    try:
        return netns_path(netns)
    except NetnsError as exc:
        raise LabError(str(exc)) from exc


def call_in_netns(netns: str, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a fresh thread that has first joined network namespace ``netns``.

    Sockets created by ``fn`` live in that namespace (a socket keeps the namespace it was created in).
    Returns ``fn``'s result or re-raises its exception in the caller's thread; a namespace that cannot
    be entered is a ``LabError``.
    """
    _netns_path(netns)
    entered = False

    def inside() -> T:
        nonlocal entered
        entered = True
        return fn(*args)

    try:
        return run_in_netns(netns, inside)
    except NetnsError as exc:
        if entered:
            raise  # fn's own error
        raise LabError(str(exc)) from exc


def lab_unavailable_reason() -> str | None:
    """None when this process can build labs; otherwise one sentence saying why not."""
    euid = os.geteuid()
    if euid != 0:
        return f"the lab needs root to create network namespaces (running as uid {euid})"
    try:
        ip_binary()
    except LabError as exc:
        return str(exc)
    # Prove that `ip netns add` works here (it needs CAP_SYS_ADMIN and a writable /run/netns): a
    # container may run us as uid 0 without those.
    name = f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    try:
        run(["ip", "netns", "add", name], timeout=10)
    except LabError as exc:
        return f"the lab cannot create network namespaces here: {exc}"
    try:
        run(["ip", "netns", "delete", name], timeout=10)
    except LabError as exc:
        return f"the lab cannot delete network namespaces here: {exc}"
    return None
