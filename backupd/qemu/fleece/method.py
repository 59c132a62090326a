"""Which fleecing method a run uses: the configured one, or the best this qemu offers."""

from __future__ import annotations

from collections.abc import Sequence

from backupd.errors import ConfigError, QemuTooOldError
from backupd.qemu.inventory import Disk

SNAPSHOT_ACCESS = "snapshot-access"
BLOCKDEV_BACKUP = "blockdev-backup"
SNAPSHOT_ACCESS_VERSION = (7, 1, 0)  # on-cbw-error=break-snapshot


def choose_method(wanted: str, version: tuple[int, int, int], disks: Sequence[Disk]) -> str:
    """The fleecing method for these disks: the configured one, or the best qemu offers."""
    no_device = [d.name for d in disks if not d.device]
    if wanted == "auto":
        if version >= SNAPSHOT_ACCESS_VERSION and not no_device:
            return SNAPSHOT_ACCESS
        return BLOCKDEV_BACKUP
    if wanted == SNAPSHOT_ACCESS:
        if version < SNAPSHOT_ACCESS_VERSION:
            have = ".".join(map(str, version))
            raise QemuTooOldError(
                f"fleecing: snapshot-access needs qemu >= 7.1 (this qemu is {have}); "
                "use fleecing: blockdev-backup"
            )
        if no_device:
            raise ConfigError(
                f"fleecing: snapshot-access needs a guest device on every disk; "
                f"{', '.join(no_device)} has none (use fleecing: blockdev-backup)"
            )
    return wanted
