"""Opening what the repository holds without being led elsewhere.

Repository contents are untrusted: a backup folder, a manifest or an image may have
been replaced by a symlink (to another VM's live disk, to ``/etc/shadow``), by a FIFO
(an ``open`` that never returns) or by a device node.  These helpers open one path
component at a time below a folder descriptor, never follow a symlink, and hand out
descriptors only for folders and regular files.  The caller's path (the repository
root from the configuration) is trusted; nothing below it is.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from backupd.errors import RepositoryError

_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused right after)
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def fsync_dir(path: Path) -> None:
    """Make the entries of the (trusted) folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    return "a special file"


def open_folder(name: str | Path, dir_fd: int | None, what: str) -> int:
    """A descriptor for the folder ``name`` (relative to ``dir_fd``); RepositoryError when
    it is a symlink or not a folder, FileNotFoundError when it is absent."""
    try:
        return os.open(name, _FOLDER, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
    try:
        kind = _kind(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        kind = "not a folder"
    raise RepositoryError(f"{what} is {kind}, not a folder: refusing to follow it")


def open_regular(name: str, dir_fd: int, what: str) -> int:
    """A read-only descriptor for the regular file ``name`` in the folder ``dir_fd``;
    RepositoryError for a symlink or anything but a regular file, FileNotFoundError when
    it is absent."""
    before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(before.st_mode):
        raise RepositoryError(f"{what} is {_kind(before.st_mode)}: refusing to open it")
    try:
        fd = os.open(name, _FILE, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RepositoryError(f"{what} became a symlink: refusing to open it") from None
        raise
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(
        after.st_mode
    ):
        os.close(fd)
        raise RepositoryError(f"{what} was replaced while it was opened: refusing it")
    return fd
