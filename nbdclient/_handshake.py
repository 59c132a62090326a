"""Handshake wire format (fixed newstyle), without I/O.

Encoders build option requests; decoders turn option reply payloads into values.
The asyncio client drives the exchange; everything here is pure and table-testable.
What a server sends is bounded: each reply by its type (strings are at most
MAX_STRING bytes), and the repeated replies of one option (NBD_OPT_LIST, the meta
context options) by count and bytes, so a server cannot make the client collect
without end.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from .constants import (
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OLDSTYLE_MAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
)
from .errors import NegotiationError, RemoteProtocolError
from .values import BlockSize, ExportListing

GREETING: Final = struct.Struct(">QQH")
GREETING_PREFIX: Final = struct.Struct(">QQ")
CLIENT_FLAGS: Final = struct.Struct(">I")
OPTION_REQUEST: Final = struct.Struct(">QII")
OPTION_REPLY: Final = struct.Struct(">QIII")
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")
_U32: Final = struct.Struct(">I")
_U16: Final = struct.Struct(">H")
INFO_EXPORT: Final = struct.Struct(">QH")
INFO_BLOCK_SIZE: Final = struct.Struct(">III")

#: A server may not make us allocate more than this for one option reply.
MAX_OPTION_REPLY: Final = 1 << 20
#: Replies that carry a name: u32 length + name + description (SERVER), u32 id + name
#: (META_CONTEXT); names and descriptions are strings.
_REPLY_LIMITS: Final = {
    OptionReply.SERVER: 4 + 2 * MAX_STRING,
    OptionReply.META_CONTEXT: 4 + MAX_STRING,
}
#: The repeated replies to one option (exports listed, meta contexts), and their bytes.
MAX_REPLIES: Final = 16384
MAX_REPLY_BYTES: Final = 8 << 20


def parse_greeting_prefix(data: bytes) -> None:
    """Check the first 16 bytes of the greeting; refuse oldstyle servers."""
    magic, second = GREETING_PREFIX.unpack(data)
    if magic != NBDMAGIC:
        raise RemoteProtocolError(f"not an NBD server (bad greeting magic {magic:#x})")
    if second == OLDSTYLE_MAGIC:
        raise NegotiationError(
            "server speaks the obsolete oldstyle NBD handshake; only fixed newstyle is supported"
        )
    if second != IHAVEOPT:
        raise RemoteProtocolError(f"bad newstyle greeting magic {second:#x}")


def client_flags_for(handshake_flags: int) -> int:
    """Client flags to answer the server's handshake flags with; refuse non-fixed newstyle."""
    flags = HandshakeFlag(handshake_flags & 0x3)
    if HandshakeFlag.FIXED_NEWSTYLE not in flags:
        raise NegotiationError("server does not support fixed newstyle negotiation")
    answer = ClientFlag.FIXED_NEWSTYLE
    if HandshakeFlag.NO_ZEROES in flags:
        answer |= ClientFlag.NO_ZEROES
    return int(answer)


def encode_option(option: Option, data: bytes = b"") -> bytes:
    return OPTION_REQUEST.pack(IHAVEOPT, option, len(data)) + data


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING:
        raise ValueError(f"string longer than {MAX_STRING} bytes: {text[:40]!r}...")
    return raw


def encode_info_request(export: str, infos: tuple[Info, ...]) -> bytes:
    """Payload of NBD_OPT_INFO / NBD_OPT_GO."""
    name = _string(export)
    body = _U32.pack(len(name)) + name + _U16.pack(len(infos))
    return body + b"".join(_U16.pack(i) for i in infos)


def encode_meta_context_request(export: str, queries: tuple[str, ...]) -> bytes:
    """Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    name = _string(export)
    parts = [_U32.pack(len(name)), name, _U32.pack(len(queries))]
    for query in queries:
        raw = _string(query)
        parts += [_U32.pack(len(raw)), raw]
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class OptionReplyHeader:
    option: int
    reply_type: int
    length: int


def parse_option_reply_header(data: bytes, expected_option: Option) -> OptionReplyHeader:
    magic, option, reply_type, length = OPTION_REPLY.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise RemoteProtocolError(f"bad option reply magic {magic:#x}")
    if option != expected_option:
        raise RemoteProtocolError(
            f"option reply for option {option} while waiting for {expected_option.name}"
        )
    limit = _REPLY_LIMITS.get(reply_type, MAX_OPTION_REPLY)
    if length > limit:
        what = OptionReply.describe(reply_type)
        raise RemoteProtocolError(f"{what} reply of {length} bytes is too large (limit {limit})")
    return OptionReplyHeader(option, reply_type, length)


def decode_text(data: bytes) -> str:
    """Server strings: UTF-8, but a broken server must not crash us."""
    return data.decode("utf-8", errors="replace")


def negotiation_error(option: Option, reply_type: int, payload: bytes) -> NegotiationError:
    what = OptionReply.describe(reply_type)
    return NegotiationError(
        f"server refused {option.name} ({what})",
        option=int(option),
        reply_type=reply_type,
        server_message=decode_text(payload[:MAX_STRING]),
    )


def parse_server_reply(payload: bytes) -> ExportListing:
    """NBD_REP_SERVER: u32 name length, name, optional description."""
    if len(payload) < 4:
        raise RemoteProtocolError("NBD_REP_SERVER reply too short")
    (length,) = _U32.unpack_from(payload)
    if length > len(payload) - 4:
        raise RemoteProtocolError("NBD_REP_SERVER name length exceeds the reply")
    name = decode_text(payload[4 : 4 + length])
    return ExportListing(name, decode_text(payload[4 + length :]))


def parse_meta_context_reply(payload: bytes) -> tuple[int, str]:
    """NBD_REP_META_CONTEXT: u32 context id, then the name."""
    if len(payload) < 5:
        raise RemoteProtocolError("NBD_REP_META_CONTEXT reply too short")
    (context_id,) = _U32.unpack_from(payload)
    return context_id, decode_text(payload[4:])


class ReplyBudget:
    """Counts the repeated replies to one option; too many, or too many bytes in all,
    is a protocol error (no real server lists that much)."""

    def __init__(self, option: Option) -> None:
        self.option = option
        self.replies = 0
        self.bytes = 0

    def spend(self, payload: bytes) -> None:
        self.replies += 1
        self.bytes += len(payload)
        if self.replies > MAX_REPLIES or self.bytes > MAX_REPLY_BYTES:
            raise RemoteProtocolError(
                f"server sent more than {MAX_REPLIES} replies or {MAX_REPLY_BYTES} bytes "
                f"to {self.option.name}"
            )


def _selects(query: str, name: str) -> bool:
    return name == query or (query.endswith(":") and name.startswith(query))


class MetaContextReplies:
    """The NBD_REP_META_CONTEXT replies to one LIST_ or SET_META_CONTEXT, checked.

    SET selects only what was asked for: every context answers a query (its exact name,
    or a ``namespace:`` query it falls under), no name twice, no id for two contexts
    (block status chunks are matched by id).  LIST ids carry no meaning (proto.md:
    "SHOULD be 0 and MUST be ignored")."""

    def __init__(self, option: Option, queries: tuple[str, ...]) -> None:
        self.option = option
        self.queries = queries
        self.contexts: dict[str, int] = {}
        self._budget = ReplyBudget(option)

    def add(self, payload: bytes) -> None:
        self._budget.spend(payload)
        context_id, name = parse_meta_context_reply(payload)
        if self.option == Option.SET_META_CONTEXT:
            if not any(_selects(query, name) for query in self.queries):
                raise RemoteProtocolError(f"server selected meta context {name!r}, not asked for")
            if name in self.contexts:
                raise RemoteProtocolError(f"server selected meta context {name!r} twice")
            if context_id in self.contexts.values():
                raise RemoteProtocolError(f"server gave meta context id {context_id} twice")
        self.contexts[name] = context_id


@dataclass(slots=True)
class ExportInfo:
    """What NBD_REP_INFO replies told us about an export."""

    size: int | None = None
    flags: int = 0
    name: str | None = None
    description: str | None = None
    block_size: BlockSize | None = None


def apply_info_reply(info: ExportInfo, payload: bytes) -> None:
    """Fold one NBD_REP_INFO payload into ``info``; unknown info types are ignored."""
    if len(payload) < 2:
        raise RemoteProtocolError("NBD_REP_INFO reply too short")
    (kind,) = _U16.unpack_from(payload)
    body = payload[2:]
    if kind == Info.EXPORT:
        if len(body) != INFO_EXPORT.size:
            raise RemoteProtocolError("NBD_INFO_EXPORT has the wrong length")
        info.size, info.flags = INFO_EXPORT.unpack(body)
    elif kind == Info.NAME:
        info.name = decode_text(body)
    elif kind == Info.DESCRIPTION:
        info.description = decode_text(body)
    elif kind == Info.BLOCK_SIZE:
        if len(body) != INFO_BLOCK_SIZE.size:
            raise RemoteProtocolError("NBD_INFO_BLOCK_SIZE has the wrong length")
        minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(body)
        if minimum == 0 or minimum & (minimum - 1) or minimum > 65536:
            raise RemoteProtocolError(f"invalid minimum block size {minimum}")
        if preferred < minimum or maximum < minimum:
            raise RemoteProtocolError(
                f"inconsistent block sizes (min {minimum}, preferred {preferred}, max {maximum})"
            )
        info.block_size = BlockSize(minimum, preferred, maximum)


def parse_export_name_reply(data: bytes) -> tuple[int, int]:
    """Reply to NBD_OPT_EXPORT_NAME: (size, transmission flags)."""
    size, flags = EXPORT_NAME_REPLY.unpack(data)
    return size, flags
