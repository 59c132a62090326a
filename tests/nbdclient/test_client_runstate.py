"""The client's life against the in-process fake server: READY, DEAD, DISCONNECTING,
CLOSED and the errors of each; timed-out and abandoned requests; a server that sends
the same part of a read twice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import nbdclient
from nbdclient import Runstate

from .fakeserver import FakeServer, Request, Session, default_handler


async def test_ready_then_closed(sockdir: Path) -> None:
    async with FakeServer(str(sockdir / "s")) as srv:
        client = await nbdclient.connect(srv.uri)
        assert client.runstate is Runstate.READY and not client.closed
        first = asyncio.create_task(client.disconnect())
        await asyncio.sleep(0)
        assert client.runstate is Runstate.DISCONNECTING
        await asyncio.gather(first, client.disconnect())  # the second waits for the first
        assert client.runstate is Runstate.CLOSED and client.closed
        with pytest.raises(nbdclient.StateError) as info:
            await client.pread(1, 0)
        assert (info.value.state, info.value.required) == (Runstate.CLOSED, Runstate.READY)
        assert "closed" in str(info.value)
        await client.disconnect()  # idempotent


async def test_dead_after_connection_loss(sockdir: Path) -> None:
    async def handler(session: Session, request: Request) -> None:
        if request.offset:
            session.writer.close()
        else:
            await default_handler(session, request)

    async with FakeServer(str(sockdir / "s"), handler=handler) as srv:
        client = await nbdclient.connect(srv.uri)
        assert await client.pread(2, 0) == bytes(2)
        with pytest.raises(nbdclient.ConnectionLostError):
            await client.pread(2, 512)
        assert client.runstate is Runstate.DEAD and client.closed
        with pytest.raises(nbdclient.ConnectionLostError):  # dead: the cause, not StateError
            await client.pread(2, 0)
        await client.disconnect()
        assert client.runstate is Runstate.CLOSED
        with pytest.raises(nbdclient.StateError):
            await client.pread(2, 0)


async def test_request_timeout_reply_consumed_later(sockdir: Path) -> None:
    """A read that times out: its late reply is consumed into nowhere (the caller's
    buffer is not written after the timeout) and the connection stays in sync."""
    release = asyncio.Event()

    async def handler(session: Session, request: Request) -> None:
        if request.offset == 0:
            await release.wait()
        await default_handler(session, request)

    async with FakeServer(str(sockdir / "s"), handler=handler) as srv:
        srv.data[:8] = b"slowslow"
        srv.data[4096:4104] = b"nextnext"
        async with await nbdclient.connect(srv.uri, request_timeout=0.1) as client:
            buf = bytearray(b"\xee" * 512)
            with pytest.raises(nbdclient.NBDTimeoutError, match="READ request"):
                await client.pread_into(buf, 0)
            with pytest.raises(nbdclient.NBDTimeoutError):
                await client.pread_many([(bytearray(512), 0)])
            release.set()
            client.request_timeout = 5
            assert await client.pread(8, 4096) == b"nextnext"
            assert buf == b"\xee" * 512
            assert client.runstate is Runstate.READY


@pytest.mark.parametrize("many", [False, True])
async def test_same_half_twice_is_refused(sockdir: Path, many: bool) -> None:
    """The server sends the first half of a read twice (DONE on the second): before,
    the read counted as complete and the second half of a reused buffer kept its old
    bytes.  Now the overlap breaks the connection with RemoteProtocolError."""

    async def handler(session: Session, request: Request) -> None:
        half = request.length // 2
        first = bytes(session.data[request.offset : request.offset + half])
        session.write(session.data_chunk(request.cookie, request.offset, first, done=False))
        session.write(session.data_chunk(request.cookie, request.offset, first, done=True))

    async with FakeServer(str(sockdir / "s"), handler=handler) as srv:
        srv.data[:4096] = b"n" * 4096
        client = await nbdclient.connect(srv.uri)
        reused = bytearray(b"old!" * 1024)
        with pytest.raises(nbdclient.RemoteProtocolError, match="overlaps"):
            if many:
                await client.pread_many([(reused, 0)])
            else:
                await client.pread_into(reused, 0)
        assert client.runstate is Runstate.DEAD
        await client.disconnect()
