"""The network-namespace lab: one Kubernetes node, routed pods, and an outside client, all in namespaces.

Topology (defaults follow the address plan in DESIGN.md section 4)::

    client ns                        node ns                                 pod ns (one per pod)
    eth0 203.0.113.10/24  <-veth->   eth0 192.168.50.1/24
                                     kp<N>-<pod> 10.244.1.1/32  <-veth->     eth0 10.244.1.N/24
                                       + route 10.244.1.N/32 dev kp<N>-<pod>     default via 10.244.1.1

Pods are routed point-to-point like Calico: no bridge; the node side of every pod veth carries the
gateway address as a /32 and a /32 route to the pod. Pod addresses carry the pod CIDR's prefix but
``noprefixroute``, so a pod reaches everything, its neighbours included, through the gateway -- the
node's forwarding path, where kube-proxy's rules live. The client and node reach each other through
on-link routes; the client has no route to pod addresses. The node's default route points at the
client (the "outside world"), as a real node's uplink does; without one, a connect() from the node to
a ClusterIP would fail route lookup before kube-proxy's OUTPUT rules ever saw the packet. The client
does not forward, so whatever the node sends it that is not for the client dies there.

:class:`LabBase` holds what every lab shares -- the tag claim, namespaces, processes, routed pods and
teardown -- and :class:`Lab` adds this one-node topology; ``multinode.MultiNodeLab`` adds several nodes
on a bridge. The invariants below hold for every lab built on :class:`LabBase`.

Invariants (the lab safety rule of DESIGN.md section 4):
- Nothing is ever created in the host's namespace: every namespace is new, every veth is created by
  ``ip -n <lab ns> link add ... peer ... netns <lab ns>``, and every address, route and sysctl is
  written inside a lab namespace. No lab namespace is linked to the host's namespace.
- Every namespace name is unique and carries the lab's tag: ``kpl-<tag>-node``, ``kpl-<tag>-client``,
  ``kpl-<tag>-pod-<name>`` (at most 40 characters). ``/run/kubeproxy-lab/<tag>.pid`` names the live
  creator (pid and start time), so :func:`sweep_stale_labs` can tell leftovers from live labs.
- Teardown is idempotent, never raises, and runs on every exit path: ``with`` exit (also on
  exceptions), SIGTERM (turned into SystemExit while a lab is active), and interpreter exit (atexit).
  It stops every tracked process (SIGTERM, then SIGKILL after 5 s), kills any stray process left in
  a lab namespace, and deletes every namespace it created (which deletes their veths).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self, TypeVar

import kubeproxy
from kubeproxy.lab.netns import (
    NETNS_RUN_DIR,
    PROBE_PREFIX,
    LabError,
    call_in_netns,
    ip_binary,
    netns_exists,
    run,
)

__all__ = ["STATE_DIR", "Lab", "LabBase", "LabError", "Pod", "sweep_stale_labs"]

_log = logging.getLogger(__name__)

STATE_DIR = Path("/run/kubeproxy-lab")
_PREFIX = "kpl-"
_TAG_RE = re.compile(r"[a-z0-9]{1,12}")
_LAB_NS_RE = re.compile(r"kpl-([a-z0-9]{1,12})-.+")
_PROBE_NS_RE = re.compile(re.escape(PROBE_PREFIX) + r"(\d+)-[0-9a-f]+")
_MAX_NETNS_NAME = 40
_MAX_IFNAME = 15  # IFNAMSIZ - 1
_STOP_GRACE = 5.0
_READY_TIMEOUT = 10.0
_POD_SUBNET_PREFIX_MAX = 30

_SignalHandler = Callable[[int, FrameType | None], Any] | int | None


@dataclass
class Pod:
    name: str
    ip: str
    netns: str
    host_veth: str  # node-side end of the pod's veth, in the node namespace
    process: subprocess.Popen[str] | None  # the podserver, None when the pod listens on no port
    ip6: str | None = None


# --- creator identity: who owns a tag --------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks (field 22 of /proc/PID/stat), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after the last ')' are fixed.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _identity(pid: int) -> str:
    return f"{pid} {_start_time(pid)}\n"


def _creator_alive(pidfile: Path) -> bool:
    """True when the process recorded in ``pidfile`` still runs (same pid AND same start time)."""
    try:
        pid_text, start = pidfile.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    # Comparing the start time as well defeats pid reuse after the creator died.
    return _start_time(pid) == start


def _pidfile(tag: str) -> Path:
    return STATE_DIR / f"{tag}.pid"


# --- namespace housekeeping (shared by Lab teardown and sweep_stale_labs) ---------------------------


def _list_netns() -> list[str]:
    try:
        return sorted(entry.name for entry in NETNS_RUN_DIR.iterdir())
    except FileNotFoundError:
        return []


def _kill_stray_processes(netns: str) -> None:
    """SIGKILL every process still inside lab namespace ``netns`` (never this process)."""
    try:
        out = run(["ip", "netns", "pids", netns], check=False, timeout=10).stdout
    except LabError:
        return
    for word in out.split():
        if word.isdigit() and int(word) != os.getpid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(word), signal.SIGKILL)


def _delete_netns(netns: str) -> bool:
    """Delete a namespace; True when it is gone afterwards. Never raises."""
    if not netns_exists(netns):
        return True
    # A process left inside would keep the namespace (and its veths and sockets) alive after the name
    # is removed; lab namespaces hold only lab processes, so they can all go.
    _kill_stray_processes(netns)
    try:
        run(["ip", "netns", "delete", netns], timeout=30)
    except LabError as exc:
        if netns_exists(netns):
            _log.warning("lab teardown: could not delete namespace %s: %s", netns, exc)
            return False
    return True


def _sweep_tag(tag: str) -> list[str]:
    removed = []
    for name in _list_netns():
        match = _LAB_NS_RE.fullmatch(name)
        if match and match[1] == tag and _delete_netns(name):
            removed.append(name)
    return removed


def sweep_stale_labs() -> list[str]:
    """Delete lab namespaces whose creating process is gone; returns the names deleted.

    A lab's namespaces are left alone while ``/run/kubeproxy-lab/<tag>.pid`` names a live process.
    Leftover probe namespaces of :func:`lab_unavailable_reason` whose process is gone go too.
    """
    removed: list[str] = []
    stale_tags: set[str] = set()
    for name in _list_netns():
        lab = _LAB_NS_RE.fullmatch(name)
        if lab:
            if not _creator_alive(_pidfile(lab[1])):
                stale_tags.add(lab[1])
            continue
        probe = _PROBE_NS_RE.fullmatch(name)
        if probe and _start_time(int(probe[1])) is None and _delete_netns(name):
            removed.append(name)
    for tag in sorted(stale_tags):
        removed.extend(_sweep_tag(tag))
        _pidfile(tag).unlink(missing_ok=True)
    # Pid files of dead creators that left no namespace behind.
    with contextlib.suppress(FileNotFoundError):
        for pidfile in STATE_DIR.glob("*.pid"):
            if not _creator_alive(pidfile):
                pidfile.unlink(missing_ok=True)
    return sorted(removed)


def _add_veth(netns: str, name: str, *, peer_netns: str, peer_name: str) -> None:
    """Create a veth pair from inside ``netns`` with its peer created straight in ``peer_netns``.

    ``ip -n`` enters the lab namespace before asking the kernel, and the peer is born in its target
    namespace: neither end ever exists in the host namespace, not even for a moment.
    """
    run(["ip", "-n", netns, "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", peer_netns])


# --- naming -------------------------------------------------------------------------------------------


def _safe_name(name: str, max_len: int) -> str:
    """A namespace/interface-safe form of ``name``, at most ``max_len`` chars, distinct per distinct name."""
    safe = re.sub(r"[^a-z0-9-]", "-", name.lower())
    if safe == name and len(safe) <= max_len:
        return safe
    # Changed or too long: append a hash of the original so two names never map to one.
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{safe[: max_len - 7].rstrip('-')}-{digest}"


def _one_address(text: str, version: int, what: str) -> str:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError as exc:
        raise LabError(f"{what} {text!r} is not an IP address") from exc
    if addr.version != version:
        raise LabError(f"{what} {text!r} is not an IPv{version} address")
    return str(addr)


_Net = TypeVar("_Net", ipaddress.IPv4Network, ipaddress.IPv6Network)


def _one_network(text: str, cls: type[_Net], what: str) -> _Net:
    try:
        return cls(text)
    except ValueError as exc:
        version = 4 if cls is ipaddress.IPv4Network else 6
        raise LabError(f"{what} {text!r} is not an IPv{version} network: {exc}") from exc


# --- what every lab shares: tag, namespaces, processes, routed pods, teardown --------------------------


class LabBase:
    """The lifecycle every lab shares; subclasses build their topology in :meth:`_build`.

    Owns the tag claim and pid file, the namespaces and processes it created, routed pods (a pod
    namespace on a veth to a node namespace, running a podserver) and the teardown that removes them
    all on every exit path. Use a subclass as a context manager.
    """

    def __init__(self, *, tag: str | None, ipv6: bool) -> None:
        self.tag = secrets.token_hex(3) if tag is None else tag
        if not _TAG_RE.fullmatch(self.tag):
            raise LabError(f"lab tag {self.tag!r} must be 1-12 characters of [a-z0-9]")
        self.ipv6 = ipv6
        self._base = f"{_PREFIX}{self.tag}"
        self.pods: dict[str, Pod] = {}

        self._pod_node_ns: dict[str, str] = {}  # pod name -> namespace holding the pod veth's node end
        self._namespaces: list[str] = []  # created by us, in creation order
        self._processes: list[subprocess.Popen[str]] = []
        self._veth_seq = 0
        self._spawn_seq = 0
        self._tmpdir: Path | None = None
        self._pidfile: Path | None = None
        self._owner_pid = os.getpid()
        self._active = False
        self._torn_down = False
        self._prev_sigterm: _SignalHandler = None
        self._installed_sigterm = False

    # -- context manager ------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        if self._active or self._torn_down:
            raise LabError(f"a {type(self).__name__} can be entered only once")
        # Register cleanup before creating anything, so even a crash halfway through building is undone.
        atexit.register(self.teardown)
        self._install_sigterm()
        self._active = True
        try:
            self._claim()
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this lab has created and not yet deleted."""
        return list(self._namespaces)

    # -- building -------------------------------------------------------------------------------------

    def _build(self) -> None:
        """Create the topology (namespaces, links, addresses, routes); called once by ``__enter__``."""
        raise NotImplementedError

    def _claim(self) -> None:
        self._pidfile = self._claim_tag()
        self._tmpdir = Path(tempfile.mkdtemp(prefix=f"{self._base}-"))

    def _claim_tag(self) -> Path:
        """Record this process as the tag's creator; refuse a tag a live lab holds; sweep dead leftovers."""
        try:
            STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise LabError(f"cannot create lab state directory {STATE_DIR}: {exc}") from exc
        pidfile = _pidfile(self.tag)
        tmp = STATE_DIR / f".{self.tag}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            tmp.write_text(_identity(os.getpid()))
        except OSError as exc:
            raise LabError(f"cannot write lab state file {tmp}: {exc}") from exc
        try:
            for _attempt in range(3):
                try:
                    # link() fails if the pid file exists: an atomic claim of a file that already has
                    # its content (no reader ever sees it half written).
                    os.link(tmp, pidfile)
                    break
                except FileExistsError:
                    if _creator_alive(pidfile):
                        raise LabError(f"lab tag {self.tag!r} is in use by a running process ({pidfile})") from None
                    pidfile.unlink(missing_ok=True)
            else:
                raise LabError(f"could not claim lab tag {self.tag!r} ({pidfile})")
        finally:
            tmp.unlink(missing_ok=True)
        # Namespaces with this tag but no live creator are leftovers of a crashed run: they would make
        # `ip netns add` fail, so remove them now.
        for name in _sweep_tag(self.tag):
            _log.info("lab: removed stale namespace %s", name)
        return pidfile

    def _add_netns(self, netns: str) -> None:
        if len(netns) > _MAX_NETNS_NAME:
            raise LabError(f"namespace name {netns!r} is longer than {_MAX_NETNS_NAME} characters")
        run(["ip", "netns", "add", netns])
        self._namespaces.append(netns)
        if self.ipv6:
            # Set before any interface exists, so link-local addresses skip duplicate detection too.
            self._sysctls(netns, {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"})

    def _sysctls(self, netns: str, values: dict[str, str]) -> None:
        """Write sysctls inside ``netns`` (never the host: call_in_netns verifies the namespace first)."""

        def write() -> None:
            for key, value in values.items():
                Path("/proc/sys", *key.split(".")).write_text(f"{value}\n")

        try:
            call_in_netns(netns, write)
        except OSError as exc:
            raise LabError(f"cannot set sysctls {values} in {netns}: {exc}") from exc

    def _ip_batch(self, netns: str, commands: list[str]) -> None:
        # One `ip` process per namespace instead of one per command: pods are built many at a time.
        run(["ip", "-n", netns, "-batch", "-"], input="\n".join(commands) + "\n")

    def _require_active(self) -> None:
        if not self._active:
            raise LabError(f"the lab is not running (use it inside a `with {type(self).__name__}(...)` block)")

    def _require_lab_netns(self, netns: str) -> None:
        # Safety rule: lab helpers only ever act inside this lab's own namespaces.
        if netns not in self._namespaces:
            raise LabError(f"{netns!r} is not a namespace of this lab ({', '.join(self._namespaces)})")

    # -- routed pods ----------------------------------------------------------------------------------

    def _check_new_pod_name(self, name: str) -> None:
        if not name or any(c.isspace() for c in name):
            raise LabError(f"pod name {name!r} must be non-empty and contain no whitespace")
        if name in self.pods:
            raise LabError(f"pod {name!r} already exists")

    def _create_routed_pod(
        self,
        name: str,
        *,
        node_ns: str,
        ip: str,
        network: ipaddress.IPv4Network,
        gateway: str,
        ip6: str | None = None,
        network6: ipaddress.IPv6Network | None = None,
        gateway6: str | None = None,
        tcp_ports: Sequence[int],
        udp_ports: Sequence[int],
    ) -> Pod:
        """Create pod namespace ``name`` on a veth to ``node_ns`` (addresses already checked) and register it.

        The node end of the veth carries the gateway as a /32 (/128) and a host route to the pod; the pod
        keeps the CIDR's prefix length but no on-link route for it (point-to-point, like Calico).
        """
        ns_prefix = f"{self._base}-pod-"
        pod_ns = ns_prefix + _safe_name(name, _MAX_NETNS_NAME - len(ns_prefix))
        if pod_ns in self._namespaces:
            raise LabError(f"pod {name!r} maps to namespace {pod_ns}, which is already in use")
        self._veth_seq += 1
        veth_prefix = f"kp{self._veth_seq}-"
        # The sequence number makes the name unique in the node namespace; the pod name is for humans.
        host_veth = (veth_prefix + _safe_name(name, _MAX_IFNAME - len(veth_prefix))).rstrip("-")

        pod = Pod(name=name, ip=ip, netns=pod_ns, host_veth=host_veth, process=None, ip6=ip6)
        try:
            self._add_netns(pod_ns)
            _add_veth(node_ns, host_veth, peer_netns=pod_ns, peer_name="eth0")
            node_cmds = [
                f"link set {host_veth} up",
                f"addr add {gateway}/32 dev {host_veth}",
                f"route add {ip}/32 dev {host_veth} scope link src {gateway}",
            ]
            # noprefixroute: the pod keeps the CIDR's prefix length but no on-link route for it, so
            # even traffic to neighbouring pods goes through the gateway (the node), like Calico.
            pod_cmds = [
                "link set lo up",
                "link set eth0 up",
                f"addr add {ip}/{network.prefixlen} dev eth0 noprefixroute",
                f"route add {gateway} dev eth0 scope link",
                f"route add default via {gateway} dev eth0",
            ]
            if ip6 is not None and network6 is not None and gateway6 is not None:
                node_cmds += [
                    f"addr add {gateway6}/128 dev {host_veth} nodad",
                    f"route add {ip6}/128 dev {host_veth} src {gateway6}",
                ]
                pod_cmds += [
                    f"addr add {ip6}/{network6.prefixlen} dev eth0 nodad noprefixroute",
                    f"route add {gateway6} dev eth0",
                    f"route add ::/0 via {gateway6} dev eth0",
                ]
            self._ip_batch(node_ns, node_cmds)
            self._ip_batch(pod_ns, pod_cmds)
            if tcp_ports or udp_ports:
                argv = [sys.executable, "-m", "kubeproxy.lab.podserver", "--name", name]
                argv += [arg for port in tcp_ports for arg in ("--tcp", str(int(port)))]
                argv += [arg for port in udp_ports for arg in ("--udp", str(int(port)))]
                log = self._tmp() / f"{pod_ns}-{self._veth_seq}.log"
                pod.process = self.spawn(pod_ns, argv, log_path=str(log), ready_line="ready")
        except BaseException:
            self._destroy_pod(pod, node_ns)
            raise
        self.pods[name] = pod
        self._pod_node_ns[name] = node_ns
        return pod

    @staticmethod
    def _check_pod_ip(
        text: str,
        *,
        network: ipaddress.IPv4Network | ipaddress.IPv6Network,
        gateway: str,
        taken: Sequence[str],
    ) -> str:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError as exc:
            raise LabError(f"pod address {text!r} is not an IP address") from exc
        if addr not in network:
            raise LabError(f"pod address {addr} is outside the pod CIDR {network}")
        if addr == network.network_address or str(addr) == gateway:
            raise LabError(f"pod address {addr} is reserved (network address or gateway {gateway})")
        if isinstance(network, ipaddress.IPv4Network) and addr == network.broadcast_address:
            raise LabError(f"pod address {addr} is the broadcast address of {network}")
        if str(addr) in taken:
            raise LabError(f"pod address {addr} is already used by another pod")
        return str(addr)

    def remove_pod(self, name: str) -> None:
        """Stop the pod's server and delete its veth and namespace."""
        try:
            pod = self.pods.pop(name)
        except KeyError:
            raise LabError(f"no pod named {name!r} in this lab") from None
        self._destroy_pod(pod, self._pod_node_ns.pop(name))

    def _destroy_pod(self, pod: Pod, node_ns: str) -> None:
        if pod.process is not None:
            self._stop([pod.process])
        if netns_exists(node_ns):
            # Deleting one end of a veth deletes both; doing it explicitly takes the node's /32 route
            # away at once rather than when the namespace is finally freed.
            with contextlib.suppress(LabError):
                run(["ip", "-n", node_ns, "link", "delete", pod.host_veth], check=False)
        if pod.netns in self._namespaces and _delete_netns(pod.netns):
            self._namespaces.remove(pod.netns)

    # -- processes ------------------------------------------------------------------------------------

    def spawn(
        self,
        netns: str,
        argv: list[str],
        *,
        log_path: str | None = None,
        env: dict[str, str] | None = None,
        ready_line: str | None = None,
        ready_timeout: float = _READY_TIMEOUT,
    ) -> subprocess.Popen[str]:
        """Start a long-running process in lab namespace ``netns``; teardown stops it.

        stdout and stderr go to ``log_path`` (default: a file in the lab's temporary directory).
        ``env`` is added to this process's environment. With ``ready_line``, wait until the process
        has written that line to its log (LabError if it exits or ``ready_timeout`` passes first).
        """
        self._require_active()
        self._require_lab_netns(netns)
        self._spawn_seq += 1
        if log_path is None:
            program = Path(argv[0]).name if argv else "process"
            log = self._tmp() / f"{netns}-{self._spawn_seq}-{program}.log"
        else:
            log = Path(log_path)
        full_env = {**os.environ, **(env or {})}
        # Make `python -m kubeproxy...` work in the child even when this package is not installed
        # (running from a source tree with PYTHONPATH unset).
        src_root = str(Path(kubeproxy.__file__).resolve().parents[1])
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, full_env.get("PYTHONPATH")) if p)
        try:
            log_file = log.open("ab")
        except OSError as exc:
            raise LabError(f"cannot open log file {log} for {argv}: {exc}") from exc
        with log_file:
            # Readiness counts only what this process writes: an appended-to log may already hold
            # an earlier process's ready line.
            log_start = log_file.tell()
            try:
                proc = subprocess.Popen(
                    [ip_binary(), "netns", "exec", netns, *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=full_env,
                    text=True,
                    # Own process group: teardown signals the whole group, children included.
                    # `ip netns exec` execs the program in place, so proc.pid is the program itself.
                    start_new_session=True,
                )
            except OSError as exc:
                raise LabError(f"cannot start {argv} in {netns}: {exc}") from exc
        self._processes.append(proc)
        if ready_line is not None:
            try:
                self._wait_ready(
                    proc, log, start=log_start, line=ready_line, timeout=ready_timeout, what=f"{argv} in {netns}"
                )
            except BaseException:
                self._stop([proc])
                raise
        return proc

    @staticmethod
    def _wait_ready(
        proc: subprocess.Popen[str], log: Path, *, start: int, line: str, timeout: float, what: str
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with log.open("rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            if line in (seen.strip() for seen in text.splitlines()):
                return
            if proc.poll() is not None:
                tail = "\n".join(text.splitlines()[-10:])
                raise LabError(f"{what} exited with status {proc.returncode} before '{line}':\n{tail}")
            if time.monotonic() > deadline:
                raise LabError(f"{what} did not print '{line}' within {timeout:g} s (log: {log})")
            time.sleep(0.02)

    def _stop(self, procs: Sequence[subprocess.Popen[str]]) -> None:
        """SIGTERM each process group, SIGKILL what is left after the grace period; reap all."""
        for proc in procs:
            if proc.poll() is None:
                # Safe from pid reuse: an unreaped process (poll() is None) keeps its pid and group.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=_STOP_GRACE)
            if proc in self._processes:
                self._processes.remove(proc)

    def exec(self, netns: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a command to completion in lab namespace ``netns`` (keywords as for :func:`run`)."""
        self._require_lab_netns(netns)
        return run(argv, netns=netns, **kw)

    def _tmp(self) -> Path:
        if self._tmpdir is None:
            raise LabError("the lab is not running")
        return self._tmpdir

    # -- teardown -------------------------------------------------------------------------------------

    def teardown(self) -> None:
        """Stop every process and delete every namespace of this lab. Idempotent; never raises."""
        if self._torn_down or os.getpid() != self._owner_pid:
            # A forked child inherits our atexit hook; only the creator may tear the lab down.
            return
        self._active = False
        try:
            self._stop(list(self._processes))
        except Exception as exc:  # teardown must go on: the namespaces matter more
            _log.warning("lab teardown: stopping processes failed: %s", exc)
        self.pods.clear()
        self._pod_node_ns.clear()
        # Pods first, then the node and the client: reverse creation order.
        for netns in reversed(list(self._namespaces)):
            try:
                if _delete_netns(netns):
                    self._namespaces.remove(netns)
            except Exception as exc:
                _log.warning("lab teardown: deleting %s failed: %s", netns, exc)
        if self._pidfile is not None and not self._namespaces:
            # Keep the pid file while any namespace survived, so a later sweep can still attribute it.
            self._pidfile.unlink(missing_ok=True)
            self._pidfile = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        self._restore_sigterm()
        atexit.unregister(self.teardown)
        self._torn_down = True

    def _install_sigterm(self) -> None:
        # SIGTERM's default action kills the process without running `finally`, `with` exits or atexit;
        # as SystemExit it unwinds through them all and the lab is cleaned up. Only the main thread may
        # install handlers; elsewhere the lab relies on the caller.
        if threading.current_thread() is not threading.main_thread():
            return
        self._prev_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _sigterm_to_exit)
        self._installed_sigterm = True

    def _restore_sigterm(self) -> None:
        if not self._installed_sigterm or threading.current_thread() is not threading.main_thread():
            return
        previous = self._prev_sigterm
        # getsignal() returns None for a handler not installed from Python; SIG_DFL is the closest.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        self._installed_sigterm = False


# --- the single-node lab ------------------------------------------------------------------------------


class Lab(LabBase):
    """One node namespace, its routed pods and one outside client. Use as a context manager."""

    def __init__(
        self,
        *,
        node_name: str = "node1",
        node_ip: str = "192.168.50.1",
        pod_cidr: str = "10.244.1.0/24",
        client_ip: str = "203.0.113.10",
        tag: str | None = None,
        ipv6: bool = False,
        node_ip6: str = "fd00:50::1",
        client_ip6: str = "fd00:203:0:113::10",
        pod_cidr6: str = "fd00:10:244::1:0/112",
    ) -> None:
        super().__init__(tag=tag, ipv6=ipv6)
        self.node_name = node_name
        self.node_ip = _one_address(node_ip, 4, "node_ip")
        self.client_ip = _one_address(client_ip, 4, "client_ip")
        self.pod_network = _one_network(pod_cidr, ipaddress.IPv4Network, "pod_cidr")
        if self.pod_network.prefixlen > _POD_SUBNET_PREFIX_MAX:
            raise LabError(f"pod_cidr {pod_cidr} is too small for a gateway and pods")
        self.pod_cidr = str(self.pod_network)
        # The first address of the pod CIDR is the gateway every pod routes through (on the node side).
        self.gateway_ip = str(self.pod_network.network_address + 1)
        self.node_ip6: str | None = None
        self.client_ip6: str | None = None
        self.pod_cidr6: str | None = None
        self.gateway_ip6: str | None = None
        self._pod_network6: ipaddress.IPv6Network | None = None
        if ipv6:
            self.node_ip6 = _one_address(node_ip6, 6, "node_ip6")
            self.client_ip6 = _one_address(client_ip6, 6, "client_ip6")
            self._pod_network6 = _one_network(pod_cidr6, ipaddress.IPv6Network, "pod_cidr6")
            self.pod_cidr6 = str(self._pod_network6)
            self.gateway_ip6 = str(self._pod_network6.network_address + 1)

        self.node_ns = f"{self._base}-node"
        self.client_ns = f"{self._base}-client"

    # -- building -------------------------------------------------------------------------------------

    def _build(self) -> None:
        for ns in (self.node_ns, self.client_ns):
            self._add_netns(ns)
        node_sysctls = {"net.ipv4.ip_forward": "1"}
        # The client stands for the outside world: it must not route traffic onwards (IPv4 settings
        # of a new namespace are copied from the host's, so say it explicitly).
        client_sysctls = {"net.ipv4.ip_forward": "0"}
        if self.ipv6:
            node_sysctls["net.ipv6.conf.all.forwarding"] = "1"
            client_sysctls["net.ipv6.conf.all.forwarding"] = "0"
        self._sysctls(self.node_ns, node_sysctls)
        self._sysctls(self.client_ns, client_sysctls)

        # Both ends are created from inside the lab: the first end in the node namespace, the peer
        # straight into the client namespace. Nothing ever appears in the host namespace.
        _add_veth(self.node_ns, "eth0", peer_netns=self.client_ns, peer_name="eth0")
        node_net = ipaddress.ip_interface(f"{self.node_ip}/24").network
        client_net = ipaddress.ip_interface(f"{self.client_ip}/24").network
        node_cmds = [
            "link set lo up",
            f"addr add {self.node_ip}/24 dev eth0",
            "link set eth0 up",
        ]
        client_cmds = [
            "link set lo up",
            f"addr add {self.client_ip}/24 dev eth0",
            "link set eth0 up",
        ]
        if node_net != client_net:
            node_cmds.append(f"route add {client_net} dev eth0 scope link")
            client_cmds.append(f"route add {node_net} dev eth0 scope link")
        node_cmds.append(f"route add default via {self.client_ip} dev eth0")
        if self.ipv6:
            # nodad: an address is usable at once instead of after ~1 s of duplicate detection.
            node_cmds += [
                f"addr add {self.node_ip6}/64 dev eth0 nodad",
                f"route add ::/0 via {self.client_ip6} dev eth0",
            ]
            client_cmds.append(f"addr add {self.client_ip6}/64 dev eth0 nodad")
            node_net6 = ipaddress.ip_interface(f"{self.node_ip6}/64").network
            client_net6 = ipaddress.ip_interface(f"{self.client_ip6}/64").network
            if node_net6 != client_net6:
                node_cmds.insert(-1, f"route add {client_net6} dev eth0")
                client_cmds.append(f"route add {node_net6} dev eth0")
        self._ip_batch(self.node_ns, node_cmds)
        self._ip_batch(self.client_ns, client_cmds)

    # -- pods -----------------------------------------------------------------------------------------

    def add_pod(
        self,
        name: str,
        ip: str,
        *,
        tcp_ports: Sequence[int] = (80,),
        udp_ports: Sequence[int] = (),
        ip6: str | None = None,
    ) -> Pod:
        """Create a routed pod namespace at ``ip`` (and ``ip6``) running a podserver on the given ports."""
        self._require_active()
        self._check_new_pod_name(name)
        pod_ip = self._check_pod_ip(
            ip, network=self.pod_network, gateway=self.gateway_ip, taken=[p.ip for p in self.pods.values()]
        )
        pod_ip6: str | None = None
        if ip6 is not None:
            if self._pod_network6 is None or self.gateway_ip6 is None:
                raise LabError(f"pod {name!r}: ip6 given, but the lab was built without ipv6=True")
            pod_ip6 = self._check_pod_ip(
                ip6,
                network=self._pod_network6,
                gateway=self.gateway_ip6,
                taken=[p.ip6 for p in self.pods.values() if p.ip6],
            )
        return self._create_routed_pod(
            name,
            node_ns=self.node_ns,
            ip=pod_ip,
            network=self.pod_network,
            gateway=self.gateway_ip,
            ip6=pod_ip6,
            network6=self._pod_network6,
            gateway6=self.gateway_ip6,
            tcp_ports=tcp_ports,
            udp_ports=udp_ports,
        )


def _sigterm_to_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
