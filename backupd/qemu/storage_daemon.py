"""backupd's own qemu-storage-daemon: the qemu that opens a VM's images while the VM's
qemu is not running (offline backups).

One daemon per run, in a private folder of its own (one per VM, in the runtime
folder): its QMP monitor listens on ``qmp.sock``, it writes and locks its pid file
``daemon.pid`` itself for as long as it lives, and what it prints goes to
``daemon.log`` (kept until the next run, for the error message of a daemon that died).

Its lifetime is backupd's:

- backupd starts it, and :meth:`StorageDaemon.stop` always stops it, on every way out
  (the caller runs it to completion, also on SIGINT/SIGTERM): ``quit``, which closes
  every image cleanly and so stores its persistent bitmaps; SIGTERM, then SIGKILL, only
  for a daemon that does not go.
- If backupd dies without stopping it (SIGKILL, a crash), the kernel sends the daemon
  SIGTERM: ``PR_SET_PDEATHSIG`` is set in the child between fork and exec (exec keeps
  it), and a child whose parent is already gone by then exits at once.
  qemu-storage-daemon handles SIGTERM like ``quit``: the images are closed cleanly,
  their bitmaps stored and consistent, their locks released.
- It runs in a session of its own, so a Ctrl-C on backupd's terminal reaches backupd
  only, which stops the daemon after its teardown.
- A daemon that is still there when the next run starts (it had not finished closing
  the images, or it was stopped with SIGSTOP) holds the lock of its pid file:
  :func:`stop_leftover` finds it so, and ends it the same way (SIGTERM, SIGCONT) before
  anything opens the images again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from backupd.errors import QemuConnectError, QemuError
from backupd.faults import checkpoint
from backupd.private import create_exclusive
from backupd.qemu.qmp import QemuMonitor

log = logging.getLogger("backupd.qemu")

DAEMON = "qemu-storage-daemon"
QMP_SOCKET = "qmp.sock"
PID_FILE = "daemon.pid"
LOG_FILE = "daemon.log"
#: how long the daemon may take to listen on its monitor
START_TIMEOUT = 10.0
#: how long it may take to quit: it flushes every image and stores every bitmap
QUIT_TIMEOUT = 60.0
#: then, after SIGTERM, before SIGKILL
TERM_TIMEOUT = 10.0
#: linux/prctl.h
PR_SET_PDEATHSIG = 1


def _option(value: str) -> str:
    """``value`` inside a qemu ``key=value,...`` option (a comma is written twice)."""
    return value.replace(",", ",,")


def daemon_argv(folder: Path) -> list[str]:
    """The command line of the daemon of ``folder``: a QMP monitor and a pid file, no
    image yet (they are opened over QMP, where a refusal is an answer, not an exit)."""
    monitor = f"socket,id=backupd-monitor,path={_option(str(folder / QMP_SOCKET))}"
    return [
        DAEMON,
        "--chardev",
        f"{monitor},server=on,wait=off",
        "--monitor",
        "chardev=backupd-monitor",
        "--pidfile",
        str(folder / PID_FILE),
    ]


def _die_with(parent: int) -> Callable[[], None]:
    """What the child runs between fork and exec: SIGTERM when ``parent`` dies, and an
    immediate exit if it died already.  ``prctl`` is looked up before the fork."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def child() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)

    return child


def log_tail(folder: Path, limit: int = 2000) -> str:
    """The last lines the daemon printed, as one line."""
    try:
        with open(folder / LOG_FILE, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " / ".join(line.strip() for line in text.splitlines() if line.strip())[-500:]


class StorageDaemon:
    """One qemu-storage-daemon of backupd's, in the private ``folder``."""

    def __init__(self, folder: Path, *, timeout: float = 30.0) -> None:
        self.folder = folder
        self.timeout = timeout
        self.monitor = QemuMonitor(str(folder / QMP_SOCKET), timeout=timeout)
        self.process: asyncio.subprocess.Process | None = None
        self._connected = False

    async def start(self) -> QemuMonitor:
        """Start the daemon and connect to its monitor."""
        for name in (QMP_SOCKET, LOG_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.folder / name).unlink()
        output = create_exclusive(self.folder / LOG_FILE)
        try:
            self.process = await asyncio.create_subprocess_exec(
                *daemon_argv(self.folder),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with(os.getpid()),
            )
        except FileNotFoundError:
            raise QemuError(
                f"{DAEMON} is not installed (Debian: qemu-system-common); offline backups need it"
            ) from None
        finally:
            os.close(output)
        await self._connect()
        return self.monitor

    async def _connect(self) -> None:
        """Connect once the daemon listens (it creates the socket a moment before)."""
        assert self.process is not None
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT
        while True:
            if self.process.returncode is not None:
                raise QemuError(
                    f"{DAEMON} exited at start ({self.process.returncode}): "
                    f"{log_tail(self.folder) or 'no message'}"
                )
            try:
                await self.monitor.connect()
            except QemuConnectError as exc:
                if not exc.unreachable or asyncio.get_running_loop().time() > deadline:
                    raise
                self.monitor = QemuMonitor(self.monitor.address, timeout=self.timeout)
                await asyncio.sleep(0.02)
                continue
            self._connected = True
            return

    async def stop(self) -> None:
        """Quit the daemon (images closed cleanly, bitmaps stored) and wait for it;
        SIGTERM, then SIGKILL, if it does not go.  Never raises."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            if self._connected:
                with contextlib.suppress(QemuError):  # it may hang up before answering
                    await self.monitor.execute("quit")
                checkpoint("after-quit")
            else:
                _signal(process, signal.SIGTERM)
            await self._wait_or_kill(process)
        await self.monitor.close()
        with contextlib.suppress(FileNotFoundError):
            (self.folder / QMP_SOCKET).unlink()
        if process.returncode != 0:
            log.warning(
                "%s ended with status %s: %s",
                DAEMON,
                process.returncode,
                log_tail(self.folder) or "no message",
            )

    async def _wait_or_kill(self, process: asyncio.subprocess.Process) -> None:
        if await _exited(process, QUIT_TIMEOUT):
            return
        log.error("%s (pid %d) did not quit; sending SIGTERM", DAEMON, process.pid)
        _signal(process, signal.SIGTERM)
        if await _exited(process, TERM_TIMEOUT):
            return
        log.error(
            "%s (pid %d) did not stop; killing it: the images' bitmaps are left "
            "inconsistent, so the next backup is a full one",
            DAEMON,
            process.pid,
        )
        _signal(process, signal.SIGKILL)
        await process.wait()


def _signal(process: asyncio.subprocess.Process, sig: int) -> None:
    """Signal our own child, which may have ended a moment ago."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)


async def _exited(process: asyncio.subprocess.Process, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            await process.wait()
    except TimeoutError:
        return False
    return True


def live_daemon(folder: Path) -> int | None:
    """The pid of the daemon of ``folder`` if one is alive: it holds the lock on its
    pid file (so the pid in it is its own, whatever happened to other processes)."""
    try:
        fd = os.open(folder / PID_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            text = os.read(fd, 64).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        return None  # nobody holds it: a daemon that was killed left the file
    finally:
        os.close(fd)


def _is_ours(pid: int, folder: Path) -> bool:
    """Whether process ``pid`` is the daemon of ``folder`` (its command line says so)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(folder / PID_FILE).encode() in argv


async def stop_leftover(folder: Path, timeout: float) -> int | None:
    """End the daemon an earlier run left in ``folder``, if there is one (SIGTERM: it
    closes the images cleanly; SIGCONT, in case it was stopped) and wait until it is
    gone; its pid, or None.  QemuError if it does not go within ``timeout``."""
    pid = live_daemon(folder)
    if pid is None:
        with contextlib.suppress(FileNotFoundError):
            (folder / PID_FILE).unlink()  # the daemon was killed: nothing holds it
        return None
    if not _is_ours(pid, folder):
        if live_daemon(folder) is None:
            return pid  # it ended meanwhile
        raise QemuError(
            f"{folder / PID_FILE} is locked by process {pid}, which is not the {DAEMON} "
            "of this folder; backupd will not signal it"
        )
    log.warning("stopping the %s (pid %d) an earlier run left", DAEMON, pid)
    for sig in (signal.SIGTERM, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while live_daemon(folder) == pid:
        if loop.time() > deadline:
            raise QemuError(
                f"the {DAEMON} an earlier run left (pid {pid}) did not stop within "
                f"{timeout:g} s; it still holds the VM's images"
            )
        await asyncio.sleep(0.05)
    return pid
