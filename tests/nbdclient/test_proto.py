"""The no-I/O protocol core: bytes in, values out."""

from __future__ import annotations

import ast
import struct
from pathlib import Path

import pytest

from nbdclient import _handshake as hs
from nbdclient import _transmission as tx
from nbdclient.constants import (
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OLDSTYLE_MAGIC,
    OPTION_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Info,
    Option,
    OptionReply,
)
from nbdclient.errors import NegotiationError, RemoteProtocolError
from nbdclient.values import BlockSize, Extent

#: The protocol core: bytes in, values and events out.  Only the asyncio layer
#: (_negotiate, _connection, client) may touch sockets, TLS or the event loop.
CORE = (
    "_handshake.py",
    "_transmission.py",
    "_replies.py",
    "_request.py",
    "_events.py",
    "constants.py",
    "values.py",
    "errors.py",
)


def test_core_modules_do_no_io() -> None:
    root = Path(__file__).resolve().parents[2] / "nbdclient"
    for name in CORE:
        tree = ast.parse((root / name).read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0
        }
        assert not imported & {"asyncio", "socket", "ssl", "selectors"}, name
        relative = {
            node.module or alias.name  # "from .x import y" or "from . import x"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1
            for alias in node.names
        }
        # the core imports only the core
        assert relative <= {name.removesuffix(".py") for name in CORE}, (name, relative)


def test_greeting_newstyle_and_oldstyle() -> None:
    hs.parse_greeting_prefix(struct.pack(">QQ", NBDMAGIC, IHAVEOPT))
    with pytest.raises(NegotiationError, match="oldstyle"):
        hs.parse_greeting_prefix(struct.pack(">QQ", NBDMAGIC, OLDSTYLE_MAGIC))
    with pytest.raises(RemoteProtocolError, match="not an NBD server"):
        hs.parse_greeting_prefix(b"HTTP/1.1 200 OK\r\n"[:16])


@pytest.mark.parametrize(("server_flags", "client_flags"), [(1, 1), (3, 3), (0xFFFF, 3)])
def test_client_flags(server_flags: int, client_flags: int) -> None:
    assert hs.client_flags_for(server_flags) == client_flags


def test_non_fixed_newstyle_refused() -> None:
    with pytest.raises(NegotiationError, match="fixed newstyle"):
        hs.client_flags_for(0)


def test_encode_go() -> None:
    data = hs.encode_info_request("exp", (Info.EXPORT, Info.BLOCK_SIZE))
    assert data == b"\0\0\0\x03exp" + b"\0\x02" + b"\0\0" + b"\0\x03"
    option = hs.encode_option(Option.GO, data)
    assert option[:16] == struct.pack(">QII", IHAVEOPT, 7, len(data))


def test_encode_meta_context_request() -> None:
    data = hs.encode_meta_context_request("e", ("base:allocation", "qemu:"))
    assert data == (
        b"\0\0\0\x01e" + b"\0\0\0\x02" + b"\0\0\0\x0fbase:allocation" + b"\0\0\0\x05qemu:"
    )


def test_info_replies() -> None:
    info = hs.ExportInfo()
    hs.apply_info_reply(info, struct.pack(">HQH", 0, 12345, 0x58F))
    hs.apply_info_reply(info, struct.pack(">HIII", 3, 512, 4096, 1 << 25))
    hs.apply_info_reply(info, struct.pack(">H", 2) + "désc".encode())
    hs.apply_info_reply(info, struct.pack(">H", 99) + b"ignored")
    assert (info.size, info.flags, info.description) == (12345, 0x58F, "désc")
    assert info.block_size == BlockSize(512, 4096, 1 << 25)
    with pytest.raises(RemoteProtocolError):
        hs.apply_info_reply(info, struct.pack(">HIII", 3, 3, 4096, 1 << 25))


def test_server_reply_bounds() -> None:
    assert hs.parse_server_reply(b"\0\0\0\x03expdesc").name == "exp"
    with pytest.raises(RemoteProtocolError):
        hs.parse_server_reply(b"\0\0\x10\x00exp")


def test_reply_headers() -> None:
    simple = struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 5, 77)
    assert tx.reply_header_size(SIMPLE_REPLY_MAGIC) == 16
    header = tx.parse_reply_header(simple, extended=False)
    assert (header.simple, header.error, header.cookie) == (True, 5, 77)
    chunk = struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1, 2, 9, 12)
    header = tx.parse_reply_header(chunk, extended=False)
    assert (header.flags, header.type, header.cookie, header.length) == (1, 2, 9, 12)
    with pytest.raises(RemoteProtocolError, match="bad reply magic"):
        tx.reply_header_size(0xDEADBEEF)
    with pytest.raises(RemoteProtocolError, match="expected an extended reply"):
        tx.parse_reply_header(chunk, extended=True)


def test_block_status_clipping_and_merging() -> None:
    payload = struct.pack(">I", 3) + b"".join(
        struct.pack(">II", n, f) for n, f in [(4096, 0), (4096, 0), (8192, 3), (1 << 20, 0)]
    )
    cid, extents = tx.parse_block_status(
        payload, extended_chunk=False, offset=4096, length=10000, size=1 << 30, req_one=False
    )
    assert cid == 3
    assert extents == [Extent(4096, 8192, 0), Extent(12288, 1808, 3)]
    _, one = tx.parse_block_status(
        payload, extended_chunk=False, offset=0, length=2048, size=1 << 30, req_one=True
    )
    assert one == [Extent(0, 2048, 0)]  # a server ignoring REQ_ONE: first extent, clamped


def test_block_status_ext_and_bad_lengths() -> None:
    payload = struct.pack(">II", 1, 2) + struct.pack(">QQ", 1 << 33, 1) + struct.pack(">QQ", 5, 0)
    _, extents = tx.parse_block_status(
        payload, extended_chunk=True, offset=0, length=1 << 40, size=1 << 34, req_one=False
    )
    assert extents == [Extent(0, 1 << 33, 1), Extent(1 << 33, 5, 0)]
    with pytest.raises(RemoteProtocolError):
        tx.parse_block_status(
            payload[:-1], extended_chunk=True, offset=0, length=10, size=10, req_one=False
        )
    with pytest.raises(RemoteProtocolError, match="length 0"):
        tx.parse_block_status(
            struct.pack(">III", 0, 0, 0),
            extended_chunk=False,
            offset=0,
            length=9,
            size=9,
            req_one=False,
        )


def test_error_chunks() -> None:
    chunk = tx.parse_error_chunk(
        struct.pack(">IH", 5, 2) + b"io" + struct.pack(">Q", 4096), with_offset=True
    )
    assert (chunk.errno, chunk.message, chunk.offset) == (5, "io", 4096)
    with pytest.raises(RemoteProtocolError):
        tx.parse_error_chunk(struct.pack(">IH", 5, 200) + b"io", with_offset=False)
    bad_utf8 = tx.parse_error_chunk(struct.pack(">IH", 22, 2) + b"\xff\xfe", with_offset=False)
    assert bad_utf8.errno == 22


def test_requests() -> None:
    assert len(tx.encode_request(0, 0, 1, 0, 512, extended=False)) == 28
    assert len(tx.encode_request(0, 0, 1, 0, 1 << 40, extended=True)) == 32
    with pytest.raises(ValueError):
        tx.encode_request(7, 0, 1, 0, 1 << 40, extended=False)


def _meta(context_id: int, name: str) -> bytes:
    return struct.pack(">I", context_id) + name.encode()


def test_set_meta_context_selects_only_what_was_asked() -> None:
    queries = ("base:allocation", "qemu:dirty-bitmap:")
    replies = hs.MetaContextReplies(Option.SET_META_CONTEXT, queries)
    replies.add(_meta(0, "base:allocation"))
    replies.add(_meta(2, "qemu:dirty-bitmap:b1"))  # under a namespace query
    assert replies.contexts == {"base:allocation": 0, "qemu:dirty-bitmap:b1": 2}
    for payload, words in [
        (_meta(3, "qemu:allocation-depth"), "not asked for"),
        (_meta(4, "base:allocation"), "twice"),
        (_meta(2, "qemu:dirty-bitmap:b2"), "id 2 twice"),
    ]:
        with pytest.raises(RemoteProtocolError, match=words):
            replies.add(payload)
    with pytest.raises(RemoteProtocolError, match="not asked for"):
        hs.MetaContextReplies(Option.SET_META_CONTEXT, ()).add(_meta(0, "base:allocation"))


def test_list_meta_context_is_bounded() -> None:
    replies = hs.MetaContextReplies(Option.LIST_META_CONTEXT, ())
    for i in range(hs.MAX_REPLIES):
        replies.add(_meta(0, f"qemu:dirty-bitmap:b{i}"))  # LIST ids are all 0: fine
    assert len(replies.contexts) == hs.MAX_REPLIES
    with pytest.raises(RemoteProtocolError, match="more than 16384 replies"):
        replies.add(_meta(0, "qemu:dirty-bitmap:one-more"))


def test_reply_budget_counts_bytes() -> None:
    budget = hs.ReplyBudget(Option.LIST)
    big = bytes(4 + 2 * MAX_STRING)
    with pytest.raises(RemoteProtocolError, match="LIST"):
        for _ in range(hs.MAX_REPLY_BYTES // len(big) + 1):
            budget.spend(big)
    assert budget.replies < hs.MAX_REPLIES  # the bytes ran out first


@pytest.mark.parametrize(
    ("reply_type", "length", "ok"),
    [
        (OptionReply.SERVER, 4 + 2 * MAX_STRING, True),
        (OptionReply.SERVER, 5 + 2 * MAX_STRING, False),
        (OptionReply.META_CONTEXT, 4 + MAX_STRING, True),
        (OptionReply.META_CONTEXT, 5 + MAX_STRING, False),
        (OptionReply.INFO, 1 << 20, True),
        (OptionReply.ERR_UNKNOWN, (1 << 20) + 1, False),
    ],
)
def test_option_reply_sizes(reply_type: int, length: int, ok: bool) -> None:
    raw = struct.pack(">QIII", OPTION_REPLY_MAGIC, Option.GO, reply_type, length)
    if ok:
        assert hs.parse_option_reply_header(raw, Option.GO).length == length
    else:
        with pytest.raises(RemoteProtocolError, match="too large"):
            hs.parse_option_reply_header(raw, Option.GO)
