"""Offline backups on real qemu: a VM whose qemu is not running is backed up from its
images (backupd's own qemu-storage-daemon), in the same chain as its online backups."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from qemu.qmp import ConnectError, QMPClient

from backupd.config import load_config
from backupd.private import private_dir
from backupd.qemu.storage_daemon import QMP_SOCKET, daemon_argv, live_daemon
from backupd.sources import daemon_folder
from integration.conftest import MiB, backupd, write_config
from integration.harness.chain import (
    backups,
    checkpoint_bitmap,
    first_difference,
    qemu_img_check,
    read_image,
)
from integration.harness.images import digest, image_bitmaps, images_of, wait_until_free
from integration.harness.vm import QemuVM


@pytest.fixture
async def two_disks(tmp_path: Path, sockdir: Path) -> AsyncIterator[QemuVM]:
    machine = QemuVM(tmp_path / "vm", {"vda": 32 * MiB, "vdb": 16 * MiB}, sockdir=sockdir)
    machine.workdir.mkdir()
    await machine.start()
    try:
        yield machine
    finally:
        await machine.kill()


def manifests(repo: Path, vm: str = "guest1") -> list[dict[str, object]]:
    return [json.loads((p / "manifest.json").read_text()) for p in backups(repo, vm)]


def assert_restores(repo: Path, points: dict[str, dict[str, bytes]], tmp: Path) -> None:
    """Every committed backup reads back as the model of its point, disk by disk."""
    found = backups(repo)
    assert [p.name for p in found] == sorted(points)
    for folder in found:
        for disk, expected in points[folder.name].items():
            image = folder / f"{disk}.qcow2"
            qemu_img_check(image)
            assert first_difference(read_image(image, tmp), expected) is None, (folder, disk)


def assert_latest(repo: Path, vm: QemuVM, tmp: Path) -> None:
    """The newest backup reads back as the disks are now."""
    newest = backups(repo)[-1]
    for disk, expected in vm.snapshot().items():
        data = read_image(newest / f"{disk}.qcow2", tmp)
        assert first_difference(data, expected) is None, (newest, disk)


def assert_clean_images(machine: QemuVM, repo: Path) -> None:
    """The images, closed: qemu-img check clean (it takes the lock: no daemon holds
    them), only the newest backup's bitmap, recording and not in use."""
    newest = checkpoint_bitmap(backups(repo)[-1])
    for image in machine.images.values():
        out = wait_until_free(image)
        assert out.returncode == 0, out.stdout + out.stderr
        assert image_bitmaps(image) == {newest: ["auto"]}, image


async def test_chain_online_offline_online(
    two_disks: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    vm = two_disks
    config = config_for(vm, images=images_of(vm))
    repo = tmp_path / "repo"
    points: dict[str, dict[str, bytes]] = {}

    async def run(source: str, kind: str) -> dict[str, object]:
        result = backupd(config, "run", "--vm", "guest1")
        assert result.returncode == 0, result.stderr
        assert f"source={source}" in result.stderr and f"kind={kind}" in result.stderr
        points[backups(repo)[-1].name] = vm.snapshot()
        return manifests(repo)[-1]

    await vm.write("vda", 0, 4 * MiB, 0x11)
    await vm.write("vdb", 1 * MiB, 2 * MiB, 0x12)
    await run("online", "full")
    await vm.write("vda", 8 * MiB, 1 * MiB, 0x21)
    await run("online", "incremental")
    # changes after the last online backup, then a graceful shutdown stores the bitmaps
    await vm.write("vda", 12 * MiB, 256 * 1024, 0x31)
    await vm.write("vdb", 0, 128 * 1024, 0x32)
    await vm.write_zeroes("vda", 0, 64 * 1024)
    await vm.quit()
    offline = await run("offline", "incremental")
    assert offline["source"] == "offline"
    copied = {d: r["bytes_copied"] for d, r in offline["disks"].items()}  # type: ignore[attr-defined]
    # the zeroed range is stored as zero clusters, not copied
    assert copied == {"vda": 256 * 1024, "vdb": 128 * 1024}
    assert_clean_images(vm, repo)
    # the VM starts again on the same images, its bitmaps recording
    await vm.start()
    for disk in vm.disks:
        (bitmap,) = await vm.bitmaps(disk)
        assert bitmap["recording"] and not bitmap.get("inconsistent"), bitmap
    await vm.write("vda", 20 * MiB, 512 * 1024, 0x41)
    await vm.write("vdb", 8 * MiB, 64 * 1024, 0x42)
    last = await run("online", "incremental")
    copied = {d: r["bytes_copied"] for d, r in last["disks"].items()}  # type: ignore[attr-defined]
    assert copied == {"vda": 512 * 1024, "vdb": 64 * 1024}
    found = manifests(repo)
    assert [m["kind"] for m in found] == ["full"] + ["incremental"] * 3
    assert [m["source"] for m in found] == ["online", "online", "offline", "online"]
    assert [m["parent"] for m in found[1:]] == [m["id"] for m in found[:-1]]
    assert_restores(repo, points, tmp_path)
    listed = json.loads(backupd(config, "list", "--json").stdout)
    assert [row["source"] for row in listed] == ["online", "online", "offline", "online"]


async def test_status_and_summary_say_offline(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm, images=images_of(vm))
    await vm.write("vda", 0, MiB, 0x51)
    await vm.quit()
    result = backupd(config, "run", "--vm", "guest1")
    assert result.returncode == 0, result.stderr
    summary = [line for line in result.stderr.splitlines() if "summary:" in line]
    assert len(summary) == 1 and " source=offline " in summary[0], result.stderr
    status = json.loads(backupd(config, "status", "--json").stdout)[0]
    assert status["last_success_source"] == "offline" and status["last_source"] == "offline"
    text = backupd(config, "status").stdout
    assert "crash-consistent, offline)" in text, text
    assert_latest(tmp_path / "repo", vm, tmp_path)


async def test_full_when_the_bitmap_is_missing_inconsistent_or_the_disk_resized(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm, images=images_of(vm))
    repo = tmp_path / "repo"
    image = vm.images["vda"]
    await vm.write("vda", 0, 2 * MiB, 0x61)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    await vm.quit()

    def offline_run(reason: str) -> None:
        result = backupd(config, "run", "--vm", "guest1")
        assert result.returncode == 0, result.stderr
        assert "kind=full" in result.stderr and reason in result.stderr, result.stderr
        assert_latest(repo, vm, tmp_path)
        assert image_bitmaps(image) == {checkpoint_bitmap(backups(repo)[-1]): ["auto"]}

    # missing: removed while the VM was off
    subprocess.run(
        ["qemu-img", "bitmap", "--remove", str(image), checkpoint_bitmap(backups(repo)[-1])],
        check=True,
    )
    offline_run(f"bitmap {checkpoint_bitmap(backups(repo)[-1])} is missing on disk vda")
    # inconsistent: a qemu that opened the image crashed
    await vm.start()
    await vm.write("vda", 4 * MiB, MiB, 0x62)
    await vm.flush("vda")
    await vm.kill()
    assert image_bitmaps(image) == {checkpoint_bitmap(backups(repo)[-1]): ["in-use", "auto"]}
    offline_run("is inconsistent")
    # resized while off
    subprocess.run(["qemu-img", "resize", "-q", str(image), str(40 * MiB)], check=True)
    vm.model["vda"] += bytes(8 * MiB)
    offline_run(f"disk vda was resized ({32 * MiB} -> {40 * MiB} bytes)")


async def test_locked_image_refused(vm: QemuVM, tmp_path: Path, sockdir: Path) -> None:
    """A running VM whose QMP socket path in the configuration is wrong: refused with one
    line, nothing committed, the image untouched, no daemon left."""
    config = write_config(
        tmp_path / "backupd.yaml",
        tmp_path / "repo",
        {"guest1": {"qmp": str(sockdir / "wrong.sock"), "images": images_of(vm)}},
        scratch_dir=str(tmp_path / "scratch"),
        runtime_dir=str(sockdir),
    )
    await vm.write("vda", 0, MiB, 0x71)
    await vm.flush("vda")
    before = digest(vm.images["vda"])
    bitmaps = await vm.bitmaps("vda")
    result = backupd(config, "run", "--vm", "guest1")
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 2, result.stderr  # the refusal and the summary
    assert (
        f"image {vm.images['vda']} of disk vda is locked by another process: the VM is "
        f"running, but its QMP socket {sockdir / 'wrong.sock'} does not exist; no backup "
        "was taken"
    ) in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    assert backups(tmp_path / "repo") == []
    assert not any((tmp_path / "repo" / "guest1").glob(".tmp-*"))
    assert digest(vm.images["vda"]) == before
    assert await vm.bitmaps("vda") == bitmaps
    (folder,) = sockdir.glob("*.images")
    assert live_daemon(folder) is None and not (folder / "qmp.sock").exists()


async def test_raw_image_full_every_time(
    tmp_path: Path, sockdir: Path, config_for: Callable[..., Path]
) -> None:
    """A VM with a qcow2 and a raw disk: full backups online and offline, each saying
    why; the raw image gets no bitmap, the qcow2 one keeps only the newest."""
    vm = QemuVM(
        tmp_path / "vm", {"vda": 16 * MiB, "vdb": 16 * MiB}, sockdir=sockdir, formats={"vdb": "raw"}
    )
    vm.workdir.mkdir()
    await vm.start()
    try:
        images: dict[str, object] = {
            "vda": str(vm.images["vda"]),
            "vdb": {"path": str(vm.images["vdb"]), "format": "raw"},
        }
        config = config_for(vm, images=images)
        repo = tmp_path / "repo"
        reason = "kind=full (disk vdb is a raw image, which holds no dirty bitmaps: only full"
        for turn in range(3):
            await vm.write("vdb", turn * MiB, MiB, 0x91 + turn)
            await vm.write("vda", turn * MiB, 64 * 1024, 0xA1 + turn)
            if turn == 2:
                await vm.quit()
            result = backupd(config, "run", "--vm", "guest1")
            assert result.returncode == 0, result.stderr
            assert reason in result.stderr, result.stderr
            assert ("source=offline" in result.stderr) == (turn == 2)
            assert_latest(repo, vm, tmp_path)
        refused = backupd(config, "run", "--vm", "guest1", "--incremental")
        assert refused.returncode == 1
        assert "an incremental backup is not possible: disk vdb is a raw image" in refused.stderr
        assert image_bitmaps(vm.images["vda"]) == {checkpoint_bitmap(backups(repo)[-1]): ["auto"]}
        assert [m["kind"] for m in manifests(repo)] == ["full"] * 3
    finally:
        await vm.kill()


async def test_leftover_daemon_is_stopped(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, sockdir: Path
) -> None:
    """A daemon left from an earlier run, holding the image (and stopped, so SIGTERM
    alone would not end it): the next run ends it and backs up."""
    config = config_for(vm, images=images_of(vm))
    await vm.write("vda", 0, MiB, 0x81)
    await vm.quit()
    folder = private_dir(daemon_folder(sockdir, load_config(config).vm("guest1")), "test")
    leftover = subprocess.Popen(daemon_argv(folder), start_new_session=True)
    try:
        client = QMPClient("test")
        for _ in range(200):
            try:
                await client.connect(str(folder / QMP_SOCKET))
                break
            except ConnectError:
                await asyncio.sleep(0.05)
        await client.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "held",
                "file": {"driver": "file", "filename": str(vm.images["vda"])},
            },
        )
        await client.disconnect()
        os.kill(leftover.pid, signal.SIGSTOP)
        result = backupd(config, "run", "--vm", "guest1")
        assert result.returncode == 0, result.stderr
        assert f"stopping the qemu-storage-daemon (pid {leftover.pid})" in result.stderr
        assert leftover.wait(10) == 0  # it closed the image cleanly
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
    assert_latest(tmp_path / "repo", vm, tmp_path)
    assert_clean_images(vm, tmp_path / "repo")
