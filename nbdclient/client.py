"""The asyncio NBD client: connect, then pipelined commands on one connection.

``connect()`` runs the handshake (``_negotiate``) and hands the socket to a
:class:`~nbdclient._connection.Connection`, the single reader of the transmission
phase, which drives the I/O-free reply machine (``_replies``).  Every command method
may be called concurrently: ``asyncio.gather`` over many ``pread_into`` calls keeps that
many requests in flight.  Requests larger than the server's maximum payload are split.
A client is READY until its connection breaks (DEAD) or ``disconnect()`` closes it
(DISCONNECTING, then CLOSED); see :class:`~nbdclient.values.Runstate`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from . import _negotiate as ng
from ._connection import Connection
from ._facts import ExportFacts
from ._replies import Replies
from .constants import (
    DEFAULT_MAX_PAYLOAD,
    Command,
    CommandFlag,
    TransmissionFlag,
)
from .errors import (
    ConnectionLostError,
    NBDError,
    NBDTimeoutError,
    StateError,
    UnsupportedError,
)
from .uri import NBDURI, parse_uri
from .values import BlockSize, Extent, Runstate, TLSOptions

#: Largest block status request with compact headers (a u32 length, kept aligned).
_MAX_COMPACT_LENGTH = 0xFFFFFFFF & ~0xFFFF


def _resolve(target: str | NBDURI, export: str | None) -> NBDURI:
    uri = parse_uri(target) if isinstance(target, str) else target
    if export is not None:
        uri = uri.with_export(export)
    return uri


def _tls_for(uri: NBDURI, tls: TLSOptions | None) -> TLSOptions | None:
    return tls if tls is not None else uri.tls


async def connect(
    target: str | NBDURI,
    *,
    export: str | None = None,
    meta_contexts: Sequence[str] = (),
    tls: TLSOptions | None = None,
    structured_replies: bool = True,
    extended_headers: bool = True,
    timeout: float = 10.0,
    request_timeout: float | None = None,
) -> Client:
    """Connect to an NBD export and finish the handshake within ``timeout`` seconds."""
    uri = _resolve(target, export)
    try:
        async with asyncio.timeout(timeout):
            negotiated = await ng.negotiate(
                uri,
                export=uri.export,
                tls=_tls_for(uri, tls),
                meta_contexts=tuple(meta_contexts),
                structured_replies=structured_replies,
                extended_headers=extended_headers,
            )
    except TimeoutError as exc:
        raise NBDTimeoutError(f"NBD handshake with {uri} did not finish in {timeout:g} s") from exc
    return Client(negotiated, request_timeout=request_timeout)


class Client(ExportFacts):
    """One connected NBD export.  Use as an async context manager, or call
    :meth:`disconnect` when done."""

    def __init__(self, negotiated: ng.Negotiated, *, request_timeout: float | None = None) -> None:
        info = negotiated.info
        assert info.size is not None
        self.export_name = info.name if info.name is not None else negotiated.export
        self.description = info.description
        self.size: int = info.size
        self.flags = TransmissionFlag(info.flags & 0x1FFF)
        self.block_size = info.block_size or BlockSize(1, 4096, DEFAULT_MAX_PAYLOAD)
        self.meta_contexts: Mapping[str, int] = dict(negotiated.meta_contexts)
        self.structured_replies = negotiated.structured_replies
        self.extended_headers = negotiated.extended_headers
        self.tls = negotiated.tls
        self.request_timeout = request_timeout
        maximum = self.block_size.maximum
        if maximum in (0, 0xFFFFFFFF) or maximum > DEFAULT_MAX_PAYLOAD:
            maximum = DEFAULT_MAX_PAYLOAD
        minimum = self.block_size.minimum
        self.max_request = max(minimum, maximum - maximum % minimum)
        self._runstate = Runstate.READY
        self._closed = asyncio.Event()
        self._writer = negotiated.writer
        replies = Replies(
            structured=self.structured_replies,
            extended=self.extended_headers,
            size=self.size,
            contexts={v: k for k, v in self.meta_contexts.items()},
        )
        transport = negotiated.writer.transport
        assert isinstance(transport, asyncio.Transport)
        self._conn = Connection(replies, transport)
        transport.set_protocol(self._conn)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    def __repr__(self) -> str:
        return f"<nbdclient.Client export={self.export_name!r} size={self.size}>"

    @property
    def runstate(self) -> Runstate:
        if self._runstate is Runstate.READY and self._conn.error is not None:
            return Runstate.DEAD
        return self._runstate

    @property
    def closed(self) -> bool:
        """True unless the client is READY."""
        return self.runstate is not Runstate.READY

    # ---- requests -------------------------------------------------------------------

    def _check_ready(self) -> None:
        state = self.runstate
        if state is Runstate.READY:
            return
        error = self._conn.error
        if state is Runstate.DEAD and error is not None:
            raise error
        raise StateError(f"the NBD client is {state.value}", state=state, required=Runstate.READY)

    def _check(self, offset: int, length: int, *, payload: bool) -> None:
        self._check_ready()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"request [{offset}, +{length}) outside the export (size {self.size})")
        minimum = self.block_size.minimum
        unaligned_end = length % minimum and offset + length != self.size
        if minimum > 1 and (offset % minimum or unaligned_end):
            raise ValueError(f"request [{offset}, +{length}) not aligned to {minimum} bytes")

    def _timed_out(self, command: Command) -> NBDTimeoutError:
        return NBDTimeoutError(
            f"{command.name} request did not complete in {self.request_timeout:g} s"
        )

    async def _request(
        self,
        command: Command,
        offset: int,
        length: int,
        *,
        flags: int = 0,
        payload: bytes | bytearray | memoryview | None = None,
        buf: memoryview | None = None,
        req_one: bool = False,
    ) -> Any:
        conn = self._conn
        cookie, header, future = conn.request(
            command,
            offset,
            length,
            flags=flags,
            buf=buf,
            req_one=req_one,
            payload_length=None if payload is None else len(payload),
        )
        try:
            if payload is not None:
                conn.send(header, payload)
                await conn.drain()
            else:
                conn.send(header)
            if self.request_timeout is None:
                return await future
            async with asyncio.timeout(self.request_timeout):
                return await future
        except TimeoutError as exc:
            conn.abandon(cookie)  # the reply is still consumed, into nowhere
            raise self._timed_out(command) from exc
        except BaseException:
            conn.abandon(cookie)
            raise

    def _split(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = self.max_request
        return [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]

    async def pread_into(
        self, buf: bytearray | memoryview, offset: int, *, df: bool = False
    ) -> None:
        """Fill ``buf`` with the export's bytes at ``offset`` (holes read as zeros)."""
        view = memoryview(buf).cast("B")
        length = len(view)
        self._check(offset, length, payload=False)
        if length == 0:
            return
        flags = CommandFlag.DF if df and self.can_df() else 0
        if length <= self.max_request:
            await self._request(Command.READ, offset, length, flags=flags, buf=view)
            return
        parts = self._split(offset, length)
        await asyncio.gather(
            *(
                self._request(
                    Command.READ, o, n, flags=flags, buf=view[o - offset : o - offset + n]
                )
                for o, n in parts
            )
        )

    async def pread_many(
        self, reads: Sequence[tuple[bytearray | memoryview, int]], *, df: bool = False
    ) -> None:
        """Fill each ``(buf, offset)`` of ``reads``: every request goes out in one write
        (one system call for many small reads) and the call returns once every reply is
        in.  If any read failed, the first failure is raised after all have completed,
        so no reply lands in a buffer later.  Each read is at most :attr:`max_request`."""
        flags = CommandFlag.DF if df and self.can_df() else 0
        requests = []
        for buf, offset in reads:
            view = memoryview(buf).cast("B")
            self._check(offset, len(view), payload=False)
            if not 0 < len(view) <= self.max_request:
                raise ValueError(f"read of {len(view)} bytes: pread_many takes 1..max_request")
            requests.append((offset, len(view), view))
        await self._request_many(Command.READ, requests, flags)

    async def _request_many(
        self,
        command: Command,
        requests: Sequence[tuple[int, int, memoryview | None]],
        flags: int = 0,
    ) -> list[Any]:
        """Send ``(offset, length, buf)`` requests in one write; their results once every
        reply is in (the first failure raised after that, so no late reply lands in a
        buffer of a caller that has gone on)."""
        if not requests:
            return []
        conn = self._conn
        cookies, headers, futures = [], [], []
        for offset, length, buf in requests:
            cookie, header, future = conn.request(command, offset, length, flags=flags, buf=buf)
            cookies.append(cookie)
            headers.append(header)
            futures.append(future)
        try:
            conn.send(b"".join(headers))
            async with asyncio.timeout(self.request_timeout):
                await asyncio.wait(futures)
        except BaseException as exc:
            for cookie in cookies:  # late replies are consumed, into nowhere
                conn.abandon(cookie)
            if isinstance(exc, TimeoutError):
                raise self._timed_out(command) from exc
            raise
        return [future.result() for future in futures]

    async def pread(self, length: int, offset: int, *, df: bool = False) -> bytes:
        buf = bytearray(length)
        await self.pread_into(buf, offset, df=df)
        return bytes(buf)

    async def pwrite(
        self, data: bytes | bytearray | memoryview, offset: int, *, fua: bool = False
    ) -> None:
        view = memoryview(data).cast("B")
        self._check(offset, len(view), payload=True)
        if self.is_read_only():
            raise UnsupportedError("the export is read-only")
        flags = self._fua(fua)
        await asyncio.gather(
            *(
                self._request(
                    Command.WRITE, o, n, flags=flags, payload=view[o - offset : o - offset + n]
                )
                for o, n in self._split(offset, len(view))
            )
        )

    def _fua(self, fua: bool) -> int:
        if fua and not self.can_fua():
            raise UnsupportedError("server does not support FUA")
        return CommandFlag.FUA if fua else 0

    async def zero(
        self,
        length: int,
        offset: int,
        *,
        no_hole: bool = False,
        fast_zero: bool = False,
        fua: bool = False,
    ) -> None:
        self._check(offset, length, payload=False)
        if not self.can_zero():
            raise UnsupportedError("server does not support WRITE_ZEROES")
        if fast_zero and not self.can_fast_zero():
            raise UnsupportedError("server does not support FAST_ZERO")
        flags = self._fua(fua)
        if no_hole:
            flags |= CommandFlag.NO_HOLE
        if fast_zero:
            flags |= CommandFlag.FAST_ZERO
        step = _MAX_COMPACT_LENGTH if not self.extended_headers else 1 << 40
        for o in range(offset, offset + length, step):
            await self._request(
                Command.WRITE_ZEROES, o, min(step, offset + length - o), flags=flags
            )

    async def trim(self, length: int, offset: int, *, fua: bool = False) -> None:
        self._check(offset, length, payload=False)
        if not self.can_trim():
            raise UnsupportedError("server does not support TRIM")
        flags = self._fua(fua)
        step = _MAX_COMPACT_LENGTH if not self.extended_headers else 1 << 40
        for o in range(offset, offset + length, step):
            await self._request(Command.TRIM, o, min(step, offset + length - o), flags=flags)

    async def flush(self) -> None:
        if not self.can_flush():
            raise UnsupportedError("server does not support FLUSH")
        self._check(0, 0, payload=False)
        await self._request(Command.FLUSH, 0, 0)

    async def cache(self, length: int, offset: int) -> None:
        self._check(offset, length, payload=False)
        if not self.can_cache():
            raise UnsupportedError("server does not support CACHE")
        for o, n in self._split(offset, length):
            await self._request(Command.CACHE, o, n)

    async def block_status(
        self, length: int, offset: int, *, req_one: bool = False
    ) -> dict[str, list[Extent]]:
        """Extents per negotiated meta context, starting at ``offset``.

        Each context's extents are clipped to ``[offset, offset + length)`` and the
        export size; a context may cover less than ``length`` (callers loop).
        """
        if not self.meta_contexts:
            raise UnsupportedError("no meta context was negotiated; block status is unavailable")
        self._check(offset, length, payload=False)
        if length == 0:
            return {name: [] for name in self.meta_contexts}
        if not self.extended_headers:
            length = min(length, _MAX_COMPACT_LENGTH)
        flags = CommandFlag.REQ_ONE if req_one else 0
        result: dict[str, list[Extent]] = await self._request(
            Command.BLOCK_STATUS, offset, length, flags=flags, req_one=req_one
        )
        return result

    async def block_status_many(
        self, ranges: Sequence[tuple[int, int]]
    ) -> list[dict[str, list[Extent]]]:
        """:meth:`block_status` of every ``(length, offset)`` of ``ranges``: all requests go
        out in one write and the call returns once every reply is in (the first failure
        is raised after that).  Each reply may cover less than its range, as one of
        :meth:`block_status` does."""
        if not self.meta_contexts:
            raise UnsupportedError("no meta context was negotiated; block status is unavailable")
        limit = _MAX_COMPACT_LENGTH if not self.extended_headers else 1 << 40
        requests = []
        for length, offset in ranges:
            self._check(offset, length, payload=False)
            if not length > 0:
                raise ValueError("block_status_many takes ranges of at least one byte")
            requests.append((offset, min(length, limit), None))
        return await self._request_many(Command.BLOCK_STATUS, requests)

    async def disconnect(self) -> None:
        """NBD_CMD_DISC, then close the socket; CLOSED when it returns.  Idempotent:
        a second call waits for the first."""
        conn = self._conn
        if self._runstate is not Runstate.READY:
            await self._closed.wait()
            return
        self._runstate = Runstate.DISCONNECTING
        try:
            if conn.error is None:
                with contextlib.suppress(NBDError, OSError):
                    conn.send(conn.replies.disconnect())
            self._writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(conn.lost), 2.0)
        finally:
            # requests still waiting (none, unless disconnect raced them) fail now
            conn.close(ConnectionLostError("NBD client disconnected"))
            self._runstate = Runstate.CLOSED
            self._closed.set()
