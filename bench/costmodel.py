"""The kernel's cost model for nftables, measured on this machine (part of ``make bench``; also
``python -m bench.costmodel [--quick]``). docs/performance.md explains the numbers and the ruleset
shape they led to.

Every case loads a synthetic table with ``nft -f`` into a private network namespace (created here and
always deleted) and reports wall-clock seconds of the ``nft`` process:

1. bulk loads, per object: N elements of one hash map (the shape of ``service-endpoints``), N empty
   chains, N rules (``dnat to``, spread over N/10 chains), N small named sets, N elements of a map
   referenced by K rules;
2. one small transaction on a loaded table: add an element, rewrite a one-rule chain, add a rule, as the
   table grows (rules are what makes the kernel re-validate the whole table on a rule change);
3. reading back: ``nft -j list`` of an N-element map.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.run import machine

HEAD = "add table ip cm\nadd chain ip cm pre { type nat hook prerouting priority -100 ; }\n"
EPS_MAP = (
    "add map ip cm eps { typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport ; }\n"
)


def _ip(base: str, i: int) -> str:
    return str(ipaddress.ip_address(int(ipaddress.ip_address(base)) + i))


@contextmanager
def namespace() -> Iterator[str]:
    name = f"kpcost-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def nft(netns: str, script: str) -> float:
    """Seconds for one ``nft -f -`` transaction (raises if nft refuses it)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"], input=script, text=True, capture_output=True, check=False
    )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"nft failed: {proc.stderr.strip()[:500]}")
    return elapsed


def reset(netns: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "nft", "flush", "ruleset"], check=True)


def elements(n: int, start: int = 0) -> str:
    lines = []
    for chunk in range(start, start + n, 500):
        body = ", ".join(
            f"{_ip('10.96.0.0', i // 10)} . tcp . 80 . {i % 10} : {_ip('10.128.0.0', i)} . 8080"
            for i in range(chunk, min(start + n, chunk + 500))
        )
        lines.append(f"add element ip cm eps {{ {body} }}")
    return "\n".join(lines) + "\n"


def chains(n: int, rules_per_chain: int = 0) -> str:
    out = []
    for c in range(n):
        out.append(f"add chain ip cm c{c}")
        out += [
            f"add rule ip cm c{c} meta l4proto tcp dnat to {_ip('10.128.0.0', c * rules_per_chain + r)}:8080"
            for r in range(rules_per_chain)
        ]
    return "\n".join(out) + "\n"


def per_object(netns: str, n: int) -> list[dict[str, Any]]:
    """Bulk loads into an empty namespace: what one more object of each kind costs."""
    cases: list[tuple[str, int, str]] = [
        ("map elements (hash, concat key)", n, HEAD + EPS_MAP + elements(n)),
        ("empty chains", n, HEAD + chains(n)),
        ("dnat rules (10 per chain)", n, HEAD + chains(n // 10, 10)),
        (
            "named sets (1 element each)",
            n // 10,
            HEAD
            + "".join(
                f"add set ip cm s{i} {{ type ipv4_addr ; }}\nadd element ip cm s{i} {{ 10.0.0.1 }}\n"
                for i in range(n // 10)
            ),
        ),
    ]
    for refs in (1, 64, 1000):
        script = (
            HEAD
            + EPS_MAP
            + "".join(
                f"add chain ip cm lb{k}\n"
                f"add rule ip cm lb{k} dnat to ip daddr . meta l4proto . th dport . "
                f"numgen random mod {k + 1} map @eps\n"
                for k in range(refs)
            )
        )
        cases.append((f"map elements, map referenced by {refs} rules", n, script + elements(n)))
    rows = []
    for name, count, script in cases:
        reset(netns)
        seconds = nft(netns, script)
        rows.append(
            {
                "case": name,
                "objects": count,
                "seconds": round(seconds, 3),
                "us_per_object": round(seconds / count * 1e6, 2),
            }
        )
    return rows


def small_transactions(netns: str, sizes: list[int], samples: int) -> list[dict[str, Any]]:
    """One small change on a table holding ``rules`` dnat rules and a 100k-element map."""
    rows = []
    for rules in sizes:
        reset(netns)
        nft(netns, HEAD + EPS_MAP + "add chain ip cm lb\n"
            "add rule ip cm lb dnat to ip daddr . meta l4proto . th dport . numgen random mod 10 map @eps\n"
            "add rule ip cm pre jump lb\n" + chains(max(1, rules // 10), 10 if rules else 0)
            + "".join(f"add rule ip cm pre jump c{c}\n" for c in range(max(1, rules // 10)) if rules)
            + elements(100_000))  # fmt: skip
        adds, rewrites, new_rules = [], [], []
        for k in range(samples):
            key = f"10.99.0.{k + 1} . tcp . 80 . 0"
            adds.append(nft(netns, f"add element ip cm eps {{ {key} : 10.200.0.{k + 1} . 8080 }}\n"))
            nft(netns, f"delete element ip cm eps {{ {key} }}\n")
            if rules:
                rewrites.append(
                    nft(netns, "flush chain ip cm c0\nadd rule ip cm c0 meta l4proto tcp dnat to 10.200.1.1:8080\n")
                )
            new_rules.append(
                nft(netns, f"add chain ip cm x{k}\nadd rule ip cm x{k} meta l4proto tcp dnat to 10.200.2.1:80\n")
            )
        rows.append(
            {
                "rules_in_table": rules,
                "add_element_ms": round(statistics.median(adds) * 1000, 1),
                "rewrite_chain_ms": round(statistics.median(rewrites) * 1000, 1) if rewrites else None,
                "add_rule_in_new_chain_ms": round(statistics.median(new_rules) * 1000, 1),
            }
        )  # fmt: skip
    return rows


def listing(netns: str, sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        reset(netns)
        nft(netns, HEAD + EPS_MAP + elements(n))
        t0 = time.perf_counter()
        out = subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "-j", "list", "map", "ip", "cm", "eps"],
            capture_output=True,
            check=True,
        ).stdout
        seconds = time.perf_counter() - t0
        per = round(seconds / n * 1e6, 1)
        rows.append(
            {"elements": n, "seconds": round(seconds, 3), "us_per_element": per, "json_mb": round(len(out) / 2**20, 1)}
        )
    return rows


def _print(title: str, rows: list[dict[str, Any]]) -> None:
    print(title)
    keys = list(rows[0])
    print("  ".join(f"{k:>22}" for k in keys))
    for row in rows:
        print("  ".join(f"{row[k]!s:>22}" for k in keys))
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.costmodel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke check, a few seconds)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (creates a network namespace)", file=sys.stderr)
        return 1
    n = 10_000 if args.quick else 100_000
    with namespace() as netns:
        results = {
            "per_object": per_object(netns, n),
            "small_transactions": small_transactions(
                netns, [0, 10_000] if args.quick else [0, 10_000, 100_000], 3 if args.quick else 7
            ),
            "listing": listing(netns, [10_000] if args.quick else [10_000, 50_000, 100_000]),
        }
    _print(f"bulk load into an empty table ({n} objects; nft -f, one transaction)", results["per_object"])
    title = "one small transaction on a loaded table (100k map elements + N dnat rules; median ms)"
    _print(title, results["small_transactions"])
    _print("reading a map back (nft -j list map)", results["listing"])
    out = Path(__file__).parent / "results" / f"costmodel-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": machine(), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
