"""The asyncio side of the transmission phase: one socket, its reader, and the futures.

:class:`Connection` is an :class:`asyncio.BufferedProtocol` around the I/O-free
:class:`~nbdclient._replies.Replies`: the event loop asks it for a buffer, the state
machine says which one (a slice of a read's own buffer while data streams in), and the
events that come out resolve the callers' futures.  It is the single reader of its
socket.  A protocol violation or a lost connection fails every waiting caller with one
:class:`ProtocolError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from ._events import Event, ProtocolViolation, RequestDone
from ._replies import Replies
from .constants import Command
from .errors import ConnectionLostError, ProtocolError

log = logging.getLogger("nbdclient")


def _retrieved(future: asyncio.Future[Any]) -> None:
    """The caller may have gone: no "exception was never retrieved" warning."""
    if not future.cancelled():
        future.exception()


class Connection(asyncio.BufferedProtocol):
    """Sends requests, and turns the reply machine's events into future results."""

    def __init__(self, replies: Replies, transport: asyncio.Transport) -> None:
        self.replies = replies
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.lost: asyncio.Future[None] = self._loop.create_future()

    @property
    def error(self) -> ProtocolError | None:
        """Why the connection is dead, or None while it is alive."""
        return self.replies.error

    # ---- requests ---------------------------------------------------------------------

    def request(
        self,
        command: Command,
        offset: int,
        length: int,
        *,
        flags: int = 0,
        buf: memoryview | None = None,
        req_one: bool = False,
        payload_length: int | None = None,
    ) -> tuple[int, bytes, asyncio.Future[Any]]:
        """Register a request: its cookie, the header to send, the future of its reply."""
        cookie, header = self.replies.request(
            command,
            offset,
            length,
            flags=flags,
            buf=buf,
            req_one=req_one,
            payload_length=payload_length,
        )
        future: asyncio.Future[Any] = self._loop.create_future()
        self._waiters[cookie] = future
        return cookie, header, future

    def abandon(self, cookie: int) -> None:
        """Nobody waits for this reply any more; it is consumed into nowhere."""
        future = self._waiters.pop(cookie, None)
        if future is not None:
            future.add_done_callback(_retrieved)
        self.replies.abandon(cookie)

    def send(self, *parts: bytes | bytearray | memoryview) -> None:
        if self.error is not None:
            raise self.error
        if len(parts) == 1:
            self.transport.write(parts[0])
        else:
            self.transport.writelines(parts)

    async def drain(self) -> None:
        if self.error is not None:
            raise self.error
        if self._paused:
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
            if self.error is not None:
                raise self.error

    # ---- asyncio protocol -----------------------------------------------------------

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.replies.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        events = self.replies.received(nbytes)
        if events:
            self._dispatch(events)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self.close(ConnectionLostError(f"NBD connection closed{reason}"))
        if not self.lost.done():
            self.lost.set_result(None)
        self.resume_writing()

    def close(self, error: ProtocolError) -> None:
        """No more replies: every waiting caller fails (with the first error seen)."""
        self.replies.close(error)
        self._fail_all()

    # ---- events -----------------------------------------------------------------------

    def _dispatch(self, events: Sequence[Event]) -> None:
        waiters = self._waiters
        for event in events:
            if isinstance(event, ProtocolViolation):
                log.warning("NBD protocol error: %s", event.error)
                self._fail_all()
                self.transport.abort()
                return
            future = waiters.pop(event.cookie, None)
            if future is None or future.done():
                continue
            if isinstance(event, RequestDone):
                future.set_result(event.extents)
            else:
                future.set_exception(event.error)

    def _fail_all(self) -> None:
        error = self.error
        assert error is not None
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(error)
                _retrieved(future)
        self._waiters.clear()
