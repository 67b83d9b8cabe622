"""The system binaries kernel adapters run (nft, iptables-*, conntrack, ip): where they are, and
the ``ip netns exec`` prefix that runs one inside a named network namespace."""

from __future__ import annotations

import shutil

# /usr/sbin is missing from many non-login root PATHs (cron, sudo -E); look there too.
_SBIN = "/usr/sbin:/sbin"


def find(name: str) -> str | None:
    """Path of ``name`` on PATH or in the sbin directories; None when it is not installed."""
    return shutil.which(name) or shutil.which(name, path=_SBIN)


def path_of(name: str) -> str:
    """Path of ``name``, or the bare name when not installed (running it then fails clearly)."""
    return find(name) or name


def netns_exec(netns: str | None) -> list[str]:
    """The argv prefix running a command inside ``netns``; empty for this process's namespace."""
    return [path_of("ip"), "netns", "exec", netns] if netns else []
