"""Full or incremental, and why.

An incremental is possible when the newest committed backup's bitmap exists on every
selected disk, is persistent, recording and consistent, the disk set and sizes did not
change, the chain is shorter than ``max_chain`` and encryption was neither turned on nor
off (every file of a chain is encrypted, or none).  Otherwise a full, with the reason.
A VM with a raw image (no persistent bitmaps) gets a full every time, and the reason
says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from backupd.bitmaps import CheckpointNames
from backupd.errors import BackupFailed
from backupd.manifest import Kind, Manifest
from backupd.qemu.inventory import Disk


class Mode(StrEnum):
    """What the run was asked for (``--full``, ``--incremental``, neither)."""

    AUTO = "auto"
    FULL = "full"
    INCREMENTAL = "incremental"


@dataclass(frozen=True, slots=True)
class Plan:
    kind: Kind
    reason: str
    parent: Manifest | None
    #: the parent's checkpoint bitmap on every disk (for an incremental)
    parent_bitmap: str | None = None


def _parent_bitmap(names: CheckpointNames, latest: Manifest, disks: Sequence[Disk]) -> str:
    """The name the newest backup's bitmap has on every disk (the current form, or the
    form from before repository ids); the current form when neither is everywhere."""
    for name in names.candidates(latest.id):
        if all(disk.bitmap(name) is not None for disk in disks):
            return name
    return names.name(latest.id)


def _full_reason(
    latest: Manifest | None,
    chain_length: int | None,
    disks: Sequence[Disk],
    max_chain: int,
    name: str,
    encrypted: bool = False,
) -> str | None:
    raw = [d.name for d in disks if not d.stores_bitmaps]
    if raw:
        return (
            f"disk {', '.join(raw)} is a raw image, which holds no dirty bitmaps: only full backups"
        )
    if latest is None:
        return "no committed backup yet"
    wanted = sorted(d.name for d in disks)
    had = sorted(latest.disks)
    if wanted != had:
        return f"the disk set changed (was {','.join(had)}, now {','.join(wanted)})"
    if chain_length is None:
        return f"the chain of backup {latest.id} is broken"
    if any(record.encrypted != encrypted for record in latest.disks.values()):
        return f"encryption was turned {'on' if encrypted else 'off'}"
    if chain_length >= max_chain:
        return f"the chain reached max_chain ({max_chain} incrementals)"
    for disk in disks:
        record = latest.disks[disk.name]
        if record.virtual_size != disk.size:
            return f"disk {disk.name} was resized ({record.virtual_size} -> {disk.size} bytes)"
        bitmap = disk.bitmap(name)
        if bitmap is None:
            return (
                f"bitmap {name} is missing on disk {disk.name} "
                "(qemu was restarted without storing it, e.g. after a crash)"
            )
        if bitmap.inconsistent:
            return f"bitmap {name} on disk {disk.name} is inconsistent (qemu crashed)"
        if not bitmap.recording:
            return f"bitmap {name} on disk {disk.name} is not recording"
        if not bitmap.persistent:
            return f"bitmap {name} on disk {disk.name} is not persistent"
    return None


def plan_backup(
    mode: Mode,
    latest: Manifest | None,
    chain_length: int | None,
    disks: Sequence[Disk],
    max_chain: int,
    names: CheckpointNames,
    *,
    encrypted: bool = False,
) -> Plan:
    """Decide the kind of the next backup (``chain_length``: incrementals since the full,
    None when the newest backup's chain is broken)."""
    mode = Mode(mode)
    if mode is Mode.FULL:
        return Plan(Kind.FULL, "a full backup was requested", None)
    name = _parent_bitmap(names, latest, disks) if latest is not None else ""
    reason = _full_reason(latest, chain_length, disks, max_chain, name, encrypted)
    if reason is None:
        assert latest is not None
        return Plan(Kind.INCREMENTAL, f"changes since {latest.id}", latest, name)
    if mode is Mode.INCREMENTAL:
        raise BackupFailed(f"an incremental backup is not possible: {reason}")
    return Plan(Kind.FULL, reason, None)
