"""Locks: one backup run per VM at a time, and who holds it.

``<vm>/.lock`` in the repository is locked with ``flock`` (exclusive for a run or a
prune); ``<vm>/.readers`` is shared by serve, restore and verify while they read backups
and exclusive for prune.  A second lock per VM on the host, named after its QMP socket,
keeps runs of one VM from different configurations (two repositories) apart.  Every
holder writes its pid, command and start time into the file so that a refused command
can say who is in the way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from backupd.errors import BusyError, RepositoryError


def _holder_text(fd: int) -> str:
    """Who holds the lock, as its holder wrote it; "" when that holder has gone (a
    reader that left while another still holds the shared lock)."""
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    match = re.search(r"\(pid (\d+)\)", text)
    if match:
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            return ""
        except PermissionError:
            pass
    return text


def acquire(path: Path, vm: str, *, shared: bool = False, purpose: str = "") -> int:
    """Take the lock at ``path`` and name this process as its holder; the descriptor
    that holds it (the caller closes it, or hands it to a process that outlives it:
    the lock lasts while any copy of the descriptor is open).  BusyError when another
    process holds it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        # never through a symlink: the repository is not trusted, the lock file is written
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise RepositoryError(f"lock file {path} is a symlink: refusing to follow it") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RepositoryError(f"lock file {path} is not a regular file: refusing it")
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd) or "another backupd process"
            raise BusyError(f"vm {vm} is busy: {holder} holds its lock") from None
        name_holder(fd, purpose or " ".join(os.path.basename(a) for a in sys.argv[:3]))
    except BaseException:
        os.close(fd)
        raise
    return fd


def name_holder(fd: int, what: str, pid: int | None = None) -> None:
    """Write who holds the lock on ``fd``: WHAT (pid PID) since NOW.  A shared holder
    names itself too (the newest of them)."""
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    line = f"{what} (pid {pid or os.getpid()}) since {since}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, line, 0)


@contextlib.contextmanager
def vm_lock(path: Path, vm: str, *, shared: bool = False, purpose: str = "") -> Iterator[None]:
    """Hold the lock at ``path`` (BusyError when another process holds it)."""
    fd = acquire(path, vm, shared=shared, purpose=purpose)
    try:
        yield
    finally:
        os.close(fd)


def host_lock_path(folder: Path, qmp: str) -> Path:
    """The host-wide lock of the VM behind QMP address ``qmp``."""
    digest = hashlib.sha256(qmp.encode()).hexdigest()[:16]
    return folder / f"vm-{digest}.lock"
