"""Logging setup: klog-style header, one line per event, key=value details, ``-v`` verbosity.

Verbosity maps like klog's common use in kube-proxy: 0-1 warnings and important info (startup,
configuration, failures), 2 also every sync summary (upstream logs "SyncProxyRules complete" at
V(2)), 4 debug, 6+ also the nft transaction text that was applied.
"""

from __future__ import annotations

import logging
import os
import sys
import time

V2 = logging.INFO - 1  # klog V(2): per-sync summaries
TRANSACTION = logging.DEBUG - 5  # level at which backends log whole transactions


class KlogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        micros = int((record.created % 1) * 1_000_000)
        level = {"WARNING": "W", "ERROR": "E", "CRITICAL": "F"}.get(record.levelname, "I")  # V(n) are I
        head = f"{level}{t.tm_mon:02d}{t.tm_mday:02d} {time.strftime('%H:%M:%S', t)}.{micros:06d} {os.getpid():7d}"
        msg = f"{head} {record.name}] {record.getMessage()}"
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return msg


def verbosity_level(v: int) -> int:
    if v >= 6:
        return TRANSACTION
    if v >= 4:
        return logging.DEBUG
    if v >= 2:
        return V2
    return logging.INFO


def setup(v: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KlogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(verbosity_level(v))
