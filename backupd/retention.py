"""Retention: which backups to keep (keep_last, keep_daily, keep_weekly, keep_monthly),
pure and testable.  What becomes of the others (merged into a kept one, or removed) is
:mod:`backupd.merge.plan`'s business."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

from backupd.config import Retention


def _parse(backup: str) -> dt.datetime:
    return dt.datetime.strptime(backup, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)


def select(backups: Sequence[str], policy: Retention) -> dict[str, str]:
    """Backup id -> why it is kept, by the policy alone (newest first in each rule)."""
    keep: dict[str, str] = {}
    newest_first = sorted(backups, reverse=True)
    if policy.keep_last:
        for backup in newest_first[: policy.keep_last]:
            keep.setdefault(backup, "keep_last")
    rules: list[tuple[int | None, str, Callable[[dt.datetime], object]]] = [
        (policy.keep_daily, "keep_daily", lambda t: t.date()),
        (policy.keep_weekly, "keep_weekly", lambda t: t.isocalendar()[:2]),
        (policy.keep_monthly, "keep_monthly", lambda t: (t.year, t.month)),
    ]
    for count, name, period in rules:
        if not count:
            continue
        seen: set[object] = set()
        for backup in newest_first:
            key = period(_parse(backup))
            if key in seen:
                continue
            seen.add(key)
            keep.setdefault(backup, name)
            if len(seen) >= count:
                break
    return keep
