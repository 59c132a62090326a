"""The served point of a live restore: a qemu-storage-daemon that outlives backupd.

A VM booted from the overlay reads every cluster not yet copied from this daemon, so it
must not die with backupd: it runs in a session of its own (a Ctrl-C on backupd's
terminal does not reach it; it is no child that dies with its parent), writes its
messages into the state folder, and is known afterwards only by its pid file.  qemu
keeps that file locked while it lives, so the lock's holder *is* the daemon: a pid
file left by a dead daemon (a reboot, a SIGKILL) names nobody, and a pid that was
reused by another program is never signalled (the holder must also be a
qemu-storage-daemon started with this very pid file).

Like ``backupd serve`` it is handed the chain through the gate (:mod:`backupd.chain`):
the descriptors of the checked files, node by node.  It is also handed the descriptor
that holds the VM's ``.readers`` lock (shared): the lock lasts exactly as long as the
served point, also when backupd is gone.  That keeps ``prune`` and ``merge`` (which
rewrite and remove backups) away from the files it serves, and nothing else: backups,
``serve``, ``restore`` and ``verify`` go on.  Whoever stops the daemon, or a crash,
ends the lock with it.

Only :meth:`ServedPoint.stop` stops it, and backupd calls it only when no qemu can need
it any more: the copy is complete, or the output was never used (see
:mod:`backupd.live.flow`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
from pathlib import Path

from backupd.chain import checked_chain
from backupd.errors import BackupdError
from backupd.keys import SECRET_ID, Key
from backupd.live.state import LOG, PIDFILE, SERVED
from backupd.lock import acquire, name_holder
from backupd.manifest import Manifest
from backupd.private import private_dir, write_private
from backupd.repository import VMRepository
from backupd.serving import blockdev_for

#: struct flock on Linux x86-64 and aarch64: l_type, l_whence, l_start, l_len, l_pid
_FLOCK = struct.Struct("@hhqqi4x")
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


def _exited(pidfd: int) -> bool:
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


class ServedPoint:
    """The daemon serving one disk of one backup on ``socket``, its pid file and log
    in the state ``folder``."""

    def __init__(self, folder: Path, socket: Path) -> None:
        self.folder = folder
        self.socket = socket
        self.pidfile = folder / PIDFILE
        self.logfile = folder / LOG
        self._child: subprocess.Popen[bytes] | None = None

    def pid(self) -> int | None:
        """The daemon's pid while it lives (it holds the lock on its pid file), else None."""
        try:
            fd = os.open(self.pidfile, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            kind, _, _, _, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, query))
        finally:
            os.close(fd)
        if kind == fcntl.F_UNLCK or pid <= 0:
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        ours = os.path.basename(argv[0]) == b"qemu-storage-daemon" and (
            str(self.pidfile).encode() in argv
        )
        return pid if ours else None

    def last_words(self) -> str:
        """The daemon's last message (from its log), for an error line."""
        try:
            lines = self.logfile.read_bytes()[-4096:].decode(errors="replace").splitlines()
        except OSError:
            return "no message"
        lines = [line.strip() for line in lines if line.strip()]
        return lines[-1] if lines else "no message"

    def _args(self, nodes: list[dict[str, object]], disk: str, key: Key | None) -> list[str]:
        server = {"addr": {"type": "unix", "path": str(self.socket)}}
        export = {"type": "nbd", "id": "e0", "node-name": nodes[-1]["node-name"], "name": disk}
        return [
            "qemu-storage-daemon",
            *("--pidfile", str(self.pidfile)),
            *(("--object", json.dumps(key.qemu_object(SECRET_ID))) if key is not None else ()),
            *(arg for node in nodes for arg in ("--blockdev", json.dumps(node))),
            *("--nbd-server", json.dumps(server)),
            *("--export", json.dumps({**export, "writable": False})),
        ]

    async def start(
        self, repo: VMRepository, manifest: Manifest, disk: str, holder: str, key: Key | None
    ) -> int:
        """Take the VM's ``.readers`` lock (shared), pass the chain of ``disk`` through the
        gate and start the daemon on it, detached; its pid once it serves.  HOLDER says,
        in the lock file, what holds the lock (with the daemon's pid).  ``key``: the VM's
        encryption key (qemu reads it once, from the descriptor, when it starts)."""
        private_dir(self.socket.parent, "runtime_dir")
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # left by a daemon that was killed (the caller checked)
        lock = acquire(repo.readers_path, repo.vm, shared=True, purpose=holder)
        try:
            with checked_chain(repo, manifest, disk, encrypted=key is not None) as files:
                nodes = blockdev_for(files, 0)
                log = os.open(
                    self.logfile,
                    os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
                try:
                    # not in a thread: a cancel must not come between the fork and
                    # self._child, or a daemon would run that nothing knows of
                    self._child = subprocess.Popen(  # noqa: ASYNC220
                        self._args(nodes, disk, key),
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        pass_fds=[checked.fd for checked in files]
                        + [lock]
                        + ([key.fd] if key is not None else []),
                        start_new_session=True,
                        cwd="/",
                    )
                finally:
                    os.close(log)
                pid = await self._ready(manifest.id)
                self._record(pid, [(str(checked.path), checked.fd) for checked in files], lock)
            name_holder(lock, holder, pid)
            return pid
        finally:
            os.close(lock)  # the daemon holds the lock now (or nobody, after a failure)

    def _record(self, pid: int, files: list[tuple[str, int]], lock: int) -> None:
        """What the daemon holds, for the operator (``served.json``; nothing reads it)."""
        held = {
            "pid": pid,
            "socket": str(self.socket),
            "chain": [{"file": path, "fd": fd} for path, fd in files],
            "readers_lock_fd": lock,
        }
        write_private(self.folder / SERVED, json.dumps(held, indent=2) + "\n")

    async def _ready(self, backup: str) -> int:
        """Until the daemon has written its pid file (every node and the export exist);
        BackupdError with its last message when it exits or hangs instead."""
        assert self._child is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        while self._child.poll() is None:
            pid = self.pid()
            if pid is not None:
                return pid
            if loop.time() > deadline:
                self._child.kill()
                self._child.wait()
                raise BackupdError(f"cannot serve backup {backup}: qemu-storage-daemon hangs")
            await asyncio.sleep(0.02)
        raise BackupdError(f"cannot serve backup {backup}: {self.last_words()}")

    async def stop(self) -> None:
        """Stop the daemon (SIGTERM, SIGKILL after a while) and wait until it is gone."""
        pid = self.pid()
        if pid is not None:
            pidfd = os.pidfd_open(pid)
            try:
                if self.pid() == pid:  # still ours now that the pidfd pins the process
                    await self._signal_until_gone(pidfd)
            finally:
                os.close(pidfd)
        if self._child is not None:  # ours to reap
            if self._child.poll() is None:  # started, but never served
                self._child.kill()
            self._child.wait()
            self._child = None
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

    @staticmethod
    async def _signal_until_gone(pidfd: int) -> None:
        loop = asyncio.get_running_loop()
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, sig)
            deadline = loop.time() + wait
            while loop.time() < deadline:
                if _exited(pidfd):
                    return
                await asyncio.sleep(0.02)
        raise BackupdError("qemu-storage-daemon does not exit")
