"""Named fault-injection points for the crash tests.

``BACKUPD_FAULT=<point>`` makes the process SIGKILL itself when it reaches that point
(``BACKUPD_FAULT=<point>@<n>``: the n-th time); ``BACKUPD_FAULT=<point>:hang`` makes it
wait there forever instead (at the points that :func:`hang_point` marks), so that a
test can send a signal or kill qemu in the middle of a run; ``<point>:pause`` stops
the whole process there for 2 s.  Unset, a checkpoint costs one dict
lookup.  Points: after-lock, after-cleanup, after-plan, after-scratch, mid-filters
(snapshot-access: a filter is in; a running VM with several disks is paused there),
after-transaction, after-export, mid-copy, after-copy, after-teardown, before-manifest,
before-rename, after-commit, mid-rotate, after-rotate.  Offline runs (the VM's images
in backupd's qemu-storage-daemon) have no scratch and no filters, and three points of
their own: after-daemon (the daemon listens, no image open yet), mid-images (after
each image is opened) and after-quit (the daemon was asked to quit, at the end).  A
merge (prune, merge, or a run finishing one): merge-after-journal, merge-after-qemu-img,
merge-before-exchange, merge-mid-exchange, merge-before-manifest, merge-after-exchange,
merge-mid-remove, merge-done.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

_counts: dict[str, int] = {}


def checkpoint(point: str, hits: int = 1) -> None:
    """Reach ``point`` (``hits`` times at once, e.g. the reads of one batch)."""
    wanted = os.environ.get("BACKUPD_FAULT")
    if not wanted:
        return
    if wanted == f"{point}:pause":  # freeze the whole process for 2 s (e.g. to kill qemu)
        time.sleep(2)
        return
    name, _, nth = wanted.partition("@")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + hits
    if _counts[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


async def hang_point(point: str) -> None:
    """Wait forever here when ``BACKUPD_FAULT=<point>:hang``."""
    if os.environ.get("BACKUPD_FAULT") == f"{point}:hang":
        await asyncio.sleep(3600)
