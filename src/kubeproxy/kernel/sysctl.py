"""Sysctl kernel boundary: read and write /proc/sys keys (and the conntrack hash size module parameter).

``ProcSysctl`` reads and writes the files. Network sysctls are per network namespace and the kernel
resolves them by the namespace of the THREAD that opens the file, so with ``netns`` set every access
runs on a fresh thread that has joined that namespace (``setns(2)``) and has verified it did -- never
the caller's thread, never the host's namespace by accident. ``FakeSysctl`` models a set of keys,
some read-only. Both raise ``SysctlError`` (a ``KernelError``) carrying the errno.

Names are /proc/sys paths with slashes (``net/netfilter/nf_conntrack_max``, upstream's spelling);
the one file outside /proc/sys we touch, ``HASHSIZE`` under /sys/module, is named by its absolute path.

What is writable where (kernel 6.18, checked in a fresh namespace): the ``nf_conntrack_*`` timeouts and
``nf_conntrack_tcp_be_liberal`` are per namespace and writable; ``nf_conntrack_max`` is global, and
read-only (EACCES) outside the initial namespace; the hash size can only be changed from the initial
namespace (the kernel answers EOPNOTSUPP elsewhere). ``apply_conntrack_sysctls`` therefore treats a
refused write as a warning, like upstream does for a read-only /sys.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from kubeproxy.kernel.errors import KernelError
from kubeproxy.kernel.netns import NetnsError, run_in_netns

__all__ = [
    "CONNTRACK_MAX",
    "HASHSIZE",
    "ConntrackSettings",
    "FakeSysctl",
    "ProcSysctl",
    "Sysctl",
    "SysctlError",
    "SysctlReport",
    "apply_conntrack_sysctls",
    "desired_conntrack_sysctls",
]

log = logging.getLogger("kubeproxy.sysctl")

T = TypeVar("T")

CONNTRACK_MAX = "net/netfilter/nf_conntrack_max"
HASHSIZE = "/sys/module/nf_conntrack/parameters/hashsize"
_ALLOWED_ROOTS = (Path("/proc/sys"), Path("/sys/module"))
_REFUSED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.EOPNOTSUPP})


class SysctlError(KernelError):
    def __init__(self, message: str, *, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_

    @property
    def refused(self) -> bool:
        """The kernel (or a read-only mount) refused the write: not ours to change here."""
        return self.errno in _REFUSED


class Sysctl(Protocol):
    def get(self, name: str) -> str:
        """The value of ``name`` (stripped)."""

    def set(self, name: str, value: str) -> None:
        """Write ``value`` to ``name``."""


def _in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a new thread that has joined named network namespace ``netns`` (and checked it)."""
    try:
        return run_in_netns(netns, fn)
    except NetnsError as exc:
        raise SysctlError(str(exc), errno_=exc.errno) from exc


class ProcSysctl:
    def __init__(self, *, netns: str | None = None) -> None:
        self.netns = netns

    @staticmethod
    def path(name: str) -> Path:
        path = Path(name) if name.startswith("/") else Path("/proc/sys", name)
        if ".." in path.parts or not any(path.is_relative_to(root) for root in _ALLOWED_ROOTS):
            raise SysctlError(f"{name!r} is not a sysctl or module parameter")
        return path

    def _run(self, fn: Callable[[], T]) -> T:
        return fn() if self.netns is None else _in_netns(self.netns, fn)

    def get(self, name: str) -> str:
        path = self.path(name)
        try:
            return self._run(path.read_text).strip()
        except OSError as exc:
            raise SysctlError(f"cannot read {path}: {exc.strerror}", errno_=exc.errno) from exc

    def set(self, name: str, value: str) -> None:
        path = self.path(name)
        try:
            self._run(lambda: path.write_text(f"{value}\n"))
        except OSError as exc:
            raise SysctlError(f"cannot write {value} to {path}: {exc.strerror}", errno_=exc.errno) from exc


@dataclass
class FakeSysctl:
    values: dict[str, str] = field(default_factory=dict)
    read_only: dict[str, int] = field(default_factory=dict)  # name -> errno a write fails with
    writes: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str:
        try:
            return self.values[name]
        except KeyError:
            raise SysctlError(f"cannot read {name}: No such file or directory", errno_=errno.ENOENT) from None

    def set(self, name: str, value: str) -> None:
        if name in self.read_only:
            err = self.read_only[name]
            raise SysctlError(f"cannot write {value} to {name}: {os.strerror(err)}", errno_=err)
        if name not in self.values:
            raise SysctlError(f"cannot write {name}: No such file or directory", errno_=errno.ENOENT)
        self.values[name] = value
        self.writes.append((name, value))


# --------------------------------------------------------------------------------------------
# Upstream's conntrack tuning (cmd/kube-proxy/app/server_linux.go, pkg/proxy/conntrack/sysctls.go)


class ConntrackSettings(Protocol):
    """What ``config.ConntrackConfig`` carries (structural: the kernel layer does not import config)."""

    @property
    def max_per_core(self) -> int: ...
    @property
    def min(self) -> int: ...
    @property
    def tcp_timeout_established(self) -> float | None: ...
    @property
    def tcp_timeout_close_wait(self) -> float | None: ...
    @property
    def tcp_be_liberal(self) -> bool: ...
    @property
    def udp_timeout(self) -> float: ...
    @property
    def udp_timeout_stream(self) -> float: ...


def desired_conntrack_sysctls(settings: ConntrackSettings, *, cpus: int) -> dict[str, int]:
    """The conntrack sysctls upstream sets, in the order it sets them (pure).

    ``nf_conntrack_max`` = max(maxPerCore x CPUs, min) only when maxPerCore > 0; the TCP timeouts when
    set (> 0); ``tcp_be_liberal`` only when asked for (never reset to 0); UDP timeouts only when > 0.
    """
    out: dict[str, int] = {}
    if settings.max_per_core > 0:
        out[CONNTRACK_MAX] = max(settings.max_per_core * cpus, settings.min)
    if settings.tcp_timeout_established:
        out["net/netfilter/nf_conntrack_tcp_timeout_established"] = int(settings.tcp_timeout_established)
    if settings.tcp_timeout_close_wait:
        out["net/netfilter/nf_conntrack_tcp_timeout_close_wait"] = int(settings.tcp_timeout_close_wait)
    if settings.tcp_be_liberal:
        out["net/netfilter/nf_conntrack_tcp_be_liberal"] = 1
    if settings.udp_timeout > 0:
        out["net/netfilter/nf_conntrack_udp_timeout"] = int(settings.udp_timeout)
    if settings.udp_timeout_stream > 0:
        out["net/netfilter/nf_conntrack_udp_timeout_stream"] = int(settings.udp_timeout_stream)
    return out


@dataclass
class SysctlReport:
    written: dict[str, int] = field(default_factory=dict)  # name -> new value
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> why (logged as a warning)


def _set_if_different(sysctl: Sysctl, name: str, value: int, report: SysctlReport) -> bool:
    """Write ``value`` unless it is there already; True when ``name`` now holds it."""
    try:
        current = sysctl.get(name)
    except SysctlError as exc:
        report.failed[name] = str(exc)
        log.warning("cannot read sysctl name=%s error=%r", name, str(exc))
        return False
    if current.isdigit() and int(current) == value:
        report.unchanged.append(name)
        return True
    try:
        sysctl.set(name, str(value))
    except SysctlError as exc:
        report.failed[name] = str(exc)
        why = "refused (read-only here, e.g. outside the initial network namespace)" if exc.refused else "failed"
        log.warning("setting sysctl %s name=%s value=%d current=%s error=%r", why, name, value, current, str(exc))
        return False
    report.written[name] = value
    log.info("set sysctl name=%s value=%d previous=%s", name, value, current)
    return True


def apply_conntrack_sysctls(sysctl: Sysctl, settings: ConntrackSettings, *, cpus: int | None = None) -> SysctlReport:
    """Apply upstream's conntrack sysctls; a value the kernel refuses is a warning, never fatal."""
    report = SysctlReport()
    desired = desired_conntrack_sysctls(settings, cpus=cpus or _usable_cpus())
    for name, value in desired.items():
        if not _set_if_different(sysctl, name, value, report) or name != CONNTRACK_MAX:
            continue
        # The hash table should hold max/4 buckets. The kernel only lets the initial namespace
        # resize it, so check before writing: usually it is big enough and nothing is written.
        want = value // 4
        try:
            hashsize = int(sysctl.get(HASHSIZE))
        except (SysctlError, ValueError) as exc:
            report.failed[HASHSIZE] = str(exc)
            log.warning("cannot read conntrack hashsize path=%s error=%r", HASHSIZE, str(exc))
            continue
        if hashsize >= want:
            report.unchanged.append(HASHSIZE)
            continue
        try:
            sysctl.set(HASHSIZE, str(want))
        except SysctlError as exc:
            report.failed[HASHSIZE] = str(exc)
            log.warning("cannot raise conntrack hashsize value=%d current=%d error=%r", want, hashsize, str(exc))
            continue
        report.written[HASHSIZE] = want
        log.info("set conntrack hashsize value=%d previous=%d", want, hashsize)
    return report


def _usable_cpus() -> int:
    """CPUs this process may run on (Go's runtime.NumCPU honours affinity too: a pinned container
    must not size conntrack for the whole host)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


OOM_SCORE_ADJ = Path("/proc/self/oom_score_adj")


def apply_oom_score_adj(value: int, path: Path = OOM_SCORE_ADJ) -> None:
    """Upstream's ``--oom-score-adj`` (default -999): keep the proxy alive under memory pressure.

    Lowering the value needs CAP_SYS_RESOURCE; SysctlError says why it failed (callers warn).
    """
    try:
        path.write_text(f"{value}\n")
    except OSError as exc:
        raise SysctlError(f"cannot write {value} to {path}: {exc.strerror}", errno_=exc.errno) from exc
