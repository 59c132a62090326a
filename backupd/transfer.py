"""Copying one disk: extents -> NBD reads -> the qcow2 writer, with digests.

The export is mapped with ``base:allocation`` (and the dirty-bitmap context for an
incremental) and turned into cluster runs: *data* runs are read and stored, *zero* runs
become qcow2 zero clusters (an incremental must hide older data), everything else is
left out (a full does not store zeros; an incremental falls through to its backing
file).  Reads are at most ``request_size`` (512 KiB by default: qemu serves that size
best).  Host space is allocated when a read is issued, in issue order, so consecutive
reads fill consecutive host space: each of ``requests`` workers takes a *batch* of reads
up to :data:`WRITE_BATCH` (many small extents, or slices of a large one), sends them in
one write over its connection (several with multi-conn), receives them straight into one
page-aligned buffer from the run's :class:`BufferPool`, and a thread writes the batch
with one direct-I/O write (no page-cache copy; buffered where the filesystem refuses)
and hashes each read, both without the GIL, while the event loop receives the next
replies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nbdclient
from backupd.config import Transfer
from backupd.digests import ALGORITHM, hexdigest
from backupd.faults import checkpoint, hang_point
from backupd.fileio import DIRECT_ALIGN, DataFile, aligned_buffer
from backupd.manifest import DigestRun, DiskRecord
from backupd.qcow2 import Qcow2Writer
from nbdclient.extents import MappedExtent, map_export

CLUSTER = 65536
#: reads up to this size are written and hashed on the event loop (~50 us)
INLINE_STORE = 256 << 10
#: host bytes written at once: consecutive reads are batched up to this size
WRITE_BATCH = 2 << 20
Interval = tuple[int, int]  # [start, end) in clusters


def cluster_union(
    extents: Sequence[MappedExtent], keep: Callable[[MappedExtent], bool], cluster: int
) -> list[Interval]:
    """Clusters touched by any extent that ``keep`` selects, as merged intervals."""
    out: list[Interval] = []
    for e in extents:
        if not keep(e):
            continue
        start, end = e.offset // cluster, -(-e.end // cluster)
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def intersect(a: Sequence[Interval], b: Sequence[Interval]) -> list[Interval]:
    out: list[Interval] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Sequence[Interval], b: Sequence[Interval]) -> list[Interval]:
    out: list[Interval] = []
    j = 0
    for start, end in a:
        position = start
        while j < len(b) and b[j][1] <= position:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > position:
                out.append((position, b[k][0]))
            position = max(position, b[k][1])
            k += 1
        if position < end:
            out.append((position, end))
    return out


@dataclass(frozen=True, slots=True)
class CopyPlan:
    data: list[Interval]
    zero: list[Interval]

    @property
    def data_clusters(self) -> int:
        return sum(e - s for s, e in self.data)


def plan_clusters(
    extents: Sequence[MappedExtent], *, incremental: bool, cluster: int = CLUSTER
) -> CopyPlan:
    """Which clusters to read and which to record as zero.

    A cluster is data when any part of it may hold non-zero bytes; it is zero only when
    all of it reads as zero (a partly zero cluster is read whole).  For an incremental
    only dirty clusters count; for a full, zero clusters are simply not stored.
    """
    nonzero = cluster_union(extents, lambda e: not e.zero, cluster)
    if not incremental:
        return CopyPlan(nonzero, [])
    dirty = cluster_union(extents, lambda e: e.dirty, cluster)
    return CopyPlan(intersect(dirty, nonzero), subtract(dirty, nonzero))


def _chunks(
    runs: Sequence[Interval], request_size: int, size: int, cluster: int
) -> Iterator[tuple[int, int]]:
    step = max(cluster, request_size // cluster * cluster)
    for start, end in runs:
        first, last = start * cluster, min(end * cluster, size)
        for offset in range(first, last, step):
            yield offset, min(step, last - offset)


def _batches(
    chunks: Iterator[tuple[int, int]], limit: int, cluster: int
) -> Iterator[list[tuple[int, int]]]:
    """Consecutive chunks grouped while their host space (whole clusters) fits ``limit``."""
    batch: list[tuple[int, int]] = []
    used = 0
    for offset, length in chunks:
        need = -(-length // cluster) * cluster
        if batch and used + need > limit:
            yield batch
            batch, used = [], 0
        batch.append((offset, length))
        used += need
    if batch:
        yield batch


class BufferPool:
    """Page-aligned buffers shared by every disk of a run, made on first use: memory is
    bounded by the pool (``count * size``), not by disks times reads in flight."""

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self._count = count
        self._made = 0
        self._free: asyncio.Queue[memoryview] = asyncio.Queue()

    async def get(self) -> memoryview:
        if self._free.empty() and self._made < self._count:
            self._made += 1
            return aligned_buffer(self.size)
        return await self._free.get()

    def put(self, buf: memoryview) -> None:
        """Give a buffer back; only when no read or write can still touch it."""
        self._free.put_nowait(buf)


def buffer_size(settings: Transfer) -> int:
    """Bytes per buffer: one read, or one batch of reads written at once."""
    return max(settings.request_size // CLUSTER * CLUSTER, CLUSTER, WRITE_BATCH)


def run_pool(settings: Transfer) -> BufferPool:
    """The buffers of one run: one per read in flight of a disk, twice over for runs of
    several disks (their copies share the host's disk and CPU anyway)."""
    return BufferPool(buffer_size(settings), 2 * max(1, settings.requests))


def _store(file: DataFile, data: memoryview, host: int) -> str:
    file.write(data, host)
    return hexdigest(data)


async def transfer_disk(
    *,
    name: str,
    node: str,
    uri: str,
    dirty_context: str | None,
    path: Path,
    backing_file: str | None,
    settings: Transfer,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    timeout: float = 10.0,
    request_timeout: float = 300.0,
    pool: BufferPool | None = None,
) -> DiskRecord:
    """Copy one exported disk into a new qcow2 file at ``path``; ``pool`` gives the
    buffers (shared by the disks of a run), else the disk gets its own."""
    started = time.monotonic()
    contexts = ["base:allocation"] + ([dirty_context] if dirty_context else [])
    first = await nbdclient.connect(
        uri, meta_contexts=contexts, timeout=timeout, request_timeout=request_timeout
    )
    clients = [first]
    writer: Qcow2Writer | None = None
    data_file: DataFile | None = None
    try:
        size = first.size
        extents = await map_export(first, dirty_context=dirty_context)
        plan = plan_clusters(extents, incremental=dirty_context is not None)
        total = sum(length for _, length in _chunks(plan.data, CLUSTER, size, CLUSTER))
        if on_total is not None:
            on_total(total)
        if settings.connections > 1 and first.can_multi_conn() and total > 64 * CLUSTER:
            more = await asyncio.gather(
                *(
                    nbdclient.connect(uri, timeout=timeout, request_timeout=request_timeout)
                    for _ in range(settings.connections - 1)
                )
            )
            clients.extend(more)
        writer = Qcow2Writer(path, size, cluster_size=CLUSTER, backing_file=backing_file).open()
        # compressed clusters are not aligned: buffered
        data_file = out = DataFile(writer.fd, path, direct=not settings.compress)
        for start, end in plan.zero:
            writer.write_zeroes(start * CLUSTER, min(end * CLUSTER, size) - start * CLUSTER)
        request_size = min(settings.request_size, *(c.max_request for c in clients))
        request_size = max(CLUSTER, request_size // CLUSTER * CLUSTER)
        chunks = _chunks(plan.data, request_size, size, CLUSTER)
        buffers = pool or run_pool(settings)
        batch_size = min(buffers.size, max(request_size, WRITE_BATCH))
        digests: list[DigestRun] = []
        stored = 0
        active_writer = writer

        def store_batch(
            buf: memoryview, span: int, host: int, pieces: list[tuple[int, int]]
        ) -> list[str]:
            """Write ``buf[:span]`` at ``host`` (in a thread, or inline when small) and
            hash each read; ``pieces`` are (position in ``buf``, length) of the reads."""
            if out.direct:
                padded = -(-span // DIRECT_ALIGN) * DIRECT_ALIGN
                buf[span:padded] = bytes(padded - span)  # the disk's tail: its cluster is ours
                out.write(buf[:padded], host)
            else:
                out.write(buf[:span], host)
            return [hexdigest(buf[rel : rel + n]) for rel, n in pieces]

        async def worker(client: nbdclient.Client) -> None:
            nonlocal stored
            if settings.compress:
                for offset, length in chunks:
                    buf = await buffers.get()
                    view = buf[:length]
                    await client.pread_into(view, offset)
                    stored += await _store_compressed(active_writer, out, view, offset, digests)
                    buffers.put(buf)
                    await _after(length)
                return
            for batch in _batches(chunks, batch_size, CLUSTER):
                # on an error the buffer is dropped, not given back: a read or write
                # being abandoned may still touch it
                buf = await buffers.get()
                hosts = [active_writer.allocate(offset, length) for offset, length in batch]
                base = hosts[0]
                pieces = [(h - base, length) for h, (_, length) in zip(hosts, batch, strict=True)]
                await client.pread_many(  # all requests of the batch in one write
                    [
                        (buf[rel : rel + length], offset)
                        for (offset, length), (rel, _) in zip(batch, pieces, strict=True)
                    ]
                )
                span = pieces[-1][0] + pieces[-1][1]
                # a small buffered write (that starts no writeback) is cheaper than a thread
                if not out.direct and span <= INLINE_STORE and not out.writeback_due(span):
                    hashes = store_batch(buf, span, base, pieces)
                else:
                    hashes = await asyncio.to_thread(store_batch, buf, span, base, pieces)
                buffers.put(buf)
                for (offset, length), h, digest in zip(batch, hosts, hashes, strict=True):
                    digests.append(DigestRun(h, length, offset, digest))
                read = sum(length for _, length in batch)
                stored += read
                await _after(read, len(batch))

        async def _after(length: int, reads: int = 1) -> None:
            checkpoint("mid-copy", hits=reads)  # fault points count reads, not batches
            await hang_point("mid-copy")
            if progress is not None:
                progress(length)

        async with asyncio.TaskGroup() as group:
            for index in range(max(1, settings.requests)):
                group.create_task(worker(clients[index % len(clients)]))
        await asyncio.to_thread(writer.finish)
        digests.sort(key=lambda d: d.guest_offset)
        return DiskRecord(
            name=name,
            file=path.name,
            node=node,
            virtual_size=size,
            cluster_size=CLUSTER,
            bytes_copied=total,
            bytes_stored=stored,
            data_extents=len(plan.data),
            zero_extents=len(plan.zero),
            compressed=settings.compress,
            digests=tuple(digests),
            digest_algorithm=ALGORITHM,
            copy_seconds=round(time.monotonic() - started, 4),
        )
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if data_file is not None:
            data_file.close()
        await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)


async def _store_compressed(
    writer: Qcow2Writer, out: DataFile, view: memoryview, offset: int, digests: list[DigestRun]
) -> int:
    """Compress cluster by cluster in a thread; incompressible clusters are stored raw."""
    stored = 0
    for rel in range(0, len(view), CLUSTER):
        cluster = view[rel : rel + CLUSTER]
        guest = offset + rel
        # qemu inflates a compressed cluster into a whole cluster: pad the disk's tail
        whole = (
            cluster if len(cluster) == CLUSTER else bytes(cluster) + bytes(CLUSTER - len(cluster))
        )
        packed = await asyncio.to_thread(writer.compress, whole)
        if packed is None:
            host = writer.allocate(guest, len(cluster))
            digest = await asyncio.to_thread(_store, out, cluster, host)
            digests.append(DigestRun(host, len(cluster), guest, digest))
            stored += len(cluster)
        else:
            host = writer.place_compressed(guest, packed)
            digest = await asyncio.to_thread(_store, out, memoryview(packed), host)
            digests.append(DigestRun(host, len(packed), guest, digest))
            stored += len(packed)
    return stored
