"""Fleecing with ``blockdev-backup sync=none`` (qemu 4.2 to 7.0, or a disk with no
guest device).

Per disk a scratch qcow2 backed by the disk, and ONE transaction that adds the new
checkpoint bitmaps, the frozen copy of the parent's bitmap on each scratch node, and
starts a ``blockdev-backup sync=none`` job from each disk into its scratch node.  The
scratch node is exported: it shows the disk as it was.  qemu's internal filter fails the
*guest's* writes if the scratch area fills up.
"""

from __future__ import annotations

from backupd.faults import checkpoint
from backupd.qemu.fleece.method import BLOCKDEV_BACKUP
from backupd.qemu.fleece.names import filter_node, job_id, scratch_node
from backupd.qemu.fleece.scratch import create_qcow2
from backupd.qemu.fleece.session import Action, FleeceSession


class BlockdevBackupSession(FleeceSession):
    method = BLOCKDEV_BACKUP

    async def point_in_time(self) -> list[str]:
        scratch = []
        for i, disk in enumerate(self.disks):
            path = self._scratch_path(disk, ".qcow2")
            await create_qcow2(path, disk.size)
            node = await self._add_node(
                {
                    "driver": "qcow2",
                    "node-name": scratch_node(i),
                    "discard": "unmap",
                    "file": {"driver": "file", "filename": str(path)},
                    "backing": disk.node,
                }
            )
            scratch.append(node)
        checkpoint("after-scratch")
        actions: list[Action] = []
        for i, (disk, node) in enumerate(zip(self.disks, scratch, strict=True)):
            actions += self._frozen_parent_actions(disk, node)
            actions.append(
                {
                    "type": "blockdev-backup",
                    "data": {
                        "device": disk.node,
                        "target": node,
                        "sync": "none",
                        "job-id": job_id(i),
                        "filter-node-name": filter_node(i),
                        "auto-dismiss": True,
                    },
                }
            )
        self.added.jobs = [job_id(i) for i in range(len(self.disks))]
        async with self.quiesce():
            await self._checkpoint_transaction(actions)
        checkpoint("after-transaction")
        return scratch
