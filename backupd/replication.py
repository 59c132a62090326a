"""``backupd copy``: the committed backups of one VM replicated into another repository
(a local folder or a bucket), only what the target lacks, parents before children.

Each backup is copied object by object, as stored (the same qcow2 files, the same
manifest), so the copy is a repository like the source and any qemu tool reads it:

- the source image passes the gate first (the source is untrusted as well);
- its bytes stream through (ranged reads of a bucket, ``pread`` of a file) into the
  target (a multipart upload, or a new file in the target's staging folder), never
  whole in memory or on a local disk on the way;
- every digest run of the manifest is recomputed from the bytes as they pass: data that
  does not match stops the copy of that backup before anything of it becomes visible;
- once complete, the target's object passes the gate as well (read back: its header and
  tables), and only then, after every disk, is the target's manifest written.

Resuming: the target's manifest is written last, so a copy killed at any instant left
no backup in the target, and the next ``copy`` starts with the backups still missing.
In a bucket, an image already uploaded whole by the killed copy (it carries the digest
of the manifest it was copied for as object metadata, set when its upload began and
visible only once it completed) is kept and checked, not uploaded again; unfinished
uploads are aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backupd.chain import check_image, check_open_image, image_name
from backupd.digests import Hasher, hasher
from backupd.errors import BackupdError, ChainError, EncryptionKeyError, RepositoryError
from backupd.faults import checkpoint
from backupd.keys import Key
from backupd.logs import human_bytes
from backupd.manifest import DiskRecord, Manifest
from backupd.private import create_exclusive
from backupd.repository import StagedBackup, VMRepository
from backupd.storage.images import ImageFile, LocalImage
from backupd.storage.vmrepo import VMRepo

if TYPE_CHECKING:
    from backupd.objectstore.writer import MultipartWriter
    from backupd.qcow2.encryption import ImageKey

log = logging.getLogger("backupd.copy")

#: bytes read and written at once
CHUNK = 8 << 20
#: user metadata naming the manifest an uploaded image belongs to
COPY_MARK = "backupd-copy-of"


@dataclass
class CopyReport:
    copied: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    bytes: int = 0


class RunChecker:
    """The digest runs of one image, checked against the bytes of the image as they
    pass in order (a run may span chunks)."""

    def __init__(self, record: DiskRecord, where: str, image_key: ImageKey | None = None) -> None:
        """``image_key``: the image is encrypted; runs are checked on their plaintext."""
        self.runs = sorted(record.digests, key=lambda r: (r.host_offset, r.length))
        self.algorithm = record.digest_algorithm
        self.where = where
        self.image_key = image_key
        self._next = 0  # the first run not yet started
        self._open: dict[int, tuple[int, Hasher]] = {}  # run index -> (bytes fed, hasher)
        self.checked = 0

    def feed(self, offset: int, data: bytes) -> None:
        """The bytes at ``offset`` (chunks come in increasing order)."""
        end = offset + len(data)
        while self._next < len(self.runs) and self.runs[self._next].host_offset < end:
            digest_key = self.image_key.digest_key if self.image_key is not None else None
            self._open[self._next] = (0, hasher(self.algorithm, digest_key))
            self._next += 1
        for index in list(self._open):
            run = self.runs[index]
            fed, digest = self._open[index]
            start = run.host_offset + fed
            stop = min(run.host_offset + run.length, end)
            if start < offset or start >= stop:
                continue
            digest.update(self._plaintext(data, offset, start, stop))
            fed += stop - start
            if fed < run.length:
                self._open[index] = (fed, digest)
                continue
            del self._open[index]
            self.checked += 1
            if digest.hexdigest() != run.digest:
                raise RepositoryError(
                    f"{self.where}: stored data at guest offset {run.guest_offset} "
                    f"(+{run.length} bytes) does not match its digest; not copied"
                )

    def _plaintext(self, data: bytes, offset: int, start: int, stop: int) -> bytes | memoryview:
        """``[start, stop)`` of the chunk at ``offset``, decrypted when encrypted (whole
        sectors: the cluster holding a run's end is the image's)."""
        if self.image_key is None:
            return memoryview(data)[start - offset : stop - offset]
        stored = memoryview(data)[start - offset : -(-(stop - offset) // 512) * 512]
        return self.image_key.plaintext(stored, start, stop - start)

    def done(self) -> None:
        if self._open or self._next < len(self.runs):
            raise RepositoryError(f"{self.where}: data the manifest records is missing")


def copy_mark(manifest: Manifest, disk: str) -> str:
    return hashlib.sha256(manifest.to_json().encode() + disk.encode()).hexdigest()[:32]


async def copy_vm(
    source: VMRepo,
    target: VMRepo,
    *,
    purpose: str,
    report: Callable[[str], object] = print,
    key: Key | None = None,
) -> CopyReport:
    """Copy every committed backup of ``source`` that ``target`` lacks (the caller has
    checked they are not the same repository); ``key``: the VM's encryption key, which
    checks the digests of encrypted backups in transit (they are copied as they are
    stored: encrypted)."""
    result = CopyReport()
    with source.readers(purpose=purpose), target.lock(purpose=purpose):
        source.refuse_unfinished_merge()
        target.ensure()
        have = set(target.ids())
        for backup in source.ids():
            if backup in have:
                result.present.append(backup)
                continue
            try:
                manifest = source.load(backup)
                if manifest.parent is not None and manifest.parent not in have:
                    raise ChainError(
                        f"backup {backup} of vm {source.vm} needs {manifest.parent}, "
                        f"which {target.where} does not have"
                    )
                started = time.monotonic()
                size = await copy_backup(source, target, manifest, key)
            except EncryptionKeyError:
                raise  # not damage: the key (exit 2)
            except BackupdError as exc:
                log.error("%s/%s: not copied: %s", source.vm, backup, exc)
                result.failed.append(backup)
                continue
            have.add(backup)
            result.copied.append(backup)
            result.bytes += size
            seconds = time.monotonic() - started
            report(f"{source.vm}: {backup}  copied ({human_bytes(size)} in {seconds:.1f} s)")
    return result


async def copy_backup(
    source: VMRepo, target: VMRepo, manifest: Manifest, key: Key | None = None
) -> int:
    """Copy one backup whose parent the target has; returns the bytes copied."""
    parent = source.load(manifest.parent) if manifest.parent is not None else None
    if isinstance(target, VMRepository):
        return await _into_folder(source, target, manifest, parent, key)
    return await _into_bucket(source, target, manifest, parent, key)


async def _stream(
    image: ImageFile, checker: RunChecker, write: Callable[[int, bytes], object]
) -> int:
    """Every byte of ``image`` through ``checker`` into ``write(offset, data)`` (awaited
    when it returns an awaitable), the next chunk read while one is written."""
    size = image.size
    pending: asyncio.Task[bytes] | None = None
    offset = 0
    try:
        while offset < size:
            data = await (pending or asyncio.ensure_future(image.read(offset, CHUNK)))
            if len(data) != min(CHUNK, size - offset):
                raise RepositoryError(f"{image.path}: the image changed while it was copied")
            nxt = offset + len(data)
            pending = asyncio.ensure_future(image.read(nxt, CHUNK)) if nxt < size else None
            await asyncio.to_thread(checker.feed, offset, data)
            written = write(offset, data)
            if asyncio.iscoroutine(written):
                await written
            checkpoint("copy-mid-image")
            offset = nxt
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
    checker.done()
    return size


def _checked_source(
    source: VMRepo, manifest: Manifest, disk: str, parent: Manifest | None
) -> ImageFile:
    encrypted = manifest.disks[disk].encrypted
    return check_image(source, manifest, disk, parent, allow_encryption=encrypted).image


def _checker(
    image: ImageFile, manifest: Manifest, disk: str, key: Key | None, where: str
) -> RunChecker:
    """The digest checker of ``disk``'s image (its key unlocked when it is encrypted:
    EncryptionKeyError without the key that opens it)."""
    record = manifest.disks[disk]
    if not record.encrypted:
        return RunChecker(record, where)
    if key is None:
        raise EncryptionKeyError(
            f"{where} is encrypted: configure the VM's encryption key to copy it"
        )
    return RunChecker(record, where, key.open_image(image.inspectable, where))


async def _into_folder(
    source: VMRepo,
    target: VMRepository,
    manifest: Manifest,
    parent: Manifest | None,
    key: Key | None = None,
) -> int:
    """Files in the target's staging folder (a killed copy's is removed first), checked,
    then the manifest and the rename: as a backup run commits."""
    stale = target.path / f".tmp-{manifest.id}"
    if stale.exists():
        shutil.rmtree(stale, ignore_errors=True)
    staged: StagedBackup = target.stage(manifest.id)
    total = 0
    try:
        for disk in sorted(manifest.disks):
            image = _checked_source(source, manifest, disk, parent)
            path = staged.file(disk)
            fd = create_exclusive(path, flags=os.O_RDWR)
            try:
                where = f"backup {manifest.id} of vm {source.vm}, disk {disk}"
                checker = _checker(image, manifest, disk, key, where)

                def write(offset: int, data: bytes, fd: int = fd) -> object:
                    return asyncio.to_thread(os.pwrite, fd, data, offset)

                total += await _stream(image, checker, write)
                await asyncio.to_thread(os.fsync, fd)
                arrived = LocalImage(os.dup(fd), path)
                encrypted = manifest.disks[disk].encrypted
                check_open_image(
                    arrived, manifest, disk, parent, allow_encryption=encrypted
                ).image.close()
            finally:
                os.close(fd)
                image.close()
        staged.commit(manifest)
    finally:
        staged.abort()
    return total


async def _into_bucket(
    source: VMRepo,
    target: VMRepo,
    manifest: Manifest,
    parent: Manifest | None,
    key: Key | None = None,
) -> int:
    from backupd.storage.s3repo import S3VMRepository
    from backupd.storage.s3stage import S3StagedBackup

    assert isinstance(target, S3VMRepository)
    storage = target.storage
    storage.call(_abort_uploads(target, manifest.id))
    staged = S3StagedBackup.begin(target, manifest.id, purpose=f"backupd copy of {manifest.id}")
    total = 0
    try:
        for disk in sorted(manifest.disks):
            name = image_name(disk)
            mark = copy_mark(manifest, disk)
            info = storage.head(staged.key(name))
            if info is not None and info.metadata.get(COPY_MARK) == mark:
                log.info("%s/%s: %s was uploaded before; checking it", target.vm, manifest.id, name)
            else:
                image = _checked_source(source, manifest, disk, parent)
                try:
                    where = f"backup {manifest.id} of vm {source.vm}, disk {disk}"
                    upload = staged.upload(name, image.size, {COPY_MARK: mark})
                    checker = _checker(image, manifest, disk, key, where)

                    def write(offset: int, data: bytes, upload: MultipartWriter = upload) -> object:
                        return storage.run(upload.write(offset, data))

                    try:
                        total += await _stream(image, checker, write)
                        await storage.run(upload.finish(image.size))
                    except BaseException:
                        await storage.run(upload.abort())
                        raise
                finally:
                    image.close()
            encrypted = manifest.disks[disk].encrypted
            check_image(target, manifest, disk, parent, allow_encryption=encrypted).image.close()
        staged.commit(manifest)
    except BaseException:
        with contextlib.suppress(BackupdError):  # finished images stay for the next copy
            storage.call(staged.lease.drop(remove=False))
        raise
    return total


async def _abort_uploads(target: VMRepo, backup: str) -> None:
    """Unfinished uploads a killed copy left in the backup's folder."""
    from backupd.storage.s3repo import S3VMRepository

    assert isinstance(target, S3VMRepository)
    store = target.storage.store
    for upload in await store.pending_uploads(target.key(backup) + "/"):
        await store.abort_multipart(upload.key, upload.upload_id)
