"""The point in time of a VM whose qemu is not running: its images, as backupd's own
qemu-storage-daemon opened them (:mod:`backupd.qemu.storage_daemon`,
:mod:`backupd.qemu.images`).

The point in time is the moment the daemon opened the images.  From then until it
exits it holds qemu's write lock on each of them: no qemu can start on them and
nothing else writes to them, so every instant in between shows the same bytes, the
disks as the guest left them at its last shutdown.  That makes the simplest view the
correct one: the image node itself, exported read-only.  No copy-before-write filter,
no scratch file, no pause, no freeze (there is no guest to freeze).  The node is
read-write only so that the checkpoint bitmaps can be changed in the image.

The bitmaps are handled as online, in one transaction: the new checkpoint bitmap is
added on every image that can store one (it stays empty: nothing writes until the VM
runs again, and then it records), and the parent's bitmap is merged into a disabled,
temporary copy that the export offers as its dirty-bitmap context.  qemu refuses to
export an enabled bitmap read-only from a writable node, and the copy keeps the
parent's own bitmap untouched until the backup is committed.  The copy is removed at
teardown (it would go with the daemon anyway: it is not persistent).
"""

from __future__ import annotations

import logging

from backupd.bitmaps import EXPORT_BITMAP
from backupd.errors import QemuError
from backupd.faults import checkpoint
from backupd.qemu.blockops import remove_bitmap
from backupd.qemu.fleece.session import Action, FleeceSession

log = logging.getLogger("backupd.fleece")

#: the name of this "method" in logs: no fleecing, the images themselves
IMAGES = "images"


class OfflineSession(FleeceSession):
    """The images of a VM whose qemu is not running, exported as they are."""

    method = IMAGES

    async def point_in_time(self) -> list[str]:
        actions: list[Action] = []
        for disk in self.disks:
            actions += self._frozen_parent_actions(disk, disk.node)
        await self._checkpoint_transaction(actions)
        checkpoint("after-transaction")
        return [disk.node for disk in self.disks]

    async def teardown(self) -> None:
        await super().teardown()
        if self.parent_bitmap is None:
            return
        for disk in self.disks:
            try:
                await remove_bitmap(self.monitor, disk.node, EXPORT_BITMAP)
            except QemuError as exc:
                log.warning("teardown: remove bitmap %s on %s: %s", EXPORT_BITMAP, disk.name, exc)
