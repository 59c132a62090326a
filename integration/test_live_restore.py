"""``backupd restore --live`` with real qemu (no guest OS: writes and reads through the
VM's device with qemu-io), byte for byte: the VM reads the backup through the served
point at once, its own writes are never overwritten by the copy, and the file ends
complete and alone, also after SIGTERM, SIGKILL, a stopped VM, a served point that is
gone (a reboot), or a copy that ended while backupd was away.  The copy is started
slow (``--speed 1M``) so that every test sees it half-way, however fast the machine,
and then let run at full speed through the VM's own monitor."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import yaml
from qemu.qmp import QMPClient

from integration.conftest import MiB, backupd
from integration.harness.chain import (
    backing_of,
    backups,
    first_difference,
    qemu_img_check,
    read_image,
)
from integration.harness.live import (
    LiveRun,
    alive,
    copy_job,
    daemon_pid,
    kill_daemons,
    live_restore,
    readers_free,
    state_folder,
    unthrottle,
    wait_for_copy,
    wait_for_job_end,
)
from integration.harness.vm import QemuVM

pytestmark = [pytest.mark.qemu]

SIZE = 32 * MiB


@pytest.fixture(autouse=True)
def _no_daemon_left(tmp_path: Path) -> object:
    """Whatever a test leaves, its served points are killed (by pid) at its end."""
    yield
    kill_daemons(tmp_path)


async def back_up(vm: QemuVM, config: Path) -> bytes:
    """A full backup and an incremental on top (a chain of two files is served); the
    bytes of the incremental's point."""
    await vm.write("vda", 0, 4 * MiB, 0x11)
    await vm.write("vda", 16 * MiB, 4 * MiB, 0x22)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    await vm.write("vda", 2 * MiB, 1 * MiB, 0x33)
    await vm.write("vda", 28 * MiB, 4 * MiB, 0x44)
    result = backupd(config, "run", "--vm", "guest1")
    assert result.returncode == 0 and "kind=incremental" in result.stderr, result.stderr
    return vm.snapshot()["vda"]


class Target:
    """The VM restored into: a qemu whose disk is the output, on its own sockets."""

    def __init__(self, tmp_path: Path, sockdir: Path) -> None:
        self.folder = tmp_path / "target"
        self.folder.mkdir(exist_ok=True)
        self.output = self.folder / "vda.qcow2"
        self.sockets = sockdir / "target"
        self.sockets.mkdir(mode=0o700, exist_ok=True)
        self.qmp_path = self.sockets / "qmp.sock"
        self.vm: QemuVM | None = None

    async def start(self) -> QemuVM:
        self.vm = QemuVM(self.folder, {"vda": SIZE}, sockdir=self.sockets)
        return await self.vm.start()

    async def stop(self) -> None:
        if self.vm is not None:
            await self.vm.quit()
            self.vm = None

    def live(self, config: Path, *args: str, starting: bool = True) -> asyncio.Task[LiveRun]:
        where = ("--output", str(self.output), "--target-qmp", str(self.qmp_path))
        return asyncio.ensure_future(live_restore(config, *args, *where, starting=starting))

    async def copying(self, config: Path) -> tuple[LiveRun, QemuVM, QMPClient]:
        """A slow live restore (``--speed 1M``) into this VM, started, once qemu's copy
        job runs: the run, the VM and its monitor."""
        run = await self.live(config, *start_args("--speed", "1M"))
        machine = await self.start()
        assert machine.qmp is not None
        await wait_for_copy(machine.qmp)
        return run, machine, machine.qmp


@pytest.fixture
async def target(tmp_path: Path, sockdir: Path) -> AsyncIterator[Target]:
    machine = Target(tmp_path, sockdir)
    try:
        yield machine
    finally:
        if machine.vm is not None:
            await machine.vm.kill()


def start_args(*more: str) -> tuple[str, ...]:
    return ("--vm", "guest1", "--disk", "vda", *more)


def assert_restored(output: Path, expected: bytes, tmp: Path) -> None:
    """OUTPUT alone (no backing file) holds exactly EXPECTED, and qemu-img check is clean."""
    assert backing_of(output) is None
    qemu_img_check(output)
    diff = first_difference(read_image(output, tmp), expected)
    assert diff is None, f"the restored disk differs at byte {diff}"


def assert_nothing_served(output: Path, repo: Path, pid: int | None) -> None:
    """The served point is stopped, its state removed, the readers' lock free."""
    assert not state_folder(output).exists()
    assert pid is None or not alive(pid)
    assert readers_free(repo)


async def test_the_vm_runs_on_the_backup_at_once_and_the_copy_keeps_its_writes(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, target: Target
) -> None:
    config = config_for(vm)
    repo = tmp_path / "repo"
    expected = bytearray(await back_up(vm, config))
    run = await target.live(config, *start_args("--speed", "1M"))
    assert run.option == (
        f"-blockdev driver=qcow2,node-name=drive-vda,file.driver=file,file.filename={target.output}"
    )
    backing = backing_of(target.output)
    assert backing is not None and backing.startswith("nbd+unix:///vda?socket="), backing
    pid = daemon_pid(target.output)
    assert pid is not None
    assert os.getsid(pid) == pid  # a session of its own: a Ctrl-C on backupd misses it
    held = json.loads((state_folder(target.output) / "served.json").read_text())
    chain = [str(folder / "vda.qcow2") for folder in backups(repo)]
    assert held["pid"] == pid and [f["file"] for f in held["chain"]] == chain
    for f in held["chain"]:  # the daemon reads the very files the gate checked
        assert os.readlink(f"/proc/{pid}/fd/{f['fd']}") == f["file"]
    assert not readers_free(repo)  # prune is kept away from the served files

    machine = await target.start()
    assert machine.qmp is not None
    await wait_for_copy(machine.qmp)
    # the VM reads what is not copied yet from the served point, and writes its own
    await machine.qemu_io("vda", "read -P 0x44 29M 1M")
    await machine.write("vda", 30 * MiB, MiB, 0x5A)
    await machine.write("vda", 20 * MiB, MiB, 0x66)
    expected[30 * MiB : 31 * MiB] = b"\x5a" * MiB
    expected[20 * MiB : 21 * MiB] = b"\x66" * MiB
    job = await copy_job(machine.qmp)
    assert job is not None and job["status"] == "running"
    assert job["current-progress"] < job["total-progress"]
    # backups of the VM go on meanwhile (only prune and merge wait)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0

    await unthrottle(machine.qmp)
    code, log = await run.finish()
    assert code == 0, log
    assert "complete" in log and "Traceback" not in log, log
    assert await copy_job(machine.qmp) is None  # ended and dismissed
    assert_nothing_served(target.output, repo, pid)
    await machine.qemu_io("vda", "read -P 0x44 31M 1M")  # the VM on its own file alone
    await target.stop()
    assert_restored(target.output, bytes(expected), tmp_path)


async def test_sigterm_and_sigkill_leave_the_copy_running_and_resume_finishes_it(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, target: Target
) -> None:
    config = config_for(vm)
    expected = bytearray(await back_up(vm, config))
    await vm.quit()
    run, machine, qmp = await target.copying(config)

    run.signal(signal.SIGTERM)
    code, log = await run.finish()
    assert code == 143, log
    assert "the copy goes on" in log and "--resume" in log and "Traceback" not in log, log
    assert daemon_pid(target.output) is not None
    job = await copy_job(qmp)
    assert job is not None and job["status"] == "running"

    resumed = await target.live(config, "--resume", starting=False)
    await resumed.until("copying every cluster")
    where = ("--output", str(target.output), "--target-qmp", str(target.qmp_path))
    twice = backupd(config, "restore", "--live", "--resume", *where)
    assert twice.returncode == 3, twice.stderr  # one backupd drives a live restore
    assert f"a backupd (pid {resumed.proc.pid}) drives the live restore" in twice.stderr
    await resumed.kill()  # SIGKILL
    await machine.qemu_io("vda", "read -P 0x44 28M 4M")  # still served
    await machine.write("vda", 29 * MiB, MiB, 0x77)
    expected[29 * MiB : 30 * MiB] = b"\x77" * MiB

    final = await target.live(config, "--resume", "--speed", "0", starting=False)
    code, log = await final.finish()
    assert code == 0, log
    assert_nothing_served(target.output, tmp_path / "repo", None)
    await target.stop()
    assert_restored(target.output, bytes(expected), tmp_path)


async def test_a_copy_that_ended_while_backupd_was_away_is_finished_by_resume(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, target: Target
) -> None:
    config = config_for(vm)
    expected = await back_up(vm, config)
    await vm.quit()
    run, _, qmp = await target.copying(config)
    await run.kill()  # SIGKILL
    await unthrottle(qmp)
    await wait_for_job_end(qmp)
    assert backing_of(target.output) is None  # qemu finished the job alone
    pid = daemon_pid(target.output)
    assert pid is not None  # nobody stopped the served point yet

    code, log = await (await target.live(config, "--resume", starting=False)).finish()
    assert code == 0, log
    assert await copy_job(qmp) is None
    assert_nothing_served(target.output, tmp_path / "repo", pid)
    await target.stop()
    assert_restored(target.output, expected, tmp_path)


async def test_a_stopped_vm_and_a_lost_served_point_then_resume(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, target: Target
) -> None:
    """The VM is stopped mid-way (backupd says how to go on), then the host "reboots"
    (the served point's daemon and its socket are gone): a resume serves the point
    again, waits for the VM, and completes the copy."""
    config = config_for(vm)
    expected = bytearray(await back_up(vm, config))
    await vm.quit()
    run, machine, _ = await target.copying(config)
    await machine.write("vda", 31 * MiB, MiB, 0x5A)
    expected[31 * MiB : 32 * MiB] = b"\x5a" * MiB
    await target.stop()
    code, log = await run.finish()
    assert code == 1, log
    assert "went away" in log and "--resume" in log, log
    assert backing_of(target.output) is not None

    pid = daemon_pid(target.output)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    socket = Path(str(backing_of(target.output)).split("socket=", 1)[1])
    while alive(pid):
        await asyncio.sleep(0.05)
    shutil.rmtree(socket.parent)  # /run is empty after a reboot

    resumed = await target.live(config, "--resume", starting=False)
    await resumed.until("serving backup .* again")
    await target.start()
    code, log = await resumed.finish()
    assert code == 0, log
    assert_nothing_served(target.output, tmp_path / "repo", None)
    await target.stop()
    assert_restored(target.output, bytes(expected), tmp_path)


async def test_sigint_while_waiting_for_the_vm_leaves_nothing(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, target: Target
) -> None:
    config = config_for(vm)
    await back_up(vm, config)
    run = await target.live(config, *start_args())
    pid = daemon_pid(target.output)
    assert pid is not None
    run.signal(signal.SIGINT)
    code, log = await run.finish()
    assert code == 130, log
    assert "nothing was restored" in log and "Traceback" not in log, log
    assert not target.output.exists()
    assert_nothing_served(target.output, tmp_path / "repo", pid)
    assert not any(p.name.startswith("live-") for p in (target.sockets.parent).iterdir())


@pytest.mark.slow
async def test_refusals_are_one_line_and_leave_nothing(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, target: Target
) -> None:
    config = config_for(vm)
    await back_up(vm, config)
    where = ("--output", str(target.output), "--target-qmp", str(target.qmp_path))

    def refused(*args: str, code: int, words: str) -> None:
        result = backupd(config, "restore", "--live", *args)
        lines = [line for line in result.stderr.splitlines() if "ERROR" in line]
        assert result.returncode == code, result.stderr
        assert len(lines) == 1 and words in lines[0], result.stderr
        assert "Traceback" not in result.stderr
        assert not state_folder(target.output).exists()
        assert readers_free(tmp_path / "repo")

    target.output.write_bytes(b"mine")
    refused(*start_args(), *where, code=2, words="exists")
    assert target.output.read_bytes() == b"mine"
    target.output.unlink()
    refused("--vm", "guest1", "--disk", "vdz", *where, code=1, words="has no disk 'vdz'")
    refused(*start_args("--wait", "1"), *where, code=1, words="target VM unreachable")
    assert not target.output.exists()
    other = QemuVM(tmp_path / "other", {"vda": SIZE}, sockdir=target.sockets)
    other.workdir.mkdir()
    await other.start()  # a VM on the target socket, on a disk of its own
    try:
        refused(*start_args("--wait", "1"), *where, code=1, words="has not opened")
    finally:
        await other.kill()
    alone = ("--output", str(target.output))
    refused(*start_args(), *alone, code=2, words="--target-qmp")
    refused("--resume", "--vm", "guest1", *where, code=2, words="--resume takes")
    refused("--resume", *where, code=2, words="does not exist")

    newest = backups(tmp_path / "repo")[-1] / "vda.qcow2"
    data = bytearray(newest.read_bytes())  # its backing file name: not its parent's
    offset = data.index(b"../")
    data[offset : offset + 3] = b"/.."
    newest.write_bytes(bytes(data))
    refused(*start_args(), *where, code=1, words="refusing to open it")
    assert not target.output.exists()


@pytest.mark.slow
async def test_an_output_a_qemu_opened_elsewhere_is_kept_when_the_wait_ends(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, sockdir: Path, target: Target
) -> None:
    """A VM started on the output with another QMP socket than the one given: when the
    wait ends, backupd fails, but removes nothing that VM reads (qemu's image locks on
    the output tell), and a resume with the right socket completes the copy."""
    config = config_for(vm)
    expected = await back_up(vm, config)
    await vm.quit()
    run = await target.live(config, *start_args("--wait", "3"))
    elsewhere = QemuVM(target.folder, {"vda": SIZE}, sockdir=sockdir)
    await elsewhere.start()
    try:
        code, log = await run.finish()
        assert code == 1, log
        assert "target VM unreachable" in log and "--resume" in log, log
        assert backing_of(target.output) is not None and daemon_pid(target.output) is not None
        await elsewhere.qemu_io("vda", "read -P 0x44 28M 4M")  # served still
        resumed = await live_restore(
            config,
            "--resume",
            "--output",
            str(target.output),
            "--target-qmp",
            str(elsewhere.qmp_path),
            starting=False,
        )
        code, log = await resumed.finish()
        assert code == 0, log
    finally:
        await elsewhere.quit()
    assert_restored(target.output, expected, tmp_path)


async def test_an_encrypted_backup_is_restored_live_into_a_plain_file(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, target: Target
) -> None:
    from backupd.keys import keygen

    key = tmp_path / "backupd.key"
    keygen(key)
    config = config_for(vm, encryption={"key_file": str(key), "iter_time": 0.05})
    expected = await back_up(vm, config)
    run = await target.live(config, *start_args("--speed", "1M"))
    pid = daemon_pid(target.output)
    assert pid is not None
    machine = await target.start()
    assert machine.qmp is not None
    await wait_for_copy(machine.qmp)
    await machine.qemu_io("vda", "read -P 0x44 29M 1M")  # decrypted by the served point
    await unthrottle(machine.qmp)
    code, log = await run.finish()
    assert code == 0, log
    assert_nothing_served(target.output, tmp_path / "repo", pid)
    await target.stop()
    assert_restored(target.output, expected, tmp_path)  # a plain qcow2: no key needed
    # without the key the point is never served, and nothing is left
    settings = yaml.safe_load(config.read_text())
    settings["vms"]["guest1"]["encryption"]["key_file"] = str(tmp_path / "missing.key")
    other = tmp_path / "missing-key.yaml"
    other.write_text(yaml.safe_dump(settings))
    output = tmp_path / "other.qcow2"
    where = ("--output", str(output), "--target-qmp", str(tmp_path / "q"))
    refused = backupd(other, "restore", "--live", *start_args(), *where)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "missing.key" in refused.stderr and not output.exists()
