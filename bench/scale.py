"""End-to-end scale benchmark: the real ``python -m kubeproxy`` process (nftables mode) against the
API-server test double, in a lab network namespace. ``python -m bench.scale [--sizes 1k,10k,5kx50]
[--only cold,churn,restart] [--quick]``; needs root. Prints a table per scenario and writes
``bench/results/scale-<date>.json``.

Setup. A :class:`~kubeproxy.lab.cluster.Lab` provides the node namespace (removed on every exit path,
Ctrl-C and SIGTERM included). The API-server test double (bench/scale_objects.py builds the objects:
one Service + one EndpointSlice per Service, shaped like real API objects) listens on 127.0.0.1 INSIDE
that namespace; the daemon runs there too (``ip netns exec``, which execs in place, so Popen's pid is
the Python process: checked against /proc/<pid>/exe, its cmdline and the pid in its klog lines). The
daemon runs with ``--v=2 --proxy-mode=nftables --iptables-min-sync-period=0s`` (the last one also sets
nftables' minSyncPeriod: without it bursts would wait up to the default 1 s).

Scenarios.
(a) cold: for each size (N Services x M endpoints: 1k x 10, 10k x 10, 5k x 50), an empty ruleset and a
    freshly started daemon. Times come from the daemon's klog timestamps (microseconds, wall clock)
    relative to ``time.time()`` taken just before the process is spawned: process start -> "starting
    kube-proxy" (interpreter, imports, config, servers) -> "initial state complete" (lists, decode,
    state) -> first ``synced family=ip full=True`` (the IPv4 table: render + ``nft -f``; rules
    programmed; the tiny ip6 table follows in the same sync and is reported too). The same end point
    as seen by polling the log every 5 ms is recorded as a cross-check. Loading the objects into the API
    server happens before the spawn and is reported separately. Peak RSS is VmHWM of the daemon
    process once idle after its first sync (its short-lived ``nft`` children are not included).
(b) churn (at 10k x 10; 1k with --quick), on the daemon that just cold-started, once it is idle:
    event-to-kernel latency of (1) one endpoint replaced, (2) one Service + its 10-endpoint slice
    added, (3) 10 slices with all their endpoints (100) replaced in one ``apply_many``. t0 =
    ``perf_counter()`` just before ``apply``/``apply_many``; t1 = when the last of the new addresses
    (and, for an added Service, its ClusterIP) has appeared in a line of ``nft monitor`` running in the
    node namespace (stamped by a reader thread as each line arrives; started after the cold sync and
    given time to build its cache, see :meth:`NftMonitor.sync_point`). Matching is by address string
    with address boundaries, never by rule layout. Every sample uses addresses never used before
    (10.200.0.0/16) and waits for the previous one plus 0.3 s. Each changed slice carries the
    trigger-time annotation (now, RFC 3339 with microseconds); the daemon's
    ``network_programming_duration_seconds`` and ``sync_partial_proxy_rules_duration_seconds``
    histograms are scraped from its metrics port (from a thread inside the node namespace) before and
    after each scenario, and the deltas are shown next to the external numbers (scenario 3 gives 10
    metric observations per sample, one per slice). The metric ends when the daemon's sync returns,
    i.e. after the ``nft`` process exited, which is some ms after the kernel committed.
(c) restart (same size as churn): SIGTERM (rules stay), then a new process with the same objects:
    process start -> first full sync, and every kernel change the restart caused, by kind (``add
    element ip``, ``delete rule ip``, ...) and per transaction. Two listeners count them: a netlink
    listener with a 512 MB buffer (bench/scale_netlink.py; authoritative) and ``nft monitor`` as a
    cross-check (nft 1.0.6 prints one line per element and a chain flush as one ``delete rule`` per
    rule; its 16 MB buffer overflows at 10k Services, which it reports and we flag). The counting window
    ends at a canary table both listeners must have seen. Listeners make the kernel build a
    notification per change and compete for the 2 CPUs, so the restart is timed once more without them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

import kubeproxy
from bench import run
from bench import scale_objects as objs
from bench.scale_netlink import CANARY_PREFIX, NetlinkCounter
from kubeproxy.lab.apiserver import FakeApiServer
from kubeproxy.lab.cluster import Lab
from kubeproxy.lab.netns import LabError, call_in_netns, ip_binary, lab_unavailable_reason

TOKEN: Final = "kube-proxy-scale-bench"
METRICS_PORT: Final = 10249
MIN_SYNC_FLAG: Final = "--iptables-min-sync-period=0s"
LOAD_CHUNK: Final = 4000  # objects per apply_many while loading (bounded memory, one thread hop each)
SAMPLE_GAP: Final = 0.3  # seconds between churn samples, after the previous one was programmed
RESULTS: Final = Path(__file__).parent / "results"
LOG_TAIL_LINES: Final = 30

_KLOG = re.compile(r"^[IWEF](\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2})\.(\d{6})\s+(\d+) ")
_STARTING = re.compile(r"starting kube-proxy ")
_INITIAL = re.compile(r"initial state complete pending_changes=(\d+)")
# The first full sync of the IPv4 family (nft family "ip"; "ipv4" accepted too): IPv4 rules programmed.
_SYNCED_FULL = re.compile(r"synced family=(?:ip|ipv4) full=True services=(\d+) commands=(\d+) elapsed=([\d.]+)s")
_SYNCED_FULL6 = re.compile(r"synced family=(?:ip6|ipv6) full=True services=(\d+) commands=(\d+) elapsed=([\d.]+)s")


class BenchError(Exception):
    """A scenario could not complete (timeout, daemon exit, unexpected output); names what and why."""


# --------------------------------------------------------------------------------------------------
# Sizes and options


@dataclass(frozen=True)
class Size:
    services: int
    per_service: int

    @property
    def label(self) -> str:
        n = f"{self.services // 1000}k" if self.services % 1000 == 0 else str(self.services)
        return n if self.per_service == 10 else f"{n}x{self.per_service}"

    @property
    def endpoints(self) -> int:
        return self.services * self.per_service


def parse_size(text: str) -> Size:
    match = re.fullmatch(r"(\d+)(k?)(?:x(\d+))?", text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected N, Nk or NkxM (e.g. 10k, 5kx50)")
    services = int(match[1]) * (1000 if match[2] else 1)
    per_service = int(match[3]) if match[3] else 10
    if services < 20 or not 1 <= per_service <= 100:
        raise argparse.ArgumentTypeError(f"size {text!r}: need >= 20 Services and 1..100 endpoints each")
    return Size(services, per_service)


@dataclass(frozen=True)
class Options:
    sizes: tuple[Size, ...]
    churn_size: Size
    scenarios: frozenset[str]
    samples_endpoint: int
    samples_service: int
    samples_bulk: int
    timeout: float
    log_dir: Path | None


# --------------------------------------------------------------------------------------------------
# The daemon's log


def klog_wall(line: str, *, near: float) -> tuple[float, int] | None:
    """(wall-clock seconds, pid) of a klog header (local time, no year: taken from ``near``)."""
    match = _KLOG.match(line)
    if match is None:
        return None
    month, day, hour, minute, second, micros, pid = (int(g) for g in match.groups())
    year = datetime.datetime.fromtimestamp(near).year
    stamp = datetime.datetime(year, month, day, hour, minute, second, micros).timestamp()  # naive = local
    if stamp - near > 180 * 86400:  # a December line read in January
        stamp = datetime.datetime(year - 1, month, day, hour, minute, second, micros).timestamp()
    return stamp, pid


@dataclass
class LogLine:
    text: str
    match: re.Match[str]
    wall: float  # from the klog header
    seen: float  # perf_counter() when the poll found it
    pid: int


class DaemonLog:
    """Follows a log file the daemon appends to; finds lines by pattern, polling every 5 ms."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self._lines: list[tuple[float, str]] = []
        self._next = 0  # index of the first line not yet consumed by wait_for

    def _poll(self) -> None:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return
        if not data:
            return
        now = time.perf_counter()
        self._offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        self._lines.extend((now, c.decode(errors="replace")) for c in chunks)

    def wait_for(self, pattern: re.Pattern[str], *, proc: subprocess.Popen[str], timeout: float, what: str) -> LogLine:
        """The next line (after the last one returned) matching ``pattern``; BenchError with the log's tail
        if the daemon exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            self._poll()
            while self._next < len(self._lines):
                self._next += 1
                found = self._parse(self._next - 1, pattern, what)
                if found is not None:
                    return found
            if proc.poll() is not None:
                raise BenchError(f"{what}: the daemon exited with {proc.returncode}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: no such log line after {timeout:g} s\n{self.tail()}")
            time.sleep(0.005)

    def find(self, pattern: re.Pattern[str], what: str) -> LogLine | None:
        """The first line read so far that matches ``pattern``."""
        for index in range(len(self._lines)):
            found = self._parse(index, pattern, what)
            if found is not None:
                return found
        return None

    def _parse(self, index: int, pattern: re.Pattern[str], what: str) -> LogLine | None:
        seen, text = self._lines[index]
        match = pattern.search(text)
        if match is None:
            return None
        head = klog_wall(text, near=time.time())
        if head is None:
            raise BenchError(f"{what}: log line without a klog header: {text!r}")
        return LogLine(text, match, head[0], seen, head[1])

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.path.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            return f"(cannot read {self.path}: {exc})"
        return f"--- last {len(text)} lines of {self.path} ---\n" + "\n".join(text)


# --------------------------------------------------------------------------------------------------
# nft monitor


class NftMonitor:
    """``nft monitor`` in a namespace; a reader thread stamps each line with ``perf_counter()``."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self._cond = threading.Condition()
        self._lines: list[tuple[float, str]] = []
        self._eof = False
        self._ready = False
        self._proc = subprocess.Popen(
            [ip_binary(), "netns", "exec", netns, "nft", "monitor"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self._thread = threading.Thread(target=self._read, name="nft-monitor", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            now = time.perf_counter()
            with self._cond:
                self._lines.append((now, line.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def sync_point(self, timeout: float, counter: NetlinkCounter | None = None) -> int:
        """Index of the line of a fresh canary table; every event before it has been printed before it.

        The canary is an ``add table`` + ``delete table`` of a throw-away table (the daemon never looks
        at it). First the monitor must have built its cache of the ruleset (seconds and ~360 MB at
        10k Services in the per-endpoint-chain layout): until then its CPU time grows. Events arriving
        meanwhile change the ruleset generation, which makes nft restart that dump; a canary every
        0.5 s kept a 10k monitor dumping forever. So: wait for its CPU to settle, then retry the
        canary with doubling waits. With ``counter``, also wait until that netlink listener read it.
        """
        deadline = time.monotonic() + timeout
        if not self._ready:
            wait_cpu_idle(self._proc.pid, quiet=0.5, timeout=timeout)
            self._ready = True
        start = self.mark()
        wait = 0.5
        while True:
            table = canary(self.netns)
            pattern = re.compile(rf"^add table ip {table}$")
            try:
                index = self.find_line(pattern, start=start, timeout=min(wait, max(0.1, deadline - time.monotonic())))
                break
            except BenchError:
                if time.monotonic() > deadline:
                    raise BenchError(f"nft monitor in {self.netns} shows nothing after {timeout:g} s") from None
                wait = min(2 * wait, 8.0)
        if counter is not None and not counter.wait_canary(table, max(1.0, deadline - time.monotonic())):
            raise BenchError("the netlink listener did not see the canary table")
        return index

    def find_line(self, pattern: re.Pattern[str], *, start: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self._lines):
                    if pattern.search(self._lines[index][1]):
                        return index
                    index += 1
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise BenchError(f"no nft monitor line matches {pattern.pattern!r}")
                self._cond.wait(timeout=min(left, 0.5))

    def mark(self) -> int:
        with self._cond:
            return len(self._lines)

    def lines(self, start: int = 0, end: int | None = None) -> list[tuple[float, str]]:
        with self._cond:
            return self._lines[start:end]

    def wait_for(self, patterns: Sequence[re.Pattern[str]], *, start: int, timeout: float) -> float:
        """perf_counter() of the line that completed the set: every pattern matched some line from ``start``."""
        pending = list(patterns)
        latest = 0.0
        index = start
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while index < len(self._lines) and pending:
                    stamp, text = self._lines[index]
                    index += 1
                    still = [p for p in pending if p.search(text) is None]
                    if len(still) != len(pending):
                        latest = max(latest, stamp)
                        pending = still
                if not pending:
                    return latest
                left = deadline - time.monotonic()
                if self._eof:
                    raise BenchError(f"nft monitor ended; still waiting for {[p.pattern for p in pending][:5]}")
                if left <= 0:
                    raise BenchError(
                        f"{len(pending)} of {len(patterns)} addresses not in nft monitor output after {timeout:g} s "
                        f"(e.g. {pending[0].pattern})"
                    )
                self._cond.wait(timeout=min(left, 0.5))

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._thread.join(timeout=5)


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def wait_cpu_idle(pid: int, *, quiet: float, timeout: float) -> None:
    """Return once ``pid`` used no CPU for ``quiet`` seconds (or after ``timeout``: best effort)."""
    deadline = time.monotonic() + timeout
    last, since = cpu_ticks(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        ticks = cpu_ticks(pid)
        if ticks != last:
            last, since = ticks, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


_canaries = 0
_SPAWNS = itertools.count(1)  # numbers the daemon logs of one run


def canary(netns: str) -> str:
    """Add and delete a throw-away table in ``netns`` (one transaction each); returns its name."""
    global _canaries  # noqa: PLW0603 -- a process-wide sequence number
    _canaries += 1
    table = f"{CANARY_PREFIX}{os.getpid()}_{_canaries}"
    _nft(netns, f"add table ip {table}\ndelete table ip {table}\n")
    return table


def _nft(netns: str, script: str) -> None:
    proc = subprocess.run(
        [ip_binary(), "netns", "exec", netns, "nft", "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"nft -f failed in {netns}: {proc.stderr.strip()}")


def address_pattern(ip: str) -> re.Pattern[str]:
    """``ip`` as a whole address: 10.200.0.1 does not match inside 10.200.0.10 or 110.200.0.1."""
    return re.compile(rf"(?<![\d.]){re.escape(ip)}(?![\d.])")


def count_monitor_lines(lines: Iterable[tuple[float, str]]) -> dict[str, Any]:
    """Monitor lines counted by kind (verb, object, family: ``add element ip``), also per transaction."""
    totals: Counter[str] = Counter()
    elements: Counter[str] = Counter()  # element lines may carry several elements: count those too
    transactions: list[dict[str, Any]] = []
    current: Counter[str] = Counter()
    lost = 0
    for _stamp, text in lines:
        if CANARY_PREFIX in text:
            continue
        if text.startswith("# new generation"):
            if current:  # else a canary's transaction
                transactions.append({"generation": text.removeprefix("# new generation "), "lines": dict(current)})
            current = Counter()
            continue
        if text.startswith("#"):
            if "lost" in text.lower() or "error" in text.lower():
                lost += 1
            totals[text[:40]] += 1
            continue
        if not text.strip():
            continue
        # "<verb> <object> <family> <table> ...": e.g. "add element ip", "delete rule ip6".
        kind = " ".join(text.split(None, 3)[:3])
        totals[kind] += 1
        current[kind] += 1
        if " element " in f"{kind} ":
            elements[kind] += _element_count(text)
    if current:
        transactions.append({"generation": "(no generation line yet)", "lines": dict(current)})
    return {
        "lines_by_kind": dict(sorted(totals.items())),
        "elements_by_kind": dict(sorted(elements.items())),
        "transactions": transactions,
        "lost_event_warnings": lost,
    }


def _element_count(text: str) -> int:
    body = text[text.find("{") + 1 : text.rfind("}")]
    depth, count = 0, 1 if body.strip() else 0
    for ch in body:
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
        elif ch == "," and depth == 0:
            count += 1
    return count


# --------------------------------------------------------------------------------------------------
# Metrics, scraped from inside the node namespace


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_HISTOGRAMS: Final = (
    "kubeproxy_network_programming_duration_seconds",
    "kubeproxy_sync_partial_proxy_rules_duration_seconds",
)


def scrape_metrics(netns: str) -> dict[str, float]:
    """``{"name{labels}": value}`` of GET /metrics on 127.0.0.1:10249, connected from a thread that has
    joined ``netns`` (never from the host namespace)."""

    def fetch() -> str:
        conn = http.client.HTTPConnection("127.0.0.1", METRICS_PORT, timeout=10)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            body = response.read().decode()
            if response.status != 200:
                raise BenchError(f"GET /metrics: HTTP {response.status}")
            return body
        finally:
            conn.close()

    try:
        text = call_in_netns(netns, fetch)
    except (OSError, LabError) as exc:
        raise BenchError(f"cannot scrape metrics in {netns}: {exc}") from exc
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match[1].startswith(_HISTOGRAMS):
            out[match[1] + (match[2] or "")] = float(match[3])
    return out


@dataclass
class Histogram:
    buckets: list[tuple[float, float]]  # (le, cumulative count), +Inf last
    sum: float
    count: float

    def minus(self, other: Histogram) -> Histogram:
        prev = dict(other.buckets)
        return Histogram(
            [(le, n - prev.get(le, 0.0)) for le, n in self.buckets], self.sum - other.sum, self.count - other.count
        )

    def quantile(self, q: float) -> float | None:
        """Prometheus' histogram_quantile: linear interpolation inside the bucket that holds rank q*count."""
        if self.count <= 0:
            return None
        rank = q * self.count
        lower_le, lower_n = 0.0, 0.0
        for le, n in self.buckets:
            if n >= rank:
                if le == float("inf"):
                    return lower_le
                if n == lower_n:
                    return le
                return lower_le + (le - lower_le) * (rank - lower_n) / (n - lower_n)
            lower_le, lower_n = le, n
        return None

    def summary(self) -> dict[str, Any]:
        nonzero: dict[str, float] = {}
        previous = 0.0
        for le, n in self.buckets:
            if n - previous > 0:
                nonzero[f"le={le:g}"] = n - previous  # per-bucket (not cumulative) counts
            previous = n
        p50, p99 = self.quantile(0.5), self.quantile(0.99)
        # Cumulative buckets: every observation is <= the first bound whose count reached the total.
        bound = next((le for le, n in self.buckets if self.count > 0 and n >= self.count), None)
        return {
            "count": int(self.count),
            "sum_s": round(self.sum, 6),
            "mean_ms": round(1000 * self.sum / self.count, 2) if self.count else None,
            "bucket_p50_ms": None if p50 is None else round(1000 * p50, 1),
            "bucket_p99_ms": None if p99 is None else round(1000 * p99, 1),
            "max_le": None if bound is None else (f"{bound:g}s" if bound != float("inf") else "+Inf"),
            "buckets_noncumulative": nonzero,
        }


def histogram(samples: dict[str, float], name: str, family: str = "IPv4") -> Histogram:
    buckets: list[tuple[float, float]] = []
    label = f'ip_family="{family}"'
    for key, value in samples.items():
        if key.startswith(name + "_bucket{") and label in key:
            le = re.search(r'le="([^"]+)"', key)
            if le:
                buckets.append((float(le[1]), value))
    buckets.sort()
    return Histogram(buckets, samples.get(f"{name}_sum{{{label}}}", 0.0), samples.get(f"{name}_count{{{label}}}", 0.0))


# --------------------------------------------------------------------------------------------------
# The daemon process


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    log: DaemonLog
    wall0: float  # time.time() just before the spawn
    perf0: float  # perf_counter() just before the spawn
    pid_checks: dict[str, Any] = field(default_factory=dict)

    def verify_pid(self, klog_pid: int) -> None:
        """Popen's pid must be the Python process itself (``ip netns exec`` execs in place)."""
        pid = self.proc.pid
        exe = os.path.realpath(f"/proc/{pid}/exe")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        checks = {
            "pid": pid,
            "exe": exe,
            "exe_is_our_python": exe == os.path.realpath(sys.executable),
            "cmdline_is_kubeproxy": b"kubeproxy" in cmdline,
            "klog_pid_matches": klog_pid == pid,
        }
        self.pid_checks = checks
        if not all(v for k, v in checks.items() if k not in ("pid", "exe")):
            raise BenchError(f"pid {pid} is not the kube-proxy Python process: {checks}")

    def rss_mb(self) -> dict[str, float]:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        out: dict[str, float] = {}
        for key in ("VmHWM", "VmRSS"):
            match = re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE)
            if match:
                out[key] = round(int(match[1]) / 1024, 1)
        return out

    def wait_idle(self, *, quiet: float = 0.6, timeout: float = 20.0) -> None:
        """Wait until the daemon used no CPU for ``quiet`` seconds (post-sync steps done)."""
        wait_cpu_idle(self.proc.pid, quiet=quiet, timeout=timeout)

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM (the daemon leaves its rules); seconds until it exited."""
        start = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise BenchError(f"the daemon ignored SIGTERM for {timeout:g} s\n{self.log.tail()}") from None
        if code != 0:
            raise BenchError(f"the daemon exited with {code} after SIGTERM\n{self.log.tail()}")
        return time.perf_counter() - start


@dataclass
class Bench:
    lab: Lab
    api: FakeApiServer
    kubeconfig: Path
    log_dir: Path
    timeout: float
    daemons: list[Daemon] = field(default_factory=list)

    def stop_all(self) -> None:
        """Stop every daemon still running (after a failure: the next size must start from none)."""
        for daemon in self.daemons:
            if daemon.proc.poll() is None:
                with contextlib.suppress(BenchError):
                    daemon.stop()

    def spawn(self, what: str) -> Daemon:
        path = self.log_dir / f"kube-proxy-{next(_SPAWNS):02d}-{what}.log"
        argv = [
            sys.executable, "-m", "kubeproxy", f"--kubeconfig={self.kubeconfig}", "--proxy-mode=nftables",
            f"--hostname-override={objs.NODE_NAME}", "--cluster-cidr=10.244.0.0/16", "--v=2", MIN_SYNC_FLAG,
        ]  # fmt: skip
        wall0, perf0 = time.time(), time.perf_counter()
        proc = self.lab.spawn(self.lab.node_ns, argv, log_path=str(path))
        daemon = Daemon(proc, DaemonLog(path), wall0, perf0)
        self.daemons.append(daemon)
        return daemon

    def start_and_sync(self, what: str) -> tuple[Daemon, dict[str, Any]]:
        """Spawn a daemon and wait for its first full sync; the timing breakdown from klog stamps."""
        daemon = self.spawn(what)
        wait = daemon.log.wait_for
        try:
            # Rules programmed: the first full IPv4 sync. The earlier milestones are looked up afterwards.
            synced = wait(_SYNCED_FULL, proc=daemon.proc, timeout=self.timeout, what=f"{what}: first full sync")
            daemon.verify_pid(synced.pid)
            initial = daemon.log.find(_INITIAL, what)
            if initial is None:
                raise BenchError(f"{what}: no 'initial state complete' line before the first sync\n{daemon.log.tail()}")
            starting = daemon.log.find(_STARTING, what)  # optional: only a finer breakdown
            try:
                # The IPv6 table (dual-stack node) follows in the same sync; tiny here, but shown.
                synced6: LogLine | None = wait(_SYNCED_FULL6, proc=daemon.proc, timeout=10, what=f"{what}: ip6 sync")
            except BenchError:
                synced6 = None
        except BaseException:
            with contextlib.suppress(Exception):
                daemon.stop(timeout=10)
            raise
        t0 = daemon.wall0
        timing = {
            "start_to_starting_log_s": None if starting is None else round(starting.wall - t0, 3),
            "start_to_initial_state_s": round(initial.wall - t0, 3),
            "initial_state_to_synced_s": round(synced.wall - initial.wall, 3),
            "start_to_synced_s": round(synced.wall - t0, 3),
            "start_to_synced_polled_s": round(synced.seen - daemon.perf0, 3),
            "sync_elapsed_s": float(synced.match[3]),
            "sync_services": int(synced.match[1]),
            "sync_commands": int(synced.match[2]),
            "start_to_synced_ip6_s": None if synced6 is None else round(synced6.wall - t0, 3),
            "pending_changes_at_initial_state": int(initial.match[1]),
        }
        return daemon, timing


# --------------------------------------------------------------------------------------------------
# Scenarios


def load_objects(api: FakeApiServer, size: Size) -> dict[str, float]:
    """Put the size's objects into the API server (before the daemon starts); build and load seconds."""
    build = load = 0.0
    it = objs.cluster_objects(size.services, size.per_service)
    while True:
        t0 = time.perf_counter()
        chunk = [o for _, o in zip(range(LOAD_CHUNK), it, strict=False)]
        t1 = time.perf_counter()
        build += t1 - t0
        if not chunk:
            break
        api.apply_many(chunk)
        load += time.perf_counter() - t1
    return {"objects_build_s": round(build, 3), "api_load_s": round(load, 3)}


def cold_row(size: Size, load: dict[str, float], timing: dict[str, Any], daemon: Daemon) -> dict[str, Any]:
    rss = daemon.rss_mb()
    return {
        "size": size.label,
        "services": size.services,
        "endpoints_per_service": size.per_service,
        "endpoints": size.endpoints,
        **load,
        **timing,
        "peak_rss_mb": rss.get("VmHWM"),
        "rss_after_sync_mb": rss.get("VmRSS"),
        "pid_checks": daemon.pid_checks,
    }


@dataclass
class ChurnState:
    """What the churn scenario changed so far (so each sample builds on the current objects)."""

    size: Size
    fresh: objs.FreshIps = field(default_factory=objs.FreshIps)
    current: dict[int, list[str]] = field(default_factory=dict)
    next_target: int = 0
    added: int = 0

    def ips(self, i: int) -> list[str]:
        if i not in self.current:
            self.current[i] = objs.endpoint_ips(i, self.size.per_service)
        return self.current[i]

    def targets(self, count: int) -> list[int]:
        """Distinct Services spread over the whole range, never the same one twice in a run."""
        out = []
        for _ in range(count):
            # A prime stride (coprime with n unless n is a multiple of it) visits each Service once.
            out.append((self.next_target * 7919 + 13) % self.size.services)
            self.next_target += 1
        return out

    def one_endpoint(self) -> tuple[list[dict[str, Any]], list[str]]:
        (i,) = self.targets(1)
        new = self.fresh.take(1)
        self.current[i] = [*self.ips(i)[:-1], *new]
        return [objs.endpoint_slice(i, self.current[i], trigger_time=objs.rfc3339_now())], new

    def add_service(self) -> tuple[list[dict[str, Any]], list[str]]:
        svc, cluster_ip = objs.added_service(self.added)
        i = 100_000 + self.added
        self.added += 1
        new = self.fresh.take(10)
        return [svc, objs.endpoint_slice(i, new, trigger_time=objs.rfc3339_now())], [cluster_ip, *new]

    def bulk(self, slices: int = 10) -> tuple[list[dict[str, Any]], list[str]]:
        changed, new_all = [], []
        for i in self.targets(slices):
            new = self.fresh.take(len(self.ips(i)))
            self.current[i] = new
            changed.append(objs.endpoint_slice(i, new, trigger_time=objs.rfc3339_now()))
            new_all.extend(new)
        return changed, new_all


def _latency_stats(samples: Sequence[float]) -> dict[str, Any]:
    ms = sorted(1000 * s for s in samples)
    if len(ms) >= 2:
        cuts = statistics.quantiles(ms, n=100, method="inclusive")
        p50, p99 = cuts[49], cuts[98]
    else:
        p50 = p99 = ms[0]
    return {
        "samples": len(ms),
        "mean_ms": round(statistics.fmean(ms), 2),
        "min_ms": round(ms[0], 2),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "max_ms": round(ms[-1], 2),
        "all_ms": [round(v, 2) for v in ms],
    }


def churn(bench: Bench, daemon: Daemon, size: Size, opts: Options) -> dict[str, Any]:
    state = ChurnState(size)
    monitor = NftMonitor(bench.lab.node_ns)
    try:
        monitor.sync_point(timeout=bench.timeout)
        scenarios: list[tuple[str, str, int, Callable[[], tuple[list[dict[str, Any]], list[str]]]]] = [
            ("one_endpoint", "1 endpoint replaced", opts.samples_endpoint, state.one_endpoint),
            ("add_service", "1 Service + 10 endpoints added", opts.samples_service, state.add_service),
            (
                "bulk_10_slices",
                f"{10 * size.per_service} endpoints (10 slices) replaced",
                opts.samples_bulk,
                state.bulk,
            ),
        ]
        results: dict[str, Any] = {
            "size": size.label,
            "services": size.services,
            "endpoints": size.endpoints,
            "daemon_flags": [MIN_SYNC_FLAG],
            "scenarios": {},
        }
        for key, title, count, make in scenarios:
            before = scrape_metrics(bench.lab.node_ns)
            samples: list[float] = []
            for _ in range(count):
                changed, addresses = make()
                patterns = [address_pattern(a) for a in addresses]
                start = monitor.mark()
                t0 = time.perf_counter()
                if len(changed) == 1:
                    bench.api.apply(changed[0])
                else:
                    bench.api.apply_many(changed)
                try:
                    t1 = monitor.wait_for(patterns, start=start, timeout=bench.timeout)
                except BenchError as exc:
                    raise BenchError(f"churn {key}: {exc}\n{daemon.log.tail()}") from None
                samples.append(t1 - t0)
                time.sleep(SAMPLE_GAP)
            after = scrape_metrics(bench.lab.node_ns)
            npd = histogram(after, _HISTOGRAMS[0]).minus(histogram(before, _HISTOGRAMS[0]))
            partial = histogram(after, _HISTOGRAMS[1]).minus(histogram(before, _HISTOGRAMS[1]))
            results["scenarios"][key] = {
                "title": title,
                "external": _latency_stats(samples),
                "metric_network_programming": npd.summary(),
                "metric_sync_partial": partial.summary(),
            }
        results["peak_rss_mb"] = daemon.rss_mb().get("VmHWM")
        results["monitor_lost_event_warnings"] = count_monitor_lines(monitor.lines())["lost_event_warnings"]
        return results
    finally:
        monitor.stop()


def restart(bench: Bench, daemon: Daemon, size: Size) -> tuple[Daemon, dict[str, Any]]:
    """SIGTERM + a new process while two listeners count the kernel changes, then once more without
    listeners (for the timing). Returns the last daemon (still running) and the results."""
    netns = bench.lab.node_ns
    monitor = NftMonitor(netns)
    counter: NetlinkCounter | None = None
    try:
        before_stop = monitor.sync_point(timeout=bench.timeout)
        stop_s = daemon.stop()
        at_spawn = monitor.sync_point(timeout=bench.timeout)
        shutdown = count_monitor_lines(monitor.lines(before_stop + 1, at_spawn))
        counter = NetlinkCounter(netns)  # subscribed once created
        new, timing = bench.start_and_sync("restart-monitored")
        new.wait_idle()
        time.sleep(1.5)  # stale-chain deletions come >= 1 s after the sync that retired the chains
        new.wait_idle()
        # A canary after everything: once both listeners show it, they have read all that came before.
        end = monitor.sync_point(timeout=bench.timeout, counter=counter)
        by_monitor = count_monitor_lines(monitor.lines(at_spawn + 1, end))
        by_netlink = counter.snapshot()
        rss = new.rss_mb()
    finally:
        monitor.stop()
        if counter is not None:
            counter.stop()
    result: dict[str, Any] = {
        "size": size.label,
        "services": size.services,
        "endpoints": size.endpoints,
        "sigterm_to_exit_s": round(stop_s, 3),
        "kernel_changes_during_shutdown": shutdown["lines_by_kind"],
        "monitored": {**timing, "peak_rss_mb": rss.get("VmHWM"), "pid_checks": new.pid_checks},
        "kernel_changes_netlink": by_netlink,
        "kernel_changes_nft_monitor": by_monitor,
    }
    new.stop()
    third, timing2 = bench.start_and_sync("restart-unmonitored")
    third.wait_idle()
    result["unmonitored"] = {**timing2, "peak_rss_mb": third.rss_mb().get("VmHWM")}
    return third, result


@contextlib.contextmanager
def periodic_bookmarks(api: FakeApiServer, every: float = 60.0) -> Iterator[None]:
    """Send watch BOOKMARKs every ``every`` seconds, as the real API server does about once a minute;
    without them the daemon declares an idle watch stalled after 150 s and reconnects."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            with contextlib.suppress(Exception):
                api.bookmark()

    thread = threading.Thread(target=loop, name="bookmarks", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def flush_ruleset(netns: str) -> None:
    _nft(netns, "flush ruleset\n")


def run_size(
    bench: Bench, size: Size, opts: Options, results: dict[str, Any], *, with_churn: bool, with_restart: bool
) -> None:
    print(f"\n== {size.label}: {size.services} Services x {size.per_service} endpoints", flush=True)
    load = load_objects(bench.api, size)
    print(f"   loaded into the API server: build {load['objects_build_s']} s, apply {load['api_load_s']} s", flush=True)
    flush_ruleset(bench.lab.node_ns)
    try:
        daemon, timing = bench.start_and_sync(f"cold-{size.label}")
        # Post-sync steps (conntrack, leftovers of other modes) finish before RSS is read and churn begins.
        daemon.wait_idle()
        row = cold_row(size, load, timing, daemon)
        results["cold"].append(row)
        print(f"   cold start: {row['start_to_synced_s']} s, peak RSS {row['peak_rss_mb']} MB", flush=True)
        if with_churn:
            results["churn"] = churn(bench, daemon, size, opts)
            print("   churn done", flush=True)
        if with_restart:
            _, results["restart"] = restart(bench, daemon, size)
            print("   restart done", flush=True)
    finally:
        bench.stop_all()


# --------------------------------------------------------------------------------------------------
# Output


def machine() -> dict[str, Any]:
    return run.machine() | run.git_info() | {"kubeproxy_source": str(Path(kubeproxy.__file__).resolve().parent)}


def _table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    cells = [[("-" if v is None else str(v)) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def print_results(results: dict[str, Any]) -> None:
    if results["cold"]:
        _table(
            "(a) cold start, nftables mode (seconds from process start; klog timestamps)",
            ["size", "services", "endpoints", "->starting", "->initial state", "->synced", "(sync elapsed)",
             "nft commands", "peak RSS MB", "API load s"],
            [[r["size"], r["services"], r["endpoints"], r["start_to_starting_log_s"], r["start_to_initial_state_s"],
              r["start_to_synced_s"], r["sync_elapsed_s"], r["sync_commands"], r["peak_rss_mb"], r["api_load_s"]]
             for r in results["cold"]],
        )  # fmt: skip
    if results.get("churn"):
        c = results["churn"]
        rows = []
        for s in c["scenarios"].values():
            ext, npd, part = s["external"], s["metric_network_programming"], s["metric_sync_partial"]
            external = [ext[k] for k in ("samples", "min_ms", "p50_ms", "p99_ms", "max_ms", "mean_ms")]
            metrics = [npd["count"], npd["mean_ms"], npd["max_le"], part["count"], part["mean_ms"]]
            rows.append([s["title"], *external, *metrics])
        _table(
            f"(b) churn at {c['size']} ({c['services']} Services, {c['endpoints']} endpoints), "
            f"daemon {' '.join(c['daemon_flags'])}; event -> nft monitor, ms",
            ["change", "n", "min", "p50", "p99", "max", "mean", "npd n", "npd mean", "npd all <=", "partial n",
             "partial mean"],
            rows,
        )  # fmt: skip
        print(
            "   npd = the daemon's kubeproxy_network_programming_duration_seconds during the scenario (slice trigger"
            " time -> its sync returned; 'all <=' is the highest\n   bucket bound needed: 0.005, 0.01, 0.025,"
            " 0.05, 0.1, 0.25, 0.5, 1, .. s);"
            " partial = kubeproxy_sync_partial_proxy_rules_duration_seconds (its own sync time)"
        )
    if results.get("restart"):
        r = results["restart"]
        print(f"\n(c) restart at {r['size']} with the rules in the kernel (SIGTERM -> exit {r['sigterm_to_exit_s']} s)")
        for label, t in (("with listeners", r["monitored"]), ("without listeners", r["unmonitored"])):
            print(
                f"   {label:>17}: start->initial state {t['start_to_initial_state_s']} s, start->synced "
                f"{t['start_to_synced_s']} s (sync elapsed {t['sync_elapsed_s']} s, {t['sync_commands']} commands), "
                f"peak RSS {t['peak_rss_mb']} MB"
            )
        print(f"   kernel changes while stopping: {r['kernel_changes_during_shutdown'] or 'none'}")
        net, mon = r["kernel_changes_netlink"], r["kernel_changes_nft_monitor"]
        # netlink cannot tell a set from a map without decoding flags: merge nft monitor's two likewise.
        mon_kinds: Counter[str] = Counter()
        for kind, n in mon["lines_by_kind"].items():
            mon_kinds[re.sub(r" (set|map) ", " set/map ", kind)] += n
        kinds = sorted(set(net["lines_by_kind"]) | set(mon_kinds))
        _table(
            "   kernel changes caused by the restart (netlink notifications; nft monitor lines as a cross-check)",
            ["kind", "netlink", "nft monitor"],
            [[k, net["lines_by_kind"].get(k, 0), mon_kinds.get(k, 0)] for k in kinds],
        )
        print(f"   elements (netlink): {net['elements_by_kind'] or 'none'}")
        for tx in net["transactions"]:
            print(f"   transaction {tx['generation']}: {tx['lines']}")
        if net["lost_event_warnings"]:
            print("   WARNING: the netlink listener overflowed: its counts are lower bounds")
        if mon["lost_event_warnings"]:
            print("   note: nft monitor reported lost events (its 16 MB buffer): its column is a lower bound")


# --------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help="cold-start sizes, e.g. 1k,10k,5kx50 (default; --quick: 1k)")
    parser.add_argument("--only", default="cold,churn,restart", help="comma list of cold, churn, restart")
    parser.add_argument("--churn-size", default=None, help="size for churn and restart (default 10k; --quick: 1k)")
    parser.add_argument("--quick", action="store_true", help="smoke check: 1k only, few samples (well under 1 min)")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per wait before giving up (300; --quick: 60)"
    )
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the daemon logs here (default: removed)")
    args = parser.parse_args(argv)
    scenarios = frozenset(s.strip() for s in args.only.split(",") if s.strip())
    if not scenarios or scenarios - {"cold", "churn", "restart"}:
        parser.error(f"--only: expected a comma list of cold, churn, restart, got {args.only!r}")
    sizes_text = args.sizes or ("1k" if args.quick else "1k,10k,5kx50")
    try:
        sizes = tuple(parse_size(s) for s in sizes_text.split(",") if s.strip())
        churn_size = parse_size(args.churn_size or ("1k" if args.quick else "10k"))
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    samples = (5, 3, 3) if args.quick else (20, 10, 10)
    return Options(
        sizes=sizes,
        churn_size=churn_size,
        scenarios=scenarios,
        samples_endpoint=samples[0],
        samples_service=samples[1],
        samples_bulk=samples[2],
        timeout=args.timeout or (60.0 if args.quick else 300.0),
        log_dir=args.log_dir,
    )


def plan(opts: Options) -> list[tuple[Size, bool, bool]]:
    """(size, churn?, restart?) in order: the cold sizes, with churn/restart on the churn size."""
    wants_churn = "churn" in opts.scenarios
    wants_restart = "restart" in opts.scenarios
    steps: list[tuple[Size, bool, bool]] = []
    sizes = list(opts.sizes) if "cold" in opts.scenarios else []
    if (wants_churn or wants_restart) and opts.churn_size not in sizes:
        sizes.insert(0, opts.churn_size)
    for size in sizes:
        on = size == opts.churn_size
        steps.append((size, on and wants_churn, on and wants_restart))
    return steps


@contextlib.contextmanager
def _log_dir(opts: Options) -> Iterator[Path]:
    if opts.log_dir is not None:
        opts.log_dir.mkdir(parents=True, exist_ok=True)
        yield opts.log_dir
        return
    with tempfile.TemporaryDirectory(prefix="kp-scale-") as tmp:
        yield Path(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C (the Lab also installs this while it is active).
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    reason = lab_unavailable_reason()
    if reason is not None:
        print(f"bench.scale needs the lab: {reason}", file=sys.stderr)
        return 1
    if shutil.which("nft") is None and shutil.which("nft", path="/usr/sbin:/sbin") is None:
        print("bench.scale needs the nft binary", file=sys.stderr)
        return 1
    results: dict[str, Any] = {"machine": machine(), "cold": [], "churn": None, "restart": None, "errors": []}
    failed = False
    with _log_dir(opts) as log_dir, Lab(tag=f"sc{os.getpid() % 1_000_000}") as lab:
        (log_dir / "token").write_text(TOKEN)
        for size, with_churn, with_restart in plan(opts):

            def listen_in_node(port: int) -> socket.socket:
                return call_in_netns(lab.node_ns, _listen, port)

            with FakeApiServer(tokens={TOKEN}, socket_factory=listen_in_node) as api, periodic_bookmarks(api):
                kubeconfig = log_dir / "kubeconfig"
                kubeconfig.write_text(yaml.safe_dump(_kubeconfig(api.url, log_dir / "token")))
                bench = Bench(lab, api, kubeconfig, log_dir, opts.timeout)
                try:
                    run_size(bench, size, opts, results, with_churn=with_churn, with_restart=with_restart)
                except BenchError as exc:
                    failed = True
                    sys.stdout.flush()
                    print(f"   FAILED: {exc}", file=sys.stderr, flush=True)
                    results["errors"].append({"size": size.label, "error": str(exc)})
    print_results(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 1 if failed else 0


def _listen(port: int) -> socket.socket:
    return socket.create_server(("127.0.0.1", port))


def _kubeconfig(server: str, token_file: Path) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "lab",
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "kube-proxy"}}],
        "clusters": [{"name": "lab", "cluster": {"server": server}}],
        "users": [{"name": "kube-proxy", "user": {"tokenFile": str(token_file)}}],
    }


if __name__ == "__main__":
    sys.exit(main())
