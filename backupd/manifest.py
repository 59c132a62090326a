"""The manifest of one backup (``manifest.json``): what was copied, from where, and
the digests that let ``verify`` prove the stored bytes without the VM.

A full backup of a big disk has 100,000s of digest runs, one per data extent, and a run
reads its newest manifest to plan the next backup without needing any of them: so each
disk's runs are stored packed (format 2: base64 of 56-byte records, host offset, length,
guest offset as little-endian 64-bit integers and the 32-byte digest), and decoded and
checked only when something uses them (:class:`DigestRuns`).  Format 1 manifests, with
the runs as JSON lists, are read as before.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, NamedTuple, overload

from backupd.digests import ALGORITHMS, KEYED, LEGACY
from backupd.errors import RepositoryError
from backupd.names import is_backup_id, is_name

FORMAT = 2
#: the formats this version reads (1: digest runs as JSON lists)
READABLE = (1, 2)


class Kind(StrEnum):
    FULL = "full"
    INCREMENTAL = "incremental"


class VMState(StrEnum):
    """Where the disks were read: the VM's running qemu, or its images while it was not
    running (manifests from before this field are online)."""

    ONLINE = "online"
    OFFLINE = "offline"


class Consistency(StrEnum):
    """What the point in time is: file systems frozen by the guest agent, or what a
    crash at that instant would have left."""

    QUIESCED = "quiesced"
    CRASH_CONSISTENT = "crash-consistent"


class DigestRun(NamedTuple):
    """Digest (the disk record's algorithm) of ``length`` stored bytes at ``host_offset``
    in the backup file, holding the guest data (or compressed clusters) starting at
    ``guest_offset``."""

    host_offset: int
    length: int
    guest_offset: int
    digest: str


@dataclass(frozen=True, slots=True)
class DiskRecord:
    name: str
    file: str
    node: str
    virtual_size: int
    cluster_size: int
    bytes_copied: int
    bytes_stored: int
    data_extents: int
    zero_extents: int
    compressed: bool = False
    digests: Sequence[DigestRun] = ()
    digest_algorithm: str = LEGACY
    #: seconds from connecting to the export to the synced file (0 when not recorded)
    copy_seconds: float = 0.0
    #: a LUKS-encrypted file (its digests are keyed: :data:`backupd.digests.KEYED`)
    encrypted: bool = False


@dataclass(frozen=True, slots=True)
class Manifest:
    id: str
    vm: str
    kind: Kind
    parent: str | None
    created: str
    qemu_version: str
    reason: str
    quiesced: bool
    duration: float
    disks: dict[str, DiskRecord] = field(default_factory=dict)
    status: str = "complete"
    format: int = FORMAT
    source: VMState = VMState.ONLINE

    @property
    def bytes_stored(self) -> int:
        return sum(d.bytes_stored for d in self.disks.values())

    @property
    def bytes_copied(self) -> int:
        return sum(d.bytes_copied for d in self.disks.values())

    def to_json(self) -> str:
        """Indented JSON; each disk's digest runs packed in one string (a full backup
        can have 100,000s of them: see the module's docstring)."""
        head: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        disks: dict[str, Any] = {}
        for name, disk in self.disks.items():
            record = {f.name: getattr(disk, f.name) for f in fields(disk)}
            record["digests"] = pack_runs(disk.digests)
            disks[name] = record
        head["disks"] = disks
        head["format"] = FORMAT
        return json.dumps(head, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        """Parse and check a manifest (RepositoryError naming ``where`` and what is wrong):
        a manifest comes from the repository, which is not trusted."""
        try:
            return _manifest(json.loads(text), where)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise RepositoryError(f"corrupt manifest {where}: {exc}") from None


# ---- reading untrusted JSON: every field's type and range checked -------------------

MAX_INT = (1 << 63) - 1  # offsets and sizes: what a file or a disk can hold
DIGEST_HEX = 64  # blake3 and sha256
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class _Fields:
    """The fields of one JSON object of a manifest; ValueError names the bad one."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise ValueError(f"{where} is not an object")
        self.data: dict[str, Any] = data
        self.where = where

    def bad(self, key: str, what: str) -> ValueError:
        return ValueError(f"{self.where}: {key} is {self.data.get(key)!r}, not {what}")

    def get(self, key: str) -> Any:
        if key not in self.data:
            raise ValueError(f"{self.where}: {key} is missing")
        return self.data[key]

    def text(self, key: str, default: str | None = None) -> str:
        value = self.data.get(key, default) if default is not None else self.get(key)
        if not isinstance(value, str):
            raise self.bad(key, "a string")
        return value

    def line(self, key: str) -> str:
        """Text that ``list`` prints: no control characters (no terminal escapes)."""
        value = self.text(key)
        if _CONTROL.search(value):
            raise self.bad(key, "one line of text")
        return value

    def count(self, key: str, minimum: int = 0) -> int:
        value = self.get(key)
        if type(value) is not int or not minimum <= value <= MAX_INT:
            raise self.bad(key, f"an integer from {minimum} to 2**63-1")
        return value

    def seconds(self, key: str, default: float | None = None) -> float:
        value = self.data.get(key, default) if default is not None else self.get(key)
        if type(value) not in (int, float) or not 0 <= value < math.inf:
            raise self.bad(key, "a number of seconds")
        return float(value)

    def flag(self, key: str, default: bool | None = None) -> bool:
        value = self.data.get(key, default) if default is not None else self.get(key)
        if type(value) is not bool:
            raise self.bad(key, "true or false")
        return value


def _manifest(data: object, where: str) -> Manifest:
    f = _Fields(data, "manifest")
    version = f.data.get("format")
    if type(version) is not int or version not in READABLE:
        raise ValueError(f"unsupported manifest format {version!r}")
    backup = f.text("id")
    if not is_backup_id(backup):
        raise f.bad("id", "a backup id")
    if not is_name(f.text("vm")):
        raise f.bad("vm", "a VM name")
    try:
        kind = Kind(f.text("kind"))
    except ValueError:
        raise ValueError(f"unknown kind {f.text('kind')!r}") from None
    parent = f.get("parent")
    if kind is Kind.FULL and parent is not None:
        raise ValueError("a full backup with a parent")
    if kind is Kind.INCREMENTAL and not parent:
        raise ValueError("incremental backup without a parent")
    if parent is not None and (not is_backup_id(parent) or parent >= backup):
        raise f.bad("parent", "the id of an older backup")
    try:
        source = VMState(f.text("source", VMState.ONLINE))
    except ValueError:
        raise f.bad("source", " or ".join(VMState)) from None
    disks = f.get("disks")
    if not isinstance(disks, dict) or not disks:
        raise f.bad("disks", "an object naming at least one disk")
    return Manifest(
        id=backup,
        vm=f.text("vm"),
        kind=kind,
        parent=parent,
        created=f.line("created"),
        qemu_version=f.text("qemu_version"),
        reason=f.text("reason"),
        quiesced=f.flag("quiesced"),
        duration=f.seconds("duration"),
        disks={name: _disk(name, disk, version, where) for name, disk in disks.items()},
        status=f.line("status"),
        source=source,
    )


def _disk(name: str, data: object, version: int, where: str) -> DiskRecord:
    if not is_name(name):
        raise ValueError(f"invalid disk name {name!r}")
    f = _Fields(data, f"disk {name}")
    if f.text("name") != name:
        raise f.bad("name", repr(name))
    if f.text("file") != f"{name}.qcow2":
        raise f.bad("file", repr(f"{name}.qcow2"))
    virtual_size = f.count("virtual_size")
    cluster_size = f.count("cluster_size", 512)
    if cluster_size & (cluster_size - 1) or cluster_size > 2 << 20:
        raise f.bad("cluster_size", "a power of two from 512 to 2 MiB")
    algorithm = f.text("digest_algorithm", LEGACY)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown digest algorithm {algorithm!r}")
    encrypted = f.flag("encrypted", False)
    if encrypted != (algorithm == KEYED):
        raise ValueError(f"disk {name}: encrypted files have keyed digests, and only they")
    disk_end = -(-virtual_size // cluster_size) * cluster_size
    return DiskRecord(
        name=name,
        file=f"{name}.qcow2",
        node=f.text("node"),
        virtual_size=virtual_size,
        cluster_size=cluster_size,
        bytes_copied=f.count("bytes_copied"),
        bytes_stored=f.count("bytes_stored"),
        data_extents=f.count("data_extents"),
        zero_extents=f.count("zero_extents"),
        compressed=f.flag("compressed", False),
        digests=(
            _digest_runs(f.get("digests"), disk_end, name)
            if version == 1
            else DigestRuns.stored(f.get("digests"), disk_end, where, name)
        ),
        digest_algorithm=algorithm,
        copy_seconds=f.seconds("copy_seconds", 0.0),
        encrypted=encrypted,
    )


_BAD_RUN = "a digest run is not [host offset, length, guest offset, digest] inside the disk"


def _digest_runs(rows: object, disk_end: int, disk: str) -> tuple[DigestRun, ...]:
    """Every run: [host offset >= 0, length > 0, guest range inside the disk, hex digest].
    A manifest can hold 100,000s of runs: checked in one pass, built at C speed."""
    if not isinstance(rows, list):
        raise ValueError(f"disk {disk}: digests is not a list")
    try:
        sound = all(
            type(h) is int
            and type(n) is int
            and type(g) is int
            and type(s) is str
            and 0 <= h <= MAX_INT
            and g >= 0
            and 0 < n <= disk_end - g
            and len(s) == DIGEST_HEX
            for h, n, g, s in rows
        )
    except (TypeError, ValueError):  # a run that is not four items
        sound = False
    if not sound:
        raise ValueError(f"disk {disk}: {_BAD_RUN}")
    return tuple(map(DigestRun._make, rows))


# ---- format 2: packed digest runs, decoded and checked when used ----------------------

_RUN = struct.Struct("<QQQ32s")


def pack_runs(runs: Iterable[DigestRun]) -> str:
    """The stored form of ``runs`` (base64 of :data:`_RUN` records)."""
    if isinstance(runs, DigestRuns):
        return runs.packed
    pack = _RUN.pack
    blob = bytearray()
    for h, n, g, d in runs:
        digest = bytes.fromhex(d)
        if len(digest) != 32:
            raise ValueError(f"a digest of {len(digest)} bytes, not 32")
        blob += pack(h, n, g, digest)
    return base64.b64encode(blob).decode("ascii")


class DigestRuns(Sequence[DigestRun]):
    """A disk's digest runs as a manifest stores them: their count is known at once,
    the runs themselves are decoded and checked on first use (every run: host offset
    up to 2**63-1, positive length, guest range inside the disk), and a damaged list is
    a :class:`RepositoryError` naming the manifest then."""

    __slots__ = ("_count", "_disk_end", "_packed", "_runs", "_where")

    def __init__(self, packed: str, disk_end: int, where: str, count: int) -> None:
        self._packed = packed
        self._disk_end = disk_end
        self._where = where
        self._count = count
        self._runs: tuple[DigestRun, ...] | None = None

    @classmethod
    def stored(cls, value: object, disk_end: int, manifest: str, disk: str) -> DigestRuns:
        """The runs of one disk record of ``manifest`` (ValueError naming the disk when
        the value cannot be packed runs)."""
        if not isinstance(value, str) or not value.isascii() or len(value) % 4:
            raise ValueError(f"disk {disk}: digests is not base64 text")
        size = len(value) // 4 * 3 - (value.endswith("=") + value.endswith("=="))
        if size % _RUN.size:
            raise ValueError(f"disk {disk}: digests is not a whole number of runs")
        return cls(value, disk_end, f"{manifest}: disk {disk}", size // _RUN.size)

    @property
    def packed(self) -> str:
        return self._packed

    def runs(self) -> tuple[DigestRun, ...]:
        """Every run, decoded and checked (once)."""
        if self._runs is None:
            self._runs = self._decode()
        return self._runs

    def _decode(self) -> tuple[DigestRun, ...]:
        try:
            blob = base64.b64decode(self._packed, validate=True)
        except binascii.Error:
            raise RepositoryError(
                f"corrupt manifest {self._where}: digests is not base64"
            ) from None
        end = self._disk_end
        rows = _RUN.iter_unpack(blob)
        runs = tuple(DigestRun(h, n, g, d.hex()) for h, n, g, d in rows)
        if len(runs) != self._count or not all(
            h <= MAX_INT and 0 < n <= end - g for h, n, g, _ in runs
        ):
            raise RepositoryError(f"corrupt manifest {self._where}: {_BAD_RUN}")
        return runs

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> DigestRun: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[DigestRun]: ...

    def __getitem__(self, index: int | slice) -> DigestRun | Sequence[DigestRun]:
        return self.runs()[index]

    def __iter__(self) -> Iterator[DigestRun]:
        return iter(self.runs())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DigestRuns) and other._packed == self._packed:
            return True
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(self.runs())

    def __repr__(self) -> str:
        return f"DigestRuns({self._count} runs)"


def check_digests(manifest: Manifest) -> None:
    """Decode and check every disk's digest runs now (RepositoryError when damaged):
    before work that must not stop half-way on them, a merge."""
    for record in manifest.disks.values():
        if isinstance(record.digests, DigestRuns):
            record.digests.runs()
