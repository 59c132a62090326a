"""The copy engine and the connection opener against the fake server, with sinks that
fail or stall where real ones cannot be made to: the first real error comes out (no
exception group), the sink is aborted once, buffers of abandoned reads are never given
out again, and a connection that fails to open closes the ones that did."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from pathlib import Path

import pytest

import nbdclient
from nbdclient.constants import Command, TransmissionFlag
from nbdclient.copy import (
    Batch,
    BufferPool,
    NBDSink,
    OutputFile,
    Plan,
    RawFileSink,
    Source,
    copy,
    copy_to_file,
)
from nbdclient.copy.engine import MIN_BATCH, WRITE_BATCH, batch_limit
from nbdclient.fileio import Offload
from nbdclient.multiconn import connect_many

from .fakeserver import FakeServer, Request, ServerConfig, Session, default_handler

SIZE = 1 << 20


class RecordingSink:
    """Keeps what it is given; fails its ``fail_at``-th write."""

    granularity = 1

    def __init__(self, *, fail_at: int = 0, place_none: bool = False) -> None:
        self.data = bytearray(SIZE)
        self.batches: list[Batch] = []
        self.buffers: list[object] = []
        self.fail_at = fail_at
        self.place_none = place_none
        self.error = OSError(errno.ENOSPC, "no space left (test)")
        self.finished = self.aborted = 0

    def place(self, offset: int, length: int) -> int | None:
        return None if self.place_none else offset

    async def write(self, batch: Batch, buf: memoryview) -> None:
        self.batches.append(batch)
        self.buffers.append(buf.obj)
        if len(self.batches) == self.fail_at:
            raise self.error
        await asyncio.sleep(0)
        for read in batch.reads:
            chunk = buf[read.position : read.position + read.length]
            self.data[read.offset : read.offset + read.length] = chunk

    async def zero(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    async def finish(self) -> None:
        self.finished += 1

    async def abort(self) -> None:
        self.aborted += 1


def pattern(size: int = SIZE) -> bytes:
    return bytes((i * 7 + i // 4096) & 0xFF for i in range(size))


class TrackingPool(BufferPool):
    """Remembers the buffers that were dropped."""

    def __init__(self, size: int, count: int) -> None:
        super().__init__(size, count)
        self.dropped: list[object] = []

    def discard(self, buf: memoryview) -> None:
        self.dropped.append(buf.obj)
        super().discard(buf)

    async def never_again(self, count: int) -> bool:
        """Whether every buffer the pool now gives out is one it did not drop."""
        given = [(await self.get()).obj for _ in range(count)]
        return bool(self.dropped) and not set(given) & set(self.dropped)


async def test_batches_layout_and_bytes(sockdir: Path) -> None:
    async with FakeServer(str(sockdir / "s")) as srv:
        srv.data[:] = pattern()
        plan = Plan([(0, 1000), (5000, 6000), (8192, SIZE)], [(1000, 5000)])
        sink = RecordingSink()
        async with await Source.open(srv.uri) as source:
            stats = await copy(source, plan, sink, requests=2, request_size=65536)
    assert sink.finished == 1 and sink.aborted == 0
    expected = bytearray(pattern())
    expected[1000:5000] = bytes(4000)
    expected[6000:8192] = bytes(2192)
    assert sink.data == expected
    assert (stats.bytes_read, stats.bytes_zero) == (plan.read_bytes, 4000)
    first = sink.batches[0]
    # two runs: the second starts page-aligned in the buffer; then contiguous reads
    assert [(r.target, r.position, r.length) for r in first.runs()[:2]] == [
        (0, 0, 1000),
        (5000, 4096, 1000),
    ]
    assert all(b.span <= 2 << 20 for b in sink.batches)
    assert max(r.length for b in sink.batches for r in b.reads) == 65536


async def test_unplaced_reads_each_start_a_run(sockdir: Path) -> None:
    async with FakeServer(str(sockdir / "s")) as srv:
        srv.data[:] = pattern()
        sink = RecordingSink(place_none=True)
        async with await Source.open(srv.uri) as source:
            await copy(source, Plan([(0, 3 * 65536 + 10)]), sink, requests=1, request_size=65536)
    assert sink.data[: 3 * 65536 + 10] == pattern()[: 3 * 65536 + 10]
    (batch,) = sink.batches
    assert [(r.position, r.target) for r in batch.runs()] == [
        (0, None),
        (65536, None),
        (131072, None),
        (196608, None),
    ]


async def test_sink_failing_midway(sockdir: Path) -> None:
    async with FakeServer(str(sockdir / "s")) as srv:
        sink = RecordingSink(fail_at=3)
        pool = TrackingPool(16384, 4)  # batches of four 4 KiB reads
        async with await Source.open(srv.uri) as source:
            with pytest.raises(OSError) as info:
                await copy(
                    source, Plan([(0, SIZE)]), sink, pool=pool, requests=4, request_size=4096
                )
    assert info.value is sink.error  # the sink's own error, not a group or a cancellation
    assert (sink.finished, sink.aborted) == (0, 1)
    assert sink.buffers[2] in pool.dropped
    assert await pool.never_again(4)  # dropped, and the pool made new ones


async def test_read_error_is_raised_and_buffer_dropped(sockdir: Path) -> None:
    async def handler(session: Session, request: Request) -> None:
        if request.command == Command.READ and request.offset >= SIZE // 2:
            session.write(session.error_chunk(request.cookie, 5, "bad sector"))
        else:
            await default_handler(session, request)

    async with FakeServer(str(sockdir / "s"), handler=handler) as srv:
        sink = RecordingSink()
        pool = TrackingPool(2 << 20, 2)
        async with await Source.open(srv.uri) as source:
            with pytest.raises(nbdclient.RequestError, match="bad sector"):
                await copy(source, Plan([(0, SIZE)]), sink, pool=pool, requests=2)
    assert (sink.finished, sink.aborted) == (0, 1)
    assert await pool.never_again(2)


async def test_cancelled_copy_aborts_and_never_reuses_buffers(sockdir: Path) -> None:
    asked = asyncio.Event()

    async def handler(session: Session, request: Request) -> None:
        if request.command == Command.READ and request.offset >= 65536:
            asked.set()  # never answered
        else:
            await default_handler(session, request)

    async with FakeServer(str(sockdir / "s"), handler=handler) as srv:
        sink = RecordingSink()
        pool = TrackingPool(65536, 2)
        async with await Source.open(srv.uri) as source:
            task = asyncio.create_task(
                copy(
                    source, Plan([(0, 4 * 65536)]), sink, pool=pool, requests=2, request_size=65536
                )
            )
            await asyncio.wait_for(asked.wait(), 5)
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert (sink.finished, sink.aborted) == (0, 1)
        assert len(sink.buffers) == 1 and len(pool.dropped) == 2  # both reads in flight
        assert await pool.never_again(2)


async def test_raw_file_not_left_behind_on_error(sockdir: Path, tmp_path: Path) -> None:
    async def handler(session: Session, request: Request) -> None:
        if request.command == Command.READ and request.offset + request.length > SIZE - 65536:
            session.write(session.error_chunk(request.cookie, 5, "bad sector"))
        else:
            await default_handler(session, request)

    dest = tmp_path / "out.raw"
    async with FakeServer(str(sockdir / "s"), handler=handler) as srv:
        with pytest.raises(nbdclient.RequestError):
            await copy_to_file(srv.uri, dest)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary name


async def test_nbd_sink_writes_zeros_without_write_zeroes(sockdir: Path) -> None:
    flags = int(TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH)
    async with (
        FakeServer(str(sockdir / "s")) as src,
        FakeServer(str(sockdir / "d"), ServerConfig(flags=flags)) as dst,
    ):
        src.data[:] = pattern()
        dst.data[:] = b"\x99" * SIZE
        plan = Plan([(0, 65536)], [(65536, SIZE)])
        async with await Source.open(src.uri) as source:
            sink = await NBDSink.open(dst.uri, size=SIZE)
            await copy(source, plan, sink)
        assert dst.data[:65536] == pattern()[:65536] and dst.data[65536:] == bytes(SIZE - 65536)
        commands = {r.command for r in dst.requests}
        assert Command.WRITE_ZEROES not in commands and Command.FLUSH in commands


class FailingNth(FakeServer):
    """The ``fail_at``-th connection is closed during its handshake (after a delay);
    the ``stall_at``-th never finishes its handshake.  Counts finished sessions."""

    def __init__(self, path: str, *, fail_at: int = 0, stall_at: int = 0) -> None:
        super().__init__(
            path, ServerConfig(flags=int(ServerConfig().flags | TransmissionFlag.CAN_MULTI_CONN))
        )
        self.fail_at, self.stall_at = fail_at, stall_at
        self.accepted = self.ended = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            if self.accepted == self.fail_at:
                await asyncio.sleep(0.2)  # the others have opened by now
                writer.close()
            elif self.accepted == self.stall_at:
                await reader.read()  # until the client goes away
                writer.close()
            else:
                await super()._serve(reader, writer)
        finally:
            self.ended += 1

    async def all_ended(self) -> bool:
        for _ in range(200):
            if self.ended == self.accepted:
                return True
            await asyncio.sleep(0.01)
        return False


async def test_third_of_four_connections_fails(sockdir: Path) -> None:
    async with FailingNth(str(sockdir / "s"), fail_at=3) as srv:
        with pytest.raises(nbdclient.ConnectionLostError, match="during the handshake"):
            await connect_many(srv.uri, 4)
        assert srv.accepted == 4
        assert await srv.all_ended()  # every connection that opened was closed


async def test_spread_failing_keeps_the_source_whole(sockdir: Path) -> None:
    async with FailingNth(str(sockdir / "s"), fail_at=3) as srv:
        source = await Source.open(srv.uri)
        assert source.clients[0].can_multi_conn()
        async with source:
            with pytest.raises(nbdclient.ConnectionLostError):
                await source.spread(4)  # connections 2, 3 (fails) and 4
            assert len(source.clients) == 1
        assert await srv.all_ended()


async def test_cancelled_open_closes_everything(sockdir: Path) -> None:
    async with FailingNth(str(sockdir / "s"), stall_at=4) as srv:
        task = asyncio.create_task(connect_many(srv.uri, 4))
        for _ in range(200):
            if srv.accepted == 4 and len(srv.sessions) == 3:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await srv.all_ended()


async def test_offload_settle_waits_for_threads_of_cancelled_callers() -> None:
    offload = Offload()
    done = threading.Event()

    def slow() -> None:
        time.sleep(0.2)
        done.set()

    task = asyncio.create_task(offload(slow))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not done.is_set()
    await offload.settle()
    assert done.is_set()


async def test_raw_sink_commit_and_refusals(tmp_path: Path) -> None:
    dest = tmp_path / "d.raw"
    dest.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        RawFileSink(OutputFile(dest), 10)
    link = tmp_path / "link.raw"
    link.symlink_to(dest)
    sink = RawFileSink(OutputFile(link, overwrite=True), 4096)
    await sink.finish()
    assert not link.is_symlink() and link.stat().st_size == 4096
    assert dest.read_bytes() == b"old"  # the symlink was replaced, never followed
    assert os.stat(link).st_mode & 0o777 == 0o600
    with pytest.raises(OSError, match="not a regular file"):
        OutputFile(tmp_path, overwrite=True).open()


async def test_shared_pool_survives_a_failed_copy(sockdir: Path) -> None:
    """A copy waiting for a buffer of a shared pool gets one when another copy fails and
    drops its buffer."""

    async def failing(session: Session, request: Request) -> None:
        if request.command == Command.READ:
            await asyncio.sleep(0.1)
            session.write(session.error_chunk(request.cookie, 5, "bad sector"))
        else:
            await default_handler(session, request)

    pool = TrackingPool(65536, 1)
    async with (
        FakeServer(str(sockdir / "a"), handler=failing) as bad,
        FakeServer(str(sockdir / "b")) as good,
    ):
        good.data[:] = pattern()
        async with await Source.open(bad.uri) as a, await Source.open(good.uri) as b:
            sink_a, sink_b = RecordingSink(), RecordingSink()
            first = asyncio.create_task(
                copy(a, Plan([(0, SIZE)]), sink_a, pool=pool, requests=1, request_size=65536)
            )
            await asyncio.sleep(0.02)  # the failing copy holds the only buffer
            second = copy(b, Plan([(0, SIZE)]), sink_b, pool=pool, requests=1, request_size=65536)
            results = await asyncio.wait_for(
                asyncio.gather(first, second, return_exceptions=True), 10
            )
    assert isinstance(results[0], nbdclient.RequestError)
    assert results[1] == nbdclient.copy.CopyStats(SIZE, SIZE, 0)
    assert sink_b.data == pattern() and sink_b.finished == 1
    assert len(pool.dropped) == 1 and pool.dropped[0] not in sink_b.buffers


def test_batch_limit_small_copies_get_smaller_batches() -> None:
    step = 512 << 10
    assert batch_limit(2 << 30, 16, step) == WRITE_BATCH  # a full: whole batches
    assert batch_limit(40 << 20, 16, step) == 1 << 20  # two batches per worker
    assert batch_limit(4 << 20, 16, step) == MIN_BATCH  # never below the floor
    assert batch_limit(1 << 20, 1, 4096) == MIN_BATCH
    assert batch_limit(1 << 20, 16, 1 << 20) == 1 << 20  # never below one request


async def test_pool_serves_waiters_first_come_first_served() -> None:
    """A worker that gives a buffer back and asks again queues behind the ones waiting
    (with fewer buffers than workers, the lowest batch must get the next buffer)."""
    pool = BufferPool(4096, 1)
    first = await pool.get()
    order: list[str] = []

    async def wait(name: str) -> None:
        buf = await pool.get()
        order.append(name)
        pool.put(buf)

    waiting = [asyncio.create_task(wait(name)) for name in ("b", "c")]
    await asyncio.sleep(0)
    pool.put(first)
    again = asyncio.create_task(wait("a"))  # gave it back, asks again: after b and c
    await asyncio.gather(*waiting, again)
    assert order == ["b", "c", "a"]


async def test_pool_buffer_of_a_cancelled_waiter_goes_to_the_next() -> None:
    pool = BufferPool(4096, 1)
    held = await pool.get()
    cancelled = asyncio.create_task(pool.get())
    later = asyncio.create_task(pool.get())
    await asyncio.sleep(0)
    pool.put(held)  # handed to the first waiter, which is cancelled before it runs
    cancelled.cancel()
    assert (await asyncio.wait_for(later, 1)).obj is held.obj
