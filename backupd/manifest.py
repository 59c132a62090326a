"""The manifest of one backup (``manifest.json``): what was copied, from where, and
the digests that let ``verify`` prove the stored bytes without the VM."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, NamedTuple

from backupd.digests import ALGORITHMS, KEYED, LEGACY
from backupd.errors import RepositoryError
from backupd.names import is_backup_id, is_name

FORMAT = 1


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
    digests: tuple[DigestRun, ...] = ()
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
        """Indented JSON; each disk's digest runs one per line, encoded in one C-speed
        call (a full backup can have 100,000s of them)."""
        head: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        disks: dict[str, Any] = {}
        runs: dict[str, str] = {}
        for index, (name, disk) in enumerate(self.disks.items()):
            record = {f.name: getattr(disk, f.name) for f in fields(disk)}
            token = f"@digest-runs-{index}@"
            record["digests"] = token
            runs[f'"{token}"'] = json.dumps(disk.digests, separators=(",", ":")).replace(
                "],[", "],\n  ["
            )
            disks[name] = record
        head["disks"] = disks
        text = json.dumps(head, indent=1, sort_keys=True)
        for token, body in runs.items():
            text = text.replace(token, body, 1)
        return text + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        """Parse and check a manifest (RepositoryError naming ``where`` and what is wrong):
        a manifest comes from the repository, which is not trusted."""
        try:
            return _manifest(json.loads(text))
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


def _manifest(data: object) -> Manifest:
    f = _Fields(data, "manifest")
    if f.data.get("format") != FORMAT or type(f.data.get("format")) is not int:
        raise ValueError(f"unsupported manifest format {f.data.get('format')!r}")
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
        disks={name: _disk(name, disk) for name, disk in disks.items()},
        status=f.line("status"),
        source=source,
    )


def _disk(name: str, data: object) -> DiskRecord:
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
        digests=_digest_runs(f.get("digests"), disk_end, name),
        digest_algorithm=algorithm,
        copy_seconds=f.seconds("copy_seconds", 0.0),
        encrypted=encrypted,
    )


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
        raise ValueError(
            f"disk {disk}: a digest run is not [host offset, length, guest offset, digest] "
            "inside the disk"
        )
    return tuple(map(DigestRun._make, rows))
