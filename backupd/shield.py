"""Clean-up that must finish even when the run is being cancelled (SIGINT, SIGTERM).

``asyncio.shield`` alone protects the inner work but lets the caller go on at once, so a
second signal would leave a thaw or a QMP disconnect half done (and asyncio would print
"Task was destroyed but it is pending!").  :func:`run_to_completion` waits for the work
to end whatever happens to the caller, then re-raises the cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def run_to_completion(work: Coroutine[Any, Any, T]) -> T:
    """Await ``work`` to its end even if this task is cancelled meanwhile; a cancellation
    that arrived while waiting is raised afterwards."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                if task.cancelled():
                    raise
                result = task.result()
                cancelled = True
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result
