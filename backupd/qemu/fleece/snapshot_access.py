"""Fleecing with ``snapshot-access`` (qemu >= 7.1, the default).

Per disk a sparse scratch file, a ``copy-before-write`` filter with
``on-cbw-error=break-snapshot`` put between the guest device and its disk (``qom-set
drive``), and a ``snapshot-access`` node on top, which is exported.  When the scratch
area fills up or fails, the guest's writes still succeed: the view breaks and the backup
fails.  This cannot be one QMP transaction, so the order makes it exact: the new
checkpoint bitmap records from *before* the filter goes in, the frozen copy of the
parent's bitmap is taken *after* it (both can only over-approximate), and with several
disks of a running VM the vCPUs are paused (``stop``/``cont``, a few milliseconds) while
the filters go in, so every disk is cut at the same instant.
"""

from __future__ import annotations

from backupd.faults import checkpoint
from backupd.qemu.blockops import qom_path
from backupd.qemu.fleece.method import SNAPSHOT_ACCESS
from backupd.qemu.fleece.names import access_node, filter_node, scratch_node
from backupd.qemu.fleece.scratch import create_sparse
from backupd.qemu.fleece.session import Action, FleeceSession
from backupd.qemu.inventory import Disk

#: a guest write waits at most this long for its copy-before-write (then the view breaks)
CBW_TIMEOUT = 60


class SnapshotAccessSession(FleeceSession):
    method = SNAPSHOT_ACCESS

    async def point_in_time(self) -> list[str]:
        for i, disk in enumerate(self.disks):
            path = self._scratch_path(disk, ".raw")
            create_sparse(path, disk.size)
            await self._add_node(
                {
                    "driver": "file",
                    "node-name": scratch_node(i),
                    "filename": str(path),
                    "discard": "unmap",
                }
            )
        checkpoint("after-scratch")
        async with self.quiesce():
            # the new bitmaps record from before the point in time on
            await self._checkpoint_transaction([])
            await self._insert_filters()
        checkpoint("after-transaction")
        views = [
            await self._add_node(
                {"driver": "snapshot-access", "node-name": access_node(i), "file": filter_node(i)}
            )
            for i in range(len(self.disks))
        ]
        # the parent's bitmap, frozen after the point in time: it holds every change since
        # the parent's point (and perhaps a few after this one, which are copied as they were)
        actions: list[Action] = []
        for disk, view in zip(self.disks, views, strict=True):
            actions += self._frozen_parent_actions(disk, view)
        if actions:
            await self._transaction(actions)
        return views

    async def _insert_filters(self) -> None:
        """The point in time: every disk's guest device now writes through a filter
        (with several disks of a running VM, the vCPUs stopped meanwhile)."""
        if len(self.disks) > 1:
            status = await self.monitor.execute("query-status")
            self.added.paused = bool(status.get("running"))
        if self.added.paused:
            self._save_state()
            await self.monitor.execute("stop")
        try:
            for i, disk in enumerate(self.disks):
                await self._insert_filter(i, disk)
                checkpoint("mid-filters")
        finally:
            if self.added.paused:
                await self._resume()

    async def _insert_filter(self, index: int, disk: Disk) -> None:
        assert disk.device is not None  # choose_method made sure
        cbw = filter_node(index)
        device = qom_path(disk.device)
        await self._add_node(
            {
                "driver": "copy-before-write",
                "node-name": cbw,
                "file": disk.node,
                "target": scratch_node(index),
                "on-cbw-error": "break-snapshot",
                "cbw-timeout": CBW_TIMEOUT,
            }
        )
        self.added.redirects[cbw] = (device, disk.node)
        self._save_state()
        await self.monitor.execute("qom-set", {"path": device, "property": "drive", "value": cbw})
