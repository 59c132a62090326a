"""The gatekeeper's view of a qcow2 file: is this an image backupd could have written?

A repository is not trusted, and qemu trusts the header of every image it opens: a
header can name any host file as its *external data file*, ask for features qemu then
acts on, or point tables anywhere.  :func:`inspect_image` reads only the header, the
header extensions, the L1 table, the L2 tables it names and the refcount table (all
small; nothing else of the file), and refuses anything :mod:`backupd.qcow2.writer` never
produces (docs/interop/qcow2.txt):

- magic ``QFI\\xfb``, version 3, a 112-byte header, refcount order 4 (16 bits),
  cluster size 512 B .. 2 MiB (the writer's range), compression type zlib;
- no incompatible, compatible or autoclear feature bit (the writer sets none: no dirty
  or corrupt bit, no external data file, no extended L2, no lazy refcounts, no bitmaps);
- no encryption, unless ``allow_encryption`` (a VM configured with encryption): then
  also LUKS (crypt method 2) with its header extension, whose region lies inside the
  file, cluster aligned, after the header, and starts with a LUKS header backupd would
  have written (:func:`backupd.qcow2.luks.parse`: aes-xts-plain64, slots where qemu
  puts them, bounded PBKDF2 iterations), and no compressed cluster (qemu keeps those
  unencrypted);
- no header extension but the backing format (``qcow2`` only, exactly when there is a
  backing file), then the end marker, all inside cluster 0, followed by the backing
  file name;
- no snapshots;
- the L1 table sized for the virtual size, and the L1 table, every L2 table, every data
  cluster, every compressed cluster's sectors, the refcount table and every refcount
  block inside the file, cluster aligned, with every reserved bit clear.

No I/O but ``os.pread`` on a descriptor the caller opened (and closes), or
:meth:`ImageReader.pread` of an image that is not a local file (an object in a bucket).
"""

from __future__ import annotations

import array
import os
import stat
import struct
import sys
from dataclasses import dataclass
from typing import Final, Protocol

from backupd.qcow2 import layout, luks

CRYPT_NONE: Final = layout.CRYPT_NONE
CRYPT_LUKS: Final = layout.CRYPT_LUKS
EXT_FULL_DISK_ENCRYPTION: Final = layout.EXT_FULL_DISK_ENCRYPTION
EXT_FDE: Final = layout.EXT_FDE
#: the writer's cluster sizes
MIN_CLUSTER_BITS: Final = 9
MAX_CLUSTER_BITS: Final = 21
#: qemu's own limits (block/qcow2.h): larger tables are refused by qemu as well
MAX_L1_BYTES: Final = 32 << 20
MAX_REFTABLE_BYTES: Final = 8 << 20
#: entry bits (docs/interop/qcow2.txt, "Cluster mapping")
OFFSET_MASK: Final = ((1 << 56) - 1) & ~((1 << 9) - 1)  # bits 9-55
L1_RESERVED: Final = ((1 << 63) - 1) & ~OFFSET_MASK  # bits 0-8 and 56-62
L2_RESERVED: Final = ((1 << 62) - 1) & ~OFFSET_MASK & ~layout.OFLAG_ZERO  # bits 1-8, 56-61
REFTABLE_RESERVED: Final = (1 << 9) - 1  # bits 0-8


class ImageReader(Protocol):
    """An image that is not a local file, as the inspector reads it."""

    @property
    def size(self) -> int: ...

    def pread(self, length: int, offset: int) -> bytes: ...


class ImageRefused(ValueError):
    """The file is not an image backupd could have written; the message says why."""


@dataclass(frozen=True, slots=True)
class ImageFacts:
    """What the header says, once the whole image has been found acceptable."""

    virtual_size: int
    cluster_size: int
    backing_file: str | None
    file_size: int
    l2_tables: int
    data_clusters: int
    compressed_clusters: int
    #: LUKS-encrypted (only with ``allow_encryption``)
    encrypted: bool = False


@dataclass(frozen=True, slots=True)
class _Header:
    backing_offset: int
    backing_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int


def _read(fd: int | ImageReader, length: int, offset: int, what: str, file_size: int) -> bytes:
    if offset < 0 or length < 0 or offset + length > file_size:
        raise ImageRefused(f"{what} at {offset} (+{length} bytes) lies outside the file")
    data = os.pread(fd, length, offset) if isinstance(fd, int) else fd.pread(length, offset)
    if len(data) != length:
        raise ImageRefused(f"{what}: short read (the file changed while it was inspected?)")
    return data


def inspect_image(fd: int | ImageReader, *, allow_encryption: bool = False) -> ImageFacts:
    """Check the image open on ``fd`` (ImageRefused when backupd would not have written it)."""
    if isinstance(fd, int):
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageRefused("not a regular file")
        size = st.st_size
    else:
        size = fd.size
    if size < layout.HEADER_LENGTH:
        raise ImageRefused("not a qcow2 file (shorter than a qcow2 header)")
    header = _header(_read(fd, layout.HEADER_LENGTH, 0, "header", size), allow_encryption)
    cluster = 1 << header.cluster_bits
    if size < cluster or size % layout.SECTOR:
        raise ImageRefused(f"file size {size} is not that of a qcow2 image")
    cluster0 = _read(fd, cluster, 0, "cluster 0", size)
    backing, region = _extensions_and_backing(cluster0, header, size, allow_encryption)
    if region is not None:
        _check_luks_header(fd, region, size)
    _check_refcount_table(fd, header, size)
    l2_tables, data, compressed = _check_mapping(fd, header, size)
    if region is not None and compressed:
        raise ImageRefused(f"encrypted image with {compressed} compressed (unencrypted) clusters")
    encrypted = region is not None
    return ImageFacts(header.size, cluster, backing, size, l2_tables, data, compressed, encrypted)


def _header(raw: bytes, allow_encryption: bool) -> _Header:
    (
        magic,
        version,
        backing_offset,
        backing_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
        incompatible,
        compatible,
        autoclear,
        refcount_order,
        header_length,
        compression_type,
    ) = layout.HEADER.unpack(raw)
    if magic != layout.MAGIC:
        raise ImageRefused("not a qcow2 file")
    if version != layout.VERSION:
        raise ImageRefused(f"qcow2 version {version} (backupd writes version 3)")
    if header_length != layout.HEADER_LENGTH or any(raw[105:112]):
        raise ImageRefused(f"header length {header_length} (backupd writes 112)")
    for name, bits in (
        ("incompatible", incompatible),
        ("compatible", compatible),
        ("autoclear", autoclear),
    ):
        if bits:
            raise ImageRefused(f"{name} feature bits {bits:#x} set (backupd sets none)")
    allowed_crypt = (CRYPT_NONE, CRYPT_LUKS) if allow_encryption else (CRYPT_NONE,)
    if crypt_method not in allowed_crypt:
        raise ImageRefused(f"encrypted (crypt method {crypt_method}) and encryption is not enabled")
    if refcount_order != layout.REFCOUNT_ORDER:
        raise ImageRefused(f"refcount order {refcount_order} (backupd writes 4)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageRefused(f"cluster bits {cluster_bits} outside 9..21")
    if compression_type != 0:
        raise ImageRefused(f"compression type {compression_type} (backupd writes zlib)")
    if nb_snapshots or snapshots_offset:
        raise ImageRefused(f"{nb_snapshots} internal snapshots (backupd writes none)")
    return _Header(
        backing_offset,
        backing_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_offset,
        refcount_table_offset,
        refcount_table_clusters,
    )


def _extensions_and_backing(
    cluster0: bytes, header: _Header, file_size: int, allow_encryption: bool
) -> tuple[str | None, tuple[int, int] | None]:
    """Walk the header extensions; return the backing file name (None without one) and
    the LUKS region (offset, length) of an encrypted image."""
    position = layout.HEADER_LENGTH
    backing_format: bytes | None = None
    region: tuple[int, int] | None = None
    seen: set[int] = set()
    while True:
        if position + layout.EXT_HEADER.size > len(cluster0):
            raise ImageRefused("header extensions run past cluster 0 (no end marker)")
        kind, length = layout.EXT_HEADER.unpack_from(cluster0, position)
        position += layout.EXT_HEADER.size
        if kind == layout.EXT_END:
            if length:
                raise ImageRefused("end-of-extensions marker with a length")
            break
        end = position + layout.align_up(length, 8)
        if end > len(cluster0):
            raise ImageRefused(f"header extension {kind:#x} runs past cluster 0")
        if kind in seen:
            raise ImageRefused(f"header extension {kind:#x} appears twice")
        seen.add(kind)
        body = cluster0[position : position + length]
        if kind == layout.EXT_BACKING_FORMAT:
            backing_format = body
        elif kind == EXT_FULL_DISK_ENCRYPTION and allow_encryption and header.crypt_method:
            region = _check_encryption_header(body, header, file_size)
        else:
            raise ImageRefused(f"header extension {kind:#x} (backupd writes only backing format)")
        if any(cluster0[position + length : end]):
            raise ImageRefused(f"header extension {kind:#x} has non-zero padding")
        position = end
    if header.crypt_method and EXT_FULL_DISK_ENCRYPTION not in seen:
        raise ImageRefused("encrypted image without its encryption header extension")
    return _backing_name(cluster0, header, position, backing_format), region


def _check_encryption_header(body: bytes, header: _Header, file_size: int) -> tuple[int, int]:
    if len(body) != EXT_FDE.size:
        raise ImageRefused("encryption header extension of the wrong length")
    offset, length = EXT_FDE.unpack(body)
    cluster = 1 << header.cluster_bits
    if offset % cluster or offset < cluster or not 0 < length <= file_size - offset:
        raise ImageRefused(f"encryption header at {offset} (+{length}) lies outside the file")
    return offset, length


def _check_luks_header(fd: int | ImageReader, region: tuple[int, int], file_size: int) -> None:
    offset, length = region
    raw = _read(fd, min(luks.HEADER_BYTES, length), offset, "LUKS header", file_size)
    try:
        luks.parse(raw, length)
    except luks.LuksError as exc:
        raise ImageRefused(str(exc)) from None


def _backing_name(
    cluster0: bytes, header: _Header, extensions_end: int, backing_format: bytes | None
) -> str | None:
    if header.backing_offset == 0 and header.backing_size == 0:
        if backing_format is not None:
            raise ImageRefused("backing format extension without a backing file")
        return None
    if header.backing_offset != extensions_end or not 0 < header.backing_size <= 1023:
        raise ImageRefused("backing file name is not where backupd writes it")
    end = header.backing_offset + header.backing_size
    if end > len(cluster0):
        raise ImageRefused("backing file name runs past cluster 0")
    if backing_format != b"qcow2":
        raise ImageRefused(f"backing format {backing_format!r} (backupd writes 'qcow2')")
    raw = cluster0[header.backing_offset : end]
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ImageRefused("backing file name is not UTF-8") from None
    if "\0" in name:
        raise ImageRefused("backing file name contains a NUL byte")
    return name


def _check_refcount_table(fd: int | ImageReader, header: _Header, file_size: int) -> None:
    cluster = 1 << header.cluster_bits
    length = header.refcount_table_clusters * cluster
    if header.refcount_table_offset % cluster or not 0 < length <= MAX_REFTABLE_BYTES:
        raise ImageRefused("refcount table is not where backupd writes one")
    table = _read(fd, length, header.refcount_table_offset, "refcount table", file_size)
    for (entry,) in struct.iter_unpack(">Q", table):
        if entry == 0:
            continue
        if entry & REFTABLE_RESERVED or entry % cluster or entry + cluster > file_size:
            raise ImageRefused(f"refcount block at {entry:#x} lies outside the file")


def _check_mapping(fd: int | ImageReader, header: _Header, file_size: int) -> tuple[int, int, int]:
    """The L1 table and every L2 table it names; (L2 tables, data, compressed clusters)."""
    cluster = 1 << header.cluster_bits
    l2_entries = cluster // 8
    guest_clusters = -(-header.size // cluster)
    needed = -(-guest_clusters // l2_entries)
    if not needed <= header.l1_size <= max(1, needed) or header.l1_size * 8 > MAX_L1_BYTES:
        raise ImageRefused(
            f"L1 table of {header.l1_size} entries for a {header.size}-byte disk "
            f"(backupd writes {max(1, needed)})"
        )
    if header.l1_offset % cluster:
        raise ImageRefused("L1 table is not cluster aligned")
    l1 = _read(fd, header.l1_size * 8, header.l1_offset, "L1 table", file_size)
    tables: set[int] = set()
    data = compressed = 0
    for (entry,) in struct.iter_unpack(">Q", l1):
        if entry & L1_RESERVED:
            raise ImageRefused(f"L1 entry {entry:#x} has reserved bits set")
        offset = entry & OFFSET_MASK
        if offset == 0 or offset in tables:
            continue
        if offset % cluster:
            raise ImageRefused(f"L2 table at {offset:#x} is not cluster aligned")
        tables.add(offset)
        table = _read(fd, cluster, offset, "L2 table", file_size)
        more_data, more_compressed = _check_l2(table, header.cluster_bits, file_size)
        data += more_data
        compressed += more_compressed
    return len(tables), data, compressed


def _check_l2(table: bytes, cluster_bits: int, file_size: int) -> tuple[int, int]:
    """(data, compressed clusters) of one L2 table, every entry checked."""
    fast = _check_plain_l2(table, cluster_bits, file_size)
    if fast is not None:
        return fast, 0
    return _check_l2_entries(table, cluster_bits, file_size)


def _check_l2_entries(table: bytes, cluster_bits: int, file_size: int) -> tuple[int, int]:
    """The entry-by-entry check (compressed clusters; says which entry is refused)."""
    cluster = 1 << cluster_bits
    data = compressed = 0
    for (entry,) in struct.iter_unpack(">Q", table):
        if entry == 0:
            continue
        if entry & layout.OFLAG_COMPRESSED:
            if entry & layout.OFLAG_COPIED:
                raise ImageRefused(f"compressed L2 entry {entry:#x} has the copied flag")
            start, end = layout.compressed_span(cluster_bits, entry)
            if end > file_size:
                raise ImageRefused(f"compressed cluster at {start:#x} runs past the end")
            compressed += 1
            continue
        if entry & L2_RESERVED:
            raise ImageRefused(f"L2 entry {entry:#x} has reserved bits set")
        offset = entry & OFFSET_MASK
        if offset == 0:
            continue  # a zero cluster, or unallocated (reads through to the backing file)
        if offset % cluster or offset + cluster > file_size:
            raise ImageRefused(f"data cluster at {offset:#x} lies outside the file")
        data += 1
    return data, compressed


def _check_plain_l2(table: bytes, cluster_bits: int, file_size: int) -> int | None:
    """The data clusters of an L2 table without compressed entries, checked a byte
    column at a time at C speed (a 1 TiB backup has 16M entries); None when the table
    needs the entry-by-entry check (compressed clusters, or anything refused)."""
    count = len(table) // 8
    if table[0::8].translate(None, b"\x00\x80"):  # bits 56-63: only the copied flag
        return None
    if table[7::8].translate(None, b"\x00\x01"):  # bits 0-7: only the zero flag
        return None
    column, low = 6, cluster_bits - 8  # bits 8 .. cluster_bits-1: alignment, reserved
    while low >= 8:
        if table[column::8].count(0) != count:
            return None
        column, low = column - 1, low - 8
    if low and table[column::8].translate(None, _ALIGNED[low]):
        return None
    offsets = bytearray(table)
    offsets[0::8] = bytes(count)
    entries = array.array("Q", offsets)
    if sys.byteorder == "little":
        entries.byteswap()
    mapped = count - entries.count(0) - entries.count(layout.OFLAG_ZERO)
    if mapped and (max(entries) & OFFSET_MASK) + (1 << cluster_bits) > file_size:
        return None
    return mapped


#: byte values whose ``n`` low bits are clear
_ALIGNED = {n: bytes(v for v in range(256) if not v & ((1 << n) - 1)) for n in range(1, 8)}
