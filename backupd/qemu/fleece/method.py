"""Which fleecing method a run uses: the configured one, or the best this qemu offers."""

from __future__ import annotations

from collections.abc import Sequence

from backupd.config import Fleecing
from backupd.errors import ConfigError, QemuTooOldError
from backupd.qemu.inventory import Disk

SNAPSHOT_ACCESS = Fleecing.SNAPSHOT_ACCESS
BLOCKDEV_BACKUP = Fleecing.BLOCKDEV_BACKUP
SNAPSHOT_ACCESS_VERSION = (7, 1, 0)  # on-cbw-error=break-snapshot


def choose_method(
    wanted: Fleecing, version: tuple[int, int, int], disks: Sequence[Disk]
) -> Fleecing:
    """The fleecing method for these disks: the configured one, or the best qemu offers."""
    wanted = Fleecing(wanted)  # (a plain string from a caller is welcome)
    no_device = [d.name for d in disks if not d.device]
    if wanted is Fleecing.AUTO:
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
