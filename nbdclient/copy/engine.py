"""The copy engine: a :class:`~nbdclient.copy.source.Source`, a
:class:`~nbdclient.copy.plan.Plan` and a :class:`Sink` in; every planned byte read from
the source and handed to the sink, zeros as zeros, fast, with bounded memory.

How a copy runs.  The plan's reads are cut into requests of at most ``request_size``
(512 KiB by default: qemu's NBD server allocates a buffer per request, and from 1 MiB
on that costs it about 3x the CPU per byte -- 2 GiB from qemu-nbd took 0.40 s in
512 KiB reads and 1.0 s in 1-4 MiB reads -- so larger requests are slower, not
faster).  Each of ``requests`` workers takes the next *batch*: consecutive requests up
to :data:`WRITE_BATCH` bytes (less in a small copy: :func:`batch_limit`; many small
extents, or slices of a large one), laid out
in one page-aligned buffer from the run's :class:`BufferPool`.  The worker sends every
request of the batch in one write (``Client.pread_many``: one system call for many
small reads) over its connection (the workers share the source's connections, several
with multi-conn), the replies land straight in the buffer, and the sink writes the
batch -- a file sink with one write per contiguous run, direct I/O where the
filesystem allows it, in a thread (and the hashing with it: both release the GIL)
while the event loop receives the next replies; a small buffered write costs less
inline (~50 us) than a hop to a thread, so it stays on the loop.  The buffer goes back
to the pool once the sink is done with it.  Buffers are shared by every copy of a run
(a backup copies several disks at once): memory is the pool's ``count * size``, not
disks times reads in flight.

The sink protocol (:class:`Sink`).  The engine calls, on the event loop:

- ``place(offset, length)`` once per request, in the order requests are issued: where
  those source bytes land in the sink's own space (a file offset; for qcow2 the host
  offset the writer allocates, so consecutive requests fill consecutive host space),
  or ``None`` when the sink decides only once it has the bytes (compressed clusters).
  Requests that land contiguously share one run of the buffer; any other request
  starts a new run at a page-aligned position.
- ``write(batch, buf)`` when every read of the batch is in ``buf``: the sink stores
  :meth:`Batch.runs` and owns ``buf`` until it returns (it may encrypt it in place; it
  must copy what it keeps).  Writes of different batches overlap and finish in any
  order.
- ``zero(offset, length)`` for each zero range of the plan (concurrently with writes).
- ``finish()`` after the last write (metadata, header, fsync, commit), or ``abort()``
  on any error or cancellation (remove what is unfinished); exactly one of them runs,
  and ``abort`` runs only after no write is still running in the engine.

The next sinks fit without engine changes: an *object-store multipart upload* of a
qcow2 image places requests at increasing host offsets, turns completed runs into parts
(numbered from the host offset, so parts upload in any order), holds back the part with
the header cluster and sends it from ``finish`` after the metadata, and aborts the
upload in ``abort``; an *encrypting qcow2 writer* places like the plain one and, in
``write``, encrypts each run in place (the IV from its host offset) before writing it.

Errors.  The first real error is raised, not an exception group and not a consequence
of cancelling the other workers; the sink is aborted.  A buffer whose read or write
was abandoned is dropped, never reused (a late reply or a running thread may still
touch it); the pool makes a new one in its place.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from ..client import Client
from ..constants import DEFAULT_REQUEST_SIZE
from ..fileio import DIRECT_ALIGN, aligned_buffer
from ..multiconn import first_error
from .plan import Plan
from .source import Source

#: sink bytes written at once: consecutive requests are batched up to this size
WRITE_BATCH = 2 << 20
#: the smallest batch a small copy is cut into (see :func:`batch_limit`)
MIN_BATCH = 512 << 10
#: more connections pay only for copies larger than this
SPREAD_MIN = 4 << 20

ProgressCallback = Callable[[int], None]


@dataclass(slots=True)
class Read:
    """One request: ``length`` bytes at ``offset`` of the source, landing at
    ``position`` of the batch buffer and at ``target`` in the sink (None: the sink
    decides when it has the bytes)."""

    offset: int
    length: int
    target: int | None
    position: int


@dataclass(frozen=True, slots=True)
class Run:
    """Consecutive reads contiguous both in the buffer and in the sink."""

    target: int | None
    position: int
    length: int


@dataclass(slots=True)
class Batch:
    reads: list[Read]

    @property
    def span(self) -> int:
        """Bytes of the buffer in use, from its start."""
        last = self.reads[-1]
        return last.position + last.length

    @property
    def length(self) -> int:
        """Bytes read."""
        return sum(r.length for r in self.reads)

    def runs(self) -> list[Run]:
        runs: list[Run] = []
        for r in self.reads:
            last = runs[-1] if runs else None
            if (
                last is not None
                and last.target is not None
                and r.target == last.target + last.length
                and r.position == last.position + last.length
            ):
                runs[-1] = Run(last.target, last.position, last.length + r.length)
            else:
                runs.append(Run(r.target, r.position, r.length))
        return runs


class Sink(Protocol):
    """Where a copy goes (see the module docstring for the contract)."""

    #: plan ranges start on multiples of this and are whole multiples (but the last
    #: range may end at the source's end); requests are cut on it
    granularity: int

    def place(self, offset: int, length: int) -> int | None: ...

    async def write(self, batch: Batch, buf: memoryview) -> None: ...

    async def zero(self, offset: int, length: int) -> None: ...

    async def finish(self) -> None: ...

    async def abort(self) -> None: ...


class BufferPool:
    """Page-aligned buffers shared by every copy of a run, made on first use: memory is
    bounded by the pool (``count * size``), not by copies times reads in flight.

    Buffers go to waiters first come, first served: a worker that just gave one back
    does not take it again past the workers waiting longer.  A sink that holds writes
    beyond a window (an upload) relies on it when the pool has fewer buffers than the
    copies have workers: the batches are taken in order, so the lowest one waiting
    always gets the next buffer and the window moves."""

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self._count = count
        self._made = 0
        self._free: collections.deque[memoryview] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[memoryview]] = collections.deque()

    async def get(self) -> memoryview:
        if self._waiters or not self._free:
            if not self._waiters and self._made < self._count:
                self._made += 1
                return aligned_buffer(self.size)
            waiter: asyncio.Future[memoryview] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                return await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.put(waiter.result())  # handed over as we were cancelled: pass it on
                raise
        return self._free.popleft()

    def put(self, buf: memoryview) -> None:
        """Give a buffer back; only when no read or write can still touch it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(buf)
                return
        self._free.append(buf)

    def discard(self, buf: memoryview) -> None:
        """Drop a buffer that an abandoned read or write may still touch, and put a new
        one in its place (a copy waiting for a buffer gets it)."""
        self.put(aligned_buffer(self.size))


@dataclass(frozen=True, slots=True)
class CopyStats:
    size: int
    bytes_read: int
    bytes_zero: int


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def batch_limit(read_bytes: int, workers: int, step: int) -> int:
    """Bytes per batch: :data:`WRITE_BATCH`, halved (down to :data:`MIN_BATCH` or one
    request) while the copy would give each worker fewer than two batches.  A batch
    is written only once its last reply is in: a small copy in big batches has every
    worker waiting for its replies first and writing only at the end, while in
    smaller ones the writes of the first batches overlap the reads of the next (an
    incremental of 40 MiB in 64 KiB extents: 1 MiB batches copied it in 0.14-0.16 s,
    2 MiB ones in 0.19-0.33 s, medians of 6 on 2 cores)."""
    limit = WRITE_BATCH
    floor = max(MIN_BATCH, step)
    while limit > floor and limit * 2 * workers > read_bytes:
        limit //= 2
    return max(limit, floor)


def _requests(plan: Plan, step: int, granularity: int) -> Iterator[tuple[int, int]]:
    for start, end in plan.reads:
        if start % granularity:
            raise ValueError(f"plan range at {start} is not aligned to {granularity}")
        for offset in range(start, end, step):
            yield offset, min(step, end - offset)


def _batches(requests: Iterator[tuple[int, int]], sink: Sink, limit: int) -> Iterator[Batch]:
    """Consecutive requests, placed by the sink in issue order, grouped while their
    layout (whole sink blocks; a page-aligned start for each new run) fits ``limit``."""
    reads: list[Read] = []
    used = 0
    for offset, length in requests:
        target = sink.place(offset, length)
        position = used
        if reads:
            last = reads[-1]
            if last.target is None or target != last.target + last.length:
                position = _align(used, DIRECT_ALIGN)
            if position + _align(length, sink.granularity) > limit:
                yield Batch(reads)
                reads, position = [], 0
        reads.append(Read(offset, length, target, position))
        used = position + length
    if reads:
        yield Batch(reads)


async def copy(
    source: Source,
    plan: Plan,
    sink: Sink,
    *,
    pool: BufferPool | None = None,
    requests: int = 16,
    request_size: int = DEFAULT_REQUEST_SIZE,
    connections: int = 1,
    progress: ProgressCallback | None = None,
    on_batch: Callable[[int], Awaitable[None]] | None = None,
) -> CopyStats:
    """Copy ``plan`` from ``source`` into ``sink``, then finish the sink; on any error
    or cancellation abort it and raise the first real error.

    ``requests`` workers each have one batch in flight; ``connections`` is how many
    connections the source may use (with multi-conn, for copies over
    :data:`SPREAD_MIN`); ``pool`` gives the buffers (shared by the copies of a run),
    else the copy gets its own.  ``progress`` gets the bytes of each batch written;
    ``on_batch`` is awaited after each with its number of reads.
    """
    try:
        if plan.read_bytes > SPREAD_MIN:
            await source.spread(connections)
        workers = _Workers(source, sink, pool, requests, request_size, progress, on_batch)
        await workers.run(plan, max(1, requests))
        await sink.finish()
    except BaseException:
        with contextlib.suppress(Exception):  # the copy's error is the one to report
            await sink.abort()
        raise
    return CopyStats(source.size, workers.total, plan.zero_bytes)


class _Workers:
    """The batches of one copy, and the workers that read and write them."""

    def __init__(
        self,
        source: Source,
        sink: Sink,
        pool: BufferPool | None,
        requests: int,
        request_size: int,
        progress: ProgressCallback | None,
        on_batch: Callable[[int], Awaitable[None]] | None,
    ) -> None:
        grain = sink.granularity
        self.step = min(request_size, source.max_request) // grain * grain
        if self.step <= 0:
            raise ValueError(f"requests of {request_size} bytes cannot carry {grain}-byte blocks")
        self.limit = max(self.step, WRITE_BATCH)
        self.buffers = pool or BufferPool(self.limit, max(1, requests))
        if self.buffers.size < _align(self.step, grain):
            raise ValueError(f"buffers of {self.buffers.size} bytes cannot hold one read")
        self.source = source
        self.sink = sink
        self.progress = progress
        self.on_batch = on_batch
        self.total = 0

    async def run(self, plan: Plan, workers: int) -> None:
        limit = min(self.limit, batch_limit(plan.read_bytes, workers, self.step))
        batches = _batches(
            _requests(plan, self.step, self.sink.granularity),
            self.sink,
            min(self.buffers.size, limit),
        )
        clients = self.source.clients
        failed: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._zeros(plan))
                for index in range(workers):
                    group.create_task(self._worker(clients[index % len(clients)], batches))
        except BaseExceptionGroup as errors:
            failed = first_error(errors)
        if failed is not None:
            raise failed  # outside the handler: the error keeps its own context

    async def _worker(self, client: Client, batches: Iterator[Batch]) -> None:
        for batch in batches:
            buf = await self.buffers.get()
            try:
                await client.pread_many(  # every request of the batch in one write
                    [(buf[r.position : r.position + r.length], r.offset) for r in batch.reads]
                )
                await self.sink.write(batch, buf)
            except BaseException:
                self.buffers.discard(buf)  # a late reply or a running thread may touch it
                raise
            self.buffers.put(buf)
            length = batch.length
            self.total += length
            if self.progress is not None:
                self.progress(length)
            if self.on_batch is not None:
                await self.on_batch(len(batch.reads))

    async def _zeros(self, plan: Plan) -> None:
        for start, end in plan.zeros:
            await self.sink.zero(start, end - start)
