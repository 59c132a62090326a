"""What every fleecing method shares: the NBD server and exports of the views, the
record of what the session added, and the teardown that removes it.

A session is an async context manager.  On enter, the method (a subclass) fixes the
point in time of every disk and returns one node per disk that shows it; the session
then exports each node read-only on a private unix socket.  On exit, or when the setup
fails or is cancelled at any point, everything is removed in reverse order, always: the
teardown runs to its end even while the run is being cancelled (a teardown cut short
would leave the guest writing through our filter).

Whatever is added is recorded *before* the command that adds it: a command cut short
by a cancel may still have been carried out by qemu, and removing what is not there is
no error (see :mod:`backupd.qemu.blockops`).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from backupd.bitmaps import EXPORT_BITMAP
from backupd.errors import QemuCommandError, QemuError
from backupd.private import private_dir
from backupd.qemu.blockops import (
    Refusal,
    cancel_job,
    delete_export,
    delete_node,
    put_back,
    refusal,
    stop_nbd_server,
)
from backupd.qemu.fleece.names import EXPORT_PREFIX, export_id, scratch_file
from backupd.qemu.fleece.scratch import (
    SessionState,
    remove_files,
    remove_state,
    scratch_full,
    write_state,
)
from backupd.qemu.inventory import Disk
from backupd.qemu.qmp import QemuMonitor
from backupd.shield import run_to_completion
from nbdclient.uri import unix_uri

log = logging.getLogger("backupd.fleece")

#: the moment of the cut runs inside this (e.g. the guest's file systems frozen)
Quiesce = Callable[[], AbstractAsyncContextManager[object]]
Action = dict[str, object]
#: one teardown step: what it does (for the log), and the work
Step = Callable[[str, Awaitable[object]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class DiskExport:
    disk: Disk
    export: str
    uri: str
    dirty_context: str | None


class Server(Enum):
    NONE = "none"
    ASKED = "asked"  # nbd-server-start sent, its answer not seen (the setup was cancelled)
    STARTED = "started"


@dataclass
class Added:
    """What a session put into qemu and the scratch folder, in the order it did."""

    scratch_files: list[Path] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)
    #: filter node -> (guest device, the node the device had before)
    redirects: dict[str, tuple[str, str]] = field(default_factory=dict)
    paused: bool = False
    server: Server = Server.NONE

    def state(self) -> SessionState:
        return SessionState(paused=self.paused, redirects=tuple(self.redirects.values()))


class FleeceSession(ABC):
    """The views of ``disks`` at one point in time, exported over NBD."""

    method: ClassVar[str]

    def __init__(
        self,
        monitor: QemuMonitor,
        disks: Sequence[Disk],
        *,
        backup_id: str,
        bitmap: str,
        parent_bitmap: str | None,
        scratch_dir: Path,
        socket_dir: Path,
        quiesce: Quiesce | None = None,
    ) -> None:
        self.monitor = monitor
        self.disks = list(disks)
        self.backup_id = backup_id
        self.bitmap = bitmap
        self.parent_bitmap = parent_bitmap
        self.scratch_dir = scratch_dir
        self.socket = socket_dir / "nbd.sock"
        self.quiesce: Quiesce = quiesce or nullcontext
        self.added = Added()
        #: the transaction adding the new checkpoint bitmaps was sent (so they may be
        #: there): when the backup fails, the caller removes them
        self.new_bitmap_sent = False

    async def __aenter__(self) -> list[DiskExport]:
        try:
            return await self._setup()
        except BaseException:
            await run_to_completion(self.teardown())
            raise

    async def __aexit__(self, *exc: object) -> None:
        await run_to_completion(self.teardown())

    def scratch_full(self) -> str | None:
        """Why the view may have broken, if the scratch area is (nearly) full."""
        return scratch_full(self.scratch_dir)

    async def _setup(self) -> list[DiskExport]:
        private_dir(self.scratch_dir, "scratch_dir")
        nodes = await self.point_in_time()
        log.debug(
            "point in time taken for %s (%s)", ", ".join(d.name for d in self.disks), self.method
        )
        await self._start_server()
        return [
            await self._export(export_id(i), disk, node)
            for i, (disk, node) in enumerate(zip(self.disks, nodes, strict=True))
        ]

    @abstractmethod
    async def point_in_time(self) -> list[str]:
        """Fix the point in time of every disk; the nodes that show it, one per disk."""

    # what the methods build with ---------------------------------------------------

    def _scratch_path(self, disk: Disk, suffix: str) -> Path:
        path = self.scratch_dir / scratch_file(self.backup_id, disk.name, suffix)
        self.added.scratch_files.append(path)
        return path

    async def _add_node(self, options: dict[str, Any]) -> str:
        node = str(options["node-name"])
        self.added.nodes.append(node)
        await self.monitor.execute("blockdev-add", options)
        return node

    async def _transaction(self, actions: list[Action]) -> None:
        await self.monitor.execute("transaction", {"actions": actions})

    async def _checkpoint_transaction(self, more: list[Action]) -> None:
        """One transaction: the new checkpoint bitmap on every disk that can store one
        (not on a raw image), and ``more``."""
        new_bitmaps: list[Action] = [
            {
                "type": "block-dirty-bitmap-add",
                "data": {"node": d.node, "name": self.bitmap, "persistent": True},
            }
            for d in self.disks
            if d.stores_bitmaps
        ]
        self.new_bitmap_sent = True
        if new_bitmaps or more:
            await self._transaction(new_bitmaps + more)

    def _frozen_parent_actions(self, disk: Disk, node: str) -> list[Action]:
        """A disabled copy of the parent's bitmap on ``node``: what the export offers."""
        if self.parent_bitmap is None:
            return []
        parent = {"node": disk.node, "name": self.parent_bitmap}
        return [
            {
                "type": "block-dirty-bitmap-add",
                "data": {
                    "node": node,
                    "name": EXPORT_BITMAP,
                    "persistent": False,
                    "disabled": True,
                },
            },
            {
                "type": "block-dirty-bitmap-merge",
                "data": {"node": node, "target": EXPORT_BITMAP, "bitmaps": [parent]},
            },
        ]

    def _save_state(self) -> None:
        try:
            write_state(self.scratch_dir, self.added.state())
        except OSError as exc:
            log.warning("cannot record the session state in %s: %s", self.scratch_dir, exc)

    async def _resume(self) -> None:
        """Resume the vCPUs; runs to its end even while the run is being cancelled."""
        await run_to_completion(self._cont())

    async def _cont(self) -> None:
        try:
            await self.monitor.execute("cont")
        except QemuError as exc:
            log.error("could not resume the VM after taking the point in time: %s", exc)
            return
        self.added.paused = False
        self._save_state()

    # the NBD server and the exports -------------------------------------------------

    async def _start_server(self) -> None:
        args = {"addr": {"type": "unix", "data": {"path": str(self.socket)}}}
        self.added.server = Server.ASKED
        try:
            await self.monitor.execute("nbd-server-start", args)
        except QemuCommandError as exc:
            self.added.server = Server.NONE
            if refusal(exc) is not Refusal.EXISTS:
                raise
            if await self._foreign_exports():
                raise QemuError(
                    "qemu already runs an NBD server with exports of its own; backupd needs "
                    "qemu's NBD server for itself during a backup"
                ) from None
            log.warning("stopping a leftover NBD server in qemu")
            await self.monitor.execute("nbd-server-stop")
            self.added.server = Server.ASKED
            await self.monitor.execute("nbd-server-start", args)
        self.added.server = Server.STARTED

    async def _foreign_exports(self) -> bool:
        """Whether qemu's NBD server has exports that are not backupd's."""
        exports = await self.monitor.execute("query-block-exports")
        return any(not str(e.get("id", "")).startswith(EXPORT_PREFIX) for e in exports)

    async def _export(self, export: str, disk: Disk, node: str) -> DiskExport:
        args: dict[str, object] = {
            "type": "nbd",
            "id": export,
            "node-name": node,
            "name": disk.name,
            "writable": False,
            "description": f"backupd {self.backup_id} {disk.name}",
        }
        if self.parent_bitmap is not None:
            args["bitmaps"] = [EXPORT_BITMAP]
        self.added.exports.append(export)
        await self.monitor.execute("block-export-add", args)
        return DiskExport(
            disk=disk,
            export=disk.name,
            uri=str(unix_uri(str(self.socket), disk.name)),
            dirty_context=f"qemu:dirty-bitmap:{EXPORT_BITMAP}" if self.parent_bitmap else None,
        )

    async def _stop_server(self) -> None:
        if self.added.server is Server.ASKED and await self._foreign_exports():
            return  # our start was perhaps refused: the running server is someone else's
        await stop_nbd_server(self.monitor)

    # teardown ----------------------------------------------------------------------

    async def teardown(self) -> None:
        """Resume the VM if still paused; remove the exports, the server, the jobs, and
        the nodes (a filter's guest device put back on its disk first), newest first;
        then the scratch files.  Never raises: a step that fails is logged and the steps
        after it still run."""
        errors: list[str] = []

        async def step(what: str, work: Awaitable[object]) -> None:
            try:
                await work
            except (QemuError, OSError) as exc:
                errors.append(f"{what}: {exc}")

        await self._undo_in_qemu(step)
        remove_files(self.added.scratch_files)
        self.added.scratch_files.clear()
        remove_files([self.socket])
        remove_state(self.scratch_dir)
        for error in errors:
            log.warning("teardown: %s", error)

    async def _undo_in_qemu(self, step: Step) -> None:
        mon, added = self.monitor, self.added
        if added.paused:
            await step("resume the VM", self._resume())
        for export in reversed(added.exports):
            await step(f"remove export {export}", delete_export(mon, export))
        added.exports.clear()
        if added.server is not Server.NONE:
            await step("stop NBD server", self._stop_server())
            added.server = Server.NONE
        for job in reversed(added.jobs):
            await step(f"cancel job {job}", cancel_job(mon, job))
        added.jobs.clear()
        for node in reversed(added.nodes):
            if node in added.redirects:
                device, original = added.redirects[node]
                await step(
                    f"put {device} back on {original}", put_back(mon, device, node, original)
                )
            await step(f"remove node {node}", delete_node(mon, node))
        added.nodes.clear()
        added.redirects.clear()
