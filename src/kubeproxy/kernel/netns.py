"""Run Python code inside a named network namespace: the one place that calls ``setns(2)``.

``run_in_netns`` moves one fresh thread (never the caller's thread, never the process) into the
namespace and runs the callable only after verifying that the thread really is there (same nsfs
inode), so a failed ``setns`` can never make code act on the host's namespace. A thread that has
switched namespaces is never reused. Sockets created inside keep that namespace.

Used by the lab (``kubeproxy.lab.netns.call_in_netns``) and by kernel adapters that must read or
write per-namespace state (sysctls).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kubeproxy.kernel.errors import KernelError

T = TypeVar("T")

# Where `ip netns add` bind-mounts named namespaces (iproute2's NETNS_RUN_DIR).
NETNS_RUN_DIR = Path("/run/netns")

# From <sched.h>; the ctypes route is needed because Python 3.11 has no os.setns (added in 3.12).
_CLONE_NEWNET = 0x40000000


class NetnsError(KernelError):
    """The namespace could not be entered (bad name, missing, setns refused); ``errno`` when known."""

    def __init__(self, message: str, *, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


def netns_path(netns: str) -> Path:
    # A name with a slash or a dot-only name would escape /run/netns; refuse it rather than open it.
    if not netns or "/" in netns or netns in {".", ".."}:
        raise NetnsError(f"invalid network namespace name {netns!r}")
    return NETNS_RUN_DIR / netns


@functools.cache
def _libc() -> ctypes.CDLL:
    # Loaded lazily, once: importing this module must not need libc symbols.
    return ctypes.CDLL(None, use_errno=True)


def run_in_netns(netns: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a new thread that has joined ``netns``; its result, or its exception re-raised.

    Failing to enter the namespace raises ``NetnsError``; whatever ``fn`` raises passes through.
    """
    try:
        fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(f"network namespace {netns!r} is not available: {exc.strerror}", errno_=exc.errno) from exc

    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            if int(_libc().setns(fd, _CLONE_NEWNET)) != 0:
                err = ctypes.get_errno()
                raise NetnsError(f"setns({netns}) failed: {os.strerror(err)}", errno_=err)
            # The network namespace is per thread on Linux: check that THIS thread moved.
            want, have = os.fstat(fd), Path("/proc/thread-self/ns/net").stat()
            if (have.st_dev, have.st_ino) != (want.st_dev, want.st_ino):
                raise NetnsError(f"thread did not enter network namespace {netns!r}")
            result.append(fn(*args))
        except BaseException as exc:  # re-raised in the caller's thread below
            failure.append(exc)

    try:
        thread = threading.Thread(target=target, name=f"netns:{netns}", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    if failure:
        raise failure[0]
    return result[0]
