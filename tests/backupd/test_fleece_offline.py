"""The offline session against the fake QMP monitor: the image nodes exported as they
are, the bitmaps it changes and the ones it must leave alone, and its teardown."""

from __future__ import annotations

import pytest

from backupd.bitmaps import EXPORT_BITMAP
from backupd.qemu.fleece import OfflineSession
from backupd.qemu.inventory import Disk, node_disks
from backupd.qemu.qmp import QemuMonitor
from tests.backupd.fakeqemu import FakeQemu, Node
from tests.backupd.fakeqmp import FakeQmp
from tests.backupd.fleecing import NEW, PARENT, Folders, without

NODES = {"vda": "drive-vda", "vdb": "drive-vdb"}


def session(
    monitor: QemuMonitor, disks: list[Disk], folders: Folders, parent: str | None
) -> OfflineSession:
    return OfflineSession(
        monitor,
        disks,
        backup_id="20260102T000000Z",
        bitmap=NEW,
        parent_bitmap=parent,
        scratch_dir=folders.scratch,
        socket_dir=folders.sockets,
    )


async def test_the_images_are_exported_as_they_are(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    before = qemu.snapshot()
    disks = await node_disks(monitor, NODES)
    assert [(d.name, d.node, d.device) for d in disks] == [
        ("vda", "drive-vda", None),
        ("vdb", "drive-vdb", None),
    ]
    async with session(monitor, disks, folders, PARENT) as exports:
        assert [(e.export, e.dirty_context) for e in exports] == [
            ("vda", f"qemu:dirty-bitmap:{EXPORT_BITMAP}"),
            ("vdb", f"qemu:dirty-bitmap:{EXPORT_BITMAP}"),
        ]
        # the image nodes themselves, no filter, no view, no scratch file
        assert {e.node for e in qemu.exports.values()} == {"drive-vda", "drive-vdb"}
        assert sorted(n for n in qemu.nodes if not n.startswith("#")) == sorted(before["nodes"])
        assert not folders.scratch.exists() or not list(folders.scratch.iterdir())
        vda = qemu.nodes["drive-vda"]
        frozen = vda.bitmap(EXPORT_BITMAP)
        assert frozen is not None and not frozen.recording and not frozen.persistent
        parent = vda.bitmap(PARENT)
        assert parent is not None and frozen.count == parent.count and parent.recording
        new = vda.bitmap(NEW)
        assert new is not None and new.persistent and new.recording
        # one transaction: the new bitmaps and the frozen copies together
        assert sum(line.startswith("-> transaction") for line in fake.timeline) == 1
        assert not [line for line in fake.timeline if "stop" in line.split()[:2]]
    # the frozen copies are gone, the parent untouched; the new bitmap stays (the run
    # removes it if the backup fails, the parent's after the commit)
    assert without(qemu.snapshot(), NEW) == before
    assert not (folders.sockets / "nbd.sock").exists()


async def test_a_full_backup_exports_no_bitmap(
    qemu: FakeQemu, monitor: QemuMonitor, folders: Folders
) -> None:
    disks = await node_disks(monitor, NODES)
    async with session(monitor, disks, folders, None) as exports:
        assert [e.dirty_context for e in exports] == [None, None]
        assert qemu.nodes["drive-vda"].bitmap(EXPORT_BITMAP) is None
        assert qemu.nodes["drive-vdb"].bitmap(NEW) is not None


async def test_a_raw_image_gets_no_checkpoint_bitmap(
    qemu: FakeQemu, monitor: QemuMonitor, folders: Folders
) -> None:
    qemu.add_node(Node("backupd-image-2", "raw", filename="/images/vdc.img", size=4 << 20))
    disks = await node_disks(monitor, {**NODES, "vdc": "backupd-image-2"})
    assert [d.stores_bitmaps for d in disks] == [True, True, False]
    async with session(monitor, disks, folders, None):
        assert qemu.nodes["backupd-image-2"].bitmaps == []
        assert qemu.nodes["drive-vda"].bitmap(NEW) is not None


async def test_a_refused_export_leaves_only_the_new_bitmap(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    before = qemu.snapshot()
    disks = await node_disks(monitor, NODES)
    fake.fail("block-export-add", "Permission conflict on node 'drive-vdb'", nth=2)
    offline = session(monitor, disks, folders, PARENT)
    with pytest.raises(Exception, match="Permission conflict"):
        async with offline:
            pass
    assert offline.new_bitmap_sent
    assert without(qemu.snapshot(), NEW) == before
    assert qemu.exports == {} and qemu.server is None
