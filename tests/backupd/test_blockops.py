"""The QMP block verbs backupd undoes things with: removing what is missing is done,
every other refusal reaches the caller; the waits for qemu's events; a guest device is
never pointed at the node it has (qemu aborts on that)."""

from __future__ import annotations

import asyncio

import pytest

from backupd.errors import QemuCommandError, QemuError
from backupd.qemu import blockops
from backupd.qemu.blockops import (
    Refusal,
    cancel_job,
    delete_export,
    delete_node,
    filter_child,
    put_back,
    redirect,
    refusal,
    remove_bitmap,
    stop_nbd_server,
)
from backupd.qemu.qmp import QemuMonitor
from tests.backupd.fakeqemu import FakeQemu
from tests.backupd.fakeqmp import FakeQmp

VDA = "/machine/peripheral/vda/virtio-backend"

#: what qemu 7.2 answers when the thing a command names is missing (from the real qemu)
MISSING_7_2 = [
    ("blockdev-del", "GenericError", "Failed to find node with node-name='nosuch'"),
    ("block-export-del", "GenericError", "Export 'nosuch' is not found"),
    ("block-job-cancel", "DeviceNotActive", "Block job 'nosuch' not found"),
    ("job-dismiss", "GenericError", "Job not found"),
    ("block-dirty-bitmap-remove", "GenericError", "Dirty bitmap 'nosuch' not found"),
    ("block-dirty-bitmap-remove", "GenericError", "Node 'nosuchnode' not found"),
    ("nbd-server-stop", "GenericError", "NBD server not running"),
    ("qom-set", "DeviceNotFound", "Device '/machine/peripheral/nosuch' not found"),
]
#: and what it answers when it refuses for another reason (also from the real qemu)
REFUSED_7_2 = [
    ("blockdev-del", "GenericError", "Node backupd-cbw-0 is in use"),
    ("blockdev-del", "GenericError", "Block device backupd-scratch-0 is in use"),
    (
        "blockdev-del",
        "GenericError",
        "Node 'backupd-scratch-0' is busy: block device is in use by block job: backup",
    ),
    (
        "block-dirty-bitmap-remove",
        "GenericError",
        "Bitmap 'backupd-export' is currently in use by another operation and cannot be used",
    ),
    (
        "qom-set",
        "GenericError",
        "Permission conflict on node 'drive0': permissions 'write' are both required by "
        "block device '/machine/peripheral/vda/virtio-backend' (uses node 'drive0' as "
        "'root' child) and unshared by node 'backupd-cbw-0' (uses node 'drive0' as 'file' "
        "child).",
    ),
    ("block-export-del", "GenericError", "Export 'e1' is already shutting down"),
    ("block-export-add", "GenericError", "NBD server already has export named 'vda'"),
    ("block-export-del", "CommandNotFound", "The command block-export-del has not been found"),
]


async def export_vda(monitor: QemuMonitor, fake: FakeQmp, bitmap: str | None = None) -> None:
    """Export drive-vda as "e" (with a disabled bitmap when ``bitmap`` names one)."""
    path = str(fake.path.parent / "nbd.sock")
    await monitor.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": path}}})
    args: dict[str, object] = {"type": "nbd", "id": "e", "node-name": "drive-vda"}
    if bitmap is not None:
        await monitor.execute(
            "block-dirty-bitmap-add", {"node": "drive-vda", "name": bitmap, "disabled": True}
        )
        args["bitmaps"] = [bitmap]
    await monitor.execute("block-export-add", args)


@pytest.mark.parametrize(("command", "error_class", "desc"), MISSING_7_2)
def test_qemu_7_2_missing_things_are_missing(command: str, error_class: str, desc: str) -> None:
    assert refusal(QemuCommandError(command, error_class, desc)) is Refusal.MISSING


@pytest.mark.parametrize(("command", "error_class", "desc"), REFUSED_7_2)
def test_qemu_7_2_refusals_are_not(command: str, error_class: str, desc: str) -> None:
    assert refusal(QemuCommandError(command, error_class, desc)) is Refusal.OTHER


def test_a_running_nbd_server_exists() -> None:
    exc = QemuCommandError("nbd-server-start", "GenericError", "NBD server already running")
    assert refusal(exc) is Refusal.EXISTS


async def test_removing_what_is_missing_is_done(fake: FakeQmp, monitor: QemuMonitor) -> None:
    await delete_node(monitor, "backupd-scratch-0")
    await delete_export(monitor, "backupd-export-0")
    await cancel_job(monitor, "backupd-job-0")
    await remove_bitmap(monitor, "drive-vda", "backupd-nosuch")
    await remove_bitmap(monitor, "nosuch-node", "backupd-nosuch")
    await stop_nbd_server(monitor)
    sent = [name for name, _ in fake.commands]
    assert sent == [
        "blockdev-del",
        "block-export-del",
        "block-job-cancel",
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-remove",
        "nbd-server-stop",
    ]


async def test_other_refusals_reach_the_caller(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor
) -> None:
    with pytest.raises(QemuCommandError, match="Node drive-vda is in use"):
        await delete_node(monitor, "drive-vda")  # the guest device uses it
    await export_vda(monitor, fake, bitmap="x")
    with pytest.raises(QemuCommandError, match="currently in use by another operation"):
        await remove_bitmap(monitor, "drive-vda", "x")
    fake.fail("block-export-del", "Export 'e' is already shutting down")
    with pytest.raises(QemuCommandError, match="already shutting down"):
        await delete_export(monitor, "e")
    assert "e" in qemu.exports


async def test_an_export_is_gone_only_with_its_event(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor
) -> None:
    """qemu answers block-export-del at once; the bitmap stays busy until the event."""
    fake.export_delete_delay = 0.2
    await export_vda(monitor, fake, bitmap="x")
    await delete_export(monitor, "e")
    assert qemu.exports == {}
    await remove_bitmap(monitor, "drive-vda", "x")  # no longer busy
    assert fake.timeline[-2].startswith("<- BLOCK_EXPORT_DELETED")


async def test_an_event_that_never_comes_is_an_error(
    fake: FakeQmp, monitor: QemuMonitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blockops, "TEARDOWN_TIMEOUT", 0.2)
    fake.export_delete_delay = 60
    await export_vda(monitor, fake)
    with pytest.raises(QemuError, match=r"did not send the expected event within 0\.2 s"):
        await delete_export(monitor, "e")


async def test_put_back_only_from_the_filter(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor
) -> None:
    """The guest device is not on the filter (the redirect never happened): nothing is
    sent, because qemu 7.2 aborts on a qom-set to the node a device has already."""
    (fake.path.parent / "s.raw").write_bytes(b"")
    await monitor.execute(
        "blockdev-add",
        {"driver": "file", "node-name": "s", "filename": str(fake.path.parent / "s.raw")},
    )
    await monitor.execute(
        "blockdev-add",
        {
            "driver": "copy-before-write",
            "node-name": "backupd-cbw-0",
            "file": "drive-vda",
            "target": "s",
        },
    )
    assert not await put_back(monitor, VDA, "backupd-cbw-0", "drive-vda")
    assert fake.called("qom-set") == []
    await redirect(monitor, VDA, "backupd-cbw-0")
    assert await put_back(monitor, VDA, "backupd-cbw-0", "drive-vda")
    assert qemu.devices[0].root == "drive-vda" and qemu.crashed is None
    with pytest.raises(QemuError, match="connection to qemu lost during qom-set"):
        await redirect(monitor, VDA, "drive-vda")
    assert qemu.crashed is not None and "old_bs != new_bs" in qemu.crashed


async def test_filter_child_from_the_block_graph(fake: FakeQmp, monitor: QemuMonitor) -> None:
    (fake.path.parent / "s.raw").write_bytes(b"")
    await monitor.execute(
        "blockdev-add",
        {"driver": "file", "node-name": "s", "filename": str(fake.path.parent / "s.raw")},
    )
    await monitor.execute(
        "blockdev-add",
        {
            "driver": "copy-before-write",
            "node-name": "backupd-cbw-0",
            "file": "drive-vdb",
            "target": "s",
        },
    )
    assert await filter_child(monitor, "backupd-cbw-0") == "drive-vdb"
    assert await filter_child(monitor, "nosuch") is None
    fake.fail(
        "x-debug-query-block-graph",
        "The command x-debug-query-block-graph has not been found",
        error_class="CommandNotFound",
    )
    assert await filter_child(monitor, "backupd-cbw-0") is None


@pytest.mark.parametrize("auto_dismiss", [True, False])
async def test_cancel_job_waits_for_its_end(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, auto_dismiss: bool
) -> None:
    scratch = fake.path.parent / "s.qcow2"
    scratch.write_bytes(b"QFI\xfb" + bytes(60))
    await monitor.execute(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "backupd-scratch-0",
            "file": {"driver": "file", "filename": str(scratch)},
            "backing": "drive-vda",
        },
    )
    await monitor.execute(
        "blockdev-backup",
        {
            "device": "drive-vda",
            "target": "backupd-scratch-0",
            "sync": "none",
            "job-id": "backupd-job-0",
            "filter-node-name": "backupd-cbw-0",
            "auto-dismiss": auto_dismiss,
        },
    )
    assert qemu.devices[0].root == "backupd-cbw-0"  # the job's filter took the disk's place
    with pytest.raises(QemuCommandError, match="in use by block job"):
        await delete_node(monitor, "backupd-scratch-0")
    await cancel_job(monitor, "backupd-job-0")
    assert qemu.jobs == {} and qemu.devices[0].root == "drive-vda"
    assert any(line.startswith("<- BLOCK_JOB_CANCELLED") for line in fake.timeline)
    await delete_node(monitor, "backupd-scratch-0")
    assert sorted(n for n in qemu.nodes if not n.startswith("#")) == ["drive-vda", "drive-vdb"]
    assert len(qemu.nodes) == 4  # the disks and their file nodes: the inline child went too


async def test_only_its_own_event_ends_the_wait(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor
) -> None:
    fake.export_delete_delay = 0.3
    await export_vda(monitor, fake)
    task = asyncio.create_task(delete_export(monitor, "e"))
    await asyncio.sleep(0.1)
    await fake.send_event("BLOCK_EXPORT_DELETED", {"id": "another"})
    await asyncio.sleep(0.05)
    assert not task.done() and "e" in qemu.exports
    await task
    assert qemu.exports == {}
