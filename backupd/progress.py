"""Progress of a backup or restore: a bar per disk on a terminal (tqdm), a line every
few seconds otherwise (cron, journald), nothing with ``--quiet``."""

from __future__ import annotations

import logging
import sys
import time
from enum import StrEnum
from typing import Any

from backupd.logs import human_bytes

log = logging.getLogger("backupd.progress")


class ProgressMode(StrEnum):
    BAR = "bar"  # a tqdm bar per disk, on a terminal
    LINES = "lines"  # a log line every few seconds (cron, journald)
    NONE = "none"  # --quiet


class Progress:
    """Byte progress of one disk."""

    def __init__(
        self, label: str, total: int, *, mode: ProgressMode, interval: float = 5.0
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.mode = mode = ProgressMode(mode)
        self.interval = interval
        self._start = time.monotonic()
        self._last = self._start
        self._bar: Any = None
        if mode is ProgressMode.BAR:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
            )

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode is ProgressMode.LINES:
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self._line(now)

    def _line(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / elapsed
        percent = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        log.info(
            "%s: %s of %s (%.0f%%), %s/s, eta %.0fs",
            self.label,
            human_bytes(self.done),
            human_bytes(self.total),
            percent,
            human_bytes(int(rate)),
            eta,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress_mode(quiet: bool) -> ProgressMode:
    """A bar on a terminal, lines otherwise, none when quiet."""
    if quiet:
        return ProgressMode.NONE
    return ProgressMode.BAR if sys.stderr.isatty() else ProgressMode.LINES
