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
its host offsets, and only then written: no plaintext reaches the file.  Compression
and encryption do not go together (qemu 7.2 stores and reads compressed clusters of an
encrypted image unencrypted).

Used by backup (a new file in the staging folder, with digests) and by restore (an
:class:`~nbdclient.copy.outfile.OutputFile`, which takes its name when finished).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from backupd.digests import ALGORITHM, KEYED, hexdigest
from backupd.manifest import DigestRun
from backupd.qcow2.layout import CLUSTER_SIZE, align_up
from backupd.qcow2.writer import Qcow2Stats, Qcow2Writer
from nbdclient.copy import Batch, OutputFile
from nbdclient.fileio import DIRECT_ALIGN, DataFile

if TYPE_CHECKING:  # numpy and cryptography: imported only for encrypted images
    from backupd.qcow2.encryption import ImageKey

SECTOR = 512


class Qcow2Sink:
    def __init__(
        self,
        writer: Qcow2Writer,
        *,
        output: OutputFile | None = None,
        digests: bool = False,
        compress: bool = False,
        key: ImageKey | None = None,
    ) -> None:
        """``writer`` is open; ``output``, when given, holds its file; ``key``: the
        writer's image is encrypted with it."""
        if key is not None and compress:
            raise ValueError("compressed clusters cannot be encrypted")
        self.granularity = writer.cluster_size
        self.compress = compress
        self.digests: list[DigestRun] = []
        #: bytes written into the file for data (compressed sizes when compressed)
        self.stored = 0
        self.stats: Qcow2Stats | None = None
        self._writer = writer
        self._output = output
        self._hash = digests
        self._key = key
        #: the digest algorithm of :attr:`digests`
        self.digest_algorithm = KEYED if key is not None else ALGORITHM
        # compressed clusters are not aligned: buffered
        self._out = DataFile(writer.fd, direct=not compress)

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
        hashes = await self._out.store(span, self._store_batch, buf, span, host, batch)
        if self._hash:
            for read, digest in zip(batch.reads, hashes, strict=True):
                assert read.target is not None
                self.digests.append(DigestRun(read.target, read.length, read.offset, digest))
        self.stored += batch.length

    def _store_batch(self, buf: memoryview, span: int, host: int, batch: Batch) -> list[str]:
        """Hash each read and write ``buf[:span]`` at ``host`` (in a thread, or inline
        when small); encrypted first when the image is."""
        hashes = self._digests(buf, batch) if self._hash else []
        padded = span
        if self._out.direct:
            padded = align_up(span, DIRECT_ALIGN)
        elif self._key is not None:
            padded = align_up(span, SECTOR)
        buf[span:padded] = bytes(padded - span)  # the disk's tail: its cluster is ours
        if self._key is not None:
            self._key.cipher.encrypt(buf[:padded], host)
        self._out.write(buf[:padded], host)
        return hashes

    def _digests(self, buf: memoryview, batch: Batch) -> list[str]:
        """The digest of each read's plaintext (keyed when the image is encrypted)."""
        key = self._key.digest_key if self._key is not None else None
        return [
            hexdigest(buf[r.position : r.position + r.length], self.digest_algorithm, key)
            for r in batch.reads
        ]

    def _store_one(self, data: memoryview, host: int) -> str:
        self._out.write(data, host)
        return hexdigest(data) if self._hash else ""

    async def _store_compressed(self, view: memoryview, offset: int) -> None:
        """Compress cluster by cluster in a thread; incompressible clusters are stored raw."""
        cs = self.granularity
        for rel in range(0, len(view), cs):
            cluster = view[rel : rel + cs]
            guest = offset + rel
            # qemu inflates a compressed cluster into a whole cluster: pad the disk's tail
            whole = cluster if len(cluster) == cs else bytes(cluster) + bytes(cs - len(cluster))
            packed = await self._out.offload(self._writer.compress, whole)
            if packed is None:
                data, host = cluster, self._writer.allocate(guest, len(cluster))
            else:
                data, host = memoryview(packed), self._writer.place_compressed(guest, packed)
            digest = await self._out.offload(self._store_one, data, host)
            if self._hash:
                self.digests.append(DigestRun(host, len(data), guest, digest))
            self.stored += len(data)

    async def zero(self, offset: int, length: int) -> None:
        self._writer.write_zeroes(offset, length)

    async def finish(self) -> None:
        await self._out.settle()
        self._out.close()
        self.stats = await self._out.offload(self._writer.finish)
        if self._output is not None:
            self._output.commit()

    async def abort(self) -> None:
        await self._out.settle()  # no thread writes into the file any more
        self._out.close()
        self._writer.abort()
        if self._output is not None:
            self._output.discard()
