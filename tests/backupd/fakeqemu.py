"""A small model of the qemu block layer, as far as backupd touches it over QMP: named
nodes with their children and dirty bitmaps, guest block devices and their root node,
block exports, block jobs, the NBD server and the run state.  :mod:`fakeqmp` serves it.

Answers and refusals follow qemu 7.2 (error classes and descriptions as the real qemu
gives them), including the ones that make order matter: a node still used by a device,
another node, an export or a job is "in use"; a bitmap of an export is busy until the
export is gone; a device cannot leave a copy-before-write filter while a snapshot-access
node reads through it; and a ``qom-set drive`` to the node a device has already aborts
qemu (:class:`Crash`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.backupd.fakeqemu_graph import Bitmap, Device, Export, Graph, Job, Node, QmpError

__all__ = ["Bitmap", "Crash", "Device", "Export", "FakeQemu", "Job", "Node", "QmpError"]

Event = tuple[str, dict[str, Any]]


class Crash(Exception):
    """qemu aborted: the connection drops and qemu is gone."""


@dataclass
class FakeQemu(Graph):
    version: tuple[int, int, int] = (7, 2, 0)
    status: str = "running"
    server: str | None = None
    #: why qemu aborted, once it has
    crashed: str | None = None
    #: events to send after the reply of the command that caused them
    events: list[Event] = field(default_factory=list)
    #: exports being deleted: their BLOCK_EXPORT_DELETED comes later (see fakeqmp)
    deleting: list[str] = field(default_factory=list)

    # -- building a VM ---------------------------------------------------------------

    def add_disk(self, device: str, node: str, size: int = 1 << 20) -> Node:
        """A qcow2 disk node (with its anonymous file child) on a guest device."""
        image = self.add_node(Node(self.anonymous(), "file", filename=f"/images/{node}"))
        image.implicit = True
        disk = self.add_node(
            Node(node, "qcow2", filename=image.filename, size=size, children={"file": image.name})
        )
        self.devices.append(Device(f"/machine/peripheral/{device}/virtio-backend", node))
        return disk

    def snapshot(self) -> dict[str, Any]:
        """Everything a test compares before and after (anonymous node names aside)."""
        return {
            "nodes": {
                n.name: (n.driver, sorted(n.children), sorted(str(b.name) for b in n.bitmaps))
                for n in self.nodes.values()
                if not n.name.startswith("#")
            },
            "devices": {d.qdev: d.root for d in self.devices},
            "exports": sorted(self.exports),
            "jobs": sorted(self.jobs),
            "server": self.server is not None,
            "status": self.status,
        }

    # -- dispatch ----------------------------------------------------------------------

    def execute(self, command: str, args: dict[str, Any]) -> Any:
        handler: Callable[[dict[str, Any]], Any] | None = getattr(
            self, "cmd_" + command.replace("-", "_"), None
        )
        if handler is None:
            raise QmpError(f"The command {command} has not been found", "CommandNotFound")
        return handler(args)

    def cmd_query_version(self, args: dict[str, Any]) -> Any:
        major, minor, micro = self.version
        return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": ""}

    def cmd_query_status(self, args: dict[str, Any]) -> Any:
        return {"status": self.status, "running": self.status == "running", "singlestep": False}

    def cmd_stop(self, args: dict[str, Any]) -> Any:
        if self.status == "running":
            self.status = "paused"
            self.events.append(("STOP", {}))
        return {}

    def cmd_cont(self, args: dict[str, Any]) -> Any:
        if self.status != "running":
            self.status = "running"
            self.events.append(("RESUME", {}))
        return {}

    def cmd_query_block(self, args: dict[str, Any]) -> Any:
        return [
            {"device": "", "qdev": d.qdev, "inserted": self.node_info(self.node(d.root))}
            for d in self.devices
        ]

    def cmd_query_named_block_nodes(self, args: dict[str, Any]) -> Any:
        return [
            {**self.node_info(n), "dirty-bitmaps": [b.info() for b in n.bitmaps]}
            for n in self.nodes.values()
        ]

    def cmd_x_debug_query_block_graph(self, args: dict[str, Any]) -> Any:
        return self.graph()

    def cmd_blockdev_add(self, args: dict[str, Any]) -> Any:
        self.blockdev_add(args)
        return {}

    def cmd_blockdev_del(self, args: dict[str, Any]) -> Any:
        self.blockdev_del(str(args["node-name"]))
        return {}

    def cmd_qom_set(self, args: dict[str, Any]) -> Any:
        device = self.device(str(args["path"]))
        if args["property"] != "drive":
            raise QmpError(f"Property '{args['property']}' not found")
        node = self.node(str(args["value"]), device="")
        if node.name == device.root:
            self.crashed = "bdrv_replace_child_noperm: Assertion `old_bs != new_bs' failed."
            raise Crash(self.crashed)
        self.check_permissions(device, node)
        device.root = node.name
        return {}

    # -- bitmaps -----------------------------------------------------------------------

    def cmd_block_dirty_bitmap_add(self, args: dict[str, Any]) -> Any:
        node = self.node(str(args["node"]), device=str(args["node"]))
        name = str(args["name"])
        if node.bitmap(name) is not None:
            raise QmpError(f"Bitmap already exists: {name}")
        node.bitmaps.append(
            Bitmap(
                name,
                persistent=bool(args.get("persistent", False)),
                recording=not args.get("disabled", False),
            )
        )
        return {}

    def cmd_block_dirty_bitmap_merge(self, args: dict[str, Any]) -> Any:
        target = self.existing_bitmap(str(args["node"]), str(args["target"]))
        for source in args["bitmaps"]:
            if isinstance(source, str):
                source = {"node": args["node"], "name": source}
            target.count += self.existing_bitmap(str(source["node"]), str(source["name"])).count
        return {}

    def cmd_block_dirty_bitmap_remove(self, args: dict[str, Any]) -> Any:
        name = str(args["node"])
        node = self.nodes.get(name)
        if node is None:
            raise QmpError(f"Node '{name}' not found")
        bitmap = self.existing_bitmap(name, str(args["name"]))
        if bitmap.busy:
            raise QmpError(
                f"Bitmap '{bitmap.name}' is currently in use by another operation and "
                "cannot be used"
            )
        node.bitmaps.remove(bitmap)
        return {}

    def cmd_transaction(self, args: dict[str, Any]) -> Any:
        """All actions or none."""
        saved = copy.deepcopy((self.nodes, self.devices, self.jobs, self.events))
        try:
            for action in args["actions"]:
                self.execute(str(action["type"]), dict(action.get("data", {})))
        except QmpError:
            self.nodes, self.devices, self.jobs, self.events = saved
            raise
        return {}

    # -- jobs --------------------------------------------------------------------------

    def cmd_blockdev_backup(self, args: dict[str, Any]) -> Any:
        source = self.node(str(args["device"]))
        target = self.node(str(args["target"]))
        job = str(args.get("job-id") or source.name)
        if job in self.jobs:
            raise QmpError(f"Job ID '{job}' already in use")
        cbw = Node(
            str(args.get("filter-node-name") or self.anonymous()),
            "copy-before-write",
            size=source.size,
            children={"file": source.name, "target": target.name},
        )
        self.insert_filter(source, cbw)
        auto_dismiss = bool(args.get("auto-dismiss", True))
        self.jobs[job] = Job(job, source.name, target.name, cbw.name, auto_dismiss)
        return {}

    def cmd_query_block_jobs(self, args: dict[str, Any]) -> Any:
        return [
            {"device": j.id, "type": "backup", "status": j.status, "auto-dismiss": j.auto_dismiss}
            for j in self.jobs.values()
        ]

    def cmd_block_job_cancel(self, args: dict[str, Any]) -> Any:
        name = str(args["device"])
        job = self.jobs.get(name)
        if job is None or job.status != "running":
            raise QmpError(f"Block job '{name}' not found", "DeviceNotActive")
        self.remove_filter(job.filter)
        size = self.node(job.source).size
        job.status = "concluded"
        if job.auto_dismiss:
            del self.jobs[name]
        data = {"device": name, "type": "backup", "len": size, "offset": 0, "speed": 0}
        self.events.append(("BLOCK_JOB_CANCELLED", data))
        return {}

    def cmd_job_dismiss(self, args: dict[str, Any]) -> Any:
        job = self.jobs.get(str(args["id"]))
        if job is None:
            raise QmpError("Job not found")
        if job.status != "concluded":
            raise QmpError(f"Job '{job.id}' in state '{job.status}' cannot accept verb 'dismiss'")
        del self.jobs[job.id]
        return {}

    # -- the NBD server and exports ----------------------------------------------------

    def cmd_nbd_server_start(self, args: dict[str, Any]) -> Any:
        if self.server is not None:
            raise QmpError("NBD server already running")
        self.server = str(args["addr"]["data"]["path"])
        return {}

    def cmd_nbd_server_stop(self, args: dict[str, Any]) -> Any:
        if self.server is None:
            raise QmpError("NBD server not running")
        for export in list(self.exports):
            self.finish_export_delete(export)
        self.server = None
        return {}

    def cmd_query_block_exports(self, args: dict[str, Any]) -> Any:
        return [
            {"id": e.id, "type": "nbd", "node-name": e.node, "shutting-down": e.id in self.deleting}
            for e in self.exports.values()
        ]

    def cmd_block_export_add(self, args: dict[str, Any]) -> Any:
        if self.server is None:
            raise QmpError("NBD server not running")
        export_id = str(args["id"])
        if export_id in self.exports:
            raise QmpError(f"Block export id '{export_id}' is already in use")
        node = self.node(str(args["node-name"]), device="")
        name = str(args.get("name") or node.name)
        if any(e.name == name for e in self.exports.values()):
            raise QmpError(f"NBD server already has export named '{name}'")
        writable = bool(args.get("writable"))
        bitmaps = [self.export_bitmap(node, str(b), writable) for b in args.get("bitmaps", [])]
        for bitmap in bitmaps:
            bitmap.busy = True
        self.exports[export_id] = Export(export_id, node.name, name, [str(b.name) for b in bitmaps])
        return {}

    def export_bitmap(self, node: Node, name: str, writable: bool) -> Bitmap:
        bitmap = node.bitmap(name)
        if bitmap is None:
            raise QmpError(f"Bitmap '{name}' is not found")
        if bitmap.recording and not writable:
            raise QmpError(f"Enabled bitmap '{name}' incompatible with readonly export")
        return bitmap

    def cmd_block_export_del(self, args: dict[str, Any]) -> Any:
        export_id = str(args["id"])
        if export_id not in self.exports:
            raise QmpError(f"Export '{export_id}' is not found")
        if export_id in self.deleting:
            raise QmpError(f"Export '{export_id}' is already shutting down")
        self.deleting.append(export_id)
        return {}

    def finish_export_delete(self, export_id: str) -> None:
        """The export is gone: its node and bitmaps are free (BLOCK_EXPORT_DELETED)."""
        export = self.exports.pop(export_id, None)
        if export_id in self.deleting:
            self.deleting.remove(export_id)
        if export is None:
            return
        node = self.nodes.get(export.node)
        for name in export.bitmaps:
            bitmap = node.bitmap(name) if node else None
            if bitmap is not None:
                bitmap.busy = False
        self.events.append(("BLOCK_EXPORT_DELETED", {"id": export_id}))
