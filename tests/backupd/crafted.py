"""A small real repository written by backupd's own qcow2 writer (no VM needed), and
the tools to damage it the way an attacker with write access to a repository could:
rewriting a qcow2 header, its extensions and backing name, or single table entries."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from backupd.digests import ALGORITHM, hexdigest
from backupd.manifest import DigestRun, DiskRecord, Manifest
from backupd.qcow2 import layout
from backupd.qcow2.writer import Qcow2Writer

VM = "guest1"
FULL = "20260101T000000Z"
INCREMENTAL = "20260102T000000Z"
CLUSTER = 65536
SIZE = 1 << 20  # 16 clusters: one L2 table

#: header fields by name, in layout.HEADER's order
FIELDS = (
    "magic",
    "version",
    "backing_offset",
    "backing_size",
    "cluster_bits",
    "size",
    "crypt_method",
    "l1_size",
    "l1_offset",
    "refcount_table_offset",
    "refcount_table_clusters",
    "nb_snapshots",
    "snapshots_offset",
    "incompatible",
    "compatible",
    "autoclear",
    "refcount_order",
    "header_length",
    "compression_type",
)


@dataclass
class Backup:
    id: str
    parent: str | None
    data: dict[int, bytes] = field(default_factory=dict)  # guest offset -> one cluster
    zeros: list[int] = field(default_factory=list)
    compressed: dict[int, bytes] = field(default_factory=dict)


def pattern(byte: int) -> bytes:
    return bytes([byte]) * (CLUSTER // 2) + os.urandom(CLUSTER // 2)


def write_backup(vm_dir: Path, spec: Backup, disk: str = "vda") -> Manifest:
    """Write ``spec`` as a committed backup of ``disk`` with its manifest."""
    folder = vm_dir / spec.id
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    backing = f"../{spec.parent}/{disk}.qcow2" if spec.parent else None
    writer = Qcow2Writer(folder / f"{disk}.qcow2", SIZE, backing_file=backing).open()
    runs = []
    for guest, data in sorted(spec.data.items()):
        host = writer.allocate(guest, len(data))
        os.pwrite(writer.fd, data, host)
        runs.append(DigestRun(host, len(data), guest, hexdigest(data)))
    for guest, data in sorted(spec.compressed.items()):
        packed = writer.compress(data)
        assert packed is not None
        host = writer.place_compressed(guest, packed)
        os.pwrite(writer.fd, packed, host)
        runs.append(DigestRun(host, len(packed), guest, hexdigest(packed)))
    for guest in spec.zeros:
        writer.write_zeroes(guest, CLUSTER)
    stats = writer.finish()
    stored = len(spec.data) * CLUSTER
    record = DiskRecord(
        name=disk,
        file=f"{disk}.qcow2",
        node=f"drive-{disk}",
        virtual_size=SIZE,
        cluster_size=CLUSTER,
        bytes_copied=stored,
        bytes_stored=stats.file_size,
        data_extents=len(spec.data),
        zero_extents=len(spec.zeros),
        compressed=bool(spec.compressed),
        digests=tuple(runs),
        digest_algorithm=ALGORITHM,
    )
    manifest = Manifest(
        id=spec.id,
        vm=vm_dir.name,
        kind="incremental" if spec.parent else "full",
        parent=spec.parent,
        created="2026-01-01T00:00:00Z",
        qemu_version="7.2.0",
        reason="crafted",
        quiesced=False,
        duration=0.1,
        disks={disk: record},
    )
    (folder / "manifest.json").write_text(manifest.to_json())
    return manifest


def base_chain(vm_dir: Path) -> dict[str, bytes]:
    """A full and an incremental backup of ``vda``; returns each point's disk bytes."""
    full = Backup(FULL, None, {0: pattern(0x11), 2 * CLUSTER: pattern(0x12)})
    full.compressed = {4 * CLUSTER: bytes([0x13]) * CLUSTER}
    incremental = Backup(INCREMENTAL, FULL, {2 * CLUSTER: pattern(0x21)}, zeros=[0])
    points = {}
    disk = bytearray(SIZE)
    for spec in (full, incremental):
        write_backup(vm_dir, spec)
        for guest, data in {**spec.data, **spec.compressed}.items():
            disk[guest : guest + len(data)] = data
        for guest in spec.zeros:
            disk[guest : guest + CLUSTER] = bytes(CLUSTER)
        points[spec.id] = bytes(disk)
    return points


# ---- damaging a qcow2 file ----------------------------------------------------------


def read_header(path: Path) -> dict[str, object]:
    with open(path, "rb") as f:
        return dict(zip(FIELDS, layout.HEADER.unpack(f.read(layout.HEADER_LENGTH)), strict=True))


def backing_name(path: Path) -> bytes | None:
    header = read_header(path)
    offset, size = int(str(header["backing_offset"])), int(str(header["backing_size"]))
    if not offset:
        return None
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def rewrite_cluster0(
    path: Path,
    *,
    extensions: list[tuple[int, bytes]] | None = None,
    backing: bytes | None = b"",
    **fields: object,
) -> None:
    """Rewrite the header (``fields`` override), the extensions (default: the backing
    format when there is a backing name) and the backing name (b"" keeps it)."""
    header = read_header(path)
    if backing == b"":
        backing = backing_name(path)
    if extensions is None:
        extensions = [(layout.EXT_BACKING_FORMAT, b"qcow2")] if backing else []
    body = b""
    for kind, data in extensions:
        body += layout.EXT_HEADER.pack(kind, len(data)) + data
        body += bytes(layout.align_up(len(data), 8) - len(data))
    body += layout.EXT_HEADER.pack(layout.EXT_END, 0)
    header["backing_offset"] = layout.HEADER_LENGTH + len(body) if backing else 0
    header["backing_size"] = len(backing) if backing else 0
    header.update(fields)
    cluster = 1 << int(str(read_header(path)["cluster_bits"]))
    data = layout.HEADER.pack(*(header[name] for name in FIELDS)) + body + (backing or b"")
    with open(path, "r+b") as f:
        f.write(data + bytes(cluster - len(data)))


def table_entry(path: Path, table: str, index: int = 0) -> tuple[int, int]:
    """(file offset, value) of entry ``index`` of the ``l1`` table, the first ``l2`` table
    or the ``refcount`` table."""
    header = read_header(path)
    with open(path, "rb") as f:
        if table == "refcount":
            where = int(str(header["refcount_table_offset"])) + 8 * index
        else:
            where = int(str(header["l1_offset"])) + 8 * (index if table == "l1" else 0)
            if table == "l2":
                f.seek(where)
                (l1,) = struct.unpack(">Q", f.read(8))
                where = (l1 & ~layout.OFLAG_COPIED) + 8 * index
        f.seek(where)
        (value,) = struct.unpack(">Q", f.read(8))
    return where, value


def set_entry(path: Path, table: str, index: int, value: int) -> None:
    where, _ = table_entry(path, table, index)
    with open(path, "r+b") as f:
        f.seek(where)
        f.write(struct.pack(">Q", value))
