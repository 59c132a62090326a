"""Faults of offline runs on real qemu: SIGKILL of backupd at every phase (its
qemu-storage-daemon must close the images cleanly and die with it), SIGTERM and a
Ctrl-C mid-copy, and an offline run beside an online one.  Each scenario records its
trials in the fault summary table (changes lost must be 0)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from backupd.config import load_config
from backupd.qemu.storage_daemon import live_daemon
from backupd.sources import daemon_folder
from integration.conftest import MiB, backupd, write_config
from integration.faults_table import record
from integration.harness.chain import backups, first_difference, read_image
from integration.harness.images import image_bitmaps, images_of, wait_until_free
from integration.harness.runs import argv, leftovers, lost_changes, run_env, wait_for_staging
from integration.harness.vm import QemuVM

#: the points an offline run passes, its own steps included (after-daemon: the daemon
#: listens, no image open; mid-images: an image is open; after-quit: the daemon was
#: asked to quit after the commit)
POINTS = [
    "after-lock",
    "after-daemon",
    "mid-images",
    "after-cleanup",
    "after-plan",
    "after-transaction",
    "after-export",
    "mid-copy@1",
    "mid-copy@3",
    "mid-copy@8",
    "after-copy",
    "after-teardown",
    "before-manifest",
    "before-rename",
    "after-commit",
    "mid-rotate",
    "after-rotate",
    "after-quit",
]


async def scatter(vm: QemuVM, rng: random.Random, count: int) -> None:
    size = vm.disks["vda"]
    for _ in range(count):
        offset = rng.randrange(0, size // 65536) * 65536
        await vm.write("vda", offset, 65536, rng.randrange(1, 256))


def images_closed_cleanly(vm: QemuVM) -> str:
    """What is wrong with the images now that nothing should hold them: "" when
    qemu-img check (with the lock) is clean and no bitmap is left in use."""
    image = vm.images["vda"]
    check = wait_until_free(image)
    if check.returncode != 0:
        return f"qemu-img check: {check.stdout}{check.stderr}"
    in_use = [name for name, flags in image_bitmaps(image).items() if "in-use" in flags]
    return f"bitmaps left in use: {in_use}" if in_use else ""


def daemon_of(config: Path, runtime: Path) -> Path:
    return daemon_folder(runtime, load_config(config).vm("guest1"))


@pytest.mark.slow
async def test_sigkill_at_every_offline_phase(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, sockdir: Path
) -> None:
    """Kill backupd at each point of an offline run; then the images must be clean and
    free (the daemon died with backupd), qemu must start on them with consistent
    bitmaps, and the next run (online or offline, in turn) must have every change."""
    config = config_for(vm, images=images_of(vm), request_size="64K")
    repo = tmp_path / "repo"
    rng = random.Random(7)
    points: dict[str, bytes] = {}
    await scatter(vm, rng, 20)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    points[backups(repo)[-1].name] = vm.snapshot()["vda"]
    for turn, point in enumerate(POINTS):
        await scatter(vm, rng, 24)
        await vm.quit()
        before = {p.name for p in backups(repo)}
        snapshot = vm.snapshot()["vda"]
        proc = run_env(config, point)
        _, killed_err = proc.communicate(timeout=60)
        killed = proc.returncode == -signal.SIGKILL
        for folder in backups(repo):
            if folder.name not in before:
                points[folder.name] = snapshot  # committed before it was killed
        damage = images_closed_cleanly(vm)
        daemon_gone = live_daemon(daemon_of(config, sockdir)) is None
        await vm.start()  # qemu opens the images as usual
        inconsistent = [b for b in await vm.bitmaps("vda") if b.get("inconsistent")]
        await scatter(vm, rng, 3)
        if turn % 2:  # the next run offline
            await vm.quit()
            result = backupd(config, "run", "--vm", "guest1")
            await vm.start()
        else:
            result = backupd(config, "run", "--vm", "guest1")
        ok = result.returncode == 0 and "kind=incremental" in result.stderr
        if result.returncode == 0:
            points[backups(repo)[-1].name] = vm.snapshot()["vda"]
        left = await leftovers(vm, repo, tmp_path / "scratch")
        lost = lost_changes(points, repo, tmp_path, latest_only=True)
        record(
            "SIGKILL of an offline run at a phase: images clean, then a run",
            failed=not (killed and not damage and daemon_gone and not inconsistent)
            or not (ok and not left),
            lost=lost,
        )
        assert killed, f"{point}: not killed ({proc.returncode}): {killed_err}"
        assert not damage, f"{point}: {damage}"
        assert daemon_gone, f"{point}: the daemon outlived backupd"
        assert not inconsistent, f"{point}: {inconsistent}"
        assert ok, f"{point}: next run: {result.stderr}"
        assert not left, f"{point}: leftovers {left}"
        assert lost == 0, point
    total = lost_changes(points, repo, tmp_path)
    record("every committed point restored after the offline kills", failed=total > 0, lost=total)
    assert total == 0


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C", "systemctl stop"])
async def test_signal_mid_offline_copy(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, sockdir: Path, how: str
) -> None:
    """SIGTERM to backupd, or SIGINT to its whole process group as a terminal's Ctrl-C
    sends it: the run stops, commits nothing, and stops its daemon itself (which, in a
    session of its own, never saw the Ctrl-C), leaving the images clean.  Or SIGTERM to
    backupd and its daemon at once, as ``systemctl stop`` sends it to the unit's whole
    control group: the daemon closes the images itself, and the run still ends cleanly."""
    config = config_for(vm, images=images_of(vm), request_size="64K", requests=1)
    repo = tmp_path / "repo"
    await vm.write("vda", 0, 8 * MiB, 0x31)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    await vm.write("vda", 8 * MiB, 8 * MiB, 0x32)
    await vm.quit()
    env = {**os.environ, "BACKUPD_FAULT": "mid-copy:hang"}
    proc = subprocess.Popen(
        argv(config, "run", "--vm", "guest1"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, so the Ctrl-C reaches it alone
    )
    try:
        await wait_for_staging(repo, proc)
        if how == "Ctrl-C":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        if how == "systemctl stop":
            daemon = live_daemon(daemon_of(config, sockdir))
            assert daemon is not None
            os.kill(daemon, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    expected = 130 if how == "Ctrl-C" else 143
    damage = images_closed_cleanly(vm)
    daemon_gone = live_daemon(daemon_of(config, sockdir)) is None
    warnings = [line for line in err.splitlines() if "WARNING" in line and "teardown" in line]
    result = backupd(config, "run", "--vm", "guest1")
    lost = 0 if result.returncode == 0 else 1
    if result.returncode == 0:
        latest = read_image(backups(repo)[-1] / "vda.qcow2", tmp_path)
        lost = 0 if first_difference(latest, vm.snapshot()["vda"]) is None else 1
    record(
        f"{how} mid offline copy: nothing committed, daemon stopped, images clean",
        failed=not (proc.returncode == expected and not damage and daemon_gone),
        lost=lost,
    )
    assert proc.returncode == expected, err
    assert "interrupted" in err and "Traceback" not in err
    if how != "systemctl stop":
        assert not warnings, warnings  # the teardown found the daemon still there
    assert len(backups(repo)) == 2 and "kind=incremental" in result.stderr, result.stderr
    assert not damage and daemon_gone
    assert lost == 0


async def test_offline_and_online_runs_at_once(tmp_path: Path, sockdir: Path) -> None:
    """guest1 running (online) and guest2 shut down (offline), backed up at once."""
    machines = {}
    for name in ("guest1", "guest2"):
        socks = sockdir / name
        socks.mkdir()
        machine = QemuVM(tmp_path / name, {"vda": 64 * MiB}, sockdir=socks)
        machine.workdir.mkdir()
        machines[name] = await machine.start()
    try:
        config = write_config(
            tmp_path / "backupd.yaml",
            tmp_path / "repo",
            {
                name: {"qmp": str(m.qmp_path), "images": images_of(m), "request_size": "64K"}
                for name, m in machines.items()
            },
            scratch_dir=str(tmp_path / "scratch"),
            runtime_dir=str(sockdir),
        )
        for round_, machine in enumerate(machines.values()):
            await machine.write("vda", 0, 32 * MiB, 0x41 + round_)
        await machines["guest2"].quit()
        procs = {
            name: subprocess.Popen(
                argv(config, "run", "--vm", name),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in machines
        }
        results = {name: p.communicate(timeout=120) for name, p in procs.items()}
        for name, proc in procs.items():
            assert proc.returncode == 0, results[name][1]
        assert "source=online" in results["guest1"][1]
        assert "source=offline" in results["guest2"][1]
        lost = 0
        for name, machine in machines.items():
            latest = backups(tmp_path / "repo", name)[-1] / "vda.qcow2"
            data = read_image(latest, tmp_path)
            lost += first_difference(data, machine.snapshot()["vda"]) is not None
        record("an offline and an online run at once", failed=lost > 0, lost=lost)
        assert lost == 0
    finally:
        for machine in machines.values():
            await machine.kill()


async def test_daemon_killed_mid_copy(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, sockdir: Path
) -> None:
    """The daemon itself SIGKILLed (the one case that cannot close the images): the run
    fails with one line, the bitmaps are left in use, qemu still starts on the images,
    and the next run is a full one that says why."""
    config = config_for(vm, images=images_of(vm), request_size="64K", requests=1)
    repo = tmp_path / "repo"
    await vm.write("vda", 0, 8 * MiB, 0x61)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    await vm.write("vda", 8 * MiB, 8 * MiB, 0x62)
    await vm.quit()
    proc = run_env(config, "mid-copy:pause")  # 2 s at every read batch
    try:
        await wait_for_staging(repo, proc)
        daemon = live_daemon(daemon_of(config, sockdir))
        assert daemon is not None
        os.kill(daemon, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    failed_cleanly = proc.returncode == 1 and "Traceback" not in err and len(backups(repo)) == 1
    in_use = [n for n, flags in image_bitmaps(vm.images["vda"]).items() if "in-use" in flags]
    await vm.start()
    result = backupd(config, "run", "--vm", "guest1")
    full = "kind=full" in result.stderr and "is inconsistent" in result.stderr
    latest = read_image(backups(repo)[-1] / "vda.qcow2", tmp_path)
    lost = 0 if first_difference(latest, vm.snapshot()["vda"]) is None else 1
    record(
        "the daemon SIGKILLed mid offline copy: run fails, next run full",
        failed=not (failed_cleanly and in_use and full),
        lost=lost,
    )
    assert failed_cleanly, err
    assert in_use, "the bitmaps of a killed daemon's images should be left in use"
    assert full, result.stderr
    assert lost == 0
