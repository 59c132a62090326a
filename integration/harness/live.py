"""Driving ``backupd restore --live`` in tests: the command in the background, the
served point's daemon (found through the state folder, checked independently of
backupd's own code, always killed by pid at the end), the copy job as the VM's qemu
reports it, and the locks it holds."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from integration.harness.runs import argv

#: what a guest kernel says when a read or write of its disk failed
IO_ERRORS = re.compile(
    r"I/O error|blk_update_request|Buffer I/O|EXT4-fs (error|warning)|"
    r"Remounting filesystem read-only|Aborting journal"
)


def state_folder(output: Path) -> Path:
    return output.parent / f".{output.name}.live"


def daemon_pid(output: Path) -> int | None:
    """The pid of the served point's qemu-storage-daemon while it runs (from its pid
    file, checked against /proc), else None."""
    return _pid_in(state_folder(output) / "qsd.pid")


def _pid_in(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if b"qemu-storage-daemon" in cmdline and alive(pid) else None


def alive(pid: int) -> bool:
    """Whether process PID runs (a zombie has exited: only its parent has not reaped it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def kill_daemons(folder: Path) -> None:
    """SIGKILL every served point's daemon of the outputs below FOLDER (by pid)."""
    for pidfile in folder.rglob("qsd.pid"):
        pid = _pid_in(pidfile)
        if pid is not None and pidfile.parent.name.endswith(".live"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def readers_free(repo: Path, vm: str = "guest1") -> bool:
    """Whether ``prune`` could take the VM's readers lock now (nobody holds it)."""
    try:
        fd = os.open(repo / vm / ".readers", os.O_RDONLY)
    except FileNotFoundError:
        return True  # nothing ever took it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


@dataclass
class LiveRun:
    """One ``backupd restore --live`` in the background."""

    proc: asyncio.subprocess.Process
    option: str = ""
    log: str = ""

    async def until(self, pattern: str, timeout: float = 60) -> None:
        """Read its log until a line matches PATTERN."""
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.proc.stderr.readline()).decode(errors="replace")
                self.log += line
                if re.search(pattern, line):
                    return
                if not line:
                    raise AssertionError(f"no {pattern!r} in the log:\n{self.log}")

    async def finish(self, timeout: float = 120) -> tuple[int, str]:
        """Its exit code and its whole log (stderr)."""
        assert self.proc.stderr is not None
        err = await asyncio.wait_for(self.proc.stderr.read(), timeout)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        self.log += err.decode(errors="replace")
        return code, self.log

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


async def live_restore(config: Path, *args: str, starting: bool = True) -> LiveRun:
    """``backupd restore --live ARGS...`` in the background; when STARTING (a new live
    restore, not a resume) waits for the ``-blockdev`` option it prints."""
    proc = await asyncio.create_subprocess_exec(
        *argv(config, "restore", "--live", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    run = LiveRun(proc)
    if starting:
        assert proc.stdout is not None
        run.option = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()
    return run


async def copy_job(qmp: QMPClient) -> dict[str, Any] | None:
    """The live restore's copy job in the VM's qemu (a stream job), or None."""
    jobs: Any = await qmp.execute("query-jobs")
    streams = [job for job in jobs if job["type"] == "stream"]
    return streams[0] if streams else None


async def wait_for_copy(qmp: QMPClient, timeout: float = 60) -> dict[str, Any]:
    """Until the copy job runs in the VM's qemu."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        job = await copy_job(qmp)
        if job is not None and job["status"] == "running":
            return job
        await asyncio.sleep(0.1)
    raise AssertionError("the copy job never ran in the VM's qemu")


async def wait_for_job_end(qmp: QMPClient, timeout: float = 120) -> None:
    """Until the copy job has ended (qemu dismisses it then)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await copy_job(qmp) is None:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the copy job did not end")


async def unthrottle(qmp: QMPClient) -> None:
    """Let the copy job run at full speed (it was started slow so that the tests can
    watch it half-way, however fast the machine)."""
    job = await copy_job(qmp)
    assert job is not None
    await qmp.execute("block-job-set-speed", {"device": job["id"], "speed": 0})
