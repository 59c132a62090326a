"""Which guest clusters a qcow2 file holds itself, and where: read from its L1 and L2
tables (docs/interop/qcow2.txt, "Cluster mapping"), nothing else.

For images that passed :func:`backupd.qcow2.inspector.inspect_image` (the tables are
known to lie inside the file).  L2 tables are read when first needed, so asking about a
few clusters of a large disk reads a few tables, and listing what a small incremental
holds reads only the tables it has.
"""

from __future__ import annotations

import array
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

from backupd.qcow2 import layout
from backupd.qcow2.inspector import OFFSET_MASK, ImageReader


class Kind(Enum):
    """What an image says of one guest cluster."""

    ABSENT = "absent"  # not in this file: read from the backing file
    ZERO = "zero"  # reads as zeros (hides the backing file)
    DATA = "data"  # a data cluster at a host offset
    COMPRESSED = "compressed"  # a compressed cluster


@dataclass(frozen=True, slots=True)
class Cluster:
    index: int
    kind: Kind
    #: host offset of a data cluster (0 otherwise)
    host: int = 0


def _pread(fd: int | ImageReader, length: int, offset: int) -> bytes:
    return os.pread(fd, length, offset) if isinstance(fd, int) else fd.pread(length, offset)


class ClusterMap:
    """The cluster map of the qcow2 image open on ``fd`` (the caller closes ``fd``), or
    of an image read through an :class:`~backupd.qcow2.inspector.ImageReader`."""

    def __init__(self, fd: int | ImageReader) -> None:
        self.fd = fd
        head = _pread(fd, layout.HEADER_LENGTH, 0)
        fields = layout.HEADER.unpack(head)
        self.cluster_bits = int(fields[4])
        self.cluster_size = 1 << self.cluster_bits
        self.virtual_size = int(fields[5])
        l1_size, l1_offset = int(fields[7]), int(fields[8])
        self.l1 = struct.unpack(f">{l1_size}Q", _pread(fd, l1_size * 8, l1_offset))
        self.per_table = self.cluster_size // 8
        self._tables: dict[int, array.array[int]] = {}

    @property
    def clusters(self) -> int:
        return -(-self.virtual_size // self.cluster_size)

    def _table(self, slot: int) -> array.array[int] | None:
        offset = self.l1[slot] & OFFSET_MASK if slot < len(self.l1) else 0
        if not offset:
            return None
        table = self._tables.get(slot)
        if table is None:
            table = array.array("Q", _pread(self.fd, self.cluster_size, offset))
            if sys.byteorder == "little":
                table.byteswap()
            self._tables[slot] = table
        return table

    @staticmethod
    def _classify(index: int, entry: int) -> Cluster:
        if entry & layout.OFLAG_COMPRESSED:
            return Cluster(index, Kind.COMPRESSED)
        host = entry & OFFSET_MASK
        if host:
            return Cluster(index, Kind.DATA, host)
        if entry & layout.OFLAG_ZERO:
            return Cluster(index, Kind.ZERO)
        return Cluster(index, Kind.ABSENT)

    def entry(self, index: int) -> int:
        """The raw L2 entry of guest cluster ``index`` (0 when its table is absent)."""
        table = self._table(index // self.per_table)
        return 0 if table is None else table[index % self.per_table]

    def lookup(self, index: int) -> Cluster:
        """What this file says of guest cluster ``index``."""
        return self._classify(index, self.entry(index))

    def held(self) -> Iterator[Cluster]:
        """Every guest cluster this file holds itself (data, zero or compressed), in order."""
        for slot in range(len(self.l1)):
            table = self._table(slot)
            if table is None:
                continue
            base = slot * self.per_table
            for position, entry in enumerate(table):
                if entry:
                    cluster = self._classify(base + position, entry)
                    if cluster.kind is not Kind.ABSENT and cluster.index < self.clusters:
                        yield cluster
