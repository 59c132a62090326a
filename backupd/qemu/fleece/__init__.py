"""The point-in-time view of a VM's disks, exported over qemu's NBD server.

:func:`fleece_session` gives the session of the method :func:`choose_method` picks, an
async context manager: on enter it fixes the point in time of every disk and exports a
read-only view of each on a private unix socket; on exit it tears everything down in
reverse order, always.  Both methods are copy-before-write: from the point in time on,
the old contents of every cluster the guest overwrites are first copied into a scratch
file, so the view shows the disk as it was.

- ``snapshot-access`` (qemu >= 7.1, the default; :mod:`.snapshot_access`): a filter put
  between guest device and disk; a full scratch area breaks the view, never the guest.
- ``blockdev-backup`` (older qemu, or a disk with no guest device;
  :mod:`.blockdev_backup`): one transaction starts a ``sync=none`` job per disk; a full
  scratch area fails the guest's writes.

A VM whose qemu is not running needs neither: :mod:`.offline` exports its images,
which backupd's own qemu-storage-daemon holds locked, as they are.

The parts: :mod:`.names` (what backupd calls things in qemu), :mod:`.scratch` (scratch
files and the state file), :mod:`.session` (server, exports, teardown),
:mod:`.recovery` (:func:`cleanup_leftovers`: what a killed run left, and a VM it left
paused).  The QMP verbs they undo things with are in :mod:`backupd.qemu.blockops`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from backupd.config import Fleecing
from backupd.qemu.fleece.blockdev_backup import BlockdevBackupSession
from backupd.qemu.fleece.method import BLOCKDEV_BACKUP, SNAPSHOT_ACCESS, choose_method
from backupd.qemu.fleece.offline import IMAGES, OfflineSession
from backupd.qemu.fleece.recovery import (
    cleanup_leftovers,
    remove_scratch_leftovers,
    remove_stray_bitmaps,
)
from backupd.qemu.fleece.session import DiskExport, FleeceSession, Quiesce
from backupd.qemu.fleece.snapshot_access import SnapshotAccessSession
from backupd.qemu.inventory import Disk
from backupd.qemu.qmp import QemuMonitor

__all__ = [
    "BLOCKDEV_BACKUP",
    "IMAGES",
    "SNAPSHOT_ACCESS",
    "BlockdevBackupSession",
    "DiskExport",
    "FleeceSession",
    "OfflineSession",
    "Quiesce",
    "SnapshotAccessSession",
    "choose_method",
    "cleanup_leftovers",
    "fleece_session",
    "remove_scratch_leftovers",
    "remove_stray_bitmaps",
]

_SESSIONS: dict[str, type[FleeceSession]] = {
    SNAPSHOT_ACCESS: SnapshotAccessSession,
    BLOCKDEV_BACKUP: BlockdevBackupSession,
}


def fleece_session(
    monitor: QemuMonitor,
    disks: Sequence[Disk],
    *,
    backup_id: str,
    bitmap: str,
    parent_bitmap: str | None,
    scratch_dir: Path,
    socket_dir: Path,
    method: Fleecing = Fleecing.AUTO,
    quiesce: Quiesce | None = None,
) -> FleeceSession:
    """The session of the configured method, or of the best this qemu offers."""
    chosen = choose_method(method, monitor.version, disks)
    return _SESSIONS[chosen](
        monitor,
        disks,
        backup_id=backup_id,
        bitmap=bitmap,
        parent_bitmap=parent_bitmap,
        scratch_dir=scratch_dir,
        socket_dir=socket_dir,
        quiesce=quiesce,
    )
