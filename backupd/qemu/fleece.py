"""The point-in-time view of a VM's disks, exported over qemu's NBD server.

:class:`FleeceSession` is an async context manager.  On enter it fixes the point in time
of every disk and exports a read-only view of each on a private unix socket; on exit it
tears everything down in reverse order, always.  Two methods, both copy-before-write:
from the point in time on, the old contents of every cluster the guest overwrites are
first copied into a scratch file, so the view shows the disk as it was.

``snapshot-access`` (qemu >= 7.1, the default): per disk a sparse scratch file, a
``copy-before-write`` filter with ``on-cbw-error=break-snapshot`` put between the guest
device and its disk (``qom-set drive``), and a ``snapshot-access`` node on top, which is
exported.  When the scratch area fills up or fails, the guest's writes still succeed:
the view breaks and the backup fails.  This cannot be one QMP transaction, so the order
makes it exact: the new checkpoint bitmap records from *before* the filter goes in, the
frozen copy of the parent's bitmap is taken *after* it (both can only over-approximate),
and with several disks of a running VM the vCPUs are paused (``stop``/``cont``, a few
milliseconds) while the filters go in, so every disk is cut at the same instant.

``blockdev-backup`` (qemu 4.2 to 7.0, or a disk with no guest device): a scratch qcow2
backed by the disk, and ONE transaction that adds the new bitmaps, the frozen copy of
the parent's and starts ``blockdev-backup sync=none`` into the scratch node.  qemu's
internal filter then fails the *guest's* writes if the scratch area fills up.

:func:`cleanup_leftovers` removes what a killed run left in qemu (and resumes a VM a
killed run left paused).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backupd.bitmaps import EXPORT_BITMAP
from backupd.errors import ConfigError, QemuCommandError, QemuError, QemuTooOldError
from backupd.faults import checkpoint
from backupd.private import create_exclusive, private_dir, read_private, write_private
from backupd.qemu.inventory import Disk, named_nodes
from backupd.qemu.qmp import QemuMonitor
from backupd.shield import run_to_completion
from nbdclient.uri import unix_uri

log = logging.getLogger("backupd.fleece")

SNAPSHOT_ACCESS = "snapshot-access"
BLOCKDEV_BACKUP = "blockdev-backup"
SNAPSHOT_ACCESS_VERSION = (7, 1, 0)  # on-cbw-error=break-snapshot

SCRATCH_PREFIX = "backupd-scratch-"
JOB_PREFIX = "backupd-job-"
CBW_PREFIX = "backupd-cbw-"
ACCESS_PREFIX = "backupd-snap-"
EXPORT_PREFIX = "backupd-export-"
#: what a killed run must undo that qemu cannot tell us: a paused VM, redirected devices
STATE_FILE = "session.json"
TEARDOWN_TIMEOUT = 30.0
#: a guest write waits at most this long for its copy-before-write (then the view breaks)
CBW_TIMEOUT = 60
#: below this much free space the scratch area is called full in error messages
SCRATCH_LOW = 4 << 20


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


@dataclass(frozen=True, slots=True)
class DiskExport:
    disk: Disk
    export: str
    uri: str
    dirty_context: str | None


#: the moment of the cut runs inside this (e.g. the guest's file systems frozen)
Quiesce = Callable[[], AbstractAsyncContextManager[object]]


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


def _create_sparse(path: Path, size: int) -> None:
    try:
        fd = create_exclusive(path)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    except OSError as exc:
        raise QemuError(f"cannot create scratch file {path}: {exc.strerror}") from None


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    write_private(folder / STATE_FILE, json.dumps(state))


def _read_state(folder: Path) -> dict[str, Any]:
    """The state a killed run left (the folder is private: see backupd.private)."""
    text = read_private(folder / STATE_FILE)
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _qom_path(device: str) -> str:
    return device if device.startswith("/") else f"/machine/peripheral/{device}"


class FleeceSession:
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
        method: str = "auto",
        quiesce: Quiesce | None = None,
    ) -> None:
        self.monitor = monitor
        self.disks = list(disks)
        self.backup_id = backup_id
        self.bitmap = bitmap
        self.parent_bitmap = parent_bitmap
        self.scratch_dir = scratch_dir
        self.socket = socket_dir / "nbd.sock"
        self.method = choose_method(method, monitor.version, self.disks)
        self.quiesce: Quiesce = quiesce or nullcontext
        self._scratch_files: list[Path] = []
        self._nodes: list[str] = []
        self._jobs: list[str] = []
        self._exports: list[str] = []
        # filter node -> (device, the node the device had before)
        self._redirects: dict[str, tuple[str, str]] = {}
        self._paused = False
        self._server = False
        self.transaction_done = False

    async def __aenter__(self) -> list[DiskExport]:
        try:
            return await self._setup()
        except BaseException:
            await run_to_completion(self.teardown())
            raise

    async def __aexit__(self, *exc: object) -> None:
        # a teardown cut short by a signal would leave the guest writing through our filter
        await run_to_completion(self.teardown())

    def scratch_full(self) -> str | None:
        """Why the view may have broken, if the scratch area is (nearly) full."""
        try:
            free = shutil.disk_usage(self.scratch_dir).free
        except OSError:
            return None
        if free >= SCRATCH_LOW:
            return None
        return (
            f"the scratch area {self.scratch_dir} is full ({free} bytes free): the guest's "
            "writes went on and the point-in-time view broke; give the scratch area room "
            "for what the guest writes during a backup"
        )

    async def _setup(self) -> list[DiskExport]:
        private_dir(self.scratch_dir, "scratch_dir")
        if self.method == SNAPSHOT_ACCESS:
            nodes = await self._setup_snapshot_access()
        else:
            nodes = await self._setup_blockdev_backup()
        log.debug(
            "point in time taken for %s (%s)", ", ".join(d.name for d in self.disks), self.method
        )
        await self._start_server()
        exports = []
        for i, (disk, node) in enumerate(zip(self.disks, nodes, strict=True)):
            export_id = f"{EXPORT_PREFIX}{i}"
            args: dict[str, object] = {
                "type": "nbd",
                "id": export_id,
                "node-name": node,
                "name": disk.name,
                "writable": False,
                "description": f"backupd {self.backup_id} {disk.name}",
            }
            if self.parent_bitmap is not None:
                args["bitmaps"] = [EXPORT_BITMAP]
            await self.monitor.execute("block-export-add", args)
            self._exports.append(export_id)
            exports.append(
                DiskExport(
                    disk=disk,
                    export=disk.name,
                    uri=str(unix_uri(str(self.socket), disk.name)),
                    dirty_context=f"qemu:dirty-bitmap:{EXPORT_BITMAP}"
                    if self.parent_bitmap
                    else None,
                )
            )
        return exports

    def _new_bitmap_actions(self) -> list[dict[str, object]]:
        return [
            {
                "type": "block-dirty-bitmap-add",
                "data": {"node": d.node, "name": self.bitmap, "persistent": True},
            }
            for d in self.disks
        ]

    def _frozen_parent_actions(self, disk: Disk, node: str) -> list[dict[str, object]]:
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

    async def _setup_blockdev_backup(self) -> list[str]:
        mon = self.monitor
        scratch = []
        for i, disk in enumerate(self.disks):
            path = self.scratch_dir / f"{self.backup_id}-{disk.name}.qcow2"
            self._scratch_files.append(path)
            await _create_scratch(path, disk.size)
            node = f"{SCRATCH_PREFIX}{i}"
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
            scratch.append(node)
        checkpoint("after-scratch")
        actions = self._new_bitmap_actions()
        for i, (disk, node) in enumerate(zip(self.disks, scratch, strict=True)):
            actions += self._frozen_parent_actions(disk, node)
            actions.append(
                {
                    "type": "blockdev-backup",
                    "data": {
                        "device": disk.node,
                        "target": node,
                        "sync": "none",
                        "job-id": f"{JOB_PREFIX}{i}",
                        "filter-node-name": f"{CBW_PREFIX}{i}",
                        "auto-dismiss": True,
                    },
                }
            )
        async with self.quiesce():
            await mon.execute("transaction", {"actions": actions})
            self.transaction_done = True
        checkpoint("after-transaction")
        self._jobs = [f"{JOB_PREFIX}{i}" for i in range(len(self.disks))]
        return scratch

    async def _setup_snapshot_access(self) -> list[str]:
        mon = self.monitor
        for i, disk in enumerate(self.disks):
            path = self.scratch_dir / f"{self.backup_id}-{disk.name}.raw"
            self._scratch_files.append(path)
            _create_sparse(path, disk.size)
            node = f"{SCRATCH_PREFIX}{i}"
            await mon.execute(
                "blockdev-add",
                {"driver": "file", "node-name": node, "filename": str(path), "discard": "unmap"},
            )
            self._nodes.append(node)
        checkpoint("after-scratch")
        async with self.quiesce():
            # the new bitmaps record from before the point in time on
            await mon.execute("transaction", {"actions": self._new_bitmap_actions()})
            self.transaction_done = True
            await self._insert_filters()
        checkpoint("after-transaction")
        access = []
        for i in range(len(self.disks)):
            node = f"{ACCESS_PREFIX}{i}"
            await mon.execute(
                "blockdev-add",
                {"driver": "snapshot-access", "node-name": node, "file": f"{CBW_PREFIX}{i}"},
            )
            self._nodes.append(node)
            access.append(node)
        # the parent's bitmap, frozen after the point in time: it holds every change since
        # the parent's point (and perhaps a few after this one, which are copied as they were)
        actions: list[dict[str, object]] = []
        for disk, node in zip(self.disks, access, strict=True):
            actions += self._frozen_parent_actions(disk, node)
        if actions:
            await mon.execute("transaction", {"actions": actions})
        return access

    async def _insert_filters(self) -> None:
        """The point in time: every disk's guest device now writes through a filter."""
        mon = self.monitor
        if len(self.disks) > 1:
            status = await mon.execute("query-status")
            self._paused = bool(status.get("running"))
        if self._paused:
            self._save_state()
            await mon.execute("stop")
        try:
            for i, disk in enumerate(self.disks):
                assert disk.device is not None  # choose_method made sure
                cbw = f"{CBW_PREFIX}{i}"
                await mon.execute(
                    "blockdev-add",
                    {
                        "driver": "copy-before-write",
                        "node-name": cbw,
                        "file": disk.node,
                        "target": f"{SCRATCH_PREFIX}{i}",
                        "on-cbw-error": "break-snapshot",
                        "cbw-timeout": CBW_TIMEOUT,
                    },
                )
                self._nodes.append(cbw)
                self._redirects[cbw] = (_qom_path(disk.device), disk.node)
                self._save_state()
                await mon.execute(
                    "qom-set",
                    {"path": _qom_path(disk.device), "property": "drive", "value": cbw},
                )
                checkpoint("mid-filters")
        finally:
            if self._paused:
                await self._resume()

    async def _resume(self) -> None:
        try:
            await run_to_completion(self.monitor.execute("cont"))
        except QemuError as exc:
            log.error("could not resume the VM after taking the point in time: %s", exc)
            return
        self._paused = False
        self._save_state()

    def _save_state(self) -> None:
        state = {"paused": self._paused, "redirects": list(self._redirects.values())}
        try:
            _write_state(self.scratch_dir, state)
        except OSError as exc:
            log.warning("cannot record the session state in %s: %s", self.scratch_dir, exc)

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
        """Remove exports, server, jobs, filters, scratch nodes and files; never raises."""
        errors: list[str] = []

        async def step(what: str, coro: Awaitable[object]) -> None:
            try:
                await coro
            except (QemuError, OSError) as exc:
                errors.append(f"{what}: {exc}")

        if self._paused:
            await step("resume the VM", self._resume())
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
            if node in self._redirects:
                device, original = self._redirects[node]
                await step(
                    f"put {device} back on {original}", redirect(self.monitor, device, original)
                )
            await step(f"remove node {node}", delete_node(self.monitor, node))
        self._nodes.clear()
        self._redirects.clear()
        for path in self._scratch_files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._scratch_files.clear()
        for path in (self.socket, self.scratch_dir / STATE_FILE):
            with contextlib.suppress(OSError):
                path.unlink()
        for error in errors:
            log.warning("teardown: %s", error)


async def redirect(monitor: QemuMonitor, device: str, node: str) -> None:
    """Point a guest device at ``node`` (a no-op if it is there already)."""
    await monitor.execute("qom-set", {"path": device, "property": "drive", "value": node})


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


async def _filter_child(monitor: QemuMonitor, node: str) -> str | None:
    """The ``file`` child of a filter node, from qemu's block graph (debug interface)."""
    try:
        graph = await monitor.execute("x-debug-query-block-graph")
    except QemuCommandError:
        return None
    names = {n["id"]: n.get("name", "") for n in graph.get("nodes", [])}
    parent = next((i for i, name in names.items() if name == node), None)
    for edge in graph.get("edges", []):
        if edge.get("parent") == parent and edge.get("name") == "file":
            child = names.get(edge.get("child"))
            return str(child) if child else None
    return None


async def cleanup_leftovers(
    monitor: QemuMonitor, is_leftover: Callable[[str], bool], scratch_dir: Path
) -> list[str]:
    """Undo what a killed run left in qemu and in the scratch folder; returns what was
    removed.  Bitmaps for which ``is_leftover`` says so are removed (those of this
    repository that no committed backup owns)."""
    removed: list[str] = []
    state = _read_state(scratch_dir)
    if state.get("paused"):
        status = await monitor.execute("query-status")
        if status.get("status") == "paused":
            await monitor.execute("cont")
            removed.append("pause of the VM (resumed)")
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

    async def delete_nodes(prefix: str) -> None:
        for info in await named_nodes(monitor):
            node_name = str(info.get("node-name", ""))
            if node_name.startswith(prefix):
                await delete_node(monitor, node_name)
                removed.append(f"node {node_name}")

    # top down: the views, then the guest devices back onto their disks, then the filters
    await delete_nodes(ACCESS_PREFIX)
    recorded = {str(d): str(n) for d, n in state.get("redirects", [])}
    for block in await monitor.execute("query-block"):
        inserted = block.get("inserted") or {}
        root = str(inserted.get("node-name", ""))
        device = block.get("qdev")
        if root.startswith(CBW_PREFIX) and device:
            qom = _qom_path(str(device))
            original = recorded.get(qom) or await _filter_child(monitor, root)
            if original is None:
                raise QemuError(
                    f"guest device {device} still writes through backupd's filter {root} and "
                    "its disk node is unknown; put it back with qom-set by hand"
                )
            await redirect(monitor, qom, original)
            removed.append(f"filter {root} in front of {original}")
    await delete_nodes(CBW_PREFIX)
    await delete_nodes(SCRATCH_PREFIX)
    for node in await named_nodes(monitor):
        for bitmap in node.get("dirty-bitmaps", []) or []:
            name = bitmap.get("name")
            if name and name != EXPORT_BITMAP and is_leftover(str(name)):
                await remove_bitmap(monitor, node["node-name"], name)
                removed.append(f"bitmap {name} on {node['node-name']}")
    if scratch_dir.is_dir():
        for pattern in ("*.qcow2", "*.raw"):
            for leftover in scratch_dir.glob(pattern):
                leftover.unlink()
                removed.append(f"scratch file {leftover.name}")
        with contextlib.suppress(FileNotFoundError):
            (scratch_dir / STATE_FILE).unlink()
    return removed
