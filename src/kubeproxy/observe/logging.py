"""Logging setup: klog-style header, one line per event, key=value details, ``-v`` verbosity.

Verbosity maps like klog's common use in kube-proxy: 0-1 warnings and important info, 2 info
(every sync summary), 4 debug, 6+ also the nft transaction text that was applied.
"""

from __future__ import annotations

import logging
import os
import sys
import time

TRANSACTION = logging.DEBUG - 5  # level at which backends log whole transactions


class KlogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        micros = int((record.created % 1) * 1_000_000)
        level = {"WARNING": "W", "ERROR": "E", "CRITICAL": "F"}.get(record.levelname, "I")
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
    return logging.INFO


def setup(v: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KlogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(verbosity_level(v))
