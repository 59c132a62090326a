"""A fleecing session against the fake QMP monitor: what it builds in qemu, the order of
its teardown, and a teardown that goes on past failures and over what is missing."""

from __future__ import annotations

import pytest

from backupd.errors import QemuCommandError, QemuError
from backupd.qemu.fleece import SnapshotAccessSession
from backupd.qemu.fleece.scratch import read_state
from backupd.qemu.inventory import select_disks
from backupd.qemu.qmp import QemuMonitor
from tests.backupd.fakeqemu import FakeQemu
from tests.backupd.fakeqmp import FakeQmp
from tests.backupd.fleecing import NEW, PARENT, Folders, index, new_session, without

VDA = "/machine/peripheral/vda/virtio-backend"
VDB = "/machine/peripheral/vdb/virtio-backend"


def teardown_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("teardown:")]


async def test_the_views_are_exported_and_everything_goes_again(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    before = qemu.snapshot()
    session = await new_session(monitor, folders)
    assert isinstance(session, SnapshotAccessSession)
    async with session as exports:
        assert [(e.export, e.dirty_context) for e in exports] == [
            ("vda", "qemu:dirty-bitmap:backupd-export"),
            ("vdb", "qemu:dirty-bitmap:backupd-export"),
        ]
        assert exports[0].uri == f"nbd+unix:///vda?socket={folders.sockets / 'nbd.sock'}"
        # the guest devices write through the filters; the exports show the views
        assert {d.root for d in qemu.devices} == {"backupd-cbw-0", "backupd-cbw-1"}
        assert {e.node for e in qemu.exports.values()} == {"backupd-snap-0", "backupd-snap-1"}
        assert qemu.nodes["drive-vda"].bitmap(NEW) is not None
        export_bitmap = qemu.nodes["backupd-snap-0"].bitmap("backupd-export")
        assert export_bitmap is not None and not export_bitmap.recording
        assert export_bitmap.count == qemu.nodes["drive-vda"].bitmap(PARENT).count  # type: ignore[union-attr]
        # two disks of a running VM: paused while the filters went in, running again
        assert qemu.status == "running"
        assert index(fake.timeline, "-> stop") < index(fake.timeline, "-> qom-set")
        assert index(fake.timeline, "-> cont") > fake.timeline.index(
            [line for line in fake.timeline if line.startswith("-> qom-set")][-1]
        )
        assert read_state(folders.scratch).redirects == ((VDA, "drive-vda"), (VDB, "drive-vdb"))
        assert sorted(p.name for p in folders.scratch.glob("*.raw")) == [
            "20260102T000000Z-vda.raw",
            "20260102T000000Z-vdb.raw",
        ]
    assert without(qemu.snapshot(), NEW) == before
    assert list(folders.scratch.iterdir()) == []
    assert not (folders.sockets / "nbd.sock").exists()
    assert qemu.crashed is None


async def test_teardown_order(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    """Exports gone (their event heard) before the server stops; views before the guest
    devices go back; each device back on its disk before its filter goes; filters before
    the scratch nodes."""
    fake.export_delete_delay = 0.05  # qemu lets go of an export a little later
    async with await new_session(monitor, folders):
        start = len(fake.timeline)
    line = fake.timeline[start:]
    stop = index(line, "-> nbd-server-stop")
    for export in ("backupd-export-0", "backupd-export-1"):
        assert index(line, f'-> block-export-del {{"id": "{export}"') < stop
        assert index(line, f'<- BLOCK_EXPORT_DELETED {{"id": "{export}"}}') < stop
    for i, disk in enumerate(("drive-vda", "drive-vdb")):
        put_back = index(line, f'-> qom-set {{"path": "/machine/peripheral/vd{"ab"[i]}/')
        assert line[put_back].endswith(f'"value": "{disk}"}}')
        assert index(line, f'-> blockdev-del {{"node-name": "backupd-snap-{i}"}}') < put_back
        assert put_back < index(line, f'-> blockdev-del {{"node-name": "backupd-cbw-{i}"}}')
        assert index(line, f'-> blockdev-del {{"node-name": "backupd-cbw-{i}"}}') < index(
            line, f'-> blockdev-del {{"node-name": "backupd-scratch-{i}"}}'
        )
    assert qemu.crashed is None and qemu.exports == {} and qemu.server is None


async def test_a_failing_step_does_not_stop_the_others(
    qemu: FakeQemu,
    fake: FakeQmp,
    monitor: QemuMonitor,
    folders: Folders,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with await new_session(monitor, folders):
        fake.fail("block-export-del", "Export 'backupd-export-1' is in use", nth=1)
        fake.fail(
            "qom-set", "Permission conflict on node 'drive-vdb'", where=lambda a: "vdb" in a["path"]
        )
    warnings = teardown_warnings(caplog)
    assert [w.split(":")[1].strip() for w in warnings] == [
        "remove export backupd-export-1",
        f"put {VDB} back on drive-vdb",
        "remove node backupd-cbw-1",
        "remove node backupd-scratch-1",
    ]
    # all the rest went: the other export, the server (and the refused export with it),
    # every view, vda's filter and scratch node, the scratch files
    assert qemu.exports == {} and qemu.server is None
    assert sorted(n for n in qemu.nodes if n.startswith("backupd-")) == [
        "backupd-cbw-1",
        "backupd-scratch-1",
    ]
    assert {d.qdev: d.root for d in qemu.devices} == {VDA: "drive-vda", VDB: "backupd-cbw-1"}
    assert list(folders.scratch.iterdir()) == []


async def test_what_is_missing_is_no_error_in_teardown(
    qemu: FakeQemu,
    fake: FakeQmp,
    monitor: QemuMonitor,
    folders: Folders,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = qemu.snapshot()
    async with await new_session(monitor, folders):
        # gone behind the session's back: the server (and the exports with it), a view
        await monitor.execute("nbd-server-stop")
        await monitor.execute("blockdev-del", {"node-name": "backupd-snap-0"})
    assert teardown_warnings(caplog) == []
    assert without(qemu.snapshot(), NEW) == before


async def test_other_refusals_are_reported(
    qemu: FakeQemu,
    fake: FakeQmp,
    monitor: QemuMonitor,
    folders: Folders,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with await new_session(monitor, folders):
        fake.fail("nbd-server-stop", "NBD server is busy")
    assert teardown_warnings(caplog) == [
        "teardown: stop NBD server: qemu refused nbd-server-stop: NBD server is busy"
    ]
    assert qemu.server is not None  # it was refused, and left as it is
    assert all(not n.startswith("backupd-") for n in qemu.nodes)


async def test_a_failed_setup_removes_what_it_added(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    before = qemu.snapshot()
    fake.fail("block-export-add", "Node 'backupd-snap-1' is busy", nth=2)
    session = await new_session(monitor, folders)
    with pytest.raises(QemuCommandError, match="is busy"):
        async with session:
            raise AssertionError("not reached")
    assert session.new_bitmap_sent
    assert without(qemu.snapshot(), NEW) == before
    assert list(folders.scratch.iterdir()) == []


async def test_a_filter_that_never_went_in_is_not_put_back(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    """The qom-set onto the filter was refused: the device is still on its disk, and a
    qom-set to the node it has would abort qemu (and the guest with it)."""
    before = qemu.snapshot()
    fake.fail("qom-set", "Permission conflict on node 'backupd-cbw-1'", nth=2)
    with pytest.raises(QemuCommandError, match="Permission conflict"):
        async with await new_session(monitor, folders):
            raise AssertionError("not reached")
    assert qemu.crashed is None
    assert without(qemu.snapshot(), NEW) == before
    assert [a["value"] for a in fake.called("qom-set")] == [
        "backupd-cbw-0",
        "backupd-cbw-1",
        "drive-vda",
    ]


async def test_a_leftover_server_is_replaced(
    qemu: FakeQemu,
    fake: FakeQmp,
    monitor: QemuMonitor,
    folders: Folders,
    caplog: pytest.LogCaptureFixture,
) -> None:
    qemu.server = "/somewhere/else.sock"
    async with await new_session(monitor, folders):
        assert qemu.server == str(folders.sockets / "nbd.sock")
    assert "stopping a leftover NBD server in qemu" in caplog.text
    assert qemu.server is None


async def test_a_server_with_exports_of_others_is_left_alone(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    path = str(folders.sockets / "theirs.sock")
    await monitor.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": path}}})
    await monitor.execute(
        "block-export-add", {"type": "nbd", "id": "theirs", "node-name": "drive-vdb"}
    )
    with pytest.raises(QemuError, match="already runs an NBD server with exports of its own"):
        async with await new_session(monitor, folders):
            raise AssertionError("not reached")
    assert qemu.server == path and list(qemu.exports) == ["theirs"]
    assert fake.called("nbd-server-stop") == []


async def test_one_disk_is_cut_without_pausing(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    disks = [d for d in await select_disks(monitor, None) if d.name == "vda"]
    async with await new_session(monitor, folders, disks=disks, parent=None) as exports:
        assert exports[0].dirty_context is None
        assert "bitmaps" not in fake.called("block-export-add")[0]
    assert fake.called("stop") == [] and fake.called("cont") == []


async def test_a_paused_vm_stays_paused(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    qemu.status = "paused"
    async with await new_session(monitor, folders):
        pass
    assert fake.called("stop") == [] and fake.called("cont") == []
    assert qemu.status == "paused"
