"""The streaming qcow2 writer as a sink of nbdclient's copy engine.

Requests are whole clusters (the engine cuts on :attr:`Qcow2Sink.granularity`), placed
at the host offsets :meth:`Qcow2Writer.allocate` hands out in issue order, so a batch
is one contiguous host range: one write, direct where the filesystem allows it (the
disk's partial last cluster is padded with zeros to the direct-I/O alignment: the
cluster is ours).  With ``digests`` every read gets a :class:`DigestRun` of the stored
bytes, hashed in the same thread as the write.  With ``compress`` a cluster is placed
only once it is compressed (``place`` returns None): each is deflated in a thread and
stored compressed, or raw when it does not shrink.  Zero ranges become zero clusters.
With ``key`` (an encrypted image: :mod:`backupd.qcow2.encryption`) each batch is hashed
as plaintext (keyed digests), then encrypted in place, sector by sector with IVs from
its host offsets, and only then written: no plaintext reaches the file or the upload.
Compression and encryption do not go together (qemu 7.2 stores and reads compressed
clusters of an encrypted image unencrypted).

Used by backup (a new file in the staging folder, with digests, or an object-store
upload) and by restore (an :class:`~nbdclient.copy.outfile.OutputFile`, which takes its
name when finished).  The bytes go through a :class:`~backupd.qcow2.target.ByteTarget`:
the writer's local file unless another target is given.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from backupd.digests import ALGORITHM, KEYED, hexdigest
from backupd.manifest import DigestRun
from backupd.qcow2.layout import CLUSTER_SIZE, align_up
from backupd.qcow2.target import ByteTarget, FileTarget
from backupd.qcow2.writer import Qcow2Stats, Qcow2Writer
from nbdclient.copy import Batch, OutputFile
from nbdclient.fileio import DIRECT_ALIGN

if TYPE_CHECKING:  # numpy and cryptography: imported only for encrypted images
    from backupd.qcow2.encryption import ImageKey


class Qcow2Sink:
    def __init__(
        self,
        writer: Qcow2Writer,
        *,
        output: OutputFile | None = None,
        digests: bool = False,
        compress: bool = False,
        target: ByteTarget | None = None,
        key: ImageKey | None = None,
    ) -> None:
        """``writer`` is open (or writes into ``target``); ``output``, when given, holds
        its file; ``key``: the writer's image is encrypted with it."""
        if key is not None and compress:
            raise ValueError("compressed clusters cannot be encrypted")
        self.granularity = writer.cluster_size
        self.compress = compress
        self.digests: list[DigestRun] = []
        #: bytes written into the file for data (compressed sizes when compressed)
        self.stored = 0
        self.stats: Qcow2Stats | None = None
        self._writer = writer
        self._hash = digests
        self._key = key
        #: the digest algorithm of :attr:`digests`
        self.digest_algorithm = KEYED if key is not None else ALGORITHM
        # compressed clusters are not aligned: buffered
        self._target = target or FileTarget(writer, output=output, direct=not compress)

    @classmethod
    def create(
        cls,
        path: Path,
        size: int,
        *,
        backing_file: str | None = None,
        digests: bool = False,
        compress: bool = False,
        encryption: tuple[ImageKey, bytes] | None = None,
    ) -> Qcow2Sink:
        """A new file at ``path`` (removed again on abort); ``encryption``: the new
        file's key and LUKS header region (:meth:`ImageKey.new`)."""
        key, region = encryption if encryption is not None else (None, b"")
        writer = Qcow2Writer(
            path, size, cluster_size=CLUSTER_SIZE, backing_file=backing_file, luks_region=region
        )
        writer.open()
        try:
            return cls(writer, digests=digests, compress=compress, key=key)
        except BaseException:
            writer.abort()
            raise

    @classmethod
    def into(cls, output: OutputFile, size: int) -> Qcow2Sink:
        """A new image written into ``output``."""
        fd = output.open()
        try:
            assert output.temp is not None
            writer = Qcow2Writer(output.temp, size, cluster_size=CLUSTER_SIZE).open(fd)
            return cls(writer, output=output)
        except BaseException:
            output.discard()
            raise

    def place(self, offset: int, length: int) -> int | None:
        if self.compress:
            return None
        return self._writer.allocate(offset, length)

    async def write(self, batch: Batch, buf: memoryview) -> None:
        if self.compress:
            for read in batch.reads:
                view = buf[read.position : read.position + read.length]
                await self._store_compressed(view, read.offset)
            return
        host = batch.reads[0].target
        assert host is not None
        span = batch.span
        if self._key is not None:  # whole sectors: the disk's tail is padded (its cluster)
            span = align_up(span, DIRECT_ALIGN)
        hashes = await self._target.store(
            buf, span, host, functools.partial(self._prepare, buf, batch, span, host)
        )
        tail = align_up(span, self.granularity) - span
        if tail:  # the disk's partial last cluster: the rest of it is never written
            await self._target.zeroes(host + span, tail)
        if self._hash:
            for read, digest in zip(batch.reads, hashes, strict=True):
                assert read.target is not None
                self.digests.append(DigestRun(read.target, read.length, read.offset, digest))
        self.stored += batch.length

    def _prepare(self, buf: memoryview, batch: Batch, span: int, host: int) -> list[str]:
        """The digest of each read's plaintext (keyed when the image is encrypted), then
        ``buf[:span]`` encrypted in place when it is (in the thread that writes it)."""
        key = self._key
        hashes = []
        if self._hash:
            digest_key = key.digest_key if key is not None else None
            hashes = [
                hexdigest(
                    buf[r.position : r.position + r.length], self.digest_algorithm, digest_key
                )
                for r in batch.reads
            ]
        if key is not None:
            buf[batch.span : span] = bytes(span - batch.span)
            key.cipher.encrypt(buf[:span], host)
        return hashes

    def _hash_one(self, data: memoryview) -> str:
        return hexdigest(data) if self._hash else ""

    async def _store_compressed(self, view: memoryview, offset: int) -> None:
        """Compress cluster by cluster in a thread; incompressible clusters are stored raw."""
        cs = self.granularity
        for rel in range(0, len(view), cs):
            cluster = view[rel : rel + cs]
            guest = offset + rel
            # qemu inflates a compressed cluster into a whole cluster: pad the disk's tail
            whole = cluster if len(cluster) == cs else bytes(cluster) + bytes(cs - len(cluster))
            packed = await self._target.compute(self._writer.compress, whole)
            if packed is None:
                end = self._writer.end
                data, host = cluster, self._writer.allocate(guest, len(cluster))
                if host > end:  # the cluster starts aligned: the bytes before it stay zero
                    await self._target.zeroes(end, host - end)
            else:
                data, host = memoryview(packed), self._writer.place_compressed(guest, packed)
            digest = await self._target.store(
                data, len(data), host, functools.partial(self._hash_one, data)
            )
            if self._hash:
                self.digests.append(DigestRun(host, len(data), guest, digest))
            self.stored += len(data)

    async def zero(self, offset: int, length: int) -> None:
        self._writer.write_zeroes(offset, length)

    async def finish(self) -> None:
        self.stats = await self._target.finish(self._writer)

    async def abort(self) -> None:
        await self._target.abort()
