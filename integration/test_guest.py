"""Backups of a running Linux guest are file-system consistent: a real kernel and ext4,
qemu-ga, and a workload that appends numbered, fsync'd records (harness/guest.py,
harness/ext4.py), all through the backupd CLI.  With the agent every point is a frozen
ext4 (no journal to replay); without it every point is what a crash at that instant
leaves (clean after journal replay); either way the records are an exact prefix.  And
the real qemu-ga is never left frozen: not by a signal while it is freezing, not by
another client's freeze, not by a freeze slower than ``freeze_timeout``."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from integration.conftest import BootGuest, MiB, backupd, restore_backup
from integration.faults_table import record
from integration.harness.chain import qemu_img_check
from integration.harness.ext4 import (
    Ext4Point,
    check_crash_consistent,
    check_quiesced,
    fsck,
    needs_recovery,
    read_file,
)
from integration.harness.guest import LinuxGuest
from integration.harness.qga import AgentError
from integration.harness.runs import argv, until_backupd_runs

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

NOISE = ("Traceback", "Task was destroyed", "Exception ignored", "never retrieved")


def point_ids(repo: Path, vm: str = "guest1") -> list[str]:
    return sorted(p.name for p in (repo / vm).iterdir() if p.name[0].isdigit())


def restore(config: Path, backup: str, output: Path, fmt: str = "raw") -> Path:
    result = restore_backup(config, backup, output, "--format", fmt)
    assert result.returncode == 0, result.stderr
    return output


async def back_up_while_writing(guest: LinuxGuest, config: Path, runs: int) -> list[str]:
    """RUNS backups (a full, then incrementals), each after the workload wrote 20 more
    records; returns the log of each run."""
    logs = []
    for n in range(runs):
        await guest.wait_records(guest.records_marked() + 20)
        result = backupd(config, "run", "--vm", "guest1")
        assert result.returncode == 0, result.stderr
        assert ("kind=full" if n == 0 else "kind=incremental") in result.stderr, result.stderr
        logs.append(result.stderr)
    return logs


def assert_extending(points: list[Ext4Point]) -> None:
    """Each point holds more records than the one before (each is an exact prefix,
    so a later one extends an earlier one)."""
    counts = [p.records for p in points]
    assert counts[0] > 0
    assert counts == sorted(set(counts)), counts


async def test_guest_boots_and_its_agent_freezes_and_thaws(
    boot_guest: BootGuest, tmp_path: Path
) -> None:
    guest = await boot_guest(workload=False)
    assert "guest: no workload" in guest.console()
    assert await guest.agent("guest-fsfreeze-status") == "thawed"
    assert await guest.agent("guest-fsfreeze-freeze") == 1  # /data, the only real fs
    assert await guest.agent("guest-fsfreeze-status") == "frozen"
    with pytest.raises(AgentError, match="frozen"):  # stop() then falls back to QMP quit
        await guest.agent("guest-shutdown")
    assert await guest.agent("guest-fsfreeze-thaw") == 1
    assert await guest.agent("guest-fsfreeze-status") == "thawed"
    assert await guest.stop(), guest.console()  # unmounted: a clean fs, no records
    raw = tmp_path / "vda.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(guest.images["vda"]), str(raw)], check=True
    )
    assert not needs_recovery(raw)
    assert fsck(raw).returncode == 0
    with pytest.raises(FileNotFoundError):
        read_file(raw)


async def test_points_with_the_agent_are_frozen_ext4(
    linux_guest: LinuxGuest, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    guest = linux_guest
    config = config_for(guest, guest_agent=str(guest.agent_path))
    logs = await back_up_while_writing(guest, config, runs=3)
    for log in logs:
        assert "guest file systems frozen (1)" in log, log
        assert "crash-consistent" not in log, log
    assert await guest.agent("guest-fsfreeze-status") == "thawed"
    points = [
        check_quiesced(restore(config, backup, tmp_path / f"{backup}.raw"))
        for backup in point_ids(tmp_path / "repo")
    ]
    assert len(points) == 3
    assert_extending(points)


async def test_points_without_the_agent_are_crash_consistent(
    linux_guest: LinuxGuest, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    guest = linux_guest
    config = config_for(guest)
    logs = await back_up_while_writing(guest, config, runs=3)
    assert not any("guest file systems frozen" in log for log in logs), logs
    points = []
    for backup in point_ids(tmp_path / "repo"):
        raw = restore(config, backup, tmp_path / f"{backup}.raw")
        points.append(check_crash_consistent(raw, tmp_path / f"{backup}.replayed.raw"))
    # mounted and not frozen: every point has a journal to replay (the check above
    # would tell a frozen point from these)
    assert all(p.needs_recovery for p in points), points
    assert len(points) == 3
    assert_extending(points)


async def test_newest_point_boots_and_the_workload_carries_on(
    boot_guest: BootGuest, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    guest = await boot_guest()
    config = config_for(guest, guest_agent=str(guest.agent_path))
    await back_up_while_writing(guest, config, runs=2)
    assert await guest.stop(), guest.console()  # one TCG guest at a time on 2 cores
    newest = point_ids(tmp_path / "repo")[-1]
    saved = check_quiesced(restore(config, newest, tmp_path / "newest.raw")).records
    image = restore(config, newest, tmp_path / "restored.qcow2", "qcow2")
    qemu_img_check(image)

    restored = await boot_guest(image)
    assert await restored.wait_ready() == saved  # resumes after the point's last record
    await restored.wait_records(saved + 20)
    assert await restored.stop(), restored.console()
    assert "torn" not in restored.console()
    qemu_img_check(image)
    raw = tmp_path / "after.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    assert check_quiesced(raw).records >= saved + 20


async def make_freeze_slow(guest: LinuxGuest, dirty_mib: int = 6) -> None:
    """Leave DIRTY_MIB MiB of unwritten data in the guest's page cache and let its disk
    write 1 MiB/s: the next fs-freeze, which writes it out first, takes seconds."""
    assert guest.qmp is not None
    limits = {"bps": 0, "bps_rd": 0, "bps_wr": MiB, "iops": 0, "iops_rd": 0, "iops_wr": 0}
    device = "/machine/peripheral/vda/virtio-backend"
    await guest.qmp.execute("block_set_io_throttle", {"id": device, **limits})
    fill = ["/bin/dd", "if=/dev/zero", "of=/data/fill", "bs=1M", f"count={dirty_mib}"]
    assert await guest.run(fill) == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_run_interrupted_while_the_guest_freezes_leaves_it_thawed(
    linux_guest: LinuxGuest, config_for: Callable[..., Path], signum: signal.Signals
) -> None:
    """A signal while qemu-ga is still freezing (the freeze is made slow: dirty data, a
    throttled disk): once backupd has exited, the guest is thawed and writing."""
    guest = linux_guest
    config = config_for(guest, guest_agent=str(guest.agent_path))
    await make_freeze_slow(guest)
    run = await asyncio.create_subprocess_exec(
        *argv(config, "run", "--vm", "guest1"), stderr=subprocess.PIPE
    )
    assert run.stderr is not None
    await guest.wait_console(r"^guest: fsfreeze-hook freeze")  # qemu-ga starts freezing
    await asyncio.sleep(0.5)  # the freeze (about 6 s) is under way
    run.send_signal(signum)
    log = await asyncio.wait_for(run.stderr.read(), 60)
    code = await run.wait()
    # qemu-ga answers once the freeze (and any thaw sent after it) is done
    assert await guest.agent("guest-fsfreeze-status") == "thawed", log.decode()
    assert "guest: fsfreeze-hook thaw" in guest.console()
    assert code == 128 + signum, log.decode()  # 130 / 143, as documented
    assert b"Traceback" not in log, log.decode()
    await guest.wait_records(guest.records_marked() + 20, timeout=30)
    again = backupd(config, "run", "--vm", "guest1")
    assert again.returncode == 0, again.stderr
    assert "guest file systems frozen (1)" in again.stderr, again.stderr


async def test_a_guest_left_frozen_is_thawed_and_a_slow_freeze_is_bounded(
    linux_guest: LinuxGuest, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    guest = linux_guest
    config = config_for(guest, guest_agent=str(guest.agent_path))
    assert await guest.agent("guest-fsfreeze-freeze") == 1  # another client's, left behind
    run = backupd(config, "run", "--vm", "guest1")
    assert run.returncode == 0, run.stderr
    assert "were FROZEN" in run.stderr, run.stderr  # said loudly, then thawed
    assert "guest file systems frozen (1)" in run.stderr, run.stderr  # and quiesced anew
    assert await guest.agent("guest-fsfreeze-status") == "thawed"
    (backup,) = point_ids(tmp_path / "repo")
    assert check_quiesced(restore(config, backup, tmp_path / "first.raw")).records > 0

    config = config_for(guest, guest_agent=str(guest.agent_path), freeze_timeout=2)
    await make_freeze_slow(guest)  # the freeze alone takes about 6 s
    slow = backupd(config, "run", "--vm", "guest1")
    assert slow.returncode == 1, slow.stderr
    assert "longer than freeze_timeout (2 s)" in slow.stderr, slow.stderr
    assert await guest.agent("guest-fsfreeze-status") == "thawed"
    await guest.wait_records(guest.records_marked() + 20, timeout=30)
    assert point_ids(tmp_path / "repo") == [backup]


async def test_signals_at_random_instants_never_leave_the_real_guest_frozen(
    linux_guest: LinuxGuest, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    """24 runs against the real qemu-ga, each sent SIGINT or SIGTERM at a random instant
    of the whole run (backupd's own code running: start-up, leftovers, plan, freeze,
    cut, copy, commit, rotation): after every exit the guest is thawed and writing, the
    exit code is 0 (the run had finished) or 128+signal, nothing noisy is printed, and
    every point that was committed is a frozen, clean ext4."""
    guest = linux_guest
    config = config_for(guest, guest_agent=str(guest.agent_path))
    first = backupd(config, "run", "--vm", "guest1")
    assert first.returncode == 0, first.stderr
    span = float(first.stderr.split("duration=")[1].split("s")[0]) + 0.3
    rng = random.Random(19)
    outcomes: dict[int, int] = {}
    for trial in range(24):
        sig = (signal.SIGINT, signal.SIGTERM)[trial % 2]
        proc = await asyncio.create_subprocess_exec(
            *argv(config, "run", "--vm", "guest1"), stderr=subprocess.PIPE
        )
        await until_backupd_runs(proc.pid)
        await asyncio.sleep(rng.uniform(0.0, span))
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        assert proc.stderr is not None
        log = (await asyncio.wait_for(proc.stderr.read(), 120)).decode(errors="replace")
        code = await proc.wait()
        outcomes[code] = outcomes.get(code, 0) + 1
        status = await guest.agent("guest-fsfreeze-status")
        noisy = [word for word in NOISE if word in log]
        record(
            "real guest: SIGINT/SIGTERM at a random instant, thawed, 0 or 128+sig, quiet",
            failed=status != "thawed" or code not in (0, 128 + sig) or bool(noisy),
        )
        assert status == "thawed", f"trial {trial}: guest left {status}\n{log}"
        assert code in (0, 128 + sig), f"trial {trial}: exit {code}\n{log}"
        assert not noisy, f"trial {trial}: {noisy}\n{log}"
        await guest.wait_records(guest.records_marked() + 3, timeout=30)  # still writing
    print(f"exit codes over 24 trials with the real guest: {outcomes}")
    assert outcomes.get(0, 0) < 24, "no trial interrupted a run"
    final = backupd(config, "run", "--vm", "guest1")
    assert final.returncode == 0, final.stderr
    for backup in point_ids(tmp_path / "repo")[-3:]:
        point = check_quiesced(restore(config, backup, tmp_path / f"{backup}.raw"))
        assert point.records > 0
