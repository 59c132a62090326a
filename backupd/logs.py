"""Logging set-up: readable lines on a terminal, syslog priorities and no timestamps
under journald, one JSON object per line with ``--log-json``.

Every backup run ends with one summary line (:func:`log_summary`) whose fields are
also present as JSON keys.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from enum import StrEnum
from typing import Any

SUMMARY_FIELDS = (
    "vm",
    "backup",
    "kind",
    "reason",
    "disks",
    "bytes",
    "consistency",
    "source",
    "duration",
    "result",
)


class Outcome(StrEnum):
    """How a run ended (``result=`` of the summary line, ``last_result`` of status)."""

    OK = "ok"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def under_journald() -> bool:
    """True when stderr is connected to the systemd journal (JOURNAL_STREAM matches)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        device, inode = (int(x) for x in stream.split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


class JournalFormatter(logging.Formatter):
    """``<6>message``: journald reads the priority and adds its own timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{record.getMessage()}"


class TextFormatter(logging.Formatter):
    """``2026-11-25 01:30:00 INFO    ...``; with ``precise``, milliseconds too (debug)."""

    def __init__(self, precise: bool = False) -> None:
        fmt = "%(asctime)s.%(msecs)03d" if precise else "%(asctime)s"
        super().__init__(f"{fmt} %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in SUMMARY_FIELDS:
            if hasattr(record, key):
                data[key] = getattr(record, key)
        if record.exc_info and record.levelno >= logging.ERROR:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, sort_keys=False)


def setup(level: str = "info", json: bool = False, quiet: bool = False) -> None:
    numeric = getattr(logging, level.upper(), logging.INFO)
    if quiet:
        numeric = max(numeric, logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    if json:
        handler.setFormatter(JSONFormatter())
    elif under_journald():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(TextFormatter(precise=numeric <= logging.DEBUG))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.getLogger("qemu").setLevel(logging.CRITICAL)  # qemu.qmp logs its own errors


def human_bytes(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def human_age(seconds: float) -> str:
    """``42 s``, ``5 min``, ``3.2 h``, ``2.1 days``: how long ago, readable at a glance."""
    if seconds < 90:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def log_summary(
    logger: logging.Logger,
    *,
    vm: str,
    backup: str | None,
    kind: str,
    reason: str,
    disks: list[str],
    copied: int,
    consistency: str,
    duration: float,
    result: Outcome,
    source: str = "-",
) -> None:
    """The one line every run logs."""
    level = logging.INFO if result is Outcome.OK else logging.ERROR
    logger.log(
        level,
        "summary: vm=%s backup=%s kind=%s (%s) disks=%s copied=%s consistency=%s "
        "source=%s duration=%.1fs result=%s",
        vm,
        backup or "-",
        kind,
        reason,
        ",".join(disks) or "-",
        human_bytes(copied),
        consistency,
        source,
        duration,
        result,
        extra={
            "vm": vm,
            "backup": backup,
            "kind": kind,
            "reason": reason,
            "disks": disks,
            "bytes": copied,
            "consistency": consistency,
            "source": source,
            "duration": round(duration, 3),
            "result": result,
        },
    )
