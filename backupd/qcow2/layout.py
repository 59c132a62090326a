"""qcow2 v3 on-disk structures (qemu docs/interop/qcow2.txt), without I/O."""

from __future__ import annotations

import struct
from typing import Final

MAGIC: Final = b"QFI\xfb"
VERSION: Final = 3
REFCOUNT_ORDER: Final = 4  # 16-bit refcounts
HEADER_LENGTH: Final = 112
HEADER: Final = struct.Struct(">4sIQIIQIIQQIIQQQQIIB7x")
EXT_HEADER: Final = struct.Struct(">II")
EXT_END: Final = 0x00000000
EXT_BACKING_FORMAT: Final = 0xE2792ACA
#: "full disk encryption header pointer": offset and length of the LUKS header region
EXT_FULL_DISK_ENCRYPTION: Final = 0x0537BE77
EXT_FDE: Final = struct.Struct(">QQ")
#: crypt methods (header field crypt_method)
CRYPT_NONE: Final = 0
CRYPT_LUKS: Final = 2

OFLAG_COPIED: Final = 1 << 63
OFLAG_COMPRESSED: Final = 1 << 62
OFLAG_ZERO: Final = 1
SECTOR: Final = 512
#: the cluster size of every image backupd writes
CLUSTER_SIZE: Final = 65536


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def compressed_descriptor(cluster_bits: int, host_offset: int, size: int) -> int:
    """The L2 entry of a compressed cluster of ``size`` bytes at ``host_offset``."""
    shift = 62 - (cluster_bits - 8)
    sectors = ((host_offset + size - 1) >> 9) - (host_offset >> 9)
    if host_offset >= 1 << shift or sectors >= 1 << (cluster_bits - 8):
        raise ValueError("compressed cluster does not fit its descriptor")
    return OFLAG_COMPRESSED | (sectors << shift) | host_offset


def compressed_span(cluster_bits: int, entry: int) -> tuple[int, int]:
    """(first byte, end) of the 512-byte sectors a compressed cluster occupies."""
    shift = 62 - (cluster_bits - 8)
    offset = entry & ((1 << shift) - 1)
    sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    start = offset & ~(SECTOR - 1)
    return start, start + sectors * SECTOR


def encode_header(
    *,
    cluster_bits: int,
    size: int,
    l1_size: int,
    l1_offset: int,
    refcount_table_offset: int,
    refcount_table_clusters: int,
    backing_file: str | None,
    backing_format: str | None,
    encryption: tuple[int, int] | None = None,
) -> bytes:
    """Header, extensions and backing file name: the content of cluster 0.
    ``encryption``: (offset, length) of the LUKS header region (crypt method LUKS)."""
    extensions = b""
    if backing_file is not None and backing_format:
        raw = backing_format.encode()
        extensions += EXT_HEADER.pack(EXT_BACKING_FORMAT, len(raw)) + raw
        extensions += bytes(align_up(len(raw), 8) - len(raw))
    if encryption is not None:
        extensions += EXT_HEADER.pack(EXT_FULL_DISK_ENCRYPTION, EXT_FDE.size)
        extensions += EXT_FDE.pack(*encryption)
    extensions += EXT_HEADER.pack(EXT_END, 0)
    backing = backing_file.encode() if backing_file is not None else b""
    backing_offset = HEADER_LENGTH + len(extensions) if backing else 0
    header = HEADER.pack(
        MAGIC,
        VERSION,
        backing_offset,
        len(backing),
        cluster_bits,
        size,
        CRYPT_NONE if encryption is None else CRYPT_LUKS,
        l1_size,
        l1_offset,
        refcount_table_offset,
        refcount_table_clusters,
        0,  # snapshots
        0,
        0,  # incompatible features
        0,  # compatible features
        0,  # autoclear features
        REFCOUNT_ORDER,
        HEADER_LENGTH,
        0,  # compression type: zlib
    )
    assert len(header) == HEADER_LENGTH
    data = header + extensions + backing
    if len(data) > 1 << cluster_bits:
        raise ValueError("qcow2 header does not fit the first cluster (backing path too long)")
    return data


def fde_extension(cluster0: bytes) -> tuple[int, int] | None:
    """(offset, length) that the full disk encryption extension of a header (the first
    cluster) names; None when it has none.  Reads what is there, checks nothing: for
    files that passed the gate, or that qemu just wrote."""
    position = HEADER_LENGTH
    while position + EXT_HEADER.size <= len(cluster0):
        kind, length = EXT_HEADER.unpack_from(cluster0, position)
        position += EXT_HEADER.size
        if kind == EXT_END:
            return None
        if kind == EXT_FULL_DISK_ENCRYPTION and length == EXT_FDE.size:
            offset, size = EXT_FDE.unpack_from(cluster0, position)
            return int(offset), int(size)
        position += align_up(length, 8)
    return None
