"""Writing copied data into local files fast, without filling the host's page cache.

Owns the low-level file writes of every file sink: :func:`pwrite_all` (positional
writes that survive short writes), *direct I/O* (``O_DIRECT``: the bytes go from our
receive buffer to the disk, no page-cache copy, and a copy does not evict the cached
data of everything else on the host) and, for buffered files, early writeback
(``sync_file_range``) so the final fsync has little left to do.  Direct I/O needs
buffers, offsets and lengths aligned to :data:`DIRECT_ALIGN`; :func:`aligned_buffer`
gives such buffers.  :class:`DataFile` puts it together: direct where it can, buffered
with early writeback where it cannot (an unaligned write, a filesystem that refuses
``O_DIRECT``), small buffered writes on the event loop and the rest in threads that
:meth:`DataFile.settle` waits for before the file is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import mmap
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

T = TypeVar("T")

#: alignment of direct I/O (buffers, file offsets and lengths); the page size covers
#: every logical block size in use (512 and 4096)
DIRECT_ALIGN = 4096

#: start the disk writing a buffered file every this many bytes written
WRITEBACK_EVERY = 64 << 20

#: a buffered write up to this size is done on the event loop (~50 us with hashing):
#: cheaper than a hop to a thread
INLINE_STORE = 256 << 10


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """os.pwrite until every byte is written (a short write is not an error by itself)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"short write at offset {offset}")
        view = view[written:]
        offset += written


def aligned_buffer(size: int) -> memoryview:
    """A zero-filled buffer of ``size`` bytes that starts on a page boundary."""
    return memoryview(mmap.mmap(-1, max(size, 1)))[:size]


def open_direct(fd: int) -> int:
    """A second, write-only descriptor of the file open as ``fd`` with O_DIRECT (the
    same file, whatever its name now points to), or -1 where the filesystem (or the
    platform) does not do direct I/O."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC | flag)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT):
            return -1
        raise


def direct_ok(data: memoryview, offset: int) -> bool:
    """Whether a write of ``data`` at ``offset`` meets direct I/O's alignment."""
    return not (offset % DIRECT_ALIGN or len(data) % DIRECT_ALIGN)


class Offload:
    """Work handed to threads (writes, hashing, fsync) that must be over before its
    file is closed: a caller cancelled while awaiting it leaves the thread running, and
    :meth:`settle` waits for every such thread."""

    def __init__(self) -> None:
        self._running: set[asyncio.Future[Any]] = set()

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        future = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
        self._running.add(future)
        future.add_done_callback(self._forget)
        return await asyncio.shield(future)

    def _forget(self, future: asyncio.Future[Any]) -> None:
        self._running.discard(future)
        if not future.cancelled():
            future.exception()  # retrieved: whoever awaited it saw it, or nobody will

    async def settle(self) -> None:
        """Wait until no thread started here is still running."""
        while self._running:
            await asyncio.wait(list(self._running))


class DataFile:
    """Positional writes of copied data into one open file: through a second, O_DIRECT
    descriptor when the filesystem takes it and the write is aligned, else buffered
    through ``fd`` with writeback started every :data:`WRITEBACK_EVERY` buffered bytes.
    A direct write the kernel refuses (EINVAL) is written buffered, and so is every
    later one.  ``fd`` stays the caller's; :meth:`close` closes only the direct
    descriptor, and only after :meth:`settle`."""

    def __init__(self, fd: int, *, direct: bool = True) -> None:
        self.fd = fd
        self._direct_fd = open_direct(fd) if direct else -1
        self.direct = self._direct_fd >= 0
        self._buffered = 0
        self._lock = threading.Lock()
        self.offload = Offload()

    def writeback_due(self, length: int) -> bool:
        """Whether a buffered write of ``length`` bytes now would start writeback."""
        return not self.direct and writeback_due(self._buffered, length)

    async def store(self, length: int, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)``, a write of ``length`` bytes into this file (and what goes
        with it, e.g. hashing): on the event loop when it is a small buffered write that
        starts no writeback, else in a thread."""
        if not self.direct and length <= INLINE_STORE and not self.writeback_due(length):
            return fn(*args)
        return await self.offload(fn, *args)

    def write(self, data: memoryview, offset: int, *, direct: bool = True) -> None:
        """Write ``data`` at ``offset`` (from any thread); ``direct=False``: buffered
        even where direct I/O would be possible."""
        if direct and self.direct and direct_ok(data, offset):
            try:
                pwrite_all(self._direct_fd, data, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False
        pwrite_all(self.fd, data, offset)
        with self._lock:
            kick = writeback_due(self._buffered, len(data))
            self._buffered += len(data)
        if kick:  # the disk writes while the copy goes on
            start_writeback(self.fd)

    async def settle(self) -> None:
        await self.offload.settle()

    def close(self) -> None:
        close_quietly(self._direct_fd)
        self._direct_fd = -1


def close_quietly(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def writeback_due(written: int, length: int) -> bool:
    """Whether writing ``length`` more bytes after ``written`` crosses a writeback mark."""
    return (written + length) // WRITEBACK_EVERY != written // WRITEBACK_EVERY


def start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk now, without waiting (Linux
    ``sync_file_range``): the disk works while the copy goes on, so the final fsync has
    little left to do.  Elsewhere a no-op."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
