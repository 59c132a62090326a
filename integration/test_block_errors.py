"""How backupd reads qemu's refusals, checked against the real qemu: a missing node,
export, job, bitmap or NBD server is "missing" (by the error class where qemu has one,
else by its words), a refusal of something that exists is not; and the put-back of a
guest device never sends the ``qom-set`` that aborts qemu."""

from __future__ import annotations

from typing import Any

import pytest

from backupd.errors import QemuCommandError, QemuError
from backupd.qemu.blockops import (
    Refusal,
    cancel_job,
    delete_export,
    delete_node,
    put_back,
    redirect,
    refusal,
    remove_bitmap,
    stop_nbd_server,
)
from backupd.qemu.qmp import QemuMonitor
from integration.harness.vm import QemuVM

pytestmark = pytest.mark.qemu

VDA = "/machine/peripheral/vda/virtio-backend"

MISSING: list[tuple[str, dict[str, Any]]] = [
    ("blockdev-del", {"node-name": "backupd-nosuch"}),
    ("block-export-del", {"id": "backupd-nosuch", "mode": "hard"}),
    ("block-job-cancel", {"device": "backupd-nosuch", "force": True}),
    ("job-dismiss", {"id": "backupd-nosuch"}),
    ("block-dirty-bitmap-remove", {"node": "drive-vda", "name": "backupd-nosuch"}),
    ("block-dirty-bitmap-remove", {"node": "backupd-nosuch", "name": "backupd-nosuch"}),
    ("nbd-server-stop", {}),
    ("qom-set", {"path": "/machine/peripheral/nosuch", "property": "drive", "value": "x"}),
]


async def refused(monitor: QemuMonitor, command: str, args: dict[str, Any]) -> QemuCommandError:
    with pytest.raises(QemuCommandError) as caught:
        await monitor.execute(command, args)
    return caught.value


async def test_what_qemu_says_is_missing_is_missing(vm: QemuVM) -> None:
    async with QemuMonitor(str(vm.qmp_path)) as monitor:
        for command, args in MISSING:
            error = await refused(monitor, command, args)
            assert refusal(error) is Refusal.MISSING, (error.error_class, error.description)
        # and so the verbs that undo things are done at once
        await delete_node(monitor, "backupd-nosuch")
        await delete_export(monitor, "backupd-nosuch")
        await cancel_job(monitor, "backupd-nosuch")
        await remove_bitmap(monitor, "drive-vda", "backupd-nosuch")
        await stop_nbd_server(monitor)


async def test_what_qemu_refuses_otherwise_is_not(vm: QemuVM, tmp_path: Any) -> None:
    async with QemuMonitor(str(vm.qmp_path)) as monitor:
        error = await refused(monitor, "blockdev-del", {"node-name": "drive-vda"})
        assert refusal(error) is Refusal.OTHER, error.description  # in use by the device
        server = {"addr": {"type": "unix", "data": {"path": str(vm.qmp_path.parent / "n.sock")}}}
        await monitor.execute("nbd-server-start", server)
        error = await refused(monitor, "nbd-server-start", server)
        assert refusal(error) is Refusal.EXISTS, error.description
        bitmap = {"node": "drive-vda", "name": "backupd-t"}
        await monitor.execute("block-dirty-bitmap-add", {**bitmap, "disabled": True})
        await monitor.execute(
            "block-export-add",
            {"type": "nbd", "id": "e", "node-name": "drive-vda", "bitmaps": ["backupd-t"]},
        )
        error = await refused(monitor, "block-dirty-bitmap-remove", bitmap)
        assert refusal(error) is Refusal.OTHER, error.description  # busy
        with pytest.raises(QemuCommandError, match="in use"):
            await delete_node(monitor, "drive-vda")
        await delete_export(monitor, "e")  # waits for BLOCK_EXPORT_DELETED: then not busy
        await remove_bitmap(monitor, "drive-vda", "backupd-t")
        await stop_nbd_server(monitor)


async def test_a_device_is_put_back_only_from_the_filter(vm: QemuVM) -> None:
    """qemu 7.2 aborts on a qom-set of a device's drive to the node it has."""
    async with QemuMonitor(str(vm.qmp_path)) as monitor:
        assert not await put_back(monitor, VDA, "backupd-cbw-0", "drive-vda")
        assert (await monitor.execute("query-status"))["status"] == "prelaunch"  # alive
        with pytest.raises(QemuError, match="connection to qemu lost during qom-set"):
            await redirect(monitor, VDA, "drive-vda")
    assert vm.proc is not None and vm.proc.wait(timeout=10) != 0
    vm.proc = None  # reaped: nothing left for the fixture to kill
