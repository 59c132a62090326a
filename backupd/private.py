"""Folders and files that only backupd may write: the scratch area, the runtime folder
for sockets and locks, and the small state files in them.

A folder is made 0700 component by component, and one that exists must be a real folder
(not a symlink) owned by backupd's user with no group or other write permission: in a
folder that another user can write to, a planted symlink or file would make backupd
(root) overwrite a file of the attacker's choice, or trust the attacker's state file.
Files are created exclusively (``O_EXCL | O_NOFOLLOW``), state files written through a
temporary file with an unpredictable name, then renamed.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from backupd.errors import ConfigError

if TYPE_CHECKING:
    from backupd.config import Config


def private_dir(path: Path, what: str) -> Path:
    """``path`` as a folder only we can write (made 0700 where missing); ConfigError
    naming ``what`` (e.g. "scratch_dir") when it exists and is not ours alone."""
    path = Path(os.path.abspath(path))
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{what} {path} is not a folder (a symlink or a file is refused)")
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"{what} {path} belongs to uid {info.st_uid}, not to backupd's user "
            f"(uid {os.geteuid()}); use a folder of its own"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{what} {path} can be written by other users (mode {info.st_mode & 0o7777:04o}); "
            "make it 0700 or use a folder of its own"
        )
    return path


def runtime_base(config: Config) -> Path:
    """The folder for backupd's sockets and host locks (private, 0700)."""
    base = config.runtime_dir
    if base is None:
        run = Path("/run/backupd")
        base = run if os.access("/run", os.W_OK) else Path(tempfile.gettempdir()) / "backupd"
    return private_dir(base, "runtime_dir")


def create_exclusive(path: Path, mode: int = 0o600, flags: int = os.O_WRONLY) -> int:
    """A new file at ``path`` (never an existing one, never through a symlink)."""
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, 0600."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_private(path: Path, limit: int = 1 << 20) -> str | None:
    """The text of a small file of ours, or None when it is missing (never followed
    through a symlink, never more than ``limit`` bytes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # missing, or a symlink (ELOOP)
        return None
    try:
        return os.read(fd, limit).decode(errors="replace")
    finally:
        os.close(fd)
