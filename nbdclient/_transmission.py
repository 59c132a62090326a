"""Transmission-phase wire format, without I/O: requests, reply headers, chunk payloads.

Replies arrive as a header (simple, structured or extended) followed by a payload.
:func:`parse_reply_header` turns header bytes into a :class:`ReplyHeader`; the chunk
payload decoders validate what a server sent against the request it answers, so a
hostile server can never make the client read past a request or allocate without bound.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from .constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    MAX_STRING,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
)
from .errors import RemoteProtocolError
from .values import Extent

REQUEST: Final = struct.Struct(">IHHQQI")
EXTENDED_REQUEST: Final = struct.Struct(">IHHQQQ")
MAGIC: Final = struct.Struct(">I")
SIMPLE_REPLY_REST: Final = struct.Struct(">IQ")  # after the magic
STRUCTURED_REPLY_REST: Final = struct.Struct(">HHQI")
EXTENDED_REPLY_REST: Final = struct.Struct(">HHQQQ")
OFFSET: Final = struct.Struct(">Q")
HOLE: Final = struct.Struct(">QI")
ERROR_HEADER: Final = struct.Struct(">IH")
U32: Final = struct.Struct(">I")
EXTENT32: Final = struct.Struct(">II")
EXTENT64: Final = struct.Struct(">QQ")
BS_EXT_HEADER: Final = struct.Struct(">II")

SIMPLE_REPLY_SIZE: Final = 16
STRUCTURED_REPLY_SIZE: Final = 20
EXTENDED_REPLY_SIZE: Final = 32

#: Upper bound for a non-data chunk payload (block status, errors): 2^20 extents of 16 bytes.
MAX_METADATA_PAYLOAD: Final = 8 + 16 * (1 << 20)


def encode_request(
    command: int, flags: int, cookie: int, offset: int, length: int, *, extended: bool
) -> bytes:
    if extended:
        return EXTENDED_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags, command, cookie, offset, length)
    if length > 0xFFFFFFFF:
        raise ValueError("request length does not fit 32 bits without extended headers")
    return REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


@dataclass(frozen=True, slots=True)
class ReplyHeader:
    """One reply or reply chunk header.

    ``simple`` replies carry ``error``; structured and extended chunks carry ``flags``,
    ``type`` and the payload ``length``.
    """

    cookie: int
    simple: bool
    error: int = 0
    flags: int = 0
    type: int = 0
    length: int = 0


def reply_header_size(magic: int) -> int:
    """Total header size for a reply starting with ``magic``."""
    if magic == SIMPLE_REPLY_MAGIC:
        return SIMPLE_REPLY_SIZE
    if magic == STRUCTURED_REPLY_MAGIC:
        return STRUCTURED_REPLY_SIZE
    if magic == EXTENDED_REPLY_MAGIC:
        return EXTENDED_REPLY_SIZE
    raise RemoteProtocolError(f"bad reply magic {magic:#010x}")


def parse_reply_header(data: bytes | bytearray | memoryview, *, extended: bool) -> ReplyHeader:
    """Parse a complete reply header (its size from :func:`reply_header_size`)."""
    (magic,) = MAGIC.unpack_from(data)
    if extended and magic != EXTENDED_REPLY_MAGIC:
        raise RemoteProtocolError(f"expected an extended reply, got magic {magic:#010x}")
    if not extended and magic == EXTENDED_REPLY_MAGIC:
        raise RemoteProtocolError("extended reply without negotiated extended headers")
    if magic == SIMPLE_REPLY_MAGIC:
        error, cookie = SIMPLE_REPLY_REST.unpack_from(data, 4)
        return ReplyHeader(cookie=cookie, simple=True, error=error)
    if magic == STRUCTURED_REPLY_MAGIC:
        flags, kind, cookie, length = STRUCTURED_REPLY_REST.unpack_from(data, 4)
        return ReplyHeader(cookie=cookie, simple=False, flags=flags, type=kind, length=length)
    if magic == EXTENDED_REPLY_MAGIC:
        flags, kind, cookie, _offset, length = EXTENDED_REPLY_REST.unpack_from(data, 4)
        return ReplyHeader(cookie=cookie, simple=False, flags=flags, type=kind, length=length)
    raise RemoteProtocolError(f"bad reply magic {magic:#010x}")


@dataclass(frozen=True, slots=True)
class ErrorChunk:
    errno: int
    message: str
    offset: int | None


def parse_error_chunk(payload: bytes, *, with_offset: bool) -> ErrorChunk:
    if len(payload) < ERROR_HEADER.size:
        raise RemoteProtocolError("error chunk too short")
    errno, msg_len = ERROR_HEADER.unpack_from(payload)
    tail = 8 if with_offset else 0
    if msg_len > MAX_STRING or ERROR_HEADER.size + msg_len + tail != len(payload):
        raise RemoteProtocolError("error chunk message length is inconsistent")
    if errno == 0:
        raise RemoteProtocolError("error chunk with error value 0")
    message = payload[6 : 6 + msg_len].decode("utf-8", errors="replace")
    offset = OFFSET.unpack_from(payload, 6 + msg_len)[0] if with_offset else None
    return ErrorChunk(errno, message, offset)


def parse_hole_chunk(payload: bytes) -> tuple[int, int]:
    if len(payload) != HOLE.size:
        raise RemoteProtocolError("OFFSET_HOLE chunk has the wrong length")
    offset, length = HOLE.unpack(payload)
    if length == 0:
        raise RemoteProtocolError("OFFSET_HOLE chunk of length 0")
    return offset, length


def check_within(kind: str, offset: int, length: int, req_offset: int, req_length: int) -> None:
    """A read chunk must lie inside its request."""
    if offset < req_offset or offset + length > req_offset + req_length:
        raise RemoteProtocolError(
            f"{kind} chunk [{offset}, +{length}) outside the request [{req_offset}, +{req_length})"
        )


def parse_block_status(
    payload: bytes | bytearray | memoryview,
    *,
    extended_chunk: bool,
    offset: int,
    length: int,
    size: int,
    req_one: bool,
) -> tuple[int, list[Extent]]:
    """Decode a BLOCK_STATUS(_EXT) payload into (context id, extents).

    Extents start at ``offset`` and are clipped to ``[offset, min(offset + length, size))``.
    With ``req_one`` only the first extent is kept (servers that ignore REQ_ONE are
    tolerated, as qemu's own client does).
    """
    view = memoryview(payload)
    limit = min(offset + length, size)
    if extended_chunk:
        if len(view) < BS_EXT_HEADER.size + EXTENT64.size:
            raise RemoteProtocolError("BLOCK_STATUS_EXT chunk too short")
        context_id, count = BS_EXT_HEADER.unpack_from(view)
        if len(view) != BS_EXT_HEADER.size + count * EXTENT64.size:
            raise RemoteProtocolError("BLOCK_STATUS_EXT descriptor count disagrees with length")
        raw = EXTENT64.iter_unpack(view[BS_EXT_HEADER.size :])
    else:
        if len(view) < U32.size + EXTENT32.size or (len(view) - U32.size) % EXTENT32.size:
            raise RemoteProtocolError("BLOCK_STATUS chunk has a bad length")
        (context_id,) = U32.unpack_from(view)
        raw = EXTENT32.iter_unpack(view[U32.size :])
    extents: list[Extent] = []
    position = offset
    for ext_length, flags in raw:
        if ext_length == 0:
            raise RemoteProtocolError("block status extent of length 0")
        if position >= limit:
            break  # the last extent may run past the request; ignore anything beyond
        end = min(position + ext_length, limit)
        if extents and extents[-1].flags == flags:
            extents[-1] = Extent(extents[-1].offset, end - extents[-1].offset, flags)
        else:
            extents.append(Extent(position, end - position, flags))
        position = end
        if req_one:
            break
    return context_id, extents
