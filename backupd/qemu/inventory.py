"""What qemu has: guest disks, their format nodes, sizes and dirty bitmaps.

A disk is named by its guest device id (``vda``); a node with no guest device can be
named by its node-name.  Bitmap state comes from ``query-named-block-nodes``, which sees
every node (``query-block`` misses bitmaps behind filters).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backupd.errors import ConfigError, QemuTooOldError
from backupd.qemu.qmp import QemuMonitor

MINIMUM_VERSION = (4, 2, 0)
BITMAP_PREFIX = "backupd-"


@dataclass(frozen=True, slots=True)
class Bitmap:
    name: str
    recording: bool
    busy: bool
    persistent: bool
    inconsistent: bool
    granularity: int
    count: int


@dataclass(frozen=True, slots=True)
class Disk:
    name: str
    node: str
    driver: str
    filename: str
    size: int
    read_only: bool
    device: str | None
    bitmaps: tuple[Bitmap, ...] = ()

    def bitmap(self, name: str) -> Bitmap | None:
        return next((b for b in self.bitmaps if b.name == name), None)

    @property
    def stores_bitmaps(self) -> bool:
        """Whether a persistent dirty bitmap can live in the image (raw images have
        none, so a raw disk is backed up in full every time)."""
        return self.driver != "raw"


def check_version(version: tuple[int, int, int]) -> None:
    if version < MINIMUM_VERSION:
        have = ".".join(map(str, version))
        raise QemuTooOldError(
            f"qemu {have} is too old: backupd needs qemu >= 4.2 (persistent dirty bitmaps, "
            "bitmap merge in transactions, NBD dirty-bitmap contexts)"
        )


def _bitmaps(node: dict[str, Any]) -> tuple[Bitmap, ...]:
    out = []
    for b in node.get("dirty-bitmaps", []) or []:
        if "name" not in b:
            continue  # internal bitmaps of jobs
        out.append(
            Bitmap(
                name=b["name"],
                recording=bool(b.get("recording", False)),
                busy=bool(b.get("busy", False)),
                persistent=bool(b.get("persistent", False)),
                inconsistent=bool(b.get("inconsistent", False)),
                granularity=int(b.get("granularity", 0)),
                count=int(b.get("count", 0)),
            )
        )
    return tuple(out)


def _device_id(qdev: str) -> str | None:
    prefix = "/machine/peripheral/"
    if qdev.startswith(prefix):
        return qdev[len(prefix) :].split("/", 1)[0]
    if qdev and not qdev.startswith("/"):
        return qdev
    return None


async def named_nodes(monitor: QemuMonitor) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = await monitor.execute("query-named-block-nodes", {"flat": True})
    return nodes


@dataclass(frozen=True, slots=True)
class BlockState:
    """qemu's block layer as one ``query-named-block-nodes`` and one ``query-block``
    saw it: what the clean-up of a killed run and the choice of disks both read, so
    a run asks once (not once per thing it looks for)."""

    nodes: list[dict[str, Any]]
    blocks: list[dict[str, Any]]


async def block_state(monitor: QemuMonitor) -> BlockState:
    nodes = await named_nodes(monitor)
    blocks: list[dict[str, Any]] = await monitor.execute("query-block")
    return BlockState(nodes, blocks)


def _disk(name: str, info: dict[str, Any], node: dict[str, Any], device: str | None) -> Disk:
    """A Disk from a BlockDeviceInfo (``query-block``'s ``inserted`` or a named node) and
    the node's entry in ``query-named-block-nodes`` (for its bitmaps)."""
    return Disk(
        name=name,
        node=info["node-name"],
        driver=info.get("drv", ""),
        filename=info.get("file", ""),
        size=int(info.get("image", {}).get("virtual-size", 0)),
        read_only=bool(info.get("ro", False)),
        device=device,
        bitmaps=_bitmaps(node),
    )


def _guest_disks(state: BlockState) -> tuple[list[Disk], dict[str, dict[str, Any]]]:
    """Every guest disk (device id, format node, size, bitmaps), and every named node
    by name."""
    nodes = {n["node-name"]: n for n in state.nodes}
    disks = []
    for block in state.blocks:
        inserted = block.get("inserted")
        if not inserted:
            continue
        name = _device_id(block.get("qdev", "")) or block.get("device") or inserted["node-name"]
        node = nodes.get(inserted["node-name"], inserted)
        disks.append(_disk(name, inserted, node, block.get("qdev") or None))
    return disks, nodes


async def node_disks(monitor: QemuMonitor, nodes: Mapping[str, str]) -> list[Disk]:
    """Disks that are nodes with no guest device (disk name -> node name), in that
    order: the images backupd opened itself."""
    found = {n["node-name"]: n for n in await named_nodes(monitor)}
    missing = [node for node in nodes.values() if node not in found]
    if missing:
        raise ConfigError(f"qemu has no node {', '.join(missing)}")
    return [_disk(name, found[node], found[node], None) for name, node in nodes.items()]


async def select_disks(
    monitor: QemuMonitor, wanted: Sequence[str] | None, state: BlockState | None = None
) -> list[Disk]:
    """The configured disks, or every writable disk with a guest device; from
    ``state`` when it is still what qemu has, else asked."""
    disks, nodes = _guest_disks(state if state is not None else await block_state(monitor))
    if wanted is None:
        chosen = [d for d in disks if not d.read_only and d.device]
        if not chosen:
            raise ConfigError("the VM has no writable disk with a guest device to back up")
        return sorted(chosen, key=lambda d: d.name)
    by_name = {d.name: d for d in disks}
    chosen = []
    for name in wanted:
        disk = by_name.get(name)
        if disk is None and name in nodes:
            disk = _disk(name, nodes[name], nodes[name], None)
        if disk is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise ConfigError(f"the VM has no disk {name!r} (guest disks: {known})")
        chosen.append(disk)
    return chosen
