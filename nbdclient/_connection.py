"""The transmission phase of one NBD connection: sending requests, receiving replies.

:class:`Connection` is an :class:`asyncio.BufferedProtocol`.  It is the single reader
of its socket: replies of many in-flight requests are matched by cookie, and the data
of an OFFSET_DATA chunk (or of a simple read reply) is received straight into the
caller's buffer, so a read costs no copies in Python.  Headers and metadata go
through a small scratch buffer and are parsed by the pure ``_transmission`` module.

A request whose caller was cancelled stays registered until its reply is consumed
and discarded, so the stream never loses sync.  A server that breaks the protocol or
a lost connection fails every pending request with one :class:`ProtocolError`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from . import _transmission as tx
from .constants import REPLY_TYPE_ERROR_BIT, Command, ReplyFlag, ReplyType
from .errors import (
    ConnectionLostError,
    NBDError,
    ProtocolError,
    RemoteProtocolError,
    RequestError,
)
from .values import Extent

log = logging.getLogger("nbdclient")

_SCRATCH = 256 * 1024
_FINISHED_KEEP = 4096
_ZEROS = bytes(1 << 20)

# stream states
_HEADER = 0
_META = 1  # collecting a metadata payload into self._meta
_DATA_OFFSET = 2  # collecting the 8-byte offset of an OFFSET_DATA chunk
_DATA = 3  # data bytes to the pending buffer (or discarded)
_DISCARD = 4


class Pending:
    """One request waiting for its reply."""

    __slots__ = (
        "buf",
        "command",
        "cookie",
        "covered",
        "error",
        "extents",
        "future",
        "length",
        "offset",
        "req_one",
    )

    def __init__(
        self,
        cookie: int,
        command: Command,
        offset: int,
        length: int,
        future: asyncio.Future[Any],
        buf: memoryview | None = None,
        req_one: bool = False,
    ) -> None:
        self.cookie = cookie
        self.command = command
        self.offset = offset
        self.length = length
        self.future = future
        self.buf = buf
        self.req_one = req_one
        self.error: NBDError | None = None
        self.extents: dict[str, list[Extent]] = {}
        self.covered = 0


class Connection(asyncio.BufferedProtocol):
    """Receives and dispatches replies; see the module docstring."""

    def __init__(
        self,
        *,
        structured: bool,
        extended: bool,
        size: int,
        contexts: dict[int, str],
    ) -> None:
        self.structured = structured
        self.extended = extended
        self.size = size
        self.contexts = contexts
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, Pending] = {}
        self._finished: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._scratch = bytearray(_SCRATCH)
        self._view = memoryview(self._scratch)
        self._start = 0
        self._end = 0
        self._state = _HEADER
        self._header: tx.ReplyHeader | None = None
        self._current: Pending | None = None
        self._meta = bytearray()
        self._meta_need = 0
        self._data_dst: memoryview | None = None
        self._data_filled = 0
        self._data_len = 0
        self._remaining = 0  # discard
        self._direct = False
        self.closed_error: ProtocolError | None = None
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.lost = asyncio.get_running_loop().create_future()

    # ---- sending ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    async def drain(self) -> None:
        if self.closed_error is not None:
            raise self.closed_error
        if self._paused:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter
            if self.closed_error is not None:
                raise self.closed_error

    def send(self, *parts: bytes | bytearray | memoryview) -> None:
        if self.closed_error is not None:
            raise self.closed_error
        assert self.transport is not None
        if len(parts) == 1:
            self.transport.write(parts[0])
        else:
            self.transport.writelines(parts)

    # ---- connection state ----------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed_error is None:
            reason = f": {exc}" if exc else ""
            self.closed_error = ConnectionLostError(f"NBD connection closed{reason}")
        self._fail_all(self.closed_error)
        if not self.lost.done():
            self.lost.set_result(None)
        self.resume_writing()

    def eof_received(self) -> bool | None:
        return False

    def _fail_all(self, error: ProtocolError) -> None:
        for pending in self.pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)
                # the caller may have gone; do not log "exception never retrieved"
                pending.future.exception()
        self.pending.clear()

    def protocol_error(self, message: str) -> None:
        if self.closed_error is None:
            self.closed_error = RemoteProtocolError(message)
            log.warning("NBD protocol error: %s", message)
        self._fail_all(self.closed_error)
        if self.transport is not None:
            self.transport.abort()

    # ---- receiving --------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._direct:
            pending = self._current
            if pending is not None and pending.buf is not None:
                assert self._data_dst is not None
                return self._data_dst[self._data_filled :]
            # the caller went away mid-chunk: discard the rest
            self._direct = False
            self._state = _DISCARD
            self._remaining = self._data_len - self._data_filled
            self._start = self._end = 0
        if self._end == len(self._scratch) and self._start:
            rest = self._end - self._start
            self._view[:rest] = self._view[self._start : self._end]
            self._start, self._end = 0, rest
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._direct:
                self._data_filled += nbytes
                if self._data_filled == self._data_len:
                    self._direct = False
                    self._data_done()
                return
            self._end += nbytes
            self._process()
            if self._start == self._end:
                self._start = self._end = 0
        except RemoteProtocolError as exc:
            self.protocol_error(str(exc))

    def _process(self) -> None:
        view = self._view
        while True:
            avail = self._end - self._start
            state = self._state
            if state == _HEADER:
                if avail < 4:
                    return
                (magic,) = tx.MAGIC.unpack_from(view, self._start)
                size = tx.reply_header_size(magic)
                if avail < size:
                    return
                header = tx.parse_reply_header(
                    view[self._start : self._start + size], extended=self.extended
                )
                self._start += size
                self._on_header(header)
            elif state in (_META, _DATA_OFFSET):
                if avail == 0:
                    return
                take = min(avail, self._meta_need - len(self._meta))
                self._meta += view[self._start : self._start + take]
                self._start += take
                if len(self._meta) == self._meta_need:
                    if state == _META:
                        self._on_meta(bytes(self._meta))
                    else:
                        self._on_data_offset(bytes(self._meta))
                elif avail == take:
                    return
            elif state == _DATA:
                want = self._data_len - self._data_filled
                take = min(avail, want)
                pending = self._current
                if take and pending is not None and pending.buf is not None:
                    assert self._data_dst is not None
                    self._data_dst[self._data_filled : self._data_filled + take] = view[
                        self._start : self._start + take
                    ]
                self._start += take
                self._data_filled += take
                if self._data_filled == self._data_len:
                    self._data_done()
                    continue
                if pending is not None and pending.buf is not None:
                    self._direct = True  # the rest lands straight in the caller's buffer
                return
            else:  # _DISCARD
                take = min(avail, self._remaining)
                self._start += take
                self._remaining -= take
                if self._remaining == 0:
                    self._chunk_done()
                    continue
                return

    # ---- reply dispatch -------------------------------------------------------------

    def _expect_meta(self, length: int, state: int = _META) -> None:
        self._meta = bytearray()
        self._meta_need = length
        self._state = state
        if length == 0 and state == _META:
            self._on_meta(b"")

    def _on_header(self, header: tx.ReplyHeader) -> None:
        self._header = header
        pending = self.pending.get(header.cookie)
        self._current = pending
        if header.simple:
            self._on_simple(header, pending)
            return
        if pending is None:
            if header.cookie in self._finished:
                log.debug("dropping a late chunk for finished cookie %d", header.cookie)
                self._discard(header.length)
                return
            raise RemoteProtocolError(f"reply for unknown cookie {header.cookie}")
        kind = header.type
        if kind == ReplyType.OFFSET_DATA:
            if pending.command != Command.READ:
                raise RemoteProtocolError("OFFSET_DATA chunk for a command that is not a read")
            if header.length <= 8 or header.length > pending.length + 8:
                raise RemoteProtocolError(f"OFFSET_DATA chunk of bad length {header.length}")
            self._expect_meta(8, _DATA_OFFSET)
            return
        if header.length > tx.MAX_METADATA_PAYLOAD:
            raise RemoteProtocolError(f"reply chunk of {header.length} bytes is too large")
        self._expect_meta(header.length)

    def _on_simple(self, header: tx.ReplyHeader, pending: Pending | None) -> None:
        if self.extended:
            raise RemoteProtocolError("simple reply after extended headers were negotiated")
        if pending is None:
            if header.cookie in self._finished:
                self._state = _HEADER
                return
            raise RemoteProtocolError(f"reply for unknown cookie {header.cookie}")
        if header.error:
            pending.error = RequestError(pending.command.name, header.error)
            self._finish(pending)
            self._state = _HEADER
            return
        if pending.command == Command.READ:
            # a simple read reply carries exactly the requested length of data
            self._start_data(pending, 0, pending.length)
            pending.covered = pending.length
            return
        self._finish(pending)
        self._state = _HEADER

    def _on_data_offset(self, raw: bytes) -> None:
        header, pending = self._header, self._current
        assert header is not None and pending is not None
        (offset,) = tx.OFFSET.unpack(raw)
        length = header.length - 8
        tx.check_within("OFFSET_DATA", offset, length, pending.offset, pending.length)
        pending.covered += length
        self._start_data(pending, offset - pending.offset, length)

    def _start_data(self, pending: Pending, rel: int, length: int) -> None:
        self._data_dst = pending.buf[rel : rel + length] if pending.buf is not None else None
        self._data_len = length
        self._data_filled = 0
        self._state = _DATA

    def _data_done(self) -> None:
        self._data_dst = None
        self._chunk_done()

    def _discard(self, length: int) -> None:
        self._remaining = length
        self._state = _DISCARD
        if length == 0:
            self._chunk_done()

    def _on_meta(self, payload: bytes) -> None:
        header, pending = self._header, self._current
        assert header is not None and pending is not None
        kind = header.type
        if kind == ReplyType.NONE:
            if payload:
                raise RemoteProtocolError("NONE chunk with a payload")
            if not header.flags & ReplyFlag.DONE:
                raise RemoteProtocolError("NONE chunk without the DONE flag")
        elif kind == ReplyType.OFFSET_HOLE:
            if pending.command != Command.READ:
                raise RemoteProtocolError("OFFSET_HOLE chunk for a command that is not a read")
            offset, length = tx.parse_hole_chunk(payload)
            tx.check_within("OFFSET_HOLE", offset, length, pending.offset, pending.length)
            pending.covered += length
            if pending.buf is not None:
                rel = offset - pending.offset
                while length:
                    step = min(length, len(_ZEROS))
                    pending.buf[rel : rel + step] = _ZEROS[:step]
                    rel += step
                    length -= step
        elif kind in (ReplyType.BLOCK_STATUS, ReplyType.BLOCK_STATUS_EXT):
            if pending.command != Command.BLOCK_STATUS:
                raise RemoteProtocolError("block status chunk for another command")
            if (kind == ReplyType.BLOCK_STATUS_EXT) != self.extended:
                raise RemoteProtocolError("block status chunk type does not match the headers")
            context_id, extents = tx.parse_block_status(
                payload,
                extended_chunk=kind == ReplyType.BLOCK_STATUS_EXT,
                offset=pending.offset,
                length=pending.length,
                size=self.size,
                req_one=pending.req_one,
            )
            name = self.contexts.get(context_id)
            if name is None:
                raise RemoteProtocolError(f"block status for unknown meta context id {context_id}")
            if name in pending.extents:
                raise RemoteProtocolError(f"two block status chunks for context {name}")
            pending.extents[name] = extents
        elif kind in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            chunk = tx.parse_error_chunk(payload, with_offset=kind == ReplyType.ERROR_OFFSET)
            if pending.error is None:
                message = chunk.message
                if chunk.offset is not None:
                    message = f"{message} (at offset {chunk.offset})".lstrip()
                pending.error = RequestError(pending.command.name, chunk.errno, message)
        elif kind & REPLY_TYPE_ERROR_BIT:
            if pending.error is None:
                pending.error = RequestError(
                    pending.command.name, 22, f"unknown error chunk type {kind:#x}"
                )
        else:
            raise RemoteProtocolError(f"unknown reply chunk type {kind}")
        self._chunk_done()

    def _chunk_done(self) -> None:
        header, pending = self._header, self._current
        self._state = _HEADER
        self._header = None
        self._current = None
        if header is None or pending is None:
            return
        if header.simple or header.flags & ReplyFlag.DONE:
            self._finish(pending)  # a simple read reply ends with its data

    def _finish(self, pending: Pending) -> None:
        if self.pending.pop(pending.cookie, None) is not None:
            self._finished[pending.cookie] = None
            if len(self._finished) > _FINISHED_KEEP:
                self._finished.popitem(last=False)
        if pending.error is None and (
            pending.command == Command.READ and pending.covered != pending.length
        ):
            message = f"read reply covered {pending.covered} of {pending.length} bytes"
            if not pending.future.done():
                pending.future.set_exception(RemoteProtocolError(message))
            raise RemoteProtocolError(message)
        if pending.future.done():
            return
        if pending.error is not None:
            pending.future.set_exception(pending.error)
            return
        if pending.command == Command.BLOCK_STATUS:
            pending.future.set_result(pending.extents)
        else:
            pending.future.set_result(None)
