"""Bounded retries with exponential backoff for object storage requests.

A request is tried up to ``attempts`` times when it fails in a way that may pass
(:func:`~backupd.objectstore.failures.retryable`: 5xx but 501, 429 and throttling such
as ``503 SlowDown``, connections refused, reset, timed out or cut mid-body).  Before try
*n + 1* it waits ``d/2 + uniform(0, d/2)`` with ``d = min(cap, base * 2**(n-1))``: with
the defaults 0.1-0.2 s, 0.2-0.4 s, 0.4-0.8 s, 0.8-1.6 s, so five tries give up after
about 3 s at most on top of the requests' own time.  botocore's own retries are off, so
every try is counted (and logged) here.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from backupd.objectstore.failures import client_error, one_line, retryable

log = logging.getLogger("backupd.objectstore")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Backoff:
    attempts: int = 5
    base: float = 0.2
    cap: float = 10.0

    def delay(self, failed: int) -> float:
        """Seconds to wait after the ``failed``-th failed try."""
        d = min(self.cap, self.base * 2.0 ** (failed - 1))
        return d / 2 + random.uniform(0, d / 2)


class RetriesSpent(Exception):
    """Carries how many tries were made to the error mapping; never leaves the package."""

    def __init__(self, attempts: int, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.attempts = attempts
        self.cause = cause


async def with_retries(what: str, call: Callable[[], Awaitable[T]], backoff: Backoff) -> T:
    """``await call()``, again after a retryable failure, at most ``backoff.attempts``
    times; the last failure is raised as :class:`RetriesSpent` (or as it is, when it was
    not retryable)."""
    failed = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            if not retryable(exc):
                if failed:
                    raise RetriesSpent(failed + 1, exc) from exc
                raise
            failed += 1
            if failed >= backoff.attempts:
                raise RetriesSpent(failed, exc) from exc
            pause = backoff.delay(failed)
            code, status, _ = client_error(exc)
            why = f"{status} {code}" if status else one_line(type(exc).__name__)
            log.warning(
                "%s failed (%s), try %d of %d in %.1f s",
                what,
                why,
                failed + 1,
                backoff.attempts,
                pause,
            )
            await asyncio.sleep(pause)
