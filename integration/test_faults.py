"""Fault injection on real qemu: crashes at every phase, signals, qemu dying, a full or
read-only repository, concurrency, a soak, hostile input.  Every scenario records its
trials in the summary table printed at the end of the run (changes lost must be 0)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from backupd.backup import RunHooks, run_backup
from backupd.config import load_config
from integration.conftest import MiB, backupd
from integration.faults_table import record
from integration.harness.agent import FakeGuestAgent
from integration.harness.chain import (
    backups,
    first_difference,
    make_qcow2,
    read_image,
)
from integration.harness.runs import (
    argv,
    leftovers,
    lost_after,
    lost_changes,
    run_env,
    wait_for_staging,
)
from integration.harness.vm import QemuVM

POINTS = [
    "after-lock",
    "after-cleanup",
    "after-plan",
    "after-scratch",
    "mid-filters",
    "after-transaction",
    "after-export",
    "mid-copy@1",
    "mid-copy@2",
    "mid-copy@3",
    "mid-copy@4",
    "mid-copy@6",
    "mid-copy@8",
    "mid-copy@12",
    "mid-copy@16",
    "after-copy",
    "after-teardown",
    "before-manifest",
    "before-rename",
    "after-commit",
    "mid-rotate",
    "after-rotate",
]


async def scatter(vm: QemuVM, rng: random.Random, count: int, size: int) -> None:
    for _ in range(count):
        offset = rng.randrange(0, size // 65536) * 65536
        await vm.write("vda", offset, 65536, rng.randrange(1, 256))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "repo"


async def test_sigkill_at_every_phase(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, repo: Path
) -> None:
    config = config_for(vm, request_size="64K")
    rng = random.Random(1)
    size = 32 * MiB
    points: dict[str, bytes] = {}
    await scatter(vm, rng, 20, size)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    points[backups(repo)[-1].name] = vm.snapshot()["vda"]
    for point in POINTS:
        await scatter(vm, rng, 24, size)
        before = {p.name for p in backups(repo)}
        snapshot = vm.snapshot()["vda"]
        proc = run_env(config, point)
        _, killed_err = proc.communicate(timeout=60)
        killed = proc.returncode == -signal.SIGKILL
        for folder in backups(repo):
            if folder.name not in before:
                points[folder.name] = snapshot  # committed before it was killed
        await scatter(vm, rng, 3, size)
        result = backupd(config, "run", "--vm", "guest1")
        ok = result.returncode == 0
        if ok:
            points[backups(repo)[-1].name] = vm.snapshot()["vda"]
        left = await leftovers(vm, repo, tmp_path / "scratch")
        lost = lost_changes(points, repo, tmp_path, latest_only=True)
        record(
            "SIGKILL of backupd at a phase, then a normal run",
            failed=not (killed and ok and not left),
            lost=lost,
        )
        assert killed, f"{point}: not killed ({proc.returncode}): {killed_err}"
        assert ok, f"{point}: next run failed: {result.stderr}"
        assert not left, f"{point}: leftovers {left}"
        assert lost == 0, point
    total = lost_changes(points, repo, tmp_path)
    record("every committed point restored after the kills", failed=total > 0, lost=total)
    assert total == 0
    assert len(backups(repo)) >= len(POINTS)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_mid_run(
    vm: QemuVM,
    config_for: Callable[..., Path],
    tmp_path: Path,
    repo: Path,
    sockdir: Path,
    sig: signal.Signals,
) -> None:
    agent = FakeGuestAgent(sockdir / "qga.sock")
    async with agent.serving():
        config = config_for(vm, guest_agent=str(agent.path))
        await vm.write("vda", 0, 8 * MiB, 0x31)
        proc = run_env(config, "mid-copy:hang")
        await wait_for_staging(repo, proc)
        start = time.monotonic()
        proc.send_signal(sig)
        while proc.poll() is None and time.monotonic() - start < 10:
            await asyncio.sleep(0.05)
        took = time.monotonic() - start
        _, err = proc.communicate(timeout=10)
        left = await leftovers(vm, repo, tmp_path / "scratch")
        thawed = not agent.frozen and "guest-fsfreeze-freeze" in agent.calls
        record(
            f"{sig.name} mid-run: exit within 5 s, clean, guest thawed",
            failed=not (proc.returncode == 128 + sig and took < 5 and not left and thawed),
        )
        assert proc.returncode == 128 + sig and took < 5, (proc.returncode, took, err)
        assert "interrupted" in err and "Traceback" not in err
        assert not left and not backups(repo) and thawed
        result = backupd(config, "run", "--vm", "guest1")
        assert lost_after(result, repo, tmp_path, vm) == 0, result.stderr


async def test_qemu_killed_mid_backup(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, repo: Path
) -> None:
    config = config_for(vm, request_size="64K", requests=1, connections=1)
    await vm.write("vda", 0, 4 * MiB, 0x41)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    await vm.quit()
    await vm.start()  # the bitmap is loaded from the image from now on
    await vm.write("vda", 8 * MiB, 8 * MiB, 0x42)
    await vm.flush("vda")
    proc = run_env(config, "mid-copy:pause")
    await wait_for_staging(repo, proc)
    await vm.kill()
    _, err = proc.communicate(timeout=60)
    clean_failure = proc.returncode == 1 and "Traceback" not in err and len(backups(repo)) == 1
    await vm.start()
    result = backupd(config, "run", "--vm", "guest1")
    full = "kind=full" in result.stderr and "inconsistent" in result.stderr
    lost = lost_after(result, repo, tmp_path, vm)
    record(
        "qemu killed mid-backup, restarted: full taken",
        failed=not (clean_failure and full),
        lost=lost,
    )
    assert clean_failure, err
    assert full, result.stderr
    assert lost == 0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs (CI runs as root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_repository_full_and_read_only(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, small_fs: Path
) -> None:
    config = config_for(vm)
    data = yaml.safe_load(config.read_text())
    data["repository"] = str(small_fs / "repo")
    config.write_text(yaml.safe_dump(data))
    repo = small_fs / "repo"
    await vm.write("vda", 0, 2 * MiB, 0x51)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    first = backups(repo)[0]
    first_model = vm.snapshot()["vda"]
    await vm.write("vda", 4 * MiB, 26 * MiB, 0x52)  # more than the filesystem holds
    result = backupd(config, "run", "--vm", "guest1")
    full_err = result.stderr
    full_ok = (
        result.returncode == 1
        and "No space left" in result.stderr
        and str(repo) in result.stderr  # the error says where
        and "Traceback" not in result.stderr
        and backups(repo) == [first]
    )
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    result_ro = backupd(config, "run", "--vm", "guest1")
    ro_ok = result_ro.returncode in (1, 2) and "Read-only file system" in result_ro.stderr
    subprocess.run(["mount", "-o", "remount,rw,size=64m", str(small_fs)], check=True)
    result = backupd(config, "run", "--vm", "guest1")
    lost = lost_after(result, repo, tmp_path, vm)
    older = first_difference(read_image(first / "vda.qcow2", tmp_path), first_model) is None
    record(
        "repository full, then read-only, then room again",
        failed=not (full_ok and ro_ok and older),
        lost=lost,
    )
    assert full_ok, full_err
    assert ro_ok, result_ro.stderr
    assert older and lost == 0
    assert "incremental" in json.loads((backups(repo)[-1] / "manifest.json").read_text())["kind"]


async def test_concurrency(
    tmp_path: Path, sockdir: Path, config_for: Callable[..., Path], vm: QemuVM
) -> None:
    other_dir = sockdir / "b"
    other_dir.mkdir()
    other = QemuVM(tmp_path / "other", {"vda": 16 * MiB}, sockdir=other_dir)
    other.workdir.mkdir()
    await other.start()
    try:
        config = config_for(vm)
        data = yaml.safe_load(config.read_text())
        data["vms"]["guest2"] = {"qmp": str(other.qmp_path)}
        data["keep_last"] = 1
        config.write_text(yaml.safe_dump(data))
        await vm.write("vda", 0, 8 * MiB, 0x61)
        await other.write("vda", 0, 8 * MiB, 0x62)
        both = [
            subprocess.Popen(
                argv(config, "run", "--vm", name),
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in ("guest1", "guest2")
        ]
        parallel_ok = all(p.wait(60) == 0 for p in both)
        record("runs on two VMs in parallel", failed=not parallel_ok)
        assert parallel_ok
        for p in both:
            assert p.stderr is not None
            p.stderr.close()
        await vm.write("vda", 0, MiB, 0x63)
        proc = run_env(config, "mid-copy:hang")
        await wait_for_staging(tmp_path / "repo", proc)
        prune = backupd(config, "prune", "--vm", "guest1")
        second = backupd(config, "run", "--vm", "guest1")
        serve = subprocess.Popen(
            argv(config, "serve", "--vm", "guest1"),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert serve.stdout is not None
        uri = serve.stdout.readline().strip()
        served = subprocess.run(
            ["qemu-img", "convert", "-O", "raw", uri, str(tmp_path / "s.raw")], capture_output=True
        )
        serve.terminate()
        serve.wait(10)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
        ok = prune.returncode == 3 and second.returncode == 3 and served.returncode == 0
        record("prune / second run / serve while a backup runs", failed=not ok)
        assert prune.returncode == 3 and "busy" in prune.stderr
        assert second.returncode == 3
        assert served.returncode == 0
        assert len(backups(tmp_path / "repo")) == 1
    finally:
        await other.kill()


async def test_soak(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, repo: Path
) -> None:
    config = load_config(config_for(vm))
    guest = config.vm("guest1")
    rng = random.Random(5)
    size = 32 * MiB
    points: dict[str, bytes] = {}

    async def during() -> None:  # the guest keeps writing while the copy runs
        await scatter(vm, rng, 2, size)

    for _ in range(50):
        await scatter(vm, rng, rng.randrange(1, 8), size)
        if rng.random() < 0.2:
            offset = rng.randrange(0, size // 65536) * 65536
            await vm.write_zeroes("vda", offset, 65536)
        snapshot = vm.snapshot()["vda"]
        # a failed run fails the test with its own error (and the row, see faults_table)
        manifest = await run_backup(config, guest, hooks=RunHooks(after_point_in_time=during))
        points[manifest.id] = snapshot
    ids = sorted(points)
    lost = 0
    for backup in ids[9::10]:
        if (
            first_difference(
                read_image(repo / "guest1" / backup / "vda.qcow2", tmp_path), points[backup]
            )
            is not None
        ):
            lost += 1
    record("soak: 50 incrementals, writes between and during (every 10th restored)", lost=lost)
    assert lost == 0
    kinds = [json.loads((repo / "guest1" / b / "manifest.json").read_text())["kind"] for b in ids]
    assert kinds.count("full") == 4  # max_chain 14: a new full every 15 runs


async def test_bad_input(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, sockdir: Path, repo: Path
) -> None:
    async def not_qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 smtp.example.com ESMTP\r\n")
        await writer.drain()

    server = await asyncio.start_unix_server(not_qemu, str(sockdir / "smtp.sock"))
    cases = 0
    try:
        config = config_for(vm)
        data = yaml.safe_load(config.read_text())
        data["vms"]["mail"] = {"qmp": str(sockdir / "smtp.sock")}
        config.write_text(yaml.safe_dump(data))
        result = await asyncio.to_thread(backupd, config, "run", "--vm", "mail")
        assert result.returncode == 1 and "QMP" in result.stderr
        assert "Traceback" not in result.stderr
        cases += 1
        # qemu's own QMP socket, not permitted: as root without the capability that
        # overrides file permissions (CI runs as root)
        mode = vm.qmp_path.stat().st_mode & 0o777
        vm.qmp_path.chmod(0)
        try:
            denied = subprocess.run(
                [
                    "setpriv",
                    "--inh-caps=-dac_override,-dac_read_search",
                    "--bounding-set=-dac_override,-dac_read_search",
                    sys.executable,
                    "-m",
                    "backupd",
                    "-c",
                    str(config),
                    "run",
                    "--vm",
                    "guest1",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            vm.qmp_path.chmod(mode)
        assert denied.returncode == 1, denied.stderr
        assert f"cannot connect to QMP at {vm.qmp_path}: permission denied" in denied.stderr
        assert "Traceback" not in denied.stderr and not backups(repo)
        cases += 1
        await vm.write("vda", 0, MiB, 0x71)
        assert backupd(config, "run", "--vm", "guest1").returncode == 0
        manifest = backups(repo)[-1] / "manifest.json"
        manifest.write_text(manifest.read_text()[:50])
        listed = backupd(config, "list", "--json")
        assert "damaged" in listed.stdout
        restore = backupd(
            config,
            "restore",
            "--vm",
            "guest1",
            "--disk",
            "vda",
            "--output",
            str(tmp_path / "x.raw"),
        )
        assert restore.returncode == 1 and "corrupt manifest" in restore.stderr
        cases += 1
        for bad_vm in ("../etc", "a/b"):
            result = backupd(config, "list", "--vm", bad_vm)
            assert result.returncode == 2 and "unknown VM" in result.stderr
            cases += 1
    finally:
        server.close()
    for _ in range(cases):
        record("bad input: one clear line, documented exit code")


async def test_nbd_connection_cut_and_stalled_qemu(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, repo: Path
) -> None:
    config = config_for(vm, request_size="64K", requests=1, connections=1, timeout=3)
    await vm.write("vda", 0, 8 * MiB, 0x81)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    assert vm.qmp is not None
    for case in ("cut", "stall"):
        await vm.write("vda", 0, 8 * MiB, 0x82 if case == "cut" else 0x83)
        committed = len(backups(repo))
        proc = run_env(config, "mid-copy:pause")
        await wait_for_staging(repo, proc)
        start = time.monotonic()
        if case == "cut":  # qemu drops the NBD client mid-copy
            await vm.qmp.execute("nbd-server-stop")
        else:  # qemu stops answering at all
            assert vm.proc is not None
            vm.proc.send_signal(signal.SIGSTOP)
        try:
            _, err = await asyncio.to_thread(proc.communicate, timeout=90)
        finally:
            if case == "stall":
                assert vm.proc is not None
                vm.proc.send_signal(signal.SIGCONT)
        took = time.monotonic() - start
        failed_cleanly = (
            proc.returncode == 1 and "Traceback" not in err and len(backups(repo)) == committed
        )
        result = backupd(config, "run", "--vm", "guest1")
        lost = lost_after(result, repo, tmp_path, vm)
        record(
            f"NBD {'connection cut mid-copy' if case == 'cut' else 'server stalled'}: "
            "bounded failure, next run ok",
            failed=not (failed_cleanly and took < 60),
            lost=lost,
        )
        assert failed_cleanly, err
        assert took < 60, took
        assert lost == 0, result.stderr
        assert not await leftovers(vm, repo, tmp_path / "scratch")


async def test_read_error_in_a_backup(
    tmp_path: Path, sockdir: Path, config_for: Callable[..., Path], repo: Path
) -> None:
    """An I/O error on the disk (qemu's blkdebug, once) under a backup's read: the run
    fails cleanly, commits nothing, and the next run takes everything.  (qemu 7.2 drops
    the NBD client when a read fails while it sends a structured reply.)"""
    image = tmp_path / "vda.qcow2"
    make_qcow2(image, "32M", "write -P 0x91 0 8M")
    extents = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(image)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    host = (
        next(
            e["offset"]
            for e in extents
            if e["data"] and e["start"] <= 4 * MiB < e["start"] + e["length"]
        )
        + 4 * MiB
        - next(
            e["start"]
            for e in extents
            if e["data"] and e["start"] <= 4 * MiB < e["start"] + e["length"]
        )
    )
    blkdebug = (
        f"file.driver=blkdebug,file.image.driver=file,file.image.filename={image},"
        f"file.inject-error.0.event=read_aio,file.inject-error.0.sector={host // 512},"
        "file.inject-error.0.errno=5,file.inject-error.0.once=on"
    )
    machine = QemuVM(
        tmp_path / "eio", {"vda": 32 * MiB}, sockdir=sockdir, file_options={"vda": blkdebug}
    )
    machine.images["vda"] = image
    machine.model["vda"][: 8 * MiB] = b"\x91" * (8 * MiB)
    machine.workdir.mkdir()
    await machine.start()
    try:
        config = config_for(machine)
        failed = backupd(config, "run", "--vm", "guest1")
        clean = (
            failed.returncode == 1
            and "reading the disk over NBD failed" in failed.stderr
            and not backups(repo)
            and "Traceback" not in failed.stderr
        )
        result = backupd(config, "run", "--vm", "guest1")
        lost = lost_after(result, repo, tmp_path, machine)
        left = await leftovers(machine, repo, tmp_path / "scratch")
        record(
            "disk read error (blkdebug) under a backup: clean failure, next run ok",
            failed=not clean or bool(left),
            lost=lost,
        )
        assert clean, failed.stderr
        assert lost == 0, result.stderr
        assert not left
    finally:
        await machine.kill()


async def test_scratch_area_full(
    tmp_path: Path, vm: QemuVM, config_for: Callable[..., Path], repo: Path
) -> None:
    """The guest overwrites more during a backup than the scratch area holds: every guest
    write succeeds (the point-in-time view breaks instead), the run fails with one clear
    line naming the full scratch area, nothing is committed, and the next run has it all."""
    small = tmp_path / "small-scratch"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        config = config_for(vm, request_size="64K", requests=1, connections=1)
        data = yaml.safe_load(config.read_text())
        data["scratch_dir"] = str(small)
        config.write_text(yaml.safe_dump(data))
        await vm.write("vda", 0, 16 * MiB, 0x61)
        assert backupd(config, "run", "--vm", "guest1").returncode == 0
        # changes for the next incremental to read: it reads them from the view after the
        # guest broke it (an incremental with nothing to read would be right to succeed)
        await vm.write("vda", 20 * MiB, 4 * MiB, 0x71)
        guest_errors: list[str] = []

        async def overwrite() -> None:
            for i in range(8):  # 8 MiB of first writes: 4x what the scratch area holds
                try:
                    await vm.write("vda", i * MiB, MiB, 0x62 + i)
                except RuntimeError as exc:
                    guest_errors.append(str(exc))

        parsed = load_config(config)
        failure = ""
        try:
            await run_backup(
                parsed, parsed.vm("guest1"), hooks=RunHooks(after_point_in_time=overwrite)
            )
        except Exception as exc:
            failure = str(exc)
        clean = (
            "scratch area" in failure
            and "full" in failure
            and len(backups(repo)) == 1
            and not await leftovers(vm, repo, small)
        )
        status = await vm.qmp.execute("query-status") if vm.qmp else {}
        result = backupd(config, "run", "--vm", "guest1")
        lost = lost_after(result, repo, tmp_path, vm)
        record(
            "scratch area full: guest writes all succeed, run fails cleanly, next run ok",
            failed=bool(guest_errors) or not clean or status.get("status") == "io-error",
            lost=lost,
        )
        assert not guest_errors, guest_errors
        assert clean, failure
        assert lost == 0, result.stderr
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


async def test_kill_while_paused_resumes_vm(
    tmp_path: Path, sockdir: Path, config_for: Callable[..., Path], repo: Path
) -> None:
    """Two disks of a running VM are cut at one instant with the vCPUs paused for the
    moment the filters go in; a backupd killed in that moment leaves the VM paused, and
    the next run resumes it, cleans up and backs up both disks."""
    machine = QemuVM(tmp_path / "two", {"vda": 16 * MiB, "vdb": 16 * MiB}, sockdir=sockdir)
    machine.workdir.mkdir()
    await machine.start()
    try:
        assert machine.qmp is not None
        await machine.qmp.execute("cont")
        config = config_for(machine)
        await machine.write("vda", 0, 2 * MiB, 0x71)
        await machine.write("vdb", MiB, 2 * MiB, 0x72)
        normal = backupd(config, "run", "--vm", "guest1")
        running_after = (await machine.qmp.execute("query-status"))["status"]  # type: ignore[index]
        await machine.write("vdb", 8 * MiB, MiB, 0x73)
        proc = run_env(config, "mid-filters")
        proc.communicate(timeout=60)
        paused = (await machine.qmp.execute("query-status"))["status"]  # type: ignore[index]
        result = backupd(config, "run", "--vm", "guest1")
        resumed = (await machine.qmp.execute("query-status"))["status"]  # type: ignore[index]
        lost = 0
        for disk in ("vda", "vdb"):
            image = backups(repo)[-1] / f"{disk}.qcow2"
            if result.returncode != 0 or (
                first_difference(read_image(image, tmp_path), machine.snapshot()[disk]) is not None
            ):
                lost += 1
        state = await machine.state()
        clean = (
            not state["exports"]
            and not state["jobs"]
            and state["nodes"]
            == [
                "drive-vda",
                "drive-vdb",
            ]
        )
        record(
            "killed while a running VM was paused for the cut: next run resumes it",
            failed=not (
                normal.returncode == 0
                and running_after == "running"
                and proc.returncode == -signal.SIGKILL
                and paused == "paused"
                and resumed == "running"
                and clean
            ),
            lost=lost,
        )
        assert normal.returncode == 0, normal.stderr
        assert running_after == "running"
        assert proc.returncode == -signal.SIGKILL
        assert paused == "paused"
        assert result.returncode == 0, result.stderr
        assert "resumed" in result.stderr
        assert resumed == "running"
        assert clean, state
        assert lost == 0
    finally:
        await machine.kill()
