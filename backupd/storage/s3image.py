"""An image in a bucket as the gate reads it and as qemu reads it afterwards.

:class:`ObjectImage` is pinned to the object version its first request saw (its ETag:
every later ranged GET carries ``If-Match``, so an object replaced meanwhile fails the
read instead of feeding other bytes).  What the gate reads (header, header extensions,
L1, L2 and refcount tables: :func:`~backupd.qcow2.inspector.inspect_image` through
:meth:`ObjectImage.pread`) is kept in a local *shadow* file, an unnamed file in the
scratch folder; when qemu later reads the image (over NBD from backupd:
:mod:`backupd.storage.objectnbd`), every byte the shadow holds comes from it, the rest
(data clusters) from the object.  So the metadata qemu acts on is exactly the metadata
the gate accepted, even if an ETag collides (an attacker able to write the bucket who
crafts two objects with one MD5 could swap data, never tables or headers).

:class:`BlockCache` reads objects in blocks of :data:`BLOCK` bytes (ranged GETs of a few
MiB: a request costs about 4 ms of botocore CPU, so small ones are slow), reading ahead
while access is sequential, in bounded memory shared by every image of a repository.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import os
import threading
from pathlib import PurePath, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backupd.objectstore.client import ObjectStore
    from backupd.storage.s3store import S3Storage

#: bytes per ranged GET of image data
BLOCK = 4 << 20
#: blocks kept (and read ahead) per repository: at most BLOCK * CAPACITY bytes
CAPACITY = 16
#: blocks read ahead of a sequential reader
AHEAD = 3
#: the gate's reads fetch at least this much (tables lie next to each other)
GATE_READ = 1 << 20

Key = tuple[str, str, int]


class BlockCache:
    """Blocks of pinned objects (on the bridge's loop only)."""

    def __init__(self, store: ObjectStore, *, block: int = BLOCK, capacity: int = CAPACITY) -> None:
        self.store = store
        self.block = block
        self.capacity = capacity
        self._blocks: collections.OrderedDict[Key, asyncio.Task[bytearray]] = (
            collections.OrderedDict()
        )

    def _get(self, key: str, etag: str, size: int, index: int) -> asyncio.Task[bytearray]:
        name = (key, etag, index)
        task = self._blocks.get(name)
        if task is not None:
            self._blocks.move_to_end(name)
            return task
        task = asyncio.get_running_loop().create_task(self._load(key, etag, size, index))
        task.add_done_callback(lambda t: self._loaded(name, t))
        self._blocks[name] = task
        self._evict()
        return task

    def _loaded(self, name: Key, task: asyncio.Task[bytearray]) -> None:
        failed = task.cancelled() or task.exception() is not None
        if failed and self._blocks.get(name) is task:  # a failed block is read again next time
            del self._blocks[name]

    def _evict(self) -> None:
        for name in list(self._blocks):
            if len(self._blocks) <= self.capacity:
                return
            if self._blocks[name].done():
                del self._blocks[name]

    async def _load(self, key: str, etag: str, size: int, index: int) -> bytearray:
        start = index * self.block
        buf = bytearray(min(self.block, size - start))
        await self.store.read_into(key, start, memoryview(buf), if_match=etag)
        return buf

    async def read(self, key: str, etag: str, size: int, offset: int, length: int) -> bytes:
        """``length`` bytes of the object at ``offset`` (fewer at its end)."""
        end = min(size, offset + length)
        if offset >= end:
            return b""
        first, last = offset // self.block, (end - 1) // self.block
        tasks = [self._get(key, etag, size, i) for i in range(first, last + 1)]
        if first == 0 or (key, etag, first - 1) in self._blocks:  # sequential: read ahead
            blocks = -(-size // self.block)
            for index in range(last + 1, min(blocks, last + 1 + AHEAD)):
                self._get(key, etag, size, index)
        parts = [await task for task in tasks]
        base = first * self.block
        data = b"".join(parts) if len(parts) > 1 else bytes(parts[0])
        return data[offset - base : end - base]

    async def close(self) -> None:
        for task in self._blocks.values():
            task.cancel()
        await asyncio.gather(*self._blocks.values(), return_exceptions=True)
        self._blocks.clear()


class ObjectImage:
    """One object, pinned, its checked metadata in a shadow file (see the module)."""

    fd = -1

    def __init__(self, storage: S3Storage, key: str, size: int, etag: str) -> None:
        self.storage = storage
        self.key = key
        self.etag = etag
        self.path: PurePath = PurePosixPath(f"s3://{storage.location.bucket}/{key}")
        self._size = size
        self._shadow = -1
        self._covered: list[tuple[int, int]] = []  # sorted, disjoint, merged
        self._lock = threading.Lock()
        self._export: str | None = None
        self._closed = False
        #: NBD connections reading this image
        self.users = 0

    @classmethod
    def open(cls, storage: S3Storage, key: str) -> ObjectImage:
        """The object ``key`` as it is now (FileNotFoundError when there is none)."""
        info = storage.head(key)
        if info is None:
            raise FileNotFoundError(key)
        return cls(storage, key, info.size, info.etag)

    @property
    def size(self) -> int:
        return self._size

    @property
    def inspectable(self) -> ObjectImage:
        return self

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return ()

    # -- the gate's reads, kept ---------------------------------------------------------

    def _is_covered(self, start: int, end: int) -> bool:
        with self._lock:
            i = bisect.bisect_right(self._covered, (start, end)) - 1
            return i >= 0 and self._covered[i][0] <= start and self._covered[i][1] >= end

    def _cover(self, start: int, end: int) -> None:
        with self._lock:
            merged = [(s, e) for s, e in self._covered if e < start or s > end]
            touching = [(s, e) for s, e in self._covered if not (e < start or s > end)]
            low = min([start, *(s for s, _ in touching)])
            high = max([end, *(e for _, e in touching)])
            bisect.insort(merged, (low, high))
            self._covered = merged

    def pread(self, length: int, offset: int) -> bytes:
        """What the gate reads (never from the bridge's loop): fetched once, at least
        :data:`GATE_READ` bytes at a time, into the shadow file, and read from there."""
        end = min(self._size, offset + length)
        if offset >= end:
            return b""
        if not self._is_covered(offset, end):
            stop = min(self._size, max(end, offset + GATE_READ))
            buf = bytearray(stop - offset)
            self.storage.call(
                self.storage.store.read_into(self.key, offset, memoryview(buf), if_match=self.etag)
            )
            if self._shadow < 0:
                self._shadow = self.storage.shadow_file()
            os.pwrite(self._shadow, buf, offset)
            self._cover(offset, stop)
        return os.pread(self._shadow, end - offset, offset)

    # -- qemu's and verify's reads --------------------------------------------------------

    def _pieces(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        """``[start, end)`` cut into (start, end, from the shadow)."""
        with self._lock:
            covered = list(self._covered)
        pieces: list[tuple[int, int, bool]] = []
        at = start
        for s, e in covered:
            if e <= at or s >= end:
                continue
            if s > at:
                pieces.append((at, s, False))
            pieces.append((max(at, s), min(end, e), True))
            at = min(end, e)
        if at < end:
            pieces.append((at, end, False))
        return pieces

    async def read_range(self, offset: int, length: int) -> bytes:
        """Bytes of the pinned object (on the bridge's loop): the shadow's where it has
        them, the cache's elsewhere."""
        end = min(self._size, offset + length)
        if offset >= end:
            return b""
        out: list[bytes] = []
        for start, stop, shadowed in self._pieces(offset, end):
            if shadowed:
                out.append(os.pread(self._shadow, stop - start, start))
            else:
                cache = self.storage.cache
                out.append(await cache.read(self.key, self.etag, self._size, start, stop - start))
        return b"".join(out)

    async def read(self, offset: int, length: int) -> bytes:
        return await self.storage.run(self.read_range(offset, length))

    def qemu_file(self) -> dict[str, object]:
        """An NBD export of this image served by backupd (it lives while a connection
        reads it, even after :meth:`close`)."""
        return self.storage.call(self._expose())

    async def _expose(self) -> dict[str, object]:
        server = await self.storage.nbd_server()
        if self._export is None:
            self._export = server.add(self)
        return {
            "driver": "nbd",
            "server": {"type": "unix", "path": str(server.socket)},
            "export": self._export,
            "read-only": True,
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._export is None:
            self.release()
            return
        with contextlib.suppress(RuntimeError):  # the storage is closed already
            self.storage.call(self._unexpose())

    async def _unexpose(self) -> None:
        """No new connection gets the export; the shadow stays while one reads it."""
        server = await self.storage.nbd_server()
        assert self._export is not None
        server.remove(self._export)
        self.release()

    def release(self) -> None:
        """Drop the shadow once closed and no connection reads the image."""
        if self._closed and self.users == 0 and self._shadow >= 0:
            os.close(self._shadow)
            self._shadow = -1
