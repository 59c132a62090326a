"""Where a run's disks come from: the VM's own qemu (online), or, while its qemu is not
running, its images opened in a qemu-storage-daemon of backupd's own (offline).

A :class:`Source` gives :class:`backupd.backup.BackupRun` the same things either way:
a QMP monitor (where the checkpoint bitmaps are changed), the disks with their
bitmaps, the clean-up of what a killed run left, and the session that exports every
disk at one point in time.  The run does the rest (plan, copy, commit, bitmap
rotation) the same way for both, so an offline backup continues the chain of the
online ones and the other way round: the persistent bitmaps in the images are the
same.

:func:`open_source` picks: online when the VM's QMP socket answers; offline when it is
missing or refuses connections and the VM has ``images:``; else the connection error.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

from backupd.config import VMConfig
from backupd.errors import BackupFailed, ImageLockedError, QemuConnectError, QemuTooOldError
from backupd.faults import checkpoint
from backupd.lock import host_lock_path
from backupd.manifest import VMState
from backupd.private import private_dir
from backupd.qemu.fleece import (
    FleeceSession,
    OfflineSession,
    Quiesce,
    cleanup_leftovers,
    fleece_session,
    remove_scratch_leftovers,
    remove_stray_bitmaps,
)
from backupd.qemu.guest_agent import GuestAgent
from backupd.qemu.images import image_node, open_image
from backupd.qemu.inventory import (
    BlockState,
    Disk,
    block_state,
    check_version,
    node_disks,
    select_disks,
)
from backupd.qemu.qmp import QemuMonitor
from backupd.qemu.storage_daemon import StorageDaemon, stop_leftover
from backupd.quiesce import open_agent
from backupd.shield import run_to_completion

log = logging.getLogger("backupd")

#: qemu-storage-daemon got block-export-add in 5.2
DAEMON_VERSION = (5, 2, 0)


class Source(ABC):
    """What a run backs up: a QMP monitor, the disks, and their views at a point in time."""

    kind: ClassVar[VMState]

    def __init__(self, vm: VMConfig, monitor: QemuMonitor) -> None:
        self.vm = vm
        self.monitor = monitor
        #: the guest agent, for the freeze around the point in time (online only)
        self.agent: GuestAgent | None = None

    @abstractmethod
    async def cleanup(self, is_leftover: Callable[[str], bool], scratch_dir: Path) -> list[str]:
        """Remove what a killed run left; what was removed."""

    @abstractmethod
    async def disks(self) -> list[Disk]:
        """The disks to back up, with their bitmaps as they are now."""

    @abstractmethod
    def session(
        self,
        disks: Sequence[Disk],
        *,
        backup_id: str,
        bitmap: str,
        parent_bitmap: str | None,
        scratch_dir: Path,
        socket_dir: Path,
        quiesce: Quiesce,
    ) -> FleeceSession:
        """The session that exports every disk at the point in time."""

    @abstractmethod
    async def close(self) -> None:
        """Let go of qemu; never raises (the caller runs it to completion)."""


class OnlineSource(Source):
    """The VM's running qemu, over its QMP socket."""

    kind = VMState.ONLINE

    def __init__(self, vm: VMConfig, monitor: QemuMonitor) -> None:
        super().__init__(vm, monitor)
        #: qemu's block layer as the clean-up saw it, while that is still what it is
        self._graph: BlockState | None = None

    @classmethod
    async def open(cls, vm: VMConfig, monitor: QemuMonitor) -> OnlineSource:
        """From a connected monitor: check qemu, connect the guest agent."""
        source = cls(vm, monitor)
        try:
            check_version(monitor.version)
            source.agent = await open_agent(vm)
        except BaseException:
            await run_to_completion(source.close())
            raise
        return source

    async def cleanup(self, is_leftover: Callable[[str], bool], scratch_dir: Path) -> list[str]:
        graph = await block_state(self.monitor)
        removed = await cleanup_leftovers(self.monitor, is_leftover, scratch_dir, graph)
        # nothing removed (every run but one after a killed one): the disks are read
        # from the same answers instead of asking qemu again
        self._graph = None if removed else graph
        return removed

    async def disks(self) -> list[Disk]:
        graph, self._graph = self._graph, None
        return await select_disks(self.monitor, self.vm.disks, graph)

    def session(
        self,
        disks: Sequence[Disk],
        *,
        backup_id: str,
        bitmap: str,
        parent_bitmap: str | None,
        scratch_dir: Path,
        socket_dir: Path,
        quiesce: Quiesce,
    ) -> FleeceSession:
        return fleece_session(
            self.monitor,
            disks,
            backup_id=backup_id,
            bitmap=bitmap,
            parent_bitmap=parent_bitmap,
            scratch_dir=scratch_dir,
            socket_dir=socket_dir,
            method=self.vm.fleecing,
            quiesce=quiesce,
        )

    async def close(self) -> None:
        try:
            if self.agent is not None:
                await self.agent.close()
        finally:
            await self.monitor.close()


class OfflineSource(Source):
    """The VM's images, opened in a qemu-storage-daemon of backupd's own, which holds
    them locked (see :mod:`backupd.qemu.fleece.offline` for the point in time)."""

    kind = VMState.OFFLINE

    def __init__(self, vm: VMConfig, daemon: StorageDaemon) -> None:
        super().__init__(vm, daemon.monitor)
        self.daemon = daemon
        #: disk name -> node of its image in the daemon
        self.nodes: dict[str, str] = {}

    @classmethod
    async def open(cls, vm: VMConfig, runtime: Path, unreachable: QemuConnectError) -> Source:
        """Start the daemon (after ending one an earlier run left) and open the images;
        refused with one line when an image is locked (the VM is running after all)."""
        if vm.require_quiesce:
            raise BackupFailed(
                f"{unreachable}; require_quiesce is set, and a VM that is not running has "
                "no file systems to freeze: no offline backup"
            )
        log.info(
            "%s: its QMP socket %s %s: backing up its images offline (qemu is not running)",
            vm.name,
            vm.qmp,
            unreachable.unreachable,
        )
        folder = private_dir(daemon_folder(runtime, vm), "runtime_dir")
        await stop_leftover(folder, vm.timeout)
        source = cls(vm, StorageDaemon(folder, timeout=vm.timeout))
        try:
            source.monitor = await source.daemon.start()
            checkpoint("after-daemon")
            check_version(source.monitor.version)
            if source.monitor.version < DAEMON_VERSION:
                raise QemuTooOldError(
                    f"offline backups need qemu-storage-daemon >= 5.2 (this one is "
                    f"{source.monitor.version_text})"
                )
            await source._open_images(unreachable)
        except BaseException:
            await run_to_completion(source.close())
            raise
        return source

    async def _open_images(self, unreachable: QemuConnectError) -> None:
        wanted = [i for i in self.vm.images if self.vm.disks is None or i.disk in self.vm.disks]
        for index, image in enumerate(wanted):
            node = image_node(index)
            try:
                await open_image(self.monitor, node, image.disk, image.path, image.format)
            except ImageLockedError as exc:
                raise ImageLockedError(
                    f"image {image.path} of disk {image.disk} is locked by another process: "
                    f"the VM is running, but its QMP socket {self.vm.qmp} "
                    f"{unreachable.unreachable}; no backup was taken (is vms.{self.vm.name}"
                    ".qmp right?)"
                ) from exc
            self.nodes[image.disk] = node
            checkpoint("mid-images")

    async def cleanup(self, is_leftover: Callable[[str], bool], scratch_dir: Path) -> list[str]:
        # a killed run's exports, nodes and jobs went with its daemon; its bitmaps were
        # stored in the images when that daemon closed them
        removed = await remove_stray_bitmaps(self.monitor, is_leftover)
        return removed + remove_scratch_leftovers(scratch_dir)

    async def disks(self) -> list[Disk]:
        return await node_disks(self.monitor, self.nodes)

    def session(
        self,
        disks: Sequence[Disk],
        *,
        backup_id: str,
        bitmap: str,
        parent_bitmap: str | None,
        scratch_dir: Path,
        socket_dir: Path,
        quiesce: Quiesce,
    ) -> FleeceSession:
        # no guest: nothing to freeze (``quiesce`` is left out)
        return OfflineSession(
            self.monitor,
            disks,
            backup_id=backup_id,
            bitmap=bitmap,
            parent_bitmap=parent_bitmap,
            scratch_dir=scratch_dir,
            socket_dir=socket_dir,
        )

    async def close(self) -> None:
        await self.daemon.stop()


def daemon_folder(runtime: Path, vm: VMConfig) -> Path:
    """The private folder of a VM's qemu-storage-daemon: one per VM on the host (named
    like its host lock, so runs of one VM from two repositories share it)."""
    return runtime / f"{host_lock_path(runtime, vm.qmp).stem}.images"


async def open_source(
    vm: VMConfig, runtime: Path, chosen: Callable[[VMState], None] | None = None
) -> Source:
    """The VM's qemu when its QMP socket answers; its images when nothing listens there
    and it has ``images:``; else the connection error.  ``chosen`` is told which, before
    that source is opened (so a refused offline run is still said to be one)."""
    tell = chosen or (lambda kind: None)
    monitor = QemuMonitor(vm.qmp_address, timeout=vm.timeout)
    try:
        await monitor.connect()
    except QemuConnectError as exc:
        if exc.unreachable and not vm.images:
            raise QemuConnectError(
                f"{exc}; to back up a VM while its qemu is not running, name its image "
                f"files in vms.{vm.name}.images",
                unreachable=exc.unreachable,
            ) from None
        if not exc.unreachable:
            raise
        tell(VMState.OFFLINE)
        return await OfflineSource.open(vm, runtime, exc)
    tell(VMState.ONLINE)
    return await OnlineSource.open(vm, monitor)
