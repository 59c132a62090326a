"""Opening several connections to one export: all of them, or none.

:func:`connect_many` is the one way nbdclient and its users open more than one
connection.  The connections are opened at once; if any fails (or the caller is
cancelled), every connection that did open is closed before the error propagates, so a
failed open never leaves a socket (or a server-side session) behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from .client import Client, connect
from .uri import NBDURI


def first_error(error: BaseException) -> BaseException:
    """The first error inside (nested) exception groups that is not a cancellation: the
    cause, not a consequence of cancelling the others."""
    while isinstance(error, BaseExceptionGroup):
        real = [e for e in error.exceptions if not isinstance(e, asyncio.CancelledError)]
        error = (real or list(error.exceptions))[0]
    return error


async def close_all(clients: Iterable[Client]) -> None:
    """Disconnect every client; errors are ignored, and a cancellation of the caller
    does not stop the disconnects that were started."""
    pending = [c.disconnect() for c in clients]
    if pending:
        await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))


async def connect_many(
    target: str | NBDURI,
    count: int,
    *,
    meta_contexts: Sequence[str] = (),
    timeout: float = 10.0,
    request_timeout: float | None = None,
) -> list[Client]:
    """``count`` connections to ``target``, opened concurrently; all or none.

    On a failure the first real error is raised (not an exception group), after every
    connection that opened has been closed; a cancellation closes them the same way.
    """
    return await connect_each(
        target, [meta_contexts] * count, timeout=timeout, request_timeout=request_timeout
    )


async def connect_each(
    target: str | NBDURI,
    contexts: Sequence[Sequence[str]],
    *,
    timeout: float = 10.0,
    request_timeout: float | None = None,
) -> list[Client]:
    """One connection per entry of ``contexts``, negotiating those meta contexts (e.g.
    one for a dirty bitmap alone, one for ``base:allocation`` alone: a block status
    request answers every context its connection negotiated); all or none, as
    :func:`connect_many`."""
    tasks: list[asyncio.Task[Client]] = []
    failed: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as group:
            for wanted in contexts:
                tasks.append(
                    group.create_task(
                        connect(
                            target,
                            meta_contexts=wanted,
                            timeout=timeout,
                            request_timeout=request_timeout,
                        )
                    )
                )
    except BaseException as exc:
        opened = [t.result() for t in tasks if t.done() and not t.cancelled() and not t.exception()]
        await close_all(opened)
        if not isinstance(exc, BaseExceptionGroup):
            raise
        failed = first_error(exc)
    if failed is not None:
        raise failed  # outside the handler: the error keeps its own context
    return [t.result() for t in tasks]
