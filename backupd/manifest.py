"""The manifest of one backup (``manifest.json``): what was copied, from where, and
the digests that let ``verify`` prove the stored bytes without the VM."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from backupd.digests import ALGORITHMS, LEGACY
from backupd.errors import RepositoryError

FORMAT = 1
KINDS = ("full", "incremental")


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


@dataclass(frozen=True, slots=True)
class Manifest:
    id: str
    vm: str
    kind: str
    parent: str | None
    created: str
    qemu_version: str
    reason: str
    quiesced: bool
    duration: float
    disks: dict[str, DiskRecord] = field(default_factory=dict)
    status: str = "complete"
    format: int = FORMAT

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
        try:
            data = json.loads(text)
            return cls._from_dict(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise RepositoryError(f"corrupt manifest {where}: {exc}") from None

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT:
            raise ValueError(f"unsupported manifest format {data.get('format')!r}")
        if data["kind"] not in KINDS:
            raise ValueError(f"unknown kind {data['kind']!r}")
        if data["kind"] == "incremental" and not data["parent"]:
            raise ValueError("incremental backup without a parent")
        disks = {}
        for name, disk in data["disks"].items():
            rows = disk["digests"]
            # a manifest can hold 100,000s of runs: check the types in bulk, build fast
            if not all(
                type(h) is int and type(n) is int and type(g) is int and type(s) is str
                for h, n, g, s in rows
            ):
                raise ValueError("a digest run is not [host, length, guest, digest]")
            digests = tuple(map(DigestRun._make, rows))
            algorithm = str(disk.get("digest_algorithm", LEGACY))
            if algorithm not in ALGORITHMS:
                raise ValueError(f"unknown digest algorithm {algorithm!r}")
            disks[name] = DiskRecord(
                name=str(disk["name"]),
                file=str(disk["file"]),
                node=str(disk["node"]),
                virtual_size=int(disk["virtual_size"]),
                cluster_size=int(disk["cluster_size"]),
                bytes_copied=int(disk["bytes_copied"]),
                bytes_stored=int(disk["bytes_stored"]),
                data_extents=int(disk["data_extents"]),
                zero_extents=int(disk["zero_extents"]),
                compressed=bool(disk.get("compressed", False)),
                digests=digests,
                digest_algorithm=algorithm,
                copy_seconds=float(disk.get("copy_seconds", 0.0)),
            )
        if not disks:
            raise ValueError("no disks")
        return cls(
            id=str(data["id"]),
            vm=str(data["vm"]),
            kind=str(data["kind"]),
            parent=data["parent"],
            created=str(data["created"]),
            qemu_version=str(data["qemu_version"]),
            reason=str(data["reason"]),
            quiesced=bool(data["quiesced"]),
            duration=float(data["duration"]),
            disks=disks,
            status=str(data["status"]),
        )
