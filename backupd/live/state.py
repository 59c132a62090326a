"""What a live restore in progress remembers, so that ``--resume`` can finish it.

The state folder sits next to the output (``/var/lib/vms/.vda.qcow2.live/`` for
``/var/lib/vms/vda.qcow2``, 0700): on the same file system as the output, so it
survives a reboot with it, and it holds

```
state.json     which point of which VM and disk is served, where, the copy job's id
qsd.pid        qemu-storage-daemon's pid file (locked by the daemon while it lives)
served.json    what the daemon holds: its pid, socket, the chain's files and descriptors
qsd.log        the daemon's own messages
control.lock   held by the backupd that drives the copy (one at a time)
overlay.qcow2  the output while it is being made (linked to its name when complete)
```

The served point's unix socket lives in the runtime folder instead
(``<runtime_dir>/live-<digest>/nbd.sock``): a socket path must be short (108 bytes), and
it is named by a digest of the output's path, so a resume after a reboot (which empties
``/run``) makes the very socket the overlay's backing file names.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backupd.errors import BackupdError, BusyError, UsageError
from backupd.names import is_backup_id, is_name
from backupd.private import read_private, write_private

FORMAT = 1
STATE = "state.json"
PIDFILE = "qsd.pid"
SERVED = "served.json"
LOG = "qsd.log"
OVERLAY = "overlay.qcow2"
CONTROL = "control.lock"

#: what a path may hold to go into an NBD URI and qemu's option syntax unquoted
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9/._-]*")


class StateError(BackupdError):
    """The state of a live restore is missing or damaged."""


@dataclass(frozen=True, slots=True)
class LiveState:
    """One live restore: the point served (``vm``, ``backup``, ``disk`` of the
    repository ``repository``), the unix ``socket`` it is served on, the ``output`` made
    over it, and the id of the copy ``job`` in the VM's qemu."""

    output: str
    vm: str
    backup: str
    disk: str
    repository: str
    size: int
    socket: str
    job: str
    created: str
    format: int = FORMAT

    @property
    def uri(self) -> str:
        """The served point, as the overlay's backing file names it."""
        return f"nbd+unix:///{self.disk}?socket={self.socket}"

    @property
    def folder(self) -> Path:
        return state_folder(Path(self.output))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: Path) -> LiveState:
        try:
            data: Any = json.loads(text)
            fields = {name: data[name] for name in cls.__dataclass_fields__}
            state = cls(**fields)
        except (ValueError, TypeError, KeyError) as exc:
            raise StateError(
                f"the state of the live restore in {where} is damaged: {exc}"
            ) from None
        text_fields = (state.output, state.repository, state.socket, state.job, state.created)
        valid = (
            state.format == FORMAT
            and all(isinstance(value, str) for value in text_fields)
            and is_name(state.vm)
            and is_name(state.disk)
            and is_backup_id(state.backup)
            and isinstance(state.size, int)
            and state.size > 0
            and _PLAIN_PATH.fullmatch(state.socket) is not None
        )
        if not valid:
            raise StateError(f"the state of the live restore in {where} is damaged")
        return state


def absolute(output: Path) -> Path:
    """The output's absolute path (its folder resolved, the name kept)."""
    return Path(os.path.realpath(output.parent)) / output.name


def digest(output: Path) -> str:
    return hashlib.sha256(str(output).encode()).hexdigest()[:12]


def state_folder(output: Path) -> Path:
    return output.parent / f".{output.name}.live"


def socket_path(runtime: Path, output: Path) -> Path:
    """Where the point is served for ``output`` (UsageError when the runtime folder's
    path cannot go into an NBD URI or a unix socket address as it is)."""
    path = runtime / f"live-{digest(output)}" / "nbd.sock"
    if _PLAIN_PATH.fullmatch(str(path)) is None or len(str(path)) > 100:
        raise UsageError(
            f"runtime_dir {runtime} does not fit in an NBD URI (use a short path of "
            "letters, digits, '/', '.', '_', '-')"
        )
    return path


def new_state(
    output: Path, repository: Path, vm: str, backup: str, disk: str, size: int, socket: Path
) -> LiveState:
    return LiveState(
        output=str(output),
        vm=vm,
        backup=backup,
        disk=disk,
        repository=str(repository),
        size=size,
        socket=str(socket),
        job=f"backupd-live-{digest(output)[:8]}",
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def make_folder(output: Path) -> Path:
    """The state folder of ``output``, new (0700); FileExistsError when there is one."""
    folder = state_folder(output)
    os.mkdir(folder, 0o700)
    return folder


def check_folder(folder: Path) -> None:
    """A state folder must be a real folder of ours that nobody else can write to (its
    pid file decides which process backupd signals)."""
    info = os.lstat(folder)
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.geteuid()
        or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise StateError(
            f"{folder} is not a private folder of backupd's user (a symlink, a file, "
            "another owner, or writable by others): refusing to use it"
        )


def take_control(output: Path) -> int:
    """The descriptor holding the control lock of the live restore into ``output``: one
    backupd drives it at a time (BusyError naming the pid of the one that does)."""
    path = state_folder(output) / CONTROL
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise BusyError(f"a backupd ({holder}) drives the live restore into {output}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    return fd


def save(state: LiveState) -> None:
    write_private(state.folder / STATE, state.to_json())


def load(output: Path) -> LiveState | None:
    """The state of the live restore into ``output``; None when there is none."""
    folder = state_folder(output)
    if not os.path.lexists(folder):
        return None
    check_folder(folder)
    text = read_private(folder / STATE)
    if text is None:
        raise StateError(f"{folder} holds no {STATE}: not a live restore's state")
    state = LiveState.from_json(text, folder)
    if state.output != str(output):
        raise StateError(f"the state in {folder} belongs to {state.output}, not {output}")
    return state


def remove(output: Path, socket: Path | None) -> None:
    """Remove the state folder of ``output`` and the served point's socket folder."""
    shutil.rmtree(state_folder(output), ignore_errors=True)
    if socket is not None:
        with contextlib.suppress(OSError):
            socket.unlink()
        with contextlib.suppress(OSError):
            socket.parent.rmdir()
