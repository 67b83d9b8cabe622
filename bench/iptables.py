"""iptables rows of ``make bench`` (``python -m bench.run --only iptables`` runs only these).

The same synthetic N Services x M endpoints as the nftables rows (``bench.run.make_objects`` and the
same state ingest) through the real iptables backend, for both iptables backends (``iptables-legacy``
and ``iptables-nft``) at 1k and 10k Services x 10 endpoints. Per (backend, size):

- cold full sync into an empty, fresh network namespace (render + ``iptables-save`` of nat and filter +
  one ``iptables-restore --noflush``; the restore share is shown separately);
- one-endpoint partial sync, median of 5 (the same change as the nftables rows);
- restore input size (lines) of the cold and of the partial sync, ``backend.rule_counts``, and the
  rules the kernel holds afterwards (one ``iptables-save`` per table, a cross-check);
- peak RSS of the ``iptables-restore`` children (sampled VmHWM; see ``TimedIptables`` for why not
  ``getrusage(RUSAGE_CHILDREN)``).

Each row runs in its own worker process (``python -m bench.iptables --worker MODE N M NETNS TIMEOUT``),
so rows share no process state and a row can be capped: the parent creates
the namespace, gives the worker ``--timeout`` seconds (default 900, env ``KUBEPROXY_BENCH_IPT_TIMEOUT``),
kills the worker's process group when it runs over (the row then reads "timeout", with whatever phases
finished) and ALWAYS deletes the namespace, also on errors and Ctrl-C. Every iptables command runs
through ``ip netns exec``: the host namespace's tables are never read or written.

The worker reports one JSON object per finished phase on stdout; the parent merges them into the row.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.run import PARTIAL_SAMPLES, build_state, make_objects, one_endpoint_change
from kubeproxy.backends.iptables.backend import IptablesBackend
from kubeproxy.backends.iptables.render import IptOptions
from kubeproxy.kernel.errors import KernelError
from kubeproxy.kernel.iptables import IptablesCli, IptablesError, IptablesMode, available_modes, parse_save, tool_name
from kubeproxy.model.service import IPFamily

OPTS = IptOptions(family=IPFamily.V4, cluster_cidrs=("10.244.0.0/16",))
TIMEOUT_ENV = "KUBEPROXY_BENCH_IPT_TIMEOUT"
DEFAULT_TIMEOUT = 900.0  # seconds per (backend, size) row
MODES = (IptablesMode.LEGACY, IptablesMode.NFT)
ROOT = Path(__file__).parent.parent


def _hwm_kb(pid: int) -> int:
    """VmHWM (peak RSS of the current image) of a running process; 0 once it has exited."""
    try:
        with Path(f"/proc/{pid}/status").open() as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TimedIptables(IptablesCli):
    """IptablesCli that times each restore/save, keeps the size of the last restore input, and samples
    the peak RSS of its children.

    Peak RSS comes from polling ``/proc/PID/status`` VmHWM (every 5 ms) rather than from
    ``getrusage(RUSAGE_CHILDREN)``: a child exec'd from this process reports at least this process's
    RSS at spawn time (the kernel keeps the pre-exec high-water mark), which hides a restore smaller
    than the worker. ``ip netns exec`` execs in place, so the pid is the iptables binary itself.
    """

    def __init__(self, mode: IptablesMode, netns: str, timeout: float) -> None:
        super().__init__(mode, netns=netns, timeout=timeout)
        self.last_restore = 0.0
        self.last_lines = 0
        self.last_bytes = 0
        self.last_chains = 0
        self.last_input = ""
        self.save_time = 0.0
        self.peak_kb: dict[str, int] = {"restore": 0, "save": 0}

    def restore(self, family: IPFamily, text: str) -> None:
        self.last_input = text
        self.last_lines = text.count("\n")
        self.last_bytes = len(text.encode())
        self.last_chains = sum(1 for line in text.splitlines() if line.startswith(":"))
        start = time.perf_counter()
        try:
            super().restore(family, text)
        finally:
            self.last_restore = time.perf_counter() - start

    def save(self, family: IPFamily, table: str) -> str:
        start = time.perf_counter()
        try:
            return super().save(family, table)
        finally:
            self.save_time += time.perf_counter() - start

    def _exec(self, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        # IptablesCli._exec with a VmHWM sampler; same errors (IptablesError) and timeout.
        full = [*self._prefix, *argv]
        kind = "restore" if argv[0].endswith("-restore") else "save"
        try:
            proc = subprocess.Popen(
                full,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except OSError as exc:
            raise IptablesError(f"cannot run {' '.join(full)}: {exc}") from exc
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.005):
                self.peak_kb[kind] = max(self.peak_kb[kind], _hwm_kb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            out, err = proc.communicate(stdin, timeout=self._timeout)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.communicate()
            raise IptablesError(f"cannot run {' '.join(full)}: {exc}") from exc
        finally:
            done.set()
            sampler.join()
        return subprocess.CompletedProcess(full, proc.returncode, out, err)


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def _failed_line(exc: Exception, text: str) -> dict[str, Any]:
    """The restore input line an iptables-restore error names ("line N failed"), when there is one."""
    match = re.search(r"line:?\s*(\d+)", str(exc))
    if not match or not text:
        return {}
    number = int(match.group(1))
    lines = text.splitlines()
    if not 1 <= number <= len(lines):
        return {"failed_line_number": number}
    return {"failed_line_number": number, "failed_line": lines[number - 1]}


def verify(ipt: TimedIptables) -> dict[str, Any]:
    """Rules the kernel holds per table, from one ``iptables-save -t`` each.

    iptables-nft-save 1.8.9 overflows its 8 MB stack (SIGSEGV, no output) on the 10k-Service nat
    table (~111k chains); that is recorded, and the save is repeated with the stack limit raised to the
    hard limit so the cross-check still runs. (The backend's own full syncs read the table the same way.)
    """
    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    kernel = {}
    for table in ("filter", "nat"):
        try:
            text = ipt.save(IPFamily.V4, table)
        except IptablesError as exc:
            if exc.returncode != -signal.SIGSEGV:
                raise
            result["verify_save_crash"] = f"{exc} (after {time.perf_counter() - t0:.1f} s)"
            _soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
            resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))  # inherited by the next child
            result["verify_save_retry_stack"] = "unlimited" if hard == resource.RLIM_INFINITY else hard
            text = ipt.save(IPFamily.V4, table)
        kernel[table] = sum(len(rules) for rules in parse_save(text, table).values())
    result["kernel_rules"] = kernel
    result["verify_save_s"] = round(time.perf_counter() - t0, 3)
    result["peak_rss_save_mb"] = round(ipt.peak_kb["save"] / 1024, 1)
    return result


def worker(mode: IptablesMode, n: int, m: int, netns: str, timeout: float) -> int:
    services, slices = make_objects(n, m)
    st, ingest = build_state(services, slices)
    _emit({"phase": "ingest", "ingest_s": round(ingest, 3)})

    ipt = TimedIptables(mode, netns, timeout)
    backend = IptablesBackend(ipt, OPTS)  # no sysctl: route_localnet would be the host namespace's
    phase = "cold"
    try:
        t0 = time.perf_counter()
        outcome = backend.sync(st, set(), full=True)
        cold = time.perf_counter() - t0
        _emit(
            {
                "phase": "cold",
                "cold_full_sync_s": round(cold, 3),
                "cold_full_sync_restore_s": round(ipt.last_restore, 3),
                "cold_full_sync_save_s": round(ipt.save_time, 3),
                "cold_restore_lines": ipt.last_lines,
                "cold_restore_mb": round(ipt.last_bytes / 2**20, 1),
                "cold_restore_chains": ipt.last_chains,
                "cold_full": outcome.full,
                "rules": dict(backend.rule_counts),
                "peak_rss_self_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "peak_rss_restore_mb": round(ipt.peak_kb["restore"] / 1024, 1),
            }
        )

        phase = "partial"
        target = slices[n // 2]
        partial, partial_restore, partial_lines = [], [], []
        for k in range(PARTIAL_SAMPLES):
            changed = one_endpoint_change(target, n, m, k)
            ipt.last_restore, ipt.last_lines = 0.0, 0
            t0 = time.perf_counter()
            st.on_endpoint_slice(("bench", target.metadata.name), changed)
            outcome = backend.sync(st, st.commit().changed, full=False)
            partial.append(time.perf_counter() - t0)
            if outcome.full:
                raise RuntimeError("the one-endpoint sync became a full sync")
            partial_restore.append(ipt.last_restore)
            partial_lines.append(ipt.last_lines)
        _emit(
            {
                "phase": "partial",
                "partial_one_endpoint_s_p50": round(statistics.median(partial), 4),
                "partial_one_endpoint_restore_s_p50": round(statistics.median(partial_restore), 4),
                "partial_one_endpoint_s_all": [round(x, 4) for x in partial],
                "partial_restore_lines": int(statistics.median(partial_lines)),
                "rules": dict(backend.rule_counts),
                "peak_rss_self_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "peak_rss_restore_mb": round(ipt.peak_kb["restore"] / 1024, 1),
                # Floored by this worker's own RSS when the children were spawned (see TimedIptables).
                "rusage_children_maxrss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            }
        )

        # Cross-check: what the kernel holds (after the RSS reading: a big save is a big child too).
        phase = "verify"
        _emit({"phase": "verify", **verify(ipt)})
    except (KernelError, RuntimeError) as exc:
        detail = _failed_line(exc, ipt.last_input) if isinstance(exc, KernelError) and phase != "verify" else {}
        _emit({"phase": "error", "error_phase": phase, "error": str(exc)[:4000], **detail})
        return 1
    return 0


def default_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    return float(value) if value else DEFAULT_TIMEOUT


def run_row(mode: IptablesMode, n: int, m: int, timeout: float) -> dict[str, Any]:
    """One (backend, size) row in a fresh namespace and a fresh worker process; never raises for the
    row's own failures (they become ``status``), and always deletes the namespace."""
    netns = f"kpbench-ipt-{os.getpid()}-{mode.value}-{n}"
    row: dict[str, Any] = {"backend": tool_name(IPFamily.V4, mode), "services": n, "endpoints_per_service": m}
    start = time.perf_counter()
    subprocess.run(["ip", "netns", "add", netns], check=True)
    proc: subprocess.Popen[str] | None = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.iptables", "--worker", mode.value, str(n), str(m), netns, str(timeout + 60)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            start_new_session=True,  # its own process group: a timeout kills the restore child too
        )
        try:
            out, err = proc.communicate(timeout=timeout)
            status = "ok" if proc.returncode == 0 else "error"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            status = "timeout"
    finally:
        if proc is not None and proc.poll() is None:  # Ctrl-C or another exception while it ran
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run(["ip", "netns", "delete", netns], check=False)
    phases = []
    for line in out.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            phases.append(record.pop("phase", None))
            row.update(record)
    row["status"] = status
    if status == "timeout":
        row["timeout_s"] = timeout
        row["timeout_after_phase"] = phases[-1] if phases else "start"
    if status == "error" and "error" not in row:
        row["error"] = err.strip()[-4000:]
    row["row_wall_s"] = round(time.perf_counter() - start, 1)
    return row


def run_rows(sizes: list[tuple[int, int]], timeout: float | None = None) -> list[dict[str, Any]]:
    timeout = default_timeout() if timeout is None else timeout
    installed = available_modes()
    rows = []
    for mode in MODES:
        for n, m in sizes:
            if mode not in installed:
                rows.append({"backend": tool_name(IPFamily.V4, mode), "services": n, "endpoints_per_service": m,
                             "status": "not installed"})  # fmt: skip
                continue
            print(f"  iptables-{mode.value} {n} x {m} ...", end="", flush=True, file=sys.stderr)
            row = run_row(mode, n, m, timeout)
            print(f" {row['status']} in {row['row_wall_s']} s", flush=True, file=sys.stderr)
            rows.append(row)
    return rows


def _fmt(row: dict[str, Any], total: str, part: str) -> str:
    if total not in row:
        return "timeout" if row.get("status") == "timeout" else "-"
    return f"{row[total]} ({row[part]})"


def print_table(rows: list[dict[str, Any]]) -> None:
    heads = ["backend", "svc x eps", "restore lines cold/1-ep", "cold sync s (restore)",
             "1-ep partial s (restore)", "rules nat/filter", "restore RSS MB", "row s", "status"]  # fmt: skip
    table = []
    for row in rows:
        rules = row.get("rules")
        table.append(
            [
                row["backend"],
                f"{row['services']} x {row['endpoints_per_service']}",
                f"{row.get('cold_restore_lines', '-')}/{row.get('partial_restore_lines', '-')}",
                _fmt(row, "cold_full_sync_s", "cold_full_sync_restore_s"),
                _fmt(row, "partial_one_endpoint_s_p50", "partial_one_endpoint_restore_s_p50"),
                f"{rules['nat']}/{rules['filter']}" if rules else "-",
                str(row.get("peak_rss_restore_mb", "-")),
                str(row.get("row_wall_s", "-")),
                f"{row['status']} ({row['error_phase']})" if "error_phase" in row else str(row["status"]),
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(heads)] if table else []
    print("iptables backends, N Services x 10 endpoints (one iptables-restore --noflush per sync; 1-ep: median of 5)")
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True)))
    for r in table:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    for row in rows:
        if row.get("status") == "error":
            where = f" in {row['error_phase']}" if "error_phase" in row else ""
            print(f"  {row['backend']} {row['services']} x {row['endpoints_per_service']}{where}: {row.get('error')}")
            if "failed_line" in row:
                print(f"    input line {row['failed_line_number']}: {row['failed_line']}")
        if "verify_save_crash" in row:
            print(
                f"  {row['backend']} {row['services']} x {row['endpoints_per_service']}: cross-check save crashed: "
                f"{row['verify_save_crash']}; retried with stack limit {row.get('verify_save_retry_stack')}"
            )
        kernel, rules = row.get("kernel_rules"), row.get("rules")
        if kernel and rules and kernel != rules:
            print(f"  {row['backend']} {row['services']}: kernel holds {kernel}, backend counted {rules}")
        elif rules and row.get("status") == "ok" and not kernel:
            print(f"  {row['backend']} {row['services']}: kernel rule counts not checked")


def machine_iptables() -> dict[str, str]:
    versions = {}
    for mode in MODES:
        proc = subprocess.run([tool_name(IPFamily.V4, mode), "--version"], capture_output=True, text=True, check=False)
        versions[f"iptables_{mode.value}"] = proc.stdout.strip()
    return versions


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"] and len(argv) == 6:
        _, mode, n, m, netns, timeout = argv
        return worker(IptablesMode(mode), int(n), int(m), netns, float(timeout))
    print("usage: python -m bench.run --only iptables (this module's --worker is internal)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
