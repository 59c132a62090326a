"""A streaming, write-once qcow2 v3 writer.

Data clusters are appended in the order reads are *issued* (:meth:`Qcow2Writer.allocate`
hands out host offsets; the caller writes the bytes there with ``os.pwrite`` whenever the
read completes, in any order).  :meth:`finish` then writes the L2 tables, the L1 table,
the refcount blocks and table, and the header last, and fsyncs.  :meth:`tail` gives the
same metadata as bytes, for an image written elsewhere than into a local file (an
object-store upload: :class:`~backupd.qcow2.sink.ByteTarget`).  Zero ranges become
zero clusters (they hide the backing file), untouched clusters fall through to the
backing file, and optional compressed clusters use raw deflate as qemu does.

Memory grows with the number of stored clusters (one dict entry each), never with the
virtual size.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import os
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from backupd.qcow2 import layout
from nbdclient.fileio import pwrite_all


@dataclass(frozen=True, slots=True)
class Qcow2Stats:
    data_clusters: int
    zero_clusters: int
    compressed_clusters: int
    file_size: int


@dataclass(frozen=True, slots=True)
class Qcow2Tail:
    """What ends an image: ``pieces`` (host offset, bytes) at increasing offsets, with
    gaps that read as zeros; then ``header`` at offset 0; the file is ``file_size``
    bytes long."""

    pieces: Iterable[tuple[int, bytes]]
    header: bytes
    file_size: int
    stats: Qcow2Stats


class Qcow2Writer:
    def __init__(
        self,
        path: Path,
        virtual_size: int,
        *,
        cluster_size: int = layout.CLUSTER_SIZE,
        backing_file: str | None = None,
        backing_format: str = "qcow2",
        luks_region: bytes = b"",
    ) -> None:
        """``luks_region``: the LUKS header region of an encrypted image (see
        :mod:`backupd.qcow2.luks`), stored from cluster 1 on; the caller encrypts the
        data (:mod:`backupd.qcow2.xts`, IVs from the host offsets handed out here)."""
        if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 << 20:
            raise ValueError(f"invalid cluster size {cluster_size}")
        self.path = path
        self.virtual_size = virtual_size
        self.cluster_size = cluster_size
        self.cluster_bits = cluster_size.bit_length() - 1
        self.backing_file = backing_file
        self.backing_format = backing_format if backing_file else None
        self.fd = -1
        self._owns_fd = True
        self.luks_region = luks_region.ljust(layout.align_up(len(luks_region), cluster_size), b"\0")
        self._region_length = len(luks_region)
        # cluster 0 holds the header, the LUKS region (if any) follows
        self._next = cluster_size + len(self.luks_region)
        self._l2: dict[int, int] = {}  # guest cluster index -> L2 entry
        self._compressed_refs: dict[int, int] = {}  # host cluster -> references
        self._data_clusters = 0
        self._zero_clusters = 0
        self._compressed = 0
        self.finished = False

    @property
    def guest_clusters(self) -> int:
        return -(-self.virtual_size // self.cluster_size)

    def open(self, fd: int | None = None) -> Qcow2Writer:
        """Create the file at :attr:`path` (exclusively, 0600), or write into ``fd``, an
        empty file that its creator closes and removes (then :meth:`finish` syncs
        but leaves it open, and :meth:`abort` leaves it alone)."""
        self._owns_fd = fd is None
        if fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.fd = fd
        if self.luks_region:
            pwrite_all(fd, self.luks_region, self.cluster_size)
        return self

    def _clusters(self, guest_offset: int, length: int) -> range:
        cs = self.cluster_size
        if guest_offset % cs:
            raise ValueError(f"guest offset {guest_offset} is not cluster aligned")
        if length <= 0 or guest_offset + length > layout.align_up(self.virtual_size, cs):
            raise ValueError(f"range [{guest_offset}, +{length}) outside the disk")
        first = guest_offset // cs
        return range(first, first + -(-length // cs))

    def _claim(self, index: int) -> None:
        if index in self._l2:
            raise ValueError(f"guest cluster {index} written twice")

    def allocate(self, guest_offset: int, length: int) -> int:
        """Reserve host clusters for ``length`` guest bytes at a cluster-aligned offset;
        returns the host offset where the caller writes them."""
        clusters = self._clusters(guest_offset, length)
        cs = self.cluster_size
        host = layout.align_up(self._next, cs)
        for i, index in enumerate(clusters):
            self._claim(index)
            self._l2[index] = (host + i * cs) | layout.OFLAG_COPIED
        self._next = host + len(clusters) * cs
        self._data_clusters += len(clusters)
        return host

    def write_zeroes(self, guest_offset: int, length: int) -> None:
        """Mark whole clusters as reading zero (hiding the backing file)."""
        for index in self._clusters(guest_offset, length):
            self._claim(index)
            self._l2[index] = layout.OFLAG_ZERO
            self._zero_clusters += 1

    def compress(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """Raw deflate of one cluster; None when it does not get smaller (thread-safe)."""
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12)
        out = compressor.compress(data) + compressor.flush()
        return out if len(out) < self.cluster_size - layout.SECTOR else None

    def place_compressed(self, guest_offset: int, compressed: bytes) -> int:
        """Record a compressed cluster and return where its bytes go."""
        (index,) = self._clusters(
            guest_offset, min(self.cluster_size, self.virtual_size - guest_offset)
        )
        self._claim(index)
        host = self._next
        self._l2[index] = layout.compressed_descriptor(self.cluster_bits, host, len(compressed))
        start, end = layout.compressed_span(self.cluster_bits, self._l2[index])
        for cluster in range(start >> self.cluster_bits, ((end - 1) >> self.cluster_bits) + 1):
            self._compressed_refs[cluster] = self._compressed_refs.get(cluster, 0) + 1
        self._next = host + len(compressed)
        self._compressed += 1
        return host

    @property
    def end(self) -> int:
        """One past the last host byte handed out so far."""
        return self._next

    def tail(self) -> Qcow2Tail:
        """The metadata that ends the image (L2 tables, L1 table, refcount blocks and
        table), as pieces at increasing host offsets, and the header; computed once the
        last data cluster was placed (the writer is done with it)."""
        cs = self.cluster_size
        start = layout.align_up(self._next, cs)
        # L2 tables for every L1 slot that maps something
        l2_slots = sorted({index // (cs // 8) for index in self._l2})
        l1_size = max(1, -(-self.guest_clusters // (cs // 8)))
        l1 = [0] * l1_size
        for n, slot in enumerate(l2_slots):
            l1[slot] = (start + n * cs) | layout.OFLAG_COPIED
        l1_offset = start + len(l2_slots) * cs
        l1_bytes = struct.pack(f">{l1_size}Q", *l1)
        position = l1_offset + layout.align_up(len(l1_bytes), cs)
        refcounts, table, table_offset, total = self._refcounts(start, position)
        header = layout.encode_header(
            cluster_bits=self.cluster_bits,
            size=self.virtual_size,
            l1_size=l1_size,
            l1_offset=l1_offset,
            refcount_table_offset=table_offset,
            refcount_table_clusters=len(table) // cs,
            backing_file=self.backing_file,
            backing_format=self.backing_format,
            encryption=(cs, self._region_length) if self.luks_region else None,
        )
        pieces = itertools.chain(
            self._l2_tables(start, l2_slots),
            [(l1_offset, l1_bytes), (position, refcounts), (table_offset, table)],
        )
        stats = Qcow2Stats(self._data_clusters, self._zero_clusters, self._compressed, total * cs)
        return Qcow2Tail(pieces, header, total * cs, stats)

    def _l2_tables(self, start: int, slots: list[int]) -> Iterator[tuple[int, bytes]]:
        """The L2 tables, one cluster each, made as they are written."""
        cs = self.cluster_size
        per_table = cs // 8
        by_slot: dict[int, list[int]] = {}
        for index in sorted(self._l2):
            by_slot.setdefault(index // per_table, []).append(index)
        for n, slot in enumerate(slots):
            table = bytearray(cs)
            for index in by_slot[slot]:
                struct.pack_into(">Q", table, (index % per_table) * 8, self._l2[index])
            yield start + n * cs, bytes(table)

    def _refcounts(self, start: int, position: int) -> tuple[bytes, bytes, int, int]:
        """Refcount blocks (at ``position``) and table for everything, including the
        refcount structures themselves: (blocks, table, table offset, clusters in all)."""
        cs = self.cluster_size
        per_block = cs // 2
        meta_end = position // cs
        blocks = table_clusters = 0
        while True:
            total = meta_end + blocks + table_clusters
            need_blocks = -(-total // per_block)
            need_table = max(1, -(-(need_blocks * 8) // cs))
            if (need_blocks, need_table) == (blocks, table_clusters):
                break
            blocks, table_clusters = need_blocks, need_table
        table_offset = position + blocks * cs
        total = meta_end + blocks + table_clusters
        counts = array.array("H", bytes(blocks * cs))
        counts[0] = 1  # the header
        for cluster in range(1, 1 + len(self.luks_region) // cs):
            counts[cluster] = 1
        for entry in self._l2.values():
            if entry & layout.OFLAG_COPIED:
                counts[(entry & ~layout.OFLAG_COPIED) // cs] += 1
        for cluster, count in self._compressed_refs.items():
            counts[cluster] += count
        for cluster in range(start // cs, total):
            counts[cluster] += 1
        if sys.byteorder == "little":
            counts.byteswap()
        refcounts = counts.tobytes()
        table = bytearray(table_clusters * cs)
        for i in range(blocks):
            struct.pack_into(">Q", table, i * 8, position + i * cs)
        return refcounts, bytes(table), table_offset, total

    def finish(self) -> Qcow2Stats:
        """Write the metadata and the header into the file; fsync; close."""
        tail = self.tail()
        for offset, piece in tail.pieces:
            pwrite_all(self.fd, piece, offset)
        os.ftruncate(self.fd, tail.file_size)
        os.fsync(self.fd)
        pwrite_all(self.fd, tail.header, 0)
        os.fsync(self.fd)
        if self._owns_fd:
            os.close(self.fd)
        self.fd = -1
        self.finished = True
        return tail.stats

    def abort(self) -> None:
        """Close and remove an unfinished file (one this writer created)."""
        if not self._owns_fd:
            self.fd = -1
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.finished:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
