"""Instant recovery and live restore with the real Linux guest (harness/guest.py): a
backup of a guest writing numbered, fsync'd records on a 1 GiB ext4 disk, taken with
its agent, boots at once through the served backup image and the workload carries on
from the point's last record; a live restore ends with a local disk that holds the
restored records and every one written since, clean for e2fsck; a SIGKILL of backupd
and a stop and restart of the VM mid-way leave the guest running without I/O errors,
and ``--resume`` finishes the copy.  The copy is started slow (``--speed 1M``: about
1000 s for the disk) so that the guest is seen writing while it runs, however long the
guest takes to boot, and then let run at full speed through the VM's own monitor."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.conftest import MiB, backupd, serving, write_config
from integration.harness.chain import backing_of, qemu_img_check
from integration.harness.ext4 import check_quiesced
from integration.harness.guest import GuestBuild, LinuxGuest
from integration.harness.live import (
    IO_ERRORS,
    LiveRun,
    copy_job,
    daemon_pid,
    kill_daemons,
    live_restore,
    readers_free,
    state_folder,
    unthrottle,
    wait_for_copy,
)

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

GiB = 1024 * MiB


@dataclass(frozen=True)
class Source:
    """The backups of a guest that wrote records: the newest point holds ``records``."""

    config: Path
    repo: Path
    records: int


async def _back_up_a_guest(folder: Path, sockets: Path, build: GuestBuild) -> Source:
    guest = LinuxGuest(folder / "source", build, sockdir=sockets / "source", size=GiB)
    config = write_config(
        folder / "backupd.yaml",
        folder / "repo",
        {"guest1": {"qmp": str(guest.qmp_path), "guest_agent": str(guest.agent_path)}},
        scratch_dir=str(folder / "scratch"),
        runtime_dir=str(sockets),
    )
    try:
        await guest.start()
        await guest.wait_ready()
        for kind in ("full", "incremental"):
            await guest.wait_records(guest.records_marked() + 20)
            result = backupd(config, "run", "--vm", "guest1")
            assert result.returncode == 0 and f"kind={kind}" in result.stderr, result.stderr
        assert await guest.stop(), guest.console()
    finally:
        await guest.kill()
    raw = folder / "newest.raw"
    result = backupd(config, "restore", "--vm", "guest1", "--disk", "vda", "--output", str(raw))
    assert result.returncode == 0, result.stderr
    records = check_quiesced(raw).records
    raw.unlink()
    return Source(config, folder / "repo", records)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, guest_build: GuestBuild) -> Iterator[Source]:
    """One guest backed up for every test here (it costs a boot): its repository is
    only read by the tests."""
    folder = tmp_path_factory.mktemp("live-source")
    sockets = Path(tempfile.mkdtemp(prefix="bkd-", dir="/tmp"))
    sockets.chmod(0o700)
    try:
        yield asyncio.run(_back_up_a_guest(folder, sockets, guest_build))
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


@pytest.fixture
async def guests(tmp_path: Path) -> AsyncIterator[list[LinuxGuest]]:
    """The guests a test boots; whatever a failure left running is killed (the guests
    and the served points, by pid)."""
    made: list[LinuxGuest] = []
    try:
        yield made
    finally:
        for guest in made:
            await guest.kill()
        kill_daemons(tmp_path)


def guest_on(
    image: Path, tmp_path: Path, sockdir: Path, build: GuestBuild, made: list[LinuxGuest]
) -> LinuxGuest:
    n = len(made)
    guest = LinuxGuest(tmp_path / f"guest{n}", build, sockdir=sockdir / f"g{n}", image=image)
    made.append(guest)
    return guest


def assert_no_io_errors(*guests: LinuxGuest) -> None:
    for guest in guests:
        found = IO_ERRORS.search(guest.console())
        assert found is None, f"the guest saw {found.group(0)!r}:\n{guest.console()[-3000:]}"


def final_records(image: Path, tmp_path: Path) -> int:
    """The records on IMAGE alone (no backing file): a clean, unmounted ext4."""
    assert backing_of(image) is None
    qemu_img_check(image)
    raw = tmp_path / "final.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    return check_quiesced(raw).records


def start_live(
    source: Source, output: Path, guest: LinuxGuest, *more: str
) -> asyncio.Task[LiveRun]:
    where = ("--output", str(output), "--target-qmp", str(guest.qmp_path))
    return asyncio.ensure_future(
        live_restore(source.config, "--vm", "guest1", "--disk", "vda", *where, *more)
    )


async def test_instant_recovery_through_the_served_image_boots(
    source: Source,
    tmp_path: Path,
    sockdir: Path,
    guest_build: GuestBuild,
    guests: list[LinuxGuest],
) -> None:
    """README's recipe: ``backupd serve``, a qcow2 overlay over its URI, boot."""
    overlay = tmp_path / "overlay.qcow2"
    with serving(source.config) as uri:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", uri, str(overlay)],
            check=True,
        )
        guest = guest_on(overlay, tmp_path, sockdir, guest_build, guests)
        await guest.start()
        assert await guest.wait_ready() == source.records  # carries on from the point
        await guest.wait_records(source.records + 20)
        assert await guest.stop(), guest.console()
        assert_no_io_errors(guest)
        raw = tmp_path / "recovered.raw"  # (through the served point: it is still needed)
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(overlay), str(raw)], check=True)
        assert check_quiesced(raw).records >= source.records + 20


async def test_live_restore_boots_at_once_and_ends_with_a_local_disk(
    source: Source,
    tmp_path: Path,
    sockdir: Path,
    guest_build: GuestBuild,
    guests: list[LinuxGuest],
) -> None:
    output = tmp_path / "vms" / "vda.qcow2"
    output.parent.mkdir()
    guest = guest_on(output, tmp_path, sockdir, guest_build, guests)
    run = await start_live(source, output, guest, "--speed", "1M")
    served = daemon_pid(output)
    assert served is not None
    await guest.start()
    assert guest.qmp is not None
    assert await guest.wait_ready() == source.records
    await guest.wait_records(source.records + 20)
    job = await copy_job(guest.qmp)  # the guest is up and writing, the copy not done
    assert job is not None and job["status"] == "running", job
    assert job["current-progress"] < job["total-progress"] == GiB
    assert run.proc.returncode is None

    await unthrottle(guest.qmp)
    code, log = await run.finish()
    assert code == 0, log
    assert backing_of(output) is None
    assert daemon_pid(output) is None and not state_folder(output).exists()
    assert readers_free(source.repo)
    mark = guest.records_marked()  # now on the local file alone
    await guest.wait_records(mark + 20)
    assert await guest.stop(), guest.console()
    assert_no_io_errors(guest)
    assert final_records(output, tmp_path) >= mark + 20


async def test_a_killed_backupd_and_a_restarted_vm_then_resume(
    source: Source,
    tmp_path: Path,
    sockdir: Path,
    guest_build: GuestBuild,
    guests: list[LinuxGuest],
) -> None:
    output = tmp_path / "vms" / "vda.qcow2"
    output.parent.mkdir()
    first = guest_on(output, tmp_path, sockdir, guest_build, guests)
    run = await start_live(source, output, first, "--speed", "1M")
    await first.start()
    assert first.qmp is not None
    assert await first.wait_ready() == source.records
    await wait_for_copy(first.qmp)
    await run.kill()  # SIGKILL mid-copy

    # the guest runs on: it writes, and reads what is not copied yet from the served point
    await first.wait_records(first.records_marked() + 20)
    tail = ["/bin/dd", "if=/dev/vda", "of=/dev/null", "bs=1M", "skip=1000", "count=24"]
    assert await first.run(tail) == 0
    job = await copy_job(first.qmp)
    assert job is not None and job["status"] == "running", job
    assert daemon_pid(output) is not None

    resumed = await live_restore(
        source.config,
        "--resume",
        "--output",
        str(output),
        "--target-qmp",
        str(first.qmp_path),
        starting=False,
    )
    await resumed.until("copying every cluster")
    assert await first.stop(), first.console()  # the VM is stopped mid-way
    code, log = await resumed.finish()
    assert code == 1 and "went away" in log and "--resume" in log, log
    assert backing_of(output) is not None  # not complete yet
    stopped = int(first.console().rsplit("workload: stopped at ", 1)[1].split()[0])

    second = guest_on(output, tmp_path, sockdir, guest_build, guests)
    await second.start()
    assert await second.wait_ready() == stopped  # every record of the first run is there
    final = await live_restore(
        source.config,
        "--resume",
        "--speed",
        "0",
        "--output",
        str(output),
        "--target-qmp",
        str(second.qmp_path),
        starting=False,
    )
    code, log = await final.finish()
    assert code == 0, log
    assert daemon_pid(output) is None and not state_folder(output).exists()
    await second.wait_records(stopped + 20)
    assert await second.stop(), second.console()
    assert_no_io_errors(first, second)
    assert final_records(output, tmp_path) >= stopped + 20
