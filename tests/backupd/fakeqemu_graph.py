"""The block graph of the fake qemu (:mod:`fakeqemu`): nodes and what uses them.

A node is used by its parents (nodes with it as a child), by guest devices (their root),
by exports and by jobs; qemu refuses to delete a used node.  Nodes qemu made itself (an
inline ``file`` child, the filter of a backup job) go when their user goes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


class QmpError(Exception):
    """A refusal, as qemu's QMP error object: class and description."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass
class Bitmap:
    #: None for the internal bitmaps of filters and jobs (listed without a name)
    name: str | None
    persistent: bool = True
    recording: bool = True
    busy: bool = False
    inconsistent: bool = False
    granularity: int = 65536
    count: int = 0

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "recording": self.recording,
            "busy": self.busy,
            "persistent": self.persistent,
            "granularity": self.granularity,
            "count": self.count,
        }
        if self.name is not None:
            info["name"] = self.name
        if self.inconsistent:
            info["inconsistent"] = True
        return info


@dataclass
class Node:
    name: str
    driver: str
    filename: str = ""
    size: int = 0
    #: role ("file", "backing", "target") -> child node name
    children: dict[str, str] = field(default_factory=dict)
    bitmaps: list[Bitmap] = field(default_factory=list)
    #: made by qemu, not by blockdev-add: not deletable, goes with its user
    implicit: bool = False

    def bitmap(self, name: str) -> Bitmap | None:
        return next((b for b in self.bitmaps if b.name == name), None)


@dataclass
class Device:
    qdev: str
    root: str


@dataclass
class Export:
    id: str
    node: str
    name: str
    bitmaps: list[str]


@dataclass
class Job:
    id: str
    source: str
    target: str
    filter: str
    auto_dismiss: bool
    status: str = "running"


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    devices: list[Device] = field(default_factory=list)
    exports: dict[str, Export] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    _anonymous: int = 0

    def anonymous(self) -> str:
        self._anonymous += 1
        return f"#block{self._anonymous:03d}"

    def add_node(self, node: Node) -> Node:
        if node.name in self.nodes:
            raise QmpError(f"Duplicate nodes with node-name='{node.name}'")
        self.nodes[node.name] = node
        return node

    def node(self, name: str, device: str | None = None) -> Node:
        """The node ``name``; qemu's words when it is missing (``device`` as qemu echoes
        it: commands that also take a device name say so)."""
        node = self.nodes.get(name)
        if node is None:
            raise QmpError(f"Cannot find device='{device or ''}' nor node-name='{name}'")
        return node

    def device(self, path: str) -> Device:
        for device in self.devices:
            if device.qdev == path or device.qdev.startswith(path + "/"):
                return device
        raise QmpError(f"Device '{path}' not found", "DeviceNotFound")

    def existing_bitmap(self, node: str, name: str) -> Bitmap:
        bitmap = self.node(node, device=node).bitmap(name)
        if bitmap is None:
            raise QmpError(f"Dirty bitmap '{name}' not found")
        return bitmap

    def node_info(self, node: Node) -> dict[str, Any]:
        return {
            "node-name": node.name,
            "drv": node.driver,
            "file": node.filename,
            "ro": False,
            "image": {"virtual-size": node.size, "filename": node.filename},
        }

    def parents(self, name: str) -> list[Node]:
        return [n for n in self.nodes.values() if name in n.children.values()]

    def in_use(self, name: str) -> str | None:
        """Why qemu refuses to delete node ``name``, if it does."""
        if any(j.source == name or j.target == name for j in self.jobs.values()):
            return f"Node '{name}' is busy: block device is in use by block job: backup"
        used = (
            self.parents(name)
            or any(d.root == name for d in self.devices)
            or any(e.node == name for e in self.exports.values())
        )
        return f"Node {name} is in use" if used else None

    # -- blockdev-add / blockdev-del ---------------------------------------------------

    def blockdev_add(self, args: dict[str, Any]) -> Node:
        name = str(args["node-name"])
        if name in self.nodes:
            raise QmpError(f"Duplicate nodes with node-name='{name}'")
        driver = str(args["driver"])
        if driver == "file":
            return self.add_node(Node(name, "file", *self._open(str(args["filename"]))))
        if driver == "qcow2":
            file = self._child(args["file"])
            self._check_qcow2(file)
            node = Node(name, "qcow2", file.filename, file.size, {"file": file.name})
            if args.get("backing"):
                node.children["backing"] = self.node(str(args["backing"])).name
            return self.add_node(node)
        if driver == "copy-before-write":
            disk, target = self.node(str(args["file"])), self.node(str(args["target"]))
            children = {"file": disk.name, "target": target.name}
            return self.add_node(Node(name, driver, disk.filename, disk.size, children))
        if driver == "snapshot-access":
            source = self.node(str(args["file"]))
            if source.driver != "copy-before-write":
                raise QmpError("snapshot-access: the file child must be a copy-before-write node")
            return self.add_node(Node(name, driver, "", source.size, {"file": source.name}))
        raise QmpError(f"Invalid parameter '{driver}'")

    def _open(self, filename: str) -> tuple[str, int]:
        try:
            return filename, os.path.getsize(filename)
        except OSError as exc:
            raise QmpError(f"Could not open '{filename}': {exc.strerror}") from None

    def _child(self, spec: Any) -> Node:
        """A child given by reference, or inline (then qemu names it itself)."""
        if isinstance(spec, str):
            return self.node(spec)
        child = self.add_node(Node(self.anonymous(), "file", *self._open(str(spec["filename"]))))
        child.implicit = True
        return child

    def _check_qcow2(self, file: Node) -> None:
        with open(file.filename, "rb") as f:
            if f.read(4) != b"QFI\xfb":
                if file.implicit:
                    del self.nodes[file.name]
                raise QmpError("Image is not in qcow2 format")

    def blockdev_del(self, name: str) -> None:
        node = self.nodes.get(name)
        if node is None:
            raise QmpError(f"Failed to find node with node-name='{name}'")
        why = self.in_use(name)
        if why is not None:
            raise QmpError(why)
        if node.implicit:
            raise QmpError(f"Node {name} is not owned by the monitor")
        self._remove(node)

    def _remove(self, node: Node) -> None:
        del self.nodes[node.name]
        for child in node.children.values():
            if self.nodes.get(child) and self.nodes[child].implicit and not self.parents(child):
                self._remove(self.nodes[child])

    # -- filters -----------------------------------------------------------------------

    def insert_filter(self, below: Node, filter_node: Node) -> None:
        """Put ``filter_node`` in the place of ``below``: its users now use the filter."""
        filter_node.implicit = True
        filter_node.bitmaps = [Bitmap(None, persistent=False), Bitmap(None, persistent=False)]
        for device in self.devices:
            if device.root == below.name:
                device.root = filter_node.name
        for parent in self.parents(below.name):
            for role, child in parent.children.items():
                if child == below.name:
                    parent.children[role] = filter_node.name
        self.add_node(filter_node)

    def remove_filter(self, name: str) -> None:
        filter_node = self.nodes.pop(name)
        below = filter_node.children["file"]
        for device in self.devices:
            if device.root == name:
                device.root = below
        for parent in self.parents(name):
            for role, child in parent.children.items():
                if child == name:
                    parent.children[role] = below

    def check_permissions(self, device: Device, node: Node) -> None:
        """A device may not write to a node that a copy-before-write filter shares only
        for reading while a snapshot-access node reads through that filter."""
        for cbw in self.parents(node.name):
            if (
                cbw.driver == "copy-before-write"
                and cbw.children.get("file") == node.name
                and any(p.driver == "snapshot-access" for p in self.parents(cbw.name))
            ):
                raise QmpError(
                    f"Permission conflict on node '{node.name}': permissions 'write' are "
                    f"both required by block device '{device.qdev}' (uses node "
                    f"'{node.name}' as 'root' child) and unshared by node '{cbw.name}' "
                    f"(uses node '{node.name}' as 'file' child)."
                )

    def graph(self) -> dict[str, Any]:
        """``x-debug-query-block-graph``: nodes by number, edges by role."""
        ids = {name: i for i, name in enumerate(self.nodes, start=1)}
        nodes = [{"id": i, "type": "block-driver", "name": n} for n, i in ids.items()]
        edges = [
            {"parent": ids[n.name], "child": ids[c], "name": role, "perm": [], "shared-perm": []}
            for n in self.nodes.values()
            for role, c in n.children.items()
            if c in ids
        ]
        for k, device in enumerate(self.devices, start=len(ids) + 1):
            nodes.append({"id": k, "type": "block-backend", "name": device.qdev})
            edges.append(
                {
                    "parent": k,
                    "child": ids[device.root],
                    "name": "root",
                    "perm": [],
                    "shared-perm": [],
                }
            )
        return {"nodes": nodes, "edges": edges}
