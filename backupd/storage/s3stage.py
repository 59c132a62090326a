"""A backup being written into a bucket: each disk's qcow2 streamed straight into a
multipart upload (nothing staged on a local disk), the manifest written last.

:class:`UploadTarget` is the qcow2 writer's :class:`~backupd.qcow2.target.ByteTarget`
for an object: the copy engine's batches go into a
:class:`~backupd.objectstore.writer.MultipartWriter` on the copy's own loop (which
uploads each part once complete, holds the first part back, and writes the header into
it at the end; its requests run on the repository's bridge loop, one hop per part, not
per batch), the holes the writer leaves are declared zero, and
:meth:`UploadTarget.finish` appends the metadata and completes the upload.  Until the
manifest exists the objects are no backup: a failed or killed run leaves nothing
visible, and :meth:`S3StagedBackup.abort` (or the next run: :mod:`.leases`) removes
them.

Memory: the part buffers of one run stay within :data:`UPLOAD_MEMORY` (shared by its
disks), so a run stays within backupd's RSS bound (256 MiB).  A disk whose object would
need more than 10,000 parts of that size gets larger parts, fewer at a time, and more
memory (a full of more than about 500 GiB in one disk: the log says so).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from backupd.errors import RepositoryError
from backupd.manifest import Manifest
from backupd.objectstore.objects import MAX_PARTS, MIN_PART
from backupd.qcow2.layout import CLUSTER_SIZE
from backupd.qcow2.sink import Qcow2Sink
from backupd.qcow2.writer import Qcow2Stats, Qcow2Writer
from backupd.storage.leases import LEASE, Lease
from backupd.storage.vmrepo import MANIFEST

if TYPE_CHECKING:
    from backupd.config import Transfer
    from backupd.objectstore.writer import MultipartWriter
    from backupd.qcow2.encryption import ImageKey
    from backupd.storage.s3repo import S3VMRepository
    from backupd.storage.s3store import S3Storage

log = logging.getLogger("backupd.s3")
T = TypeVar("T")
MiB = 1 << 20

#: part buffers of one run, all its disks together: one disk gets parts of 24 MiB,
#: 2 filling and 3 uploading (Swift stores each part as an object of its own: larger
#: parts and more of them in flight keep it busier; see the README's S3 figures)
UPLOAD_MEMORY = 125 * MiB
#: parts being filled and parts being uploaded per disk
WINDOW = 2
CONCURRENCY = 3
LARGEST_PART = 64 * MiB
#: hashing of a batch this small is done on the loop (cheaper than a hop to a thread)
INLINE = 256 << 10


@dataclass(frozen=True, slots=True)
class PartLayout:
    part_size: int
    window: int
    concurrency: int


def part_layout(expected: int, disks: int = 1) -> PartLayout:
    """Parts for an object of about ``expected`` bytes, one of ``disks`` uploads of a
    run: as large as the run's share of :data:`UPLOAD_MEMORY` allows, larger (and fewer
    at once) when the object needs it to stay within S3's 10,000 parts."""
    share = UPLOAD_MEMORY // max(1, disks) - MIN_PART
    window, concurrency = WINDOW, CONCURRENCY
    slots = share // MIN_PART
    if slots < WINDOW + CONCURRENCY:  # many disks: fewer parts at once, never below two
        window = max(1, slots // 2)
        concurrency = max(1, slots - window)
    part = min(LARGEST_PART, max(MIN_PART, share // (window + concurrency) // MiB * MiB))
    needed = -(-(expected + expected // 8) // (MAX_PARTS - 100))
    needed = -(-needed // MiB) * MiB
    if needed <= part:
        return PartLayout(part, window, concurrency)
    log.warning(
        "an object of about %d GiB needs parts of %d MiB: uploading it holds about %d MiB",
        expected >> 30,
        needed >> 20,
        (MIN_PART + 2 * needed) >> 20,
    )
    return PartLayout(needed, 1, 1)


def multipart(
    storage: S3Storage,
    key: str,
    layout: PartLayout,
    metadata: dict[str, str] | None = None,
) -> MultipartWriter:
    """A writer of ``key``, used on any loop: its requests run on the bridge's (on the
    bridge's own loop, directly)."""
    from backupd.objectstore.writer import MultipartWriter

    return MultipartWriter(
        storage.store,
        key,
        part_size=layout.part_size,
        first_part_size=MIN_PART,
        window=layout.window,
        concurrency=layout.concurrency,
        metadata=metadata,
        via=storage.run,
    )


class UploadTarget:
    """A qcow2 image written into one multipart upload (see the module docstring).

    The upload's writer lives on the copy's loop (every batch goes into its part
    buffers there); only its requests run on the bridge's loop, one hop per part."""

    def __init__(self, storage: S3Storage, upload: MultipartWriter, expected: int = 0) -> None:
        self.storage = storage
        self.upload = upload
        self._begun = expected <= upload.first_part_size  # small: one PUT at the end

    async def store(self, buf: memoryview, span: int, offset: int, prepare: Callable[[], T]) -> T:
        if not self._begun:  # several parts ahead: begin the upload with the first bytes
            self._begun = True
            self.upload.begin()
        result = prepare() if span <= INLINE else await asyncio.to_thread(prepare)
        await self.upload.write(offset, buf[:span])
        return result

    async def zeroes(self, offset: int, length: int) -> None:
        await self.upload.write_zeroes(offset, length)

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def finish(self, writer: Qcow2Writer) -> Qcow2Stats:
        tail = await asyncio.to_thread(writer.tail)
        at = writer.end
        for offset, piece in tail.pieces:
            if offset > at:
                await self.upload.write_zeroes(at, offset - at)
            await self.upload.write(offset, piece)
            at = offset + len(piece)
        if writer.luks_region:  # in the first part, which is still held back
            await self.upload.write(writer.cluster_size, writer.luks_region)
        await self.upload.write(0, tail.header)
        await self.upload.finish(tail.file_size)
        stats: Qcow2Stats = tail.stats
        return stats

    async def abort(self) -> None:
        await self.upload.abort()


class S3StagedBackup:
    """Backup ``id`` of ``repo`` being written: its lease is held from :meth:`begin` to
    :meth:`commit` or :meth:`abort`."""

    def __init__(self, repo: S3VMRepository, backup: str, lease: Lease) -> None:
        self.repo = repo
        self.id = backup
        self.lease = lease
        self.committed = False
        self.where = f"{repo.root}/{repo.vm}/{backup}"
        self._keys: list[str] = []

    @classmethod
    def begin(cls, repo: S3VMRepository, backup: str, purpose: str = "") -> S3StagedBackup:
        if backup in repo.ids():
            raise RepositoryError(f"backup {backup} of vm {repo.vm} already exists")
        lease = Lease(repo.storage, repo.key(backup, LEASE), purpose or f"backup {backup}")
        repo.storage.call(lease.take())
        return cls(repo, backup, lease)

    def key(self, name: str) -> str:
        return self.repo.key(self.id, name)

    def read_buffers(self, settings: Transfer) -> int:
        """A batch in flight for every second read of one disk, shared by all disks (the
        pool serves them in turn): an upload, not the reading, bounds the run, and the
        memory goes to the parts."""
        return max(1, settings.requests // 2)

    def sink(
        self,
        disk: str,
        size: int,
        *,
        backing_file: str | None,
        compress: bool,
        expected: int = 0,
        disks: int = 1,
        encryption: tuple[ImageKey, bytes] | None = None,
    ) -> Qcow2Sink:
        """The qcow2 image of ``disk`` as a copy engine sink, uploaded as it is written
        (``encryption``: its key and LUKS header region)."""
        key = self.key(f"{disk}.qcow2")
        self._keys.append(key)
        image_key, region = encryption if encryption is not None else (None, b"")
        writer = Qcow2Writer(
            Path(key),
            size,
            cluster_size=CLUSTER_SIZE,
            backing_file=backing_file,
            luks_region=region,
        )
        upload = multipart(self.repo.storage, key, part_layout(expected, disks))
        target = UploadTarget(self.repo.storage, upload, expected)
        return Qcow2Sink(writer, target=target, digests=True, compress=compress, key=image_key)

    def upload(
        self, name: str, expected: int, metadata: dict[str, str] | None = None
    ) -> MultipartWriter:
        """A plain object (a copied image) of about ``expected`` bytes, written in
        increasing order; use it on the bridge's loop."""
        key = self.key(name)
        self._keys.append(key)
        return multipart(self.repo.storage, key, part_layout(expected), metadata)

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest (the backup exists from now on), then drop the lease."""
        storage = self.repo.storage
        if storage.head(self.key(MANIFEST)) is not None:
            raise RepositoryError(f"backup {self.id} of vm {self.repo.vm} already exists")
        storage.put(self.key(MANIFEST), manifest.to_json().encode(), if_absent=True)
        self.committed = True
        try:
            storage.call(self.lease.drop())
        except RepositoryError as exc:  # committed all the same; the next run removes it
            log.warning(
                "%s: could not remove the lease of backup %s: %s", self.repo.vm, self.id, exc
            )

    def abort(self) -> None:
        """Remove what was uploaded (the uploads themselves were aborted by their
        sinks); what cannot be removed now, the next run removes."""
        if self.committed:
            return
        storage = self.repo.storage

        async def remove() -> None:
            await self.lease.drop(remove=False)
            await storage.store.delete_many([*self._keys, self.lease.key])

        try:
            storage.call(remove())
        except RepositoryError as exc:
            log.warning(
                "%s: could not remove the objects of the failed backup %s (%s); "
                "the next run removes them",
                self.repo.vm,
                self.id,
                exc,
            )
