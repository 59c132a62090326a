"""The multipart sink against a real S3 server (Swift with s3api): a qcow2-like stream
(host-ordered data with gaps, completed out of order by several workers, the header
written last at offset 0) becomes an object byte-identical to the same writes into a
local file, within its memory bound; abort and a server that goes away leave no object
and no pending upload."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backupd.errors import ObjectNotFound, StorageError, StorageUnreachable
from backupd.objectstore import Backoff, MultipartWriter, ObjectStore
from integration.harness.s3server import SwiftS3Server
from integration.test_objectstore import settings_for

pytestmark = pytest.mark.s3
MiB = 1 << 20
CLUSTER = 65536
PART = 5 * MiB


@pytest.fixture
async def store(s3server: SwiftS3Server, s3bucket: str) -> AsyncIterator[ObjectStore]:
    async with ObjectStore(settings_for(s3server.endpoint()), s3bucket) as client:
        yield client


Write = tuple[int, bytes | None, int]  # offset, data (None: declared zeros), length


def qcow2_like(rng: random.Random, data_bytes: int) -> tuple[list[Write], int]:
    """Writes as a qcow2 sink makes them: data runs appended from cluster 1 on, some
    shorter than their clusters (the rest declared zero, as a sink pads the last
    cluster) and now and then an alignment gap declared zero; a few metadata clusters
    after the data; then the header at offset 0 (the rest of cluster 0 never written);
    and the file's final size, past the last write."""
    writes: list[Write] = []
    host = CLUSTER
    while host < data_bytes:
        length = rng.choice([CLUSTER, 512 << 10, 2 * MiB, rng.randrange(1, 33) * CLUSTER])
        short = rng.choice([0, 0, 0, 1536])
        writes.append((host, rng.randbytes(length - short), length - short))
        if short:
            writes.append((host + length - short, None, short))
        host += length
        if rng.random() < 0.05:
            writes.append((host, None, CLUSTER))
            host += CLUSTER
    for _ in range(3):  # L2 tables, L1, refcounts
        size = rng.choice([512, CLUSTER])
        writes.append((host, rng.randbytes(size), size))
        if size < CLUSTER:
            writes.append((host + size, None, CLUSTER - size))
        host += CLUSTER
    writes.append((0, rng.randbytes(104), 104))  # the header, last
    return writes, host + CLUSTER  # ftruncate past the last metadata cluster


async def stream(writer: MultipartWriter, writes: list[Write], workers: int, seed: int) -> None:
    """``workers`` tasks take the writes in order and finish them after random delays
    (as reads complete): out of order, but each worker holds one write at a time."""
    queue = iter(writes[:-1])
    rng = random.Random(seed)

    async def worker() -> None:
        for offset, data, length in queue:
            await asyncio.sleep(rng.random() * 0.004)
            if data is None:
                await writer.write_zeroes(offset, length)
            else:
                await writer.write(offset, data)

    async with asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(worker())
    offset, header, _ = writes[-1]
    assert header is not None
    await writer.write(offset, header)


def local_file(path: Path, writes: list[Write], size: int) -> bytes:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for offset, data, _ in reversed(writes):  # order does not matter to a file
            if data is not None:
                os.pwrite(fd, data, offset)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path.read_bytes()


@pytest.mark.parametrize("seed", [1, 2])
async def test_stream_matches_a_local_file(store: ObjectStore, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    writes, size = qcow2_like(rng, rng.randrange(12 * MiB, 28 * MiB))
    expected = local_file(tmp_path / "image.qcow2", writes, size)
    async with MultipartWriter(store, "vm/b/vda.qcow2", part_size=PART, concurrency=3) as writer:
        await stream(writer, writes, workers=6, seed=seed)
        etag = await writer.finish(size)
    assert etag.endswith(f"-{-(-size // PART)}")  # a multipart object, one part per 5 MiB
    assert await store.get("vm/b/vda.qcow2") == expected
    assert 2 * PART <= writer.peak_buffered <= writer.memory_bound == 6 * PART
    assert await store.pending_uploads("") == []


async def test_small_stream_is_one_put(store: ObjectStore, tmp_path: Path) -> None:
    writes, size = qcow2_like(random.Random(3), 2 * MiB)
    expected = local_file(tmp_path / "small.qcow2", writes, size)
    async with MultipartWriter(store, "small.qcow2", part_size=PART) as writer:
        await stream(writer, writes, workers=4, seed=3)
        etag = await writer.finish(size)
    assert "-" not in etag and await store.get("small.qcow2") == expected


async def test_writes_beyond_the_window_wait(store: ObjectStore) -> None:
    async with MultipartWriter(store, "w.bin", part_size=PART, window=1) as writer:
        await writer.write(0, b"H" * 100)
        ahead = asyncio.create_task(writer.write(2 * PART, b"2" * PART))  # part 2
        await asyncio.sleep(0.1)
        assert not ahead.done()  # part 1 is still open: part 2 is outside the window
        await writer.write(PART, b"1" * (PART - 10))
        assert not ahead.done()
        await writer.write_zeroes(2 * PART - 10, 10)  # part 1 complete: it goes up
        await asyncio.wait_for(ahead, 30)
        with pytest.raises(ValueError, match="written twice"):
            await writer.write(PART + 5, b"again")
        etag = await writer.finish()
    assert etag.endswith("-3")
    data = await store.get("w.bin")
    assert data == b"H" * 100 + bytes(PART - 100) + b"1" * (PART - 10) + bytes(10) + b"2" * PART


async def test_abort_leaves_no_object_and_no_upload(store: ObjectStore) -> None:
    writer = MultipartWriter(store, "aborted.qcow2", part_size=PART, concurrency=2)
    for part in range(5):
        await writer.write(part * PART, bytes([part + 1]) * PART)
    for _ in range(200):  # until the server shows the upload begun
        if await store.pending_uploads(""):
            break
        await asyncio.sleep(0.05)
    assert [u.key for u in await store.pending_uploads("")] == ["aborted.qcow2"]
    await writer.abort()
    with pytest.raises(RuntimeError, match="boom"):
        async with MultipartWriter(store, "failed.qcow2", part_size=PART) as failing:
            await failing.write(0, bytes(3 * PART))
            raise RuntimeError("boom")
    assert await store.pending_uploads("") == []
    assert [o async for o in store.list_objects("")] == []
    with pytest.raises(ObjectNotFound):
        await store.head("aborted.qcow2")


async def test_a_hole_never_written_is_an_error_not_a_hang(store: ObjectStore) -> None:
    writer = MultipartWriter(store, "holey.bin", part_size=PART, window=1, stall_timeout=0.3)
    await writer.write(PART, bytes(1000))
    await writer.write(PART + 2000, bytes(PART - 2000))  # bytes 1000-1999 of part 1: never
    with pytest.raises(StorageError) as stuck:
        await writer.write(2 * PART, bytes(10))
    assert str(stuck.value) == (
        f"s3://{store.bucket}/holey.bin: the write at {2 * PART} waited 0.3 s for bytes "
        f"{PART + 1000}-{PART + 1999} that nothing writes (write them, or declare them "
        "with write_zeroes)"
    )
    await writer.abort()
    assert await store.pending_uploads("") == []


@pytest.mark.slow
async def test_server_gone_mid_upload(tmp_path: Path) -> None:
    with SwiftS3Server(tmp_path / "swift") as server:
        server.create_bucket("going-away")
        settings = settings_for(server.endpoint())
        async with ObjectStore(settings, "going-away", backoff=Backoff(3, 0.01)) as client:
            writer = MultipartWriter(client, "vda.qcow2", part_size=PART, concurrency=2)
            await writer.write(0, bytes(2 * PART))
            server.stop()
            with pytest.raises(StorageUnreachable) as gone:
                await writer.write(2 * PART, bytes(2 * PART))
                await writer.finish()
            await writer.abort()  # no server to tell: it still returns
    text = str(gone.value)
    assert "\n" not in text and f"S3 endpoint {server.endpoint_url} is unreachable" in text


async def test_a_reused_part_buffer_holds_no_stale_bytes(store: ObjectStore) -> None:
    """With one part filling and one uploading, part 3 gets part 1's buffer and the
    header, written last, part 2's: what was declared zero and what was never written
    (the rest of part 0, the end of the last part) read as zeros."""
    half, quarter = PART // 2, PART // 4
    async with MultipartWriter(store, "reuse.bin", part_size=PART, window=1, concurrency=1) as w:
        await w.write(PART, b"1" * PART)
        await w.write(2 * PART, b"2" * PART)  # goes up once part 1 is up: its buffer is free
        await w.write_zeroes(3 * PART, half)  # declared before the part has a buffer
        await w.write(3 * PART + half, b"3" * half)
        await w.write(0, b"H" * 100)  # the header, into part 2's buffer
        await w.write(4 * PART, b"4" * quarter)
        await w.write_zeroes(4 * PART + quarter, quarter)
        etag = await w.finish(4 * PART + PART - 10)
    assert etag.endswith("-5")
    expected = b"H" * 100 + bytes(PART - 100) + b"1" * PART + b"2" * PART
    expected += bytes(half) + b"3" * half + b"4" * quarter + bytes(PART - quarter - 10)
    assert await store.get("reuse.bin") == expected
    assert w.peak_buffered == 3 * PART  # two parts' buffers reused
