"""The point-in-time view of a VM's disks, exported over qemu's NBD server.

:class:`FleeceSession` is an async context manager.  On enter it creates a scratch
qcow2 per disk, then in ONE QMP transaction adds the new persistent checkpoint bitmap
on every disk, (for an incremental) a frozen copy of the parent's bitmap on the
scratch node, and starts ``blockdev-backup sync=none`` into the scratch node: from that
instant the scratch node shows every disk as it was, while the guest writes on
(copy-before-write).  Each scratch node is exported read-only on a private unix socket.
On exit it tears everything down in reverse order, always.

:func:`cleanup_leftovers` removes what a killed run left in qemu.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from backupd.errors import QemuCommandError, QemuError
from backupd.faults import checkpoint
from backupd.qemu.inventory import BITMAP_PREFIX, Disk, named_nodes
from backupd.qemu.qmp import QemuMonitor
from nbdclient.uri import unix_uri

log = logging.getLogger("backupd.fleece")

SCRATCH_PREFIX = "backupd-scratch-"
JOB_PREFIX = "backupd-job-"
CBW_PREFIX = "backupd-cbw-"
EXPORT_PREFIX = "backupd-export-"
EXPORT_BITMAP = "backupd-export"
TEARDOWN_TIMEOUT = 30.0


def bitmap_name(backup_id: str) -> str:
    return f"{BITMAP_PREFIX}{backup_id}"


@dataclass(frozen=True, slots=True)
class DiskExport:
    disk: Disk
    export: str
    uri: str
    dirty_context: str | None


Hook = Callable[[], Awaitable[None]]


async def _create_scratch(path: Path, size: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536",
        str(path),
        str(size),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise QemuError(f"cannot create scratch image {path}: {err.decode().strip()}")
    path.chmod(0o600)


class FleeceSession:
    def __init__(
        self,
        monitor: QemuMonitor,
        disks: Sequence[Disk],
        *,
        backup_id: str,
        parent_id: str | None,
        scratch_dir: Path,
        socket_dir: Path,
        before_transaction: Hook | None = None,
        after_transaction: Hook | None = None,
    ) -> None:
        self.monitor = monitor
        self.disks = list(disks)
        self.backup_id = backup_id
        self.parent_id = parent_id
        self.scratch_dir = scratch_dir
        self.socket = socket_dir / "nbd.sock"
        self.before = before_transaction
        self.after = after_transaction
        self._scratch_files: list[Path] = []
        self._nodes: list[str] = []
        self._jobs: list[str] = []
        self._exports: list[str] = []
        self._server = False
        self.transaction_done = False

    async def __aenter__(self) -> list[DiskExport]:
        try:
            return await self._setup()
        except BaseException:
            await self.teardown()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.teardown()

    async def _setup(self) -> list[DiskExport]:
        mon = self.monitor
        self.scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for disk in self.disks:
            path = self.scratch_dir / f"{self.backup_id}-{disk.name}.qcow2"
            self._scratch_files.append(path)
            await _create_scratch(path, disk.size)
            node = SCRATCH_PREFIX + disk.name
            await mon.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": node,
                    "discard": "unmap",
                    "file": {"driver": "file", "filename": str(path)},
                    "backing": disk.node,
                },
            )
            self._nodes.append(node)
        checkpoint("after-scratch")
        actions: list[dict[str, object]] = []
        for disk in self.disks:
            node = SCRATCH_PREFIX + disk.name
            actions.append(
                {
                    "type": "block-dirty-bitmap-add",
                    "data": {
                        "node": disk.node,
                        "name": bitmap_name(self.backup_id),
                        "persistent": True,
                    },
                }
            )
            if self.parent_id is not None:
                actions.append(
                    {
                        "type": "block-dirty-bitmap-add",
                        "data": {
                            "node": node,
                            "name": EXPORT_BITMAP,
                            "persistent": False,
                            "disabled": True,
                        },
                    }
                )
                actions.append(
                    {
                        "type": "block-dirty-bitmap-merge",
                        "data": {
                            "node": node,
                            "target": EXPORT_BITMAP,
                            "bitmaps": [{"node": disk.node, "name": bitmap_name(self.parent_id)}],
                        },
                    }
                )
            actions.append(
                {
                    "type": "blockdev-backup",
                    "data": {
                        "device": disk.node,
                        "target": node,
                        "sync": "none",
                        "job-id": JOB_PREFIX + disk.name,
                        "filter-node-name": CBW_PREFIX + disk.name,
                        "auto-dismiss": True,
                    },
                }
            )
        if self.before is not None:
            await self.before()
        try:
            await mon.execute("transaction", {"actions": actions})
        finally:
            if self.after is not None:
                await self.after()
        self.transaction_done = True
        checkpoint("after-transaction")
        self._jobs = [JOB_PREFIX + d.name for d in self.disks]
        log.debug("point in time taken for %s", ", ".join(d.name for d in self.disks))
        await self._start_server()
        exports = []
        for disk in self.disks:
            export_id = EXPORT_PREFIX + disk.name
            args: dict[str, object] = {
                "type": "nbd",
                "id": export_id,
                "node-name": SCRATCH_PREFIX + disk.name,
                "name": disk.name,
                "writable": False,
                "description": f"backupd {self.backup_id} {disk.name}",
            }
            if self.parent_id is not None:
                args["bitmaps"] = [EXPORT_BITMAP]
            await mon.execute("block-export-add", args)
            self._exports.append(export_id)
            exports.append(
                DiskExport(
                    disk=disk,
                    export=disk.name,
                    uri=str(unix_uri(str(self.socket), disk.name)),
                    dirty_context=f"qemu:dirty-bitmap:{EXPORT_BITMAP}" if self.parent_id else None,
                )
            )
        return exports

    async def _start_server(self) -> None:
        args = {"addr": {"type": "unix", "data": {"path": str(self.socket)}}}
        try:
            await self.monitor.execute("nbd-server-start", args)
        except QemuCommandError as exc:
            if "already running" not in exc.description:
                raise
            others = [
                e
                for e in await self.monitor.execute("query-block-exports")
                if not str(e.get("id", "")).startswith(EXPORT_PREFIX)
            ]
            if others:
                raise QemuError(
                    "qemu already runs an NBD server with exports of its own; backupd needs "
                    "qemu's NBD server for itself during a backup"
                ) from None
            log.warning("stopping a leftover NBD server in qemu")
            await self.monitor.execute("nbd-server-stop")
            await self.monitor.execute("nbd-server-start", args)
        self._server = True

    async def teardown(self) -> None:
        """Remove exports, server, jobs, scratch nodes and files; never raises."""
        errors: list[str] = []

        async def step(what: str, coro: Awaitable[object]) -> None:
            try:
                await coro
            except (QemuError, OSError) as exc:
                errors.append(f"{what}: {exc}")

        for export_id in reversed(self._exports):
            await step(f"remove export {export_id}", delete_export(self.monitor, export_id))
        self._exports.clear()
        if self._server:
            await step("stop NBD server", self.monitor.execute("nbd-server-stop"))
            self._server = False
        for job in reversed(self._jobs):
            await step(f"cancel job {job}", cancel_job(self.monitor, job))
        self._jobs.clear()
        for node in reversed(self._nodes):
            await step(f"remove node {node}", delete_node(self.monitor, node))
        self._nodes.clear()
        for path in self._scratch_files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._scratch_files.clear()
        with contextlib.suppress(OSError):
            self.socket.unlink()
        for error in errors:
            log.warning("teardown: %s", error)


async def delete_export(monitor: QemuMonitor, export_id: str) -> None:
    with monitor.listen("BLOCK_EXPORT_DELETED", lambda e: e["data"].get("id") == export_id) as ev:
        try:
            await monitor.execute("block-export-del", {"id": export_id, "mode": "hard"})
        except QemuCommandError as exc:
            if "not found" in exc.description or "No export" in exc.description:
                return
            raise
        await ev.get(TEARDOWN_TIMEOUT)


async def cancel_job(monitor: QemuMonitor, job: str) -> None:
    accept = lambda e: e["data"].get("device") == job  # noqa: E731
    with monitor.listen(("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"), accept) as ev:
        try:
            await monitor.execute("block-job-cancel", {"device": job, "force": True})
        except QemuCommandError as exc:
            if "not found" in exc.description or "No active" in exc.description:
                return
            raise
        await ev.get(TEARDOWN_TIMEOUT)
    # with auto-dismiss the job is gone; dismiss in case it concluded otherwise
    with contextlib.suppress(QemuCommandError):
        await monitor.execute("job-dismiss", {"id": job})


async def delete_node(monitor: QemuMonitor, node: str) -> None:
    try:
        await monitor.execute("blockdev-del", {"node-name": node})
    except QemuCommandError as exc:
        if "Failed to find node" in exc.description or "not found" in exc.description:
            return
        raise


async def remove_bitmap(monitor: QemuMonitor, node: str, name: str) -> None:
    await monitor.execute("block-dirty-bitmap-remove", {"node": node, "name": name})


async def cleanup_leftovers(
    monitor: QemuMonitor, owned_bitmaps: set[str], scratch_dir: Path
) -> list[str]:
    """Remove what a killed run left in qemu and in the scratch folder; returns what was
    removed.  Bitmaps named ``backupd-*`` that no committed backup owns are removed."""
    removed: list[str] = []
    exports = await monitor.execute("query-block-exports")
    for export in exports:
        export_id = str(export.get("id", ""))
        if export_id.startswith(EXPORT_PREFIX):
            await delete_export(monitor, export_id)
            removed.append(f"export {export_id}")
    if any(r.startswith("export") for r in removed):
        others = await monitor.execute("query-block-exports")
        if not others:
            with contextlib.suppress(QemuCommandError):
                await monitor.execute("nbd-server-stop")
    for job in await monitor.execute("query-block-jobs"):
        job_id = str(job.get("device", ""))
        if job_id.startswith(JOB_PREFIX):
            await cancel_job(monitor, job_id)
            removed.append(f"job {job_id}")
    for node in await named_nodes(monitor):
        name = str(node.get("node-name", ""))
        if name.startswith(SCRATCH_PREFIX):
            await delete_node(monitor, name)
            removed.append(f"node {name}")
    for node in await named_nodes(monitor):
        for bitmap in node.get("dirty-bitmaps", []) or []:
            name = bitmap.get("name")
            if name and name.startswith(BITMAP_PREFIX) and name not in owned_bitmaps:
                if name == EXPORT_BITMAP:
                    continue
                await remove_bitmap(monitor, node["node-name"], name)
                removed.append(f"bitmap {name} on {node['node-name']}")
    if scratch_dir.is_dir():
        for path in scratch_dir.glob("*.qcow2"):
            path.unlink()
            removed.append(f"scratch file {path.name}")
    return removed
