"""The asyncio client against the in-process fake server: negotiation paths, torn and
out-of-order replies, quirks of real servers, protocol violations, cancellation."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

import nbdclient
from nbdclient.constants import Command, Option, OptionReply, ReplyType, TransmissionFlag
from nbdclient.extents import map_export, merge_extents

from .fakeserver import FakeServer, Request, ServerConfig, Session, default_handler


def server(
    sockdir: Path, config: ServerConfig | None = None, handler=default_handler
) -> FakeServer:  # type: ignore[no-untyped-def]
    return FakeServer(str(sockdir / "s"), config, handler)


async def test_go_read_write_and_info(sockdir: Path) -> None:
    async with server(sockdir) as srv:
        srv.data[4096:4100] = b"abcd"
        async with await nbdclient.connect(srv.uri, meta_contexts=["base:allocation"]) as c:
            assert c.size == 1 << 20
            assert c.structured_replies and not c.extended_headers
            assert c.meta_contexts == {"base:allocation": 10}
            assert await c.pread(4, 4096) == b"abcd"
            await c.pwrite(b"xyz", 100, fua=True)
            await c.zero(4096, 8192)
            await c.flush()
            await c.trim(512, 0)
            await c.cache(512, 0)
        assert srv.data[100:103] == b"xyz"
        commands = [r.command for r in srv.requests]
        assert commands == [
            Command.READ,
            Command.WRITE,
            Command.WRITE_ZEROES,
            Command.FLUSH,
            Command.TRIM,
            Command.CACHE,
        ]
        assert srv.requests[1].flags == 1  # FUA
        assert Option.GO in srv.options and Option.STRUCTURED_REPLY in srv.options


async def test_list_exports_and_contexts(sockdir: Path) -> None:
    async with server(sockdir) as srv:
        exports = await nbdclient.list_exports(srv.uri)
        assert exports == [nbdclient.ExportListing("exp", "a test export")]
        assert await nbdclient.list_meta_contexts(srv.uri, queries=["qemu:dirty-bitmap:"]) == [
            "qemu:dirty-bitmap:b1"
        ]
        assert srv.options[-1] == Option.ABORT


async def test_oldstyle_refused(sockdir: Path) -> None:
    async with server(sockdir, ServerConfig(oldstyle=True)) as srv:
        with pytest.raises(nbdclient.NegotiationError, match="oldstyle"):
            await nbdclient.connect(srv.uri)


async def test_go_unsupported_falls_back_to_export_name(sockdir: Path) -> None:
    async with server(sockdir, ServerConfig(support_go=False)) as srv:
        async with await nbdclient.connect(srv.uri) as c:
            assert c.size == 1 << 20
            assert await c.pread(8, 0) == bytes(8)
        assert srv.options[-1] == Option.EXPORT_NAME


async def test_negotiation_error_carries_server_message(sockdir: Path) -> None:
    config = ServerConfig(go_error=(OptionReply.ERR_UNKNOWN, "export 'nope' not present"))
    async with server(sockdir, config) as srv:
        with pytest.raises(nbdclient.NegotiationError) as info:
            await nbdclient.connect(srv.uri)
        assert info.value.server_message == "export 'nope' not present"
        assert info.value.reply_type == OptionReply.ERR_UNKNOWN
        assert srv.options[-1] == Option.ABORT


async def test_tls_refused_never_plaintext(sockdir: Path) -> None:
    async with server(sockdir) as srv:
        with pytest.raises(nbdclient.NegotiationError, match="STARTTLS"):
            await nbdclient.connect(srv.uri, tls=nbdclient.TLSOptions())
        assert Option.GO not in srv.options


async def test_handshake_timeout(sockdir: Path) -> None:
    async with server(sockdir, ServerConfig(stall_handshake=True)) as srv:
        with pytest.raises(nbdclient.NBDTimeoutError):
            await nbdclient.connect(srv.uri, timeout=0.3)


async def test_extended_headers(sockdir: Path) -> None:
    big = 6 << 30

    async def handler(session: Session, request: Request) -> None:
        if request.command == Command.BLOCK_STATUS:
            assert request.length == 5 << 30  # 64-bit lengths pass unsplit
            session.write(
                session.status_chunk(request.cookie, 10, [(1 << 32, 0), (1 << 32, 3)], done=True)
            )
        elif request.command == Command.READ:
            session.write(
                session.data_chunk(request.cookie, request.offset, b"q" * request.length, done=True)
            )
        else:
            session.write(session.done(request.cookie))

    config = ServerConfig(size=big, support_extended=True, contexts=("base:allocation",))
    async with server(sockdir, config, handler) as srv:
        async with await nbdclient.connect(srv.uri, meta_contexts=["base:allocation"]) as c:
            assert c.extended_headers
            reply = await c.block_status(5 << 30, 0)
            assert reply["base:allocation"] == [
                nbdclient.Extent(0, 1 << 32, 0),
                nbdclient.Extent(1 << 32, 1 << 30, 3),
            ]
            assert await c.pread(3, big - 3) == b"qqq"
            await c.pwrite(b"12", 0)
            await c.flush()
        assert Option.STRUCTURED_REPLY not in srv.options


async def test_torn_out_of_order_chunks(sockdir: Path) -> None:
    """Replies of two reads interleaved, sent one byte at a time, with holes."""
    held: list[Request] = []

    async def handler(session: Session, request: Request) -> None:
        held.append(request)
        if len(held) < 2:
            return
        a, b = held
        wire = b"".join(
            [
                session.data_chunk(b.cookie, b.offset + 512, b"B" * 512, done=False),
                session.hole_chunk(a.cookie, a.offset, 512, done=False),
                session.data_chunk(a.cookie, a.offset + 512, b"A" * 512, done=True),
                session.hole_chunk(b.cookie, b.offset, 512, done=True),
            ]
        )
        for i in range(len(wire)):
            session.write(wire[i : i + 1])
            await session.drain()

    async with server(sockdir, handler=handler) as srv:
        async with await nbdclient.connect(srv.uri) as c:
            buf_a = bytearray(b"x" * 1024)
            buf_b = bytearray(b"y" * 1024)
            await asyncio.gather(c.pread_into(buf_a, 0), c.pread_into(buf_b, 4096))
            assert buf_a == bytes(512) + b"A" * 512
            assert buf_b == bytes(512) + b"B" * 512


async def test_error_chunk_keeps_connection(sockdir: Path) -> None:
    async def handler(session: Session, request: Request) -> None:
        if request.offset == 0:
            session.write(session.error_chunk(request.cookie, 5, "media error"))
        else:
            await default_handler(session, request)

    async with server(sockdir, handler=handler) as srv:
        async with await nbdclient.connect(srv.uri) as c:
            with pytest.raises(nbdclient.RequestError) as info:
                await c.pread(512, 0)
            assert info.value.errno_name == "EIO" and "media error" in str(info.value)
            assert await c.pread(4, 512) == bytes(4)


async def test_double_done_late_chunk_dropped(sockdir: Path) -> None:
    """qemu 7.2: an ERROR chunk flagged DONE, then more chunks for the same cookie."""

    async def handler(session: Session, request: Request) -> None:
        if request.command == Command.BLOCK_STATUS:
            session.write(session.error_chunk(request.cookie, 22, "can't get block status"))
            session.write(
                session.status_chunk(request.cookie, 11, [(request.length, 1)], done=True)
            )
        else:
            await default_handler(session, request)

    async with server(sockdir, handler=handler) as srv:
        contexts = ["base:allocation", "qemu:dirty-bitmap:b1"]
        async with await nbdclient.connect(srv.uri, meta_contexts=contexts) as c:
            with pytest.raises(nbdclient.RequestError, match="EINVAL"):
                await c.block_status(4096, 0)
            srv.data[0:2] = b"ok"
            assert await c.pread(2, 0) == b"ok"


async def test_req_one_ignored_and_multiple_contexts(sockdir: Path) -> None:
    async def handler(session: Session, request: Request) -> None:
        extents = [(1024, 0), (1024, 3), (1 << 19, 0)]
        session.write(session.status_chunk(request.cookie, 10, extents, done=False))
        session.write(session.status_chunk(request.cookie, 11, [(512, 1), (1 << 20, 0)], done=True))

    async with server(sockdir, handler=handler) as srv:
        contexts = ["base:allocation", "qemu:dirty-bitmap:b1"]
        async with await nbdclient.connect(srv.uri, meta_contexts=contexts) as c:
            one = await c.block_status(4096, 0, req_one=True)
            assert one["base:allocation"] == [nbdclient.Extent(0, 1024, 0)]
            both = await c.block_status(4096, 0)
            assert both["base:allocation"] == [
                nbdclient.Extent(0, 1024, 0),
                nbdclient.Extent(1024, 1024, 3),
                nbdclient.Extent(2048, 2048, 0),
            ]
            assert both["qemu:dirty-bitmap:b1"] == [
                nbdclient.Extent(0, 512, 1),
                nbdclient.Extent(512, 3584, 0),
            ]
            merged = merge_extents(both["base:allocation"], both["qemu:dirty-bitmap:b1"])
            assert [(m.offset, m.length, m.zero, m.dirty) for m in merged] == [
                (0, 512, False, True),
                (512, 512, False, False),
                (1024, 1024, True, False),
                (2048, 2048, False, False),
            ]


async def test_map_export_loops_over_short_replies(sockdir: Path) -> None:
    async def handler(session: Session, request: Request) -> None:
        # one 64 KiB extent per reply, alternating data / zero
        flags = 3 if (request.offset // 65536) % 2 else 0
        session.write(session.status_chunk(request.cookie, 10, [(65536, flags)], done=False))
        session.write(session.status_chunk(request.cookie, 11, [(1 << 20, 1)], done=True))

    async with server(sockdir, handler=handler) as srv:
        contexts = ["base:allocation", "qemu:dirty-bitmap:b1"]
        async with await nbdclient.connect(srv.uri, meta_contexts=contexts) as c:
            mapped = await map_export(c, dirty_context="qemu:dirty-bitmap:b1")
        assert len(mapped) == 16
        assert all(m.dirty for m in mapped)
        assert [m.zero for m in mapped] == [bool(i % 2) for i in range(16)]
        assert sum(r.command == Command.BLOCK_STATUS for r in srv.requests) == 16


async def test_cancel_one_request_keeps_stream_in_sync(sockdir: Path) -> None:
    release = asyncio.Event()

    async def handler(session: Session, request: Request) -> None:
        if request.offset == 0:
            await release.wait()
        await default_handler(session, request)

    async with server(sockdir, handler=handler) as srv:
        srv.data[:8] = b"slowslow"
        srv.data[8192:8200] = b"fastfast"
        async with await nbdclient.connect(srv.uri) as c:
            buf = bytearray(1024)
            slow = asyncio.create_task(c.pread_into(buf, 0))
            await asyncio.sleep(0.05)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            buf[:] = bytes(1024)
            release.set()
            # the server answers the cancelled read first; it must be consumed silently
            assert await c.pread(8, 8192) == b"fastfast"
            assert buf == bytes(1024)  # nothing landed in the abandoned buffer


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (lambda s, r: struct.pack(">I", 0x12345678) + bytes(12), "bad reply magic"),
        (lambda s, r: s.chunk(r.cookie + 99, ReplyType.NONE, b"", done=True), "unknown cookie"),
        (lambda s, r: s.chunk(r.cookie, 77, b"", done=True), "unknown reply chunk type"),
        (lambda s, r: s.data_chunk(r.cookie, r.offset + 4096, b"z", done=True), "outside"),
        (
            lambda s, r: (
                s.chunk(r.cookie, ReplyType.OFFSET_DATA, bytes(8) + b"\0" * 1, done=True)[:20]
                + struct.pack(">Q", 0)
            ),
            None,
        ),
        (lambda s, r: s.data_chunk(r.cookie, r.offset, b"half", done=True), "covered 4 of 512"),
    ],
)
async def test_protocol_violations_fail_everything(sockdir: Path, wire, match) -> None:  # type: ignore[no-untyped-def]
    async def handler(session: Session, request: Request) -> None:
        session.write(wire(session, request))
        if match is None:
            session.writer.close()  # EOF mid-reply

    async with server(sockdir, handler=handler) as srv:
        c = await nbdclient.connect(srv.uri)
        with pytest.raises(nbdclient.ProtocolError) as info:
            await asyncio.wait_for(c.pread(512, 0), 5)
        if match:
            assert match in str(info.value)
        with pytest.raises(nbdclient.ProtocolError):
            await c.pread(512, 0)
        await c.disconnect()


async def test_huge_chunk_length_refused(sockdir: Path) -> None:
    async def handler(session: Session, request: Request) -> None:
        session.write(
            struct.pack(">IHHQI", 0x668E33EF, 1, ReplyType.OFFSET_DATA, request.cookie, 0xFFFFFFF0)
        )

    async with server(sockdir, handler=handler) as srv:
        c = await nbdclient.connect(srv.uri)
        with pytest.raises(nbdclient.RemoteProtocolError, match="bad length"):
            await asyncio.wait_for(c.pread(512, 0), 5)
        await c.disconnect()


async def test_unknown_error_type_fails_only_that_request(sockdir: Path) -> None:
    async def handler(session: Session, request: Request) -> None:
        if request.offset == 0:
            session.write(session.chunk(request.cookie, 0x8123, b"\0\0\0\x05\0\0", done=True))
        else:
            await default_handler(session, request)

    async with server(sockdir, handler=handler) as srv:
        async with await nbdclient.connect(srv.uri) as c:
            with pytest.raises(nbdclient.RequestError):
                await c.pread(512, 0)
            assert await c.pread(2, 512) == bytes(2)


async def test_large_reads_split_to_maximum(sockdir: Path) -> None:
    config = ServerConfig(size=1 << 20, block_size=(512, 4096, 65536))
    async with server(sockdir, config) as srv:
        srv.data[:] = bytes(range(256)) * 4096
        async with await nbdclient.connect(srv.uri) as c:
            data = await c.pread(1 << 20, 0)
            with pytest.raises(ValueError, match="aligned"):
                await c.pread(100, 1)
        assert data == bytes(srv.data)
        reads = [r for r in srv.requests if r.command == Command.READ]
        assert len(reads) == 16 and max(r.length for r in reads) == 65536


async def test_connection_lost_fails_pending(sockdir: Path) -> None:
    async def handler(session: Session, request: Request) -> None:
        session.writer.close()

    async with server(sockdir, handler=handler) as srv:
        c = await nbdclient.connect(srv.uri)
        results = await asyncio.gather(
            *(c.pread(512, i * 512) for i in range(4)), return_exceptions=True
        )
        assert all(isinstance(r, nbdclient.ConnectionLostError) for r in results)
        await c.disconnect()
        with pytest.raises(nbdclient.StateError):
            await c.pread(1, 0)


async def test_read_only_and_flags(sockdir: Path) -> None:
    flags = int(
        TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY | TransmissionFlag.CAN_MULTI_CONN
    )
    async with server(sockdir, ServerConfig(flags=flags)) as srv:
        async with await nbdclient.connect(srv.uri) as c:
            assert c.is_read_only() and c.can_multi_conn() and not c.can_trim()
            with pytest.raises(nbdclient.UnsupportedError):
                await c.pwrite(b"x", 0)
            with pytest.raises(nbdclient.UnsupportedError):
                await c.block_status(512, 0)


async def test_simple_replies_without_structured(sockdir: Path) -> None:
    async with server(sockdir, ServerConfig(support_structured=False)) as srv:
        srv.data[:] = bytes(range(256)) * 4096
        async with await nbdclient.connect(srv.uri, meta_contexts=["base:allocation"]) as c:
            assert not c.structured_replies and dict(c.meta_contexts) == {}
            reads = await asyncio.gather(*(c.pread(65536, i * 65536) for i in range(16)))
            assert b"".join(reads) == bytes(srv.data)
            with pytest.raises(nbdclient.UnsupportedError):
                await c.block_status(512, 0)


async def test_pread_many_waits_for_all_then_raises_first_error(sockdir: Path) -> None:
    """One read fails first, a slow one completes later: the error is raised only after
    the slow buffer is filled (no reply lands later), and the connection stays usable."""
    order: list[int] = []

    async def handler(session: Session, request: Request) -> None:
        if request.offset == 8192:
            await asyncio.sleep(0.05)  # the slowest reply comes after the failing one
        if request.offset == 4096:
            session.write(session.error_chunk(request.cookie, 5, "bad sector"))
        else:
            await default_handler(session, request)
        order.append(request.offset)

    async with server(sockdir, handler=handler) as srv:
        srv.data[0:12288] = b"a" * 4096 + b"b" * 4096 + b"c" * 4096
        async with await nbdclient.connect(srv.uri) as c:
            bufs = [bytearray(4096) for _ in range(3)]
            await c.pread_many([(bufs[0], 0), (bufs[2], 8192)])
            assert bufs[0] == b"a" * 4096 and bufs[2] == b"c" * 4096
            assert len(srv.requests) == 2
            bufs = [bytearray(4096) for _ in range(3)]
            with pytest.raises(nbdclient.RequestError, match="bad sector"):
                await c.pread_many([(bufs[0], 0), (bufs[1], 4096), (bufs[2], 8192)])
            assert order[-1] == 8192  # the call returned only after the slow reply
            assert bufs[0] == b"a" * 4096 and bufs[2] == b"c" * 4096
            assert await c.pread(4, 8) == b"aaaa"
            with pytest.raises(ValueError, match="outside the export"):
                await c.pread_many([(bytearray(8), c.size - 4)])


MANY_BITMAPS = ServerConfig(contexts=tuple(f"qemu:dirty-bitmap:b{i}" for i in range(20000)))


@pytest.mark.parametrize(
    ("config", "query", "words"),
    [
        (ServerConfig(exports=tuple((f"e{i}", "") for i in range(20000))), "LIST", "replies"),
        (ServerConfig(exports=(("exp", "d" * 10000),)), "LIST", "too large"),
        (MANY_BITMAPS, "LIST_META_CONTEXT", "replies"),
        (MANY_BITMAPS, "SET_META_CONTEXT", "replies"),  # a namespace query in connect()
    ],
)
async def test_handshake_floods_refused(
    sockdir: Path, config: ServerConfig, query: str, words: str
) -> None:
    """A server that lists without end (exports, meta contexts) or sends an oversized
    listing is refused with one RemoteProtocolError, before memory grows."""
    async with server(sockdir, config) as srv:
        with pytest.raises(nbdclient.RemoteProtocolError, match=words):
            if query == "LIST":
                await nbdclient.list_exports(srv.uri)
            elif query == "LIST_META_CONTEXT":
                await nbdclient.list_meta_contexts(srv.uri, queries=["qemu:dirty-bitmap:"])
            else:
                await nbdclient.connect(srv.uri, meta_contexts=["qemu:dirty-bitmap:"])
