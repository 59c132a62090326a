"""Helpers for the fleecing tests: a VM behind the fake QMP monitor, backupd's client on
it, and a session on its disks."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backupd.qemu.blockops import remove_bitmap
from backupd.qemu.fleece import FleeceSession, Quiesce, fleece_session
from backupd.qemu.inventory import Disk, select_disks
from backupd.qemu.qmp import QemuMonitor
from tests.backupd.fakeqemu import Bitmap, FakeQemu
from tests.backupd.fakeqmp import FakeQmp

#: the parent backup's checkpoint bitmap on every disk
PARENT = "backupd-r1-20260101T000000Z"
#: the checkpoint bitmap a session adds
NEW = "backupd-r1-20260102T000000Z"


def two_disk_vm(devices: tuple[str, ...] = ("vda", "vdb")) -> FakeQemu:
    qemu = FakeQemu()
    for device in devices:
        disk = qemu.add_disk(device, f"drive-{device}", size=4 << 20)
        disk.bitmaps.append(Bitmap(PARENT, count=65536))
    return qemu


@contextlib.asynccontextmanager
async def served(
    qemu: FakeQemu, sockdir: Path, *, timeout: float = 5.0
) -> AsyncIterator[tuple[FakeQmp, QemuMonitor]]:
    """``qemu`` behind a fake monitor in ``sockdir``, and backupd's client connected."""
    async with FakeQmp(qemu, sockdir / "qmp.sock") as fake:
        monitor = QemuMonitor(str(fake.path), timeout=timeout)
        await monitor.connect()
        try:
            yield fake, monitor
        finally:
            await monitor.close()


@dataclass
class Folders:
    scratch: Path
    sockets: Path

    @classmethod
    def under(cls, root: Path) -> Folders:
        sockets = root / "run"
        sockets.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(root / "scratch", sockets)


async def new_session(
    monitor: QemuMonitor,
    folders: Folders,
    *,
    disks: list[Disk] | None = None,
    parent: str | None = PARENT,
    method: str = "auto",
    quiesce: Quiesce | None = None,
) -> FleeceSession:
    return fleece_session(
        monitor,
        disks if disks is not None else await select_disks(monitor, None),
        backup_id="20260102T000000Z",
        bitmap=NEW,
        parent_bitmap=parent,
        scratch_dir=folders.scratch,
        socket_dir=folders.sockets,
        method=method,
        quiesce=quiesce,
    )


async def forget_new_bitmap(monitor: QemuMonitor, session: FleeceSession) -> None:
    """What the run does after a failure: drop the new bitmap if it may be there."""
    if session.new_bitmap_sent:
        for disk in session.disks:
            await remove_bitmap(monitor, disk.node, NEW)


def without(snapshot: dict[str, Any], bitmap: str) -> dict[str, Any]:
    """A model snapshot as if ``bitmap`` were on no node."""
    nodes = {
        name: (driver, children, [b for b in bitmaps if b != bitmap])
        for name, (driver, children, bitmaps) in snapshot["nodes"].items()
    }
    return {**snapshot, "nodes": nodes}


def index(timeline: list[str], prefix: str) -> int:
    """Where the first line starting with ``prefix`` is in a fake monitor's timeline."""
    for i, line in enumerate(timeline):
        if line.startswith(prefix):
            return i
    raise AssertionError(f"{prefix!r} not in the timeline:\n" + "\n".join(timeline))
