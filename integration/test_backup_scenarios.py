"""backupd run in the situations a backup tool meets: writes during the copy, several
disks, qemu restarts and crashes, a killed run, concurrent runs, a guest agent,
compression, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from backupd.backup import RunHooks, run_backup
from backupd.config import load_config
from integration.conftest import MiB, backupd
from integration.harness.chain import (
    backups,
    checkpoint_bitmap,
    first_difference,
    qemu_img_check,
    read_image,
)
from integration.harness.vm import QemuVM


def assert_point(folder: Path, disk: str, expected: bytes, tmp: Path) -> None:
    image = folder / f"{disk}.qcow2"
    qemu_img_check(image)
    assert first_difference(read_image(image, tmp), expected) is None, f"{folder.name}/{disk}"


METHODS = pytest.mark.parametrize("fleecing", ["snapshot-access", "blockdev-backup"])


@METHODS
async def test_writes_during_the_copy_go_to_the_next_backup(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, fleecing: str
) -> None:
    config = load_config(config_for(vm, fleecing=fleecing))
    await vm.write("vda", 0, 2 * MiB, 0xA1)
    before = vm.snapshot()

    async def guest_writes() -> None:  # after the point in time, before the copy
        await vm.write("vda", 0, 65536, 0xB2)
        await vm.write("vda", 10 * MiB, 65536, 0xB3)

    first = await run_backup(
        config, config.vm("guest1"), hooks=RunHooks(after_point_in_time=guest_writes)
    )
    second = await run_backup(config, config.vm("guest1"))
    assert (first.kind, second.kind) == ("full", "incremental")
    repo = tmp_path / "repo"
    assert_point(repo / "guest1" / first.id, "vda", before["vda"], tmp_path)
    assert_point(repo / "guest1" / second.id, "vda", vm.snapshot()["vda"], tmp_path)
    assert second.disks["vda"].bytes_copied == 2 * 65536

    # the same during an incremental
    async def more_writes() -> None:
        await vm.write("vda", 65536, 65536, 0xB4)
        await vm.write("vda", 12 * MiB, 4096, 0xB5)

    await vm.write("vda", 20 * MiB, 65536, 0xB6)
    before = vm.snapshot()
    third = await run_backup(
        config, config.vm("guest1"), hooks=RunHooks(after_point_in_time=more_writes)
    )
    fourth = await run_backup(config, config.vm("guest1"))
    assert (third.kind, fourth.kind) == ("incremental", "incremental")
    assert_point(repo / "guest1" / third.id, "vda", before["vda"], tmp_path)
    assert_point(repo / "guest1" / fourth.id, "vda", vm.snapshot()["vda"], tmp_path)
    assert fourth.disks["vda"].bytes_copied == 2 * 65536


@METHODS
async def test_two_disks_one_instant(
    tmp_path: Path, sockdir: Path, config_for: Callable[..., Path], fleecing: str
) -> None:
    machine = QemuVM(tmp_path / "vm2", {"vda": 16 * MiB, "vdb": 8 * MiB}, sockdir=sockdir)
    machine.workdir.mkdir()
    await machine.start()
    try:
        config = load_config(config_for(machine, fleecing=fleecing))
        await machine.write("vda", MiB, MiB, 0x01)
        await machine.write("vdb", 0, MiB, 0x02)
        expected = machine.snapshot()

        async def both() -> None:
            await machine.write("vda", MiB, 4096, 0x03)
            await machine.write("vdb", 0, 4096, 0x04)

        manifest = await run_backup(
            config, config.vm("guest1"), hooks=RunHooks(after_point_in_time=both)
        )
        assert sorted(manifest.disks) == ["vda", "vdb"]
        folder = tmp_path / "repo" / "guest1" / manifest.id
        for disk in ("vda", "vdb"):
            assert_point(folder, disk, expected[disk], tmp_path)
        again = await run_backup(config, config.vm("guest1"))
        assert again.kind == "incremental"
        folder = tmp_path / "repo" / "guest1" / again.id
        for disk in ("vda", "vdb"):
            assert_point(folder, disk, machine.snapshot()[disk], tmp_path)
    finally:
        await machine.kill()


async def test_qemu_restart_and_crash(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm)
    await vm.write("vda", 0, MiB, 0x10)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    await vm.quit()  # graceful: persistent bitmaps are stored in the image
    await vm.start()
    await vm.write("vda", 4 * MiB, 65536, 0x11)
    result = backupd(config, "run", "--vm", "guest1")
    assert result.returncode == 0, result.stderr
    assert "incremental" in result.stderr
    await vm.quit()
    await vm.start()  # the bitmap is now loaded from the image (flagged in-use)
    await vm.write("vda", 6 * MiB, 65536, 0x12)
    await vm.flush("vda")
    await vm.kill()  # crash: the loaded bitmap comes back inconsistent
    await vm.start()
    result = backupd(config, "run", "--vm", "guest1")
    assert result.returncode == 0, result.stderr
    assert "kind=full" in result.stderr and "inconsistent" in result.stderr
    found = backups(tmp_path / "repo")
    kinds = [json.loads((f / "manifest.json").read_text())["kind"] for f in found]
    assert kinds == ["full", "incremental", "full"]
    assert_point(found[-1], "vda", vm.snapshot()["vda"], tmp_path)
    names = [b["name"] for b in await vm.bitmaps("vda")]
    assert names == [checkpoint_bitmap(found[-1])]


@pytest.mark.parametrize(
    "point", ["after-transaction", "mid-copy", "before-rename", "after-commit"]
)
async def test_killed_run_loses_nothing(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, point: str
) -> None:
    config = config_for(vm)
    repo = tmp_path / "repo"
    await vm.write("vda", 0, 4 * MiB, 0x21)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    await vm.write("vda", 8 * MiB, 2 * MiB, 0x22)
    env = {**os.environ, "BACKUPD_FAULT": point}
    killed = subprocess.run(
        [sys.executable, "-m", "backupd", "-c", str(config), "run", "--vm", "guest1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert killed.returncode == -signal.SIGKILL
    committed = point == "after-commit"
    assert len(backups(repo)) == (2 if committed else 1)
    await vm.write("vda", 12 * MiB, 65536, 0x23)
    result = backupd(config, "run", "--vm", "guest1")
    assert result.returncode == 0, result.stderr
    assert "removed leftover" in result.stderr or committed or point == "before-rename"
    found = backups(repo)
    assert_point(found[-1], "vda", vm.snapshot()["vda"], tmp_path)
    assert json.loads((found[-1] / "manifest.json").read_text())["kind"] == "incremental"
    state = await vm.state()
    assert state == {"exports": [], "jobs": [], "nodes": ["drive-vda"]}
    assert [b["name"] for b in await vm.bitmaps("vda")] == [checkpoint_bitmap(found[-1])]
    assert not [p for p in (repo / "guest1").iterdir() if p.name.startswith(".tmp-")]
    assert not list((tmp_path / "scratch").rglob("*.qcow2"))


async def test_second_run_on_a_vm_is_refused(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm)
    await vm.write("vda", 0, 8 * MiB, 0x31)
    from backupd.lock import vm_lock

    with vm_lock(tmp_path / "repo" / "guest1" / ".lock", "guest1", purpose="test holder"):
        result = backupd(config, "run", "--vm", "guest1")
    assert result.returncode == 3
    assert "busy" in result.stderr and "test holder" in result.stderr
    assert "Traceback" not in result.stderr
    assert backupd(config, "run", "--vm", "guest1").returncode == 0


async def test_compressed_backups(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm, compress=True)
    await vm.write("vda", 0, 4 * MiB, 0x41)
    await vm.write("vda", 32 * MiB - 65536, 65536, 0x42)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    await vm.write("vda", 65536, 65536, 0x43)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    found = backups(tmp_path / "repo")
    full = json.loads((found[0] / "manifest.json").read_text())["disks"]["vda"]
    assert full["compressed"] and full["bytes_stored"] < full["bytes_copied"] // 10
    assert_point(found[-1], "vda", vm.snapshot()["vda"], tmp_path)


async def test_cli_errors(vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path) -> None:
    def check(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
        assert result.returncode == code, result.stderr
        assert text in result.stderr
        assert "Traceback" not in result.stderr

    good = config_for(vm)
    bad = tmp_path / "bad.yaml"
    bad.write_text("repository: /x\nvms:\n  guest1: {qmp: /x, dsiks: [vda]}\n")
    check(backupd(bad, "run", "--vm", "guest1"), 2, "unknown configuration key 'vms.guest1.dsiks'")
    bad.write_text("repository: [unclosed\n")
    check(backupd(bad, "run", "--vm", "guest1"), 2, "malformed YAML")
    check(backupd(good, "run", "--vm", "nosuch"), 2, "unknown VM 'nosuch'")
    check(
        backupd(good, "run", "--vm", "guest1", "--incremental"),
        1,
        "an incremental backup is not possible: no committed backup yet",
    )
    missing = config_for(vm, name="ghost")
    text = missing.read_text().replace(str(vm.qmp_path), str(tmp_path / "none.sock"))
    missing.write_text(text)
    check(backupd(missing, "run", "--vm", "ghost"), 1, "does not exist")
    not_socket = tmp_path / "plain"
    not_socket.write_text("")
    missing.write_text(text.replace(str(tmp_path / "none.sock"), str(not_socket)))
    check(backupd(missing, "run", "--vm", "ghost"), 1, "is not a socket")
    disk = config_for(vm, disks=["vdz"])
    check(backupd(disk, "run", "--vm", "guest1"), 2, "no disk 'vdz'")
    assert not backups(tmp_path / "repo")


async def test_disk_chosen_by_node_name(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    """A disk named by its block node (no guest device found under that name) is backed
    up through that node with the method that needs no device, then incrementally;
    and a snapshot-access request is refused with the reason (a configuration error)."""
    config = config_for(vm, disks=["drive-vda"])
    await vm.write("vda", MiB, 2 * MiB, 0x5A)
    result = backupd(config, "run", "--vm", "guest1")
    assert result.returncode == 0, result.stderr
    await vm.write("vda", 8 * MiB, 65536, 0x5B)
    result = backupd(config, "run", "--vm", "guest1")
    assert result.returncode == 0 and "kind=incremental" in result.stderr, result.stderr
    found = backups(tmp_path / "repo")
    assert [p.name for p in (found[-1]).glob("*.qcow2")] == ["drive-vda.qcow2"]
    assert_point(found[-1], "drive-vda", vm.snapshot()["vda"], tmp_path)
    forced = config_for(vm, disks=["drive-vda"], fleecing="snapshot-access")
    refused = backupd(forced, "run", "--vm", "guest1")
    assert refused.returncode == 2 and "drive-vda has none" in refused.stderr, refused.stderr
