"""Recovery: what a killed run left in qemu and in the scratch folder, found at the start
of the next run.  The leftovers are made the way a run makes them (a session's setup,
then the run "killed": its teardown never runs), or planted in the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from backupd.config import VMConfig
from backupd.errors import QemuError
from backupd.qemu.fleece import cleanup_leftovers
from backupd.qemu.fleece.names import STATE_FILE
from backupd.qemu.fleece.scratch import SessionState, write_state
from backupd.qemu.qmp import QemuMonitor
from backupd.sources import OnlineSource
from tests.backupd.fakeqemu import Bitmap, FakeQemu
from tests.backupd.fakeqmp import FakeQmp
from tests.backupd.fleecing import NEW, PARENT, Folders, new_session

VDA = "/machine/peripheral/vda/virtio-backend"
VDB = "/machine/peripheral/vdb/virtio-backend"


def ours(name: str) -> bool:
    """The predicate of a run: this repository's bitmaps that no committed backup owns."""
    return name.startswith("backupd-r1-") and name != PARENT


async def killed_run(monitor: QemuMonitor, folders: Folders, *, paused: bool = False) -> None:
    """A run that got as far as its exports, then died (no teardown at all)."""
    session = await new_session(monitor, folders)
    await session._setup()
    if paused:  # killed between stop and cont
        await monitor.execute("stop")
        session.added.paused = True
        session._save_state()


async def test_everything_a_killed_run_left_goes(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    before = qemu.snapshot()
    await killed_run(monitor, folders)
    assert (folders.scratch / STATE_FILE).exists()
    removed = await cleanup_leftovers(monitor, ours, folders.scratch)
    assert qemu.snapshot() == before  # NEW went too: ours, and no backup owns it
    assert removed == [
        "export backupd-export-0",
        "export backupd-export-1",
        "node backupd-snap-0",
        "node backupd-snap-1",
        "filter backupd-cbw-0 in front of drive-vda",
        "filter backupd-cbw-1 in front of drive-vdb",
        "node backupd-cbw-0",
        "node backupd-cbw-1",
        "node backupd-scratch-0",
        "node backupd-scratch-1",
        f"bitmap {NEW} on drive-vda",
        f"bitmap {NEW} on drive-vdb",
        "scratch file 20260102T000000Z-vda.raw",
        "scratch file 20260102T000000Z-vdb.raw",
    ]
    assert list(folders.scratch.iterdir()) == []
    assert qemu.crashed is None and qemu.status == "running"


async def test_a_vm_left_paused_by_the_run_is_resumed(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    await killed_run(monitor, folders, paused=True)
    assert qemu.status == "paused"
    removed = await cleanup_leftovers(monitor, ours, folders.scratch)
    assert removed[0] == "pause of the VM (resumed)"
    assert qemu.status == "running"


async def test_only_a_paused_vm_is_resumed(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    """The state file says "paused", but the VM runs (resumed by someone since) or was
    never started: no cont."""
    for status in ("running", "prelaunch"):
        folders.scratch.mkdir(mode=0o700, exist_ok=True)
        write_state(folders.scratch, SessionState(paused=True))
        qemu.status = status
        assert await cleanup_leftovers(monitor, ours, folders.scratch) == []
        assert qemu.status == status
    assert fake.called("cont") == []
    # and a VM paused by someone else, with no state file saying the run did it, stays so
    qemu.status = "paused"
    assert await cleanup_leftovers(monitor, ours, folders.scratch) == []
    assert qemu.status == "paused" and fake.called("cont") == []


async def test_recorded_redirects_are_undone(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    """The state file names the node each device had; qemu's graph is not needed."""
    await killed_run(monitor, folders)
    fake.fail("x-debug-query-block-graph", "no graph here", times=10)
    await cleanup_leftovers(monitor, ours, folders.scratch)
    assert {d.qdev: d.root for d in qemu.devices} == {VDA: "drive-vda", VDB: "drive-vdb"}
    assert fake.called("x-debug-query-block-graph") == []


async def test_filters_found_through_query_block_without_a_state_file(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    await killed_run(monitor, folders)
    (folders.scratch / STATE_FILE).unlink()
    removed = await cleanup_leftovers(monitor, ours, folders.scratch)
    assert "filter backupd-cbw-1 in front of drive-vdb" in removed
    assert {d.qdev: d.root for d in qemu.devices} == {VDA: "drive-vda", VDB: "drive-vdb"}
    assert len(fake.called("x-debug-query-block-graph")) == 2
    assert all(not n.startswith("backupd-") for n in qemu.nodes)


async def test_a_filter_with_no_known_disk_is_left_with_a_clear_error(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    await killed_run(monitor, folders)
    (folders.scratch / STATE_FILE).unlink()
    fake.fail(
        "x-debug-query-block-graph",
        "The command x-debug-query-block-graph has not been found",
        error_class="CommandNotFound",
    )
    with pytest.raises(QemuError, match=f"guest device {VDA} still writes through backupd's"):
        await cleanup_leftovers(monitor, ours, folders.scratch)
    assert qemu.devices[0].root == "backupd-cbw-0" and qemu.crashed is None


async def test_the_export_bitmap_never_goes(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    vda = qemu.nodes["drive-vda"]
    vda.bitmaps += [Bitmap("backupd-r1-X"), Bitmap("backupd-r2-Y"), Bitmap("user-bitmap")]
    vda.bitmaps.append(Bitmap(None))  # an internal one, listed without a name
    qemu.nodes["drive-vdb"].bitmaps.append(Bitmap("backupd-export"))
    removed = await cleanup_leftovers(monitor, lambda name: True, folders.scratch)
    # everything, says the predicate; but never the export bitmap
    assert "bitmap backupd-export on drive-vdb" not in removed
    assert qemu.nodes["drive-vdb"].bitmap("backupd-export") is not None
    removed = await cleanup_leftovers(monitor, ours, folders.scratch)
    assert removed == []  # the first call took them all already
    assert [b.name for b in vda.bitmaps] == [None]


async def test_only_the_bitmaps_the_predicate_selects_go(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    vda = qemu.nodes["drive-vda"]
    vda.bitmaps += [Bitmap("backupd-r1-X"), Bitmap("backupd-r2-Y"), Bitmap("user-bitmap")]
    removed = await cleanup_leftovers(monitor, ours, folders.scratch)
    assert removed == ["bitmap backupd-r1-X on drive-vda"]
    assert [b.name for b in vda.bitmaps] == [PARENT, "backupd-r2-Y", "user-bitmap"]


async def test_exports_and_server_of_others_stay(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders, tmp_path: Path
) -> None:
    path = str(tmp_path / "nbd.sock")
    await monitor.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": path}}})
    await monitor.execute(
        "block-export-add", {"type": "nbd", "id": "backupd-export-0", "node-name": "drive-vda"}
    )
    await monitor.execute(
        "block-export-add", {"type": "nbd", "id": "theirs", "node-name": "drive-vdb"}
    )
    assert await cleanup_leftovers(monitor, ours, folders.scratch) == ["export backupd-export-0"]
    assert list(qemu.exports) == ["theirs"] and qemu.server == path
    # without the other export, the server goes with ours
    await monitor.execute("block-export-del", {"id": "theirs"})
    await monitor.execute(
        "block-export-add", {"type": "nbd", "id": "backupd-export-1", "node-name": "drive-vda"}
    )
    assert await cleanup_leftovers(monitor, ours, folders.scratch) == ["export backupd-export-1"]
    assert qemu.server is None


async def test_only_scratch_files_go(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    folders.scratch.mkdir(mode=0o700)
    for name in ("a.qcow2", "b.raw", "notes.txt"):
        (folders.scratch / name).write_bytes(b"x")
    removed = await cleanup_leftovers(monitor, ours, folders.scratch)
    assert removed == ["scratch file a.qcow2", "scratch file b.raw"]
    assert [p.name for p in folders.scratch.iterdir()] == ["notes.txt"]


async def test_a_clean_start_asks_for_nodes_and_devices_once(
    fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    """Nothing left by a killed run: the clean-up and the choice of disks share one
    query-named-block-nodes and one query-block; after a clean-up that removed
    something, the disks are asked again (the bitmaps changed)."""
    source = OnlineSource(VMConfig(name="vm", qmp="unused"), monitor)
    assert await source.cleanup(ours, folders.scratch) == []
    disks = await source.disks()
    assert [d.name for d in disks] == ["vda", "vdb"]
    assert len(fake.called("query-named-block-nodes")) == 1
    assert len(fake.called("query-block")) == 1

    await killed_run(monitor, folders)
    nodes, blocks = len(fake.called("query-named-block-nodes")), len(fake.called("query-block"))
    assert await source.cleanup(ours, folders.scratch)
    disks = await source.disks()
    assert NEW not in {b.name for d in disks for b in d.bitmaps}  # asked after the removal
    assert len(fake.called("query-named-block-nodes")) == nodes + 2
    assert len(fake.called("query-block")) == blocks + 2
