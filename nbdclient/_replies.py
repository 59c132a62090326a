"""The reply side of the transmission phase, without I/O: cookies in, completions out.

:class:`Replies` owns the cookies of one connection.  :meth:`Replies.request` registers
a request and returns the header to send.  The server's bytes go in through a buffer the
machine chooses: :meth:`Replies.get_buffer` says where the next bytes belong and
:meth:`Replies.received` is told how many arrived there; it returns the events that
completed (:class:`RequestDone`, :class:`RequestFailed`, or one final
:class:`ProtocolViolation`).  While a read's data streams in (an OFFSET_DATA payload, or
the data of a simple reply) that buffer is the caller's own buffer, so read data is never
copied in Python; headers and small payloads go through a scratch buffer and are decoded
by ``_transmission``.

What a server must do, and what breaks the stream when it does not (NBD proto.md,
"Transmission phase" and "Structured reply chunk message types"):

- every reply or chunk answers an outstanding cookie; chunks that arrive for a request
  that already finished are dropped (qemu 7.2 sends an ERROR chunk flagged DONE and then
  a block status chunk for the same cookie);
- the chunks of a read lie inside the request and never overlap, and a successful read
  is complete only when they cover it exactly ("the server MUST NOT send chunks that
  overlap", "MUST cover the entire requested range");
- block status chunks name negotiated meta contexts, one chunk per context.

A request whose caller went away (:meth:`Replies.abandon`) stays registered until its
reply has been consumed into nowhere, so the stream never loses sync.
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Final

from . import _transmission as tx
from ._events import Event, ProtocolViolation, RequestDone, RequestFailed
from ._request import Request
from .constants import REPLY_TYPE_ERROR_BIT, Command, CommandFlag, Errno, ReplyFlag, ReplyType
from .errors import ProtocolError, RemoteProtocolError

log = logging.getLogger("nbdclient")

_SCRATCH: Final = 256 * 1024
#: Cookies of finished requests remembered, to recognise their late chunks.
_FINISHED_KEEP: Final = 4096


class ReplyState(enum.Enum):
    """Where the reply stream is."""

    HEADER = "header"  # the next bytes start a reply or chunk header
    PAYLOAD = "payload"  # a chunk's metadata (block status, error, hole, none)
    DATA_OFFSET = "data offset"  # the 8-byte offset that opens an OFFSET_DATA chunk
    DATA = "data"  # read data: into the request's buffer, or into nowhere
    DISCARD = "discard"  # the payload of a late chunk for a finished request
    DEAD = "dead"  # the server broke the protocol or the connection ended


_HEADER: Final = ReplyState.HEADER
_PAYLOAD: Final = ReplyState.PAYLOAD
_DATA_OFFSET: Final = ReplyState.DATA_OFFSET
_DATA: Final = ReplyState.DATA
_DISCARD: Final = ReplyState.DISCARD
_DEAD: Final = ReplyState.DEAD
_NO_EVENTS: Final[Sequence[Event]] = ()
_DONE: Final = int(ReplyFlag.DONE)  # a plain int: IntFlag's & costs a call per chunk


class Replies:
    """The cookie table and reply state machine of one connection (see the module
    docstring).  ``contexts`` maps negotiated meta context ids to their names."""

    def __init__(
        self, *, structured: bool, extended: bool, size: int, contexts: Mapping[int, str]
    ) -> None:
        self.structured = structured or extended
        self.extended = extended
        self.size = size
        self.contexts = dict(contexts)
        self.state = _HEADER
        self.error: ProtocolError | None = None
        self._requests: dict[int, Request] = {}
        self._finished: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._cookies = itertools.count(1)
        self._events: list[Event] = []
        self._scratch = bytearray(_SCRATCH)
        self._view = memoryview(self._scratch)
        self._end = 0  # bytes in the scratch buffer not yet parsed start at 0
        self._direct = False  # the last buffer handed out was the caller's
        self._header: tx.ReplyHeader | None = None
        self._current: Request | None = None
        self._payload = bytearray()
        self._need = 0
        self._dst: memoryview | None = None
        self._filled = 0
        self._data_len = 0

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
    ) -> tuple[int, bytes]:
        """Register a request; returns its cookie and the request header to send.

        ``buf`` receives a read's data; ``payload_length`` is the length of the data
        that follows the header (writes)."""
        if self.error is not None:
            raise self.error
        cookie = next(self._cookies)
        self._requests[cookie] = Request(cookie, command, offset, length, buf, req_one)
        wire_length = length
        if payload_length is not None and self.extended:
            flags |= CommandFlag.PAYLOAD_LEN
            wire_length = payload_length
        return cookie, tx.encode_request(
            command, flags, cookie, offset, wire_length, extended=self.extended
        )

    def disconnect(self) -> bytes:
        """The NBD_CMD_DISC request (it has no reply)."""
        return tx.encode_request(Command.DISC, 0, 0, 0, 0, extended=self.extended)

    def abandon(self, cookie: int) -> None:
        """The caller went away: its reply is still consumed, but lands nowhere and
        completes nothing.  (Never called between get_buffer and received.)"""
        request = self._requests.get(cookie)
        if request is None:
            return
        request.abandoned = True
        request.buf = None
        if request is self._current:
            self._dst = None

    @property
    def outstanding(self) -> int:
        """Requests whose reply has not finished, abandoned ones included."""
        return len(self._requests)

    def close(self, error: ProtocolError) -> None:
        """The connection ended: no more replies; later requests raise ``error``
        (or the violation that came first)."""
        if self.error is None:
            self.error = error
        self.state = _DEAD
        self._requests.clear()
        self._dst = None
        self._direct = False
        self._end = 0

    # ---- receiving ----------------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next bytes from the server go (``sizehint`` is ignored)."""
        if self.state is _DATA and self._dst is not None:
            self._direct = True
            return self._dst[self._filled :]
        self._direct = False
        return self._view[self._end :]

    def received(self, nbytes: int) -> Sequence[Event]:
        """``nbytes`` arrived in the last buffer from :meth:`get_buffer`; returns the
        events they completed, in order."""
        try:
            if self._direct:
                self._filled += nbytes
                if self._filled == self._data_len:
                    self._data_done()
            elif self.state is not _DEAD:
                self._end += nbytes
                start = self._process()
                rest = self._end - start
                if rest:  # a partial header: keep it at the front
                    self._view[:rest] = self._view[start : self._end]
                self._end = rest
        except RemoteProtocolError as exc:
            self._violation(exc)
        events = self._events
        if not events:
            return _NO_EVENTS
        self._events = []
        return events

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed ``data`` through :meth:`get_buffer`/:meth:`received` (for callers that
        already hold the bytes, and for tests)."""
        events: list[Event] = []
        view = memoryview(data)
        while view and self.state is not _DEAD:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            events += self.received(n)
        return events

    def _violation(self, error: RemoteProtocolError) -> None:
        if self.error is None:
            self._events.append(ProtocolViolation(error))
        self.close(error)

    def _process(self) -> int:
        """Parse what is in the scratch buffer; returns where unparsed bytes start."""
        view = self._view
        start = 0
        end = self._end
        while start < end:
            state = self.state
            avail = end - start
            if state is _HEADER:
                if avail < 4:
                    break
                (magic,) = tx.MAGIC.unpack_from(view, start)
                size = tx.reply_header_size(magic)
                if avail < size:
                    break
                header = tx.parse_reply_header(view[start : start + size], extended=self.extended)
                start += size
                self._on_header(header)
            elif state is _DATA or state is _DISCARD:
                take = min(avail, self._data_len - self._filled)
                if self._dst is not None:
                    self._dst[self._filled : self._filled + take] = view[start : start + take]
                start += take
                self._filled += take
                if self._filled == self._data_len:
                    self._data_done()
            elif not self._payload and avail >= self._need:  # all at hand: the usual case
                if state is _DATA_OFFSET:
                    (offset,) = tx.OFFSET.unpack_from(view, start)
                    start += 8
                    self._on_data_offset(offset)
                else:
                    payload = bytes(view[start : start + self._need])
                    start += self._need
                    self._on_payload(payload)
            else:  # a payload split across receives: collect it
                take = min(avail, self._need - len(self._payload))
                self._payload += view[start : start + take]
                start += take
                if len(self._payload) == self._need:
                    payload = bytes(self._payload)
                    self._payload.clear()
                    if state is _PAYLOAD:
                        self._on_payload(payload)
                    else:
                        self._on_data_offset(tx.OFFSET.unpack(payload)[0])
        return start

    # ---- reply dispatch -----------------------------------------------------------------

    def _on_header(self, header: tx.ReplyHeader) -> None:
        self._header = header
        request = self._current = self._requests.get(header.cookie)
        if header.simple:
            self._on_simple(header, request)
            return
        if not self.structured:
            raise RemoteProtocolError("structured reply chunk, but structured replies are off")
        if request is None:
            if header.cookie not in self._finished:
                raise RemoteProtocolError(f"reply for unknown cookie {header.cookie}")
            log.debug("dropping a late chunk for finished cookie %d", header.cookie)
            self._stream(None, header.length, _DISCARD)
            return
        if header.type == ReplyType.OFFSET_DATA:
            if request.command != Command.READ:
                raise RemoteProtocolError("OFFSET_DATA chunk for a command that is not a read")
            if header.length <= 8 or header.length > request.length + 8:
                raise RemoteProtocolError(f"OFFSET_DATA chunk of bad length {header.length}")
            self._need = 8
            self.state = _DATA_OFFSET
            return
        if header.length > tx.MAX_METADATA_PAYLOAD:
            raise RemoteProtocolError(f"reply chunk of {header.length} bytes is too large")
        self._need = header.length
        self.state = _PAYLOAD
        if header.length == 0:
            self._on_payload(b"")

    def _on_simple(self, header: tx.ReplyHeader, request: Request | None) -> None:
        if self.extended:
            raise RemoteProtocolError("simple reply after extended headers were negotiated")
        if request is None:
            if header.cookie not in self._finished:
                raise RemoteProtocolError(f"reply for unknown cookie {header.cookie}")
            self._chunk_done()  # its length is unknowable; assume no data
            return
        if header.error:
            request.fail(header.error)
        elif request.command == Command.READ:
            # a simple read reply carries exactly the requested length of data
            request.cover(0, request.length)
            self._stream(request.buf, request.length, _DATA)
            return
        self._chunk_done()

    def _on_data_offset(self, offset: int) -> None:
        header, request = self._header, self._current
        assert header is not None and request is not None
        length = header.length - 8
        self._stream(request.add_data(offset, length), length, _DATA)

    def _stream(self, dst: memoryview | None, length: int, state: ReplyState) -> None:
        """The next ``length`` bytes go to ``dst`` (or nowhere)."""
        self._dst = dst
        self._data_len = length
        self._filled = 0
        self.state = state
        if length == 0:
            self._data_done()

    def _data_done(self) -> None:
        self._dst = None
        self._direct = False
        self._chunk_done()

    def _on_payload(self, payload: bytes) -> None:
        header, request = self._header, self._current
        assert header is not None and request is not None
        kind = header.type
        if kind == ReplyType.NONE:
            if payload:
                raise RemoteProtocolError("NONE chunk with a payload")
            if not header.flags & _DONE:
                raise RemoteProtocolError("NONE chunk without the DONE flag")
        elif kind == ReplyType.OFFSET_HOLE:
            if request.command != Command.READ:
                raise RemoteProtocolError("OFFSET_HOLE chunk for a command that is not a read")
            request.add_hole(*tx.parse_hole_chunk(payload))
        elif kind in (ReplyType.BLOCK_STATUS, ReplyType.BLOCK_STATUS_EXT):
            self._on_block_status(request, kind, payload)
        elif kind in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            chunk = tx.parse_error_chunk(payload, with_offset=kind == ReplyType.ERROR_OFFSET)
            message = chunk.message
            if chunk.offset is not None:
                message = f"{message} (at offset {chunk.offset})".lstrip()
            request.fail(chunk.errno, message)
        elif kind & REPLY_TYPE_ERROR_BIT:
            request.fail(Errno.EINVAL, f"unknown error chunk type {kind:#x}")
        else:
            raise RemoteProtocolError(f"unknown reply chunk type {kind}")
        self._chunk_done()

    def _on_block_status(self, request: Request, kind: int, payload: bytes) -> None:
        if request.command != Command.BLOCK_STATUS:
            raise RemoteProtocolError("block status chunk for another command")
        extended_chunk = kind == ReplyType.BLOCK_STATUS_EXT
        if extended_chunk != self.extended:
            raise RemoteProtocolError("block status chunk type does not match the headers")
        context_id, extents = tx.parse_block_status(
            payload,
            extended_chunk=extended_chunk,
            offset=request.offset,
            length=request.length,
            size=self.size,
            req_one=request.req_one,
        )
        name = self.contexts.get(context_id)
        if name is None:
            raise RemoteProtocolError(f"block status for unknown meta context id {context_id}")
        request.add_extents(name, extents)

    def _chunk_done(self) -> None:
        header, request = self._header, self._current
        self.state = _HEADER
        self._header = None
        self._current = None
        if request is None or header is None:
            return
        if header.simple or header.flags & _DONE:
            self._finish(request)

    def _finish(self, request: Request) -> None:
        cookie = request.cookie
        del self._requests[cookie]
        self._finished[cookie] = None
        if len(self._finished) > _FINISHED_KEEP:
            self._finished.popitem(last=False)
        incomplete = request.pieces is not None and request.covered != request.length
        if incomplete and request.error is None:
            raise RemoteProtocolError(
                f"read reply covered {request.covered} of {request.length} bytes"
            )
        if request.abandoned:
            return
        if request.error is not None:
            self._events.append(RequestFailed(cookie, request.error))
        elif request.command == Command.BLOCK_STATUS:
            self._events.append(RequestDone(cookie, request.extents))
        else:
            self._events.append(RequestDone(cookie, None))
