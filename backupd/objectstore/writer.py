"""A stream of positioned writes turned into one multipart upload, in bounded memory:
the sink for a qcow2 image written straight into object storage.

The qcow2 writer hands out host offsets in increasing order and writes the header
cluster (offset 0) last; reads that complete out of order land a little out of order.
So :class:`MultipartWriter` takes writes at any offset within a *window*, cuts the byte
stream into parts (part *i* is S3's part number *i + 1*; part 0 holds the first
``first_part_size`` bytes, every later one ``part_size`` bytes: parts need not be of one
size, only at least 5 MiB but the last), uploads every part as soon as it is complete,
``concurrency`` at a time, and keeps the FIRST part (part 0) in memory until
:meth:`finish`, so the header can be written into it at the very end.  A small first
part keeps what is held back small when parts are large.  Bytes never written read as
zeros.

The window: writes to part 1 up to part ``low + window - 1`` go straight in, where
``low`` is the lowest part (from 1) not yet handed to an upload; a write further ahead
waits until ``low`` moves (backpressure: a fast writer waits for the slow one).  Part 0
is always writable until :meth:`finish`.  With the defaults (16 MiB parts, window 2)
writes may land 16-32 MiB ahead of the lowest byte still missing without waiting: the
copy path's 8-16 reads of up to 2 MiB in flight.  A part goes up only when every byte of
it was written, so a hole (an alignment gap, the unused tail of a cluster) must be
declared with :meth:`write_zeroes` before the stream gets ``window`` parts beyond it; a
hole left open is reported as an error that names it (after ``stall_timeout`` seconds in
which nothing moved), never a hang.  Past the last write, :meth:`finish` fills zeros.

Memory: at most ``first_part_size + (window + concurrency) * part_size`` bytes of part
buffers (part 0, the parts being filled, the parts being uploaded);
:attr:`peak_buffered` reports the most held at once.  A part buffer is allocated on its
first write, and reused for a later part once its own is uploaded (not zeroed then:
the ranges declared zero are cleared in it).

The writer's state lives on the loop that writes into it; ``via`` runs each request of
the store (create, part, complete, abort) where the store's client lives, e.g. on the
loop of another thread (:meth:`backupd.storage.s3store.S3Storage.run`): then only
whole parts cross between the threads, not every write.

Each part but the last is ``part_size`` >= 5 MiB (S3's rule); an object of one part
goes up in one PUT instead.  On any failure the upload is aborted (no object, no
pending upload left behind); leaving ``async with`` without :meth:`finish` aborts too.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import enum
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from backupd.errors import StorageError
from backupd.objectstore.client import ObjectStore
from backupd.objectstore.objects import MAX_PARTS, MIN_PART, Buffer

DEFAULT_PART_SIZE = 16 << 20
T = TypeVar("T")


class Runner(Protocol):
    """Runs a request of the store where the store's client lives (see ``via``)."""

    def __call__(self, coro: Coroutine[Any, Any, T], /) -> Coroutine[Any, Any, T]: ...


async def _here(coro: Coroutine[Any, Any, T]) -> T:
    return await coro


class _State(enum.Enum):
    OPEN = "open"
    FINISHING = "finishing"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(slots=True)
class _Part:
    """A part being filled: its buffer (made on the first data) and the byte ranges
    written so far (sorted, disjoint, relative to the part)."""

    size: int
    buf: bytearray | None = None
    spans: list[tuple[int, int]] = field(default_factory=list)
    covered: int = 0
    #: ranges declared zero before the buffer was made (a reused buffer is not zero)
    zeros: list[tuple[int, int]] = field(default_factory=list)

    def mark(self, start: int, end: int) -> bool:
        """Record ``[start, end)``; False when it overlaps what was written before."""
        i = bisect.bisect_left(self.spans, (start, end))
        before = i > 0 and self.spans[i - 1][1] > start
        after = i < len(self.spans) and self.spans[i][0] < end
        if before or after:
            return False
        if i and self.spans[i - 1][1] == start:  # join the neighbours: spans stay few
            start = self.spans.pop(i - 1)[0]
            i -= 1
        if i < len(self.spans) and self.spans[i][0] == end:
            end = self.spans.pop(i)[1]
        self.spans.insert(i, (start, end))
        self.covered = sum(e - s for s, e in self.spans)
        return True

    def clear_gaps(self, length: int) -> None:
        """Zero what of ``buf[:length]`` was never written (a part handed off by
        :meth:`MultipartWriter.finish`; a reused buffer holds an older part's bytes)."""
        assert self.buf is not None
        at = 0
        for start, end in self.spans:
            if start >= length:
                break
            if start > at:
                _clear(self.buf, at, start)
            at = end
        if at < length:
            _clear(self.buf, at, length)


class MultipartWriter:
    """Writes at byte offsets into object ``key``; :meth:`finish` makes the object."""

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        concurrency: int = 4,
        window: int = 2,
        stall_timeout: float = 60.0,
        first_part_size: int | None = None,
        metadata: dict[str, str] | None = None,
        via: Runner | None = None,
    ) -> None:
        first_part_size = part_size if first_part_size is None else first_part_size
        if min(part_size, first_part_size) < MIN_PART:
            raise ValueError(
                f"part size {min(part_size, first_part_size)} is below S3's minimum of {MIN_PART}"
            )
        if concurrency < 1 or window < 1:
            raise ValueError("concurrency and window must be at least 1")
        self.store = store
        self.key = key
        self._via = via or _here
        self.part_size = part_size
        self.first_part_size = first_part_size
        #: user metadata of the object (``x-amz-meta-*``)
        self.metadata = metadata or {}
        self.concurrency = concurrency
        self.window = window
        self.stall_timeout = stall_timeout
        self.buffered = 0
        self.peak_buffered = 0
        self.size = 0  # one past the highest byte written
        self.upload_id: str | None = None
        self._state = _State.OPEN
        self._parts: dict[int, _Part] = {}
        self._spare: list[bytearray] = []  # buffers of uploaded parts, for the next ones
        self._handed: set[int] = set()
        self._low = 1
        self._etags: dict[int, str] = {}
        self._slots = asyncio.Semaphore(concurrency)
        self._moved = asyncio.Condition()
        self._uploads: set[asyncio.Task[None]] = set()
        self._creating: asyncio.Task[str] | None = None
        self._failure: BaseException | None = None
        self._progress = 0  # writes so far: tells a slow stream from a stuck one

    @property
    def memory_bound(self) -> int:
        return self.first_part_size + (self.window + self.concurrency) * self.part_size

    def _start(self, index: int) -> int:
        """The first byte of part ``index``."""
        return 0 if index == 0 else self.first_part_size + (index - 1) * self.part_size

    def _size(self, index: int) -> int:
        return self.first_part_size if index == 0 else self.part_size

    def _locate(self, offset: int) -> tuple[int, int]:
        """(part, offset in it) of byte ``offset``."""
        if offset < self.first_part_size:
            return 0, offset
        index, rel = divmod(offset - self.first_part_size, self.part_size)
        return index + 1, rel

    async def __aenter__(self) -> MultipartWriter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._state is not _State.FINISHED:
            await self.abort()

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._state is not _State.OPEN:
            raise StorageError(f"{self.store.url(self.key)}: the upload is {self._state.value}")

    # -- writing ----------------------------------------------------------------------

    async def write(self, offset: int, data: Buffer) -> None:
        """Copy ``data`` to ``offset``; returns when it is buffered (the caller may
        reuse ``data`` then).  Waits while ``offset`` is beyond the window."""
        view = memoryview(data).cast("B")
        await self._place(offset, view, len(view))

    async def write_zeroes(self, offset: int, length: int) -> None:
        """Declare ``[offset, offset + length)`` zeros without sending bytes here."""
        await self._place(offset, None, length)

    async def _place(self, offset: int, view: memoryview | None, length: int) -> None:
        self._check()
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        pos = 0
        while pos < length:
            index, rel = self._locate(offset + pos)
            n = min(length - pos, self._size(index) - rel)
            await self._fill(index, rel, n, None if view is None else view[pos : pos + n])
            pos += n
            self._progress += 1
        self.size = max(self.size, offset + length)

    async def _fill(self, index: int, rel: int, length: int, chunk: memoryview | None) -> None:
        if index >= MAX_PARTS:
            raise StorageError(
                f"{self.store.url(self.key)}: more than {MAX_PARTS} parts of "
                f"{self.part_size >> 20} MiB: use larger parts"
            )
        offset = self._start(index) + rel
        while index >= self._low + self.window:
            await self._wait_for_window(index, offset)
        part = self._parts.get(index)
        if part is None:
            if index in self._handed:
                raise ValueError(f"bytes at {offset} written twice (their part is uploaded)")
            part = self._parts[index] = _Part(self._size(index))
        if not part.mark(rel, rel + length):
            raise ValueError(f"bytes at {offset} written twice")
        if chunk is not None:
            if part.buf is None:
                part.buf = self._buffer(part.size)
                for start, end in part.zeros:
                    _clear(part.buf, start, end)
            part.buf[rel : rel + length] = chunk
        elif part.buf is not None:
            _clear(part.buf, rel, rel + length)
        else:
            part.zeros.append((rel, rel + length))
        if index and part.covered == part.size:
            await self._hand_off(index, part.size)

    async def _wait_for_window(self, index: int, offset: int) -> None:
        """Wait until part ``index`` is inside the window.  When nothing moves for
        ``stall_timeout`` seconds (no write, no upload), the part holding the window
        back has a hole that will never be written: that is an error, not a hang."""
        progress = self._progress
        try:
            async with self._moved:
                await asyncio.wait_for(
                    self._moved.wait_for(
                        lambda: index < self._low + self.window or self._failure is not None
                    ),
                    self.stall_timeout,
                )
        except TimeoutError:
            if progress == self._progress and not self._uploads:
                raise StorageError(
                    f"{self.store.url(self.key)}: the write at {offset} waited "
                    f"{self.stall_timeout:g} s for bytes {self._hole()} that nothing writes "
                    "(write them, or declare them with write_zeroes)"
                ) from None
        self._check()

    def _hole(self) -> str:
        """The first unwritten byte range of the part holding the window back."""
        base = self._start(self._low)
        part = self._parts.get(self._low)
        end = 0
        for start, stop in part.spans if part else []:
            if start > end:
                return f"{base + end}-{base + start - 1}"
            end = stop
        return f"{base + end}-{base + self._size(self._low) - 1}"

    def _buffer(self, size: int) -> bytearray:
        """A part buffer of ``size`` bytes, not zeroed: one whose part was uploaded
        when there is one (a new one costs a page fault per 4 KiB on first write:
        ~0.4 s of CPU per GiB), else a new one."""
        if size == self.part_size and self._spare:
            return self._spare.pop()
        self.buffered += size
        self.peak_buffered = max(self.peak_buffered, self.buffered)
        return bytearray(size)

    def _release(self, buf: bytearray) -> None:
        """``buf``'s part is uploaded: keep it for the next part (parts of
        ``part_size`` only; memory stays within :attr:`memory_bound`)."""
        if len(buf) == self.part_size and self._state is _State.OPEN:
            self._spare.append(buf)
        else:
            self.buffered -= len(buf)

    # -- uploading --------------------------------------------------------------------

    async def _hand_off(self, index: int, length: int) -> None:
        """Start uploading part ``index`` (its first ``length`` bytes) once one of the
        ``concurrency`` slots is free; the window moves past it."""
        await self._slots.acquire()
        if self._failure is not None:
            self._slots.release()
            self._check()
        part = self._parts.pop(index, None)
        buf = part.buf if part is not None else None
        if buf is None:  # never written: zeros
            buf = self._buffer(self._size(index))
            _clear(buf, 0, length)
        else:
            assert part is not None
            part.clear_gaps(length)
        self._handed.add(index)
        task = asyncio.create_task(self._upload(index, buf, length))
        self._uploads.add(task)
        task.add_done_callback(self._uploads.discard)
        while self._low in self._handed:
            self._low += 1
        async with self._moved:
            self._moved.notify_all()

    async def _upload(self, index: int, buf: bytearray, length: int) -> None:
        try:
            upload_id = await self._upload_id()
            self._etags[index + 1] = await self._via(
                self.store.upload_part(self.key, upload_id, index + 1, memoryview(buf)[:length])
            )
        except Exception as e:  # kept for the writer's caller; the task itself succeeds
            if self._failure is None:
                self._failure = e
            async with self._moved:
                self._moved.notify_all()
        finally:
            self._release(buf)
            self._slots.release()

    def begin(self) -> None:
        """Begin the multipart upload now rather than with the first complete part (an
        object known to need several parts: a refusal shows at once, and a killed
        writer leaves a pending upload for the next run to find)."""
        if self._creating is None:
            self._creating = asyncio.create_task(
                self._via(self.store.create_multipart(self.key, metadata=self.metadata))
            )
            self._creating.add_done_callback(_retrieve)

    async def _upload_id(self) -> str:
        self.begin()
        assert self._creating is not None
        self.upload_id = await asyncio.shield(self._creating)
        return self.upload_id

    # -- the end ------------------------------------------------------------------------

    async def finish(self, size: int | None = None) -> str:
        """Upload what is left (part 0 last), complete the upload and return the
        object's ETag.  ``size`` (at least the highest byte written) sets the object's
        length; bytes never written are zeros.  On failure the upload is aborted."""
        self._check()
        size = self.size if size is None else size
        if size < self.size:
            raise ValueError(f"size {size} is below the {self.size} bytes written")
        self._state = _State.FINISHING
        last = self._locate(size - 1)[0] if size else 0
        try:
            if last == 0 and self._creating is None:
                part = self._parts.pop(0, None)
                if part is not None and part.buf is not None:
                    part.clear_gaps(size)
                body = memoryview(part.buf if part and part.buf else bytearray(size))[:size]
                etag = await self._via(self.store.put(self.key, body, metadata=self.metadata))
            else:
                etag = await self._complete(size, last)
        except BaseException:
            await self.abort()
            raise
        self._state = _State.FINISHED
        return etag

    async def _complete(self, size: int, last: int) -> str:
        for index in [*range(1, last + 1), 0]:
            if index not in self._handed:
                end = size if index == last else self._start(index) + self._size(index)
                await self._hand_off(index, end - self._start(index))
        await asyncio.gather(*self._uploads)
        if self._failure is not None:
            raise self._failure
        upload_id = await self._upload_id()
        return await self._via(self.store.complete_multipart(self.key, upload_id, self._etags))

    async def abort(self) -> None:
        """Stop every upload, drop the buffers and abort the multipart upload (if one
        was begun); safe to call more than once."""
        if self._state in (_State.ABORTED, _State.FINISHED):
            return
        self._state = _State.ABORTED
        running = list(self._uploads)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        self._parts.clear()
        self._spare.clear()
        self.buffered = 0
        if self._creating is not None:
            with contextlib.suppress(Exception):
                upload_id = await asyncio.shield(self._creating)
                await self._via(self.store.abort_multipart(self.key, upload_id))
        async with self._moved:
            self._moved.notify_all()


_ZEROS = bytes(1 << 20)
_ZERO_VIEW = memoryview(_ZEROS)


def _clear(buf: bytearray, start: int, end: int) -> None:
    """Zero ``buf[start:end]``."""
    view = memoryview(buf)
    for at in range(start, end, len(_ZEROS)):
        n = min(len(_ZEROS), end - at)
        view[at : at + n] = _ZERO_VIEW[:n]


def _retrieve(task: asyncio.Task[str]) -> None:
    """A failed creation is reported by the first part that needs it, not as an
    exception nobody retrieved."""
    if not task.cancelled():
        task.exception()
