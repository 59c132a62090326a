"""Output files that carry their name only when complete.

An :class:`OutputFile` is written under a fresh temporary name in the destination's
folder (``mkstemp``: created exclusively, mode 0600, never through a symlink) and
takes the destination's name in :meth:`OutputFile.commit`, after its data was synced;
:meth:`OutputFile.discard` removes it.  A copy that fails or is interrupted therefore
never leaves a half-written file under the destination's name.

The destination: a regular file is replaced only with ``overwrite`` (atomically, by
the rename; a symlink there is replaced, never followed); without it the commit links
the file into place, so a file that appeared meanwhile is not replaced either.
Anything else there (a directory, a device node) is refused.  Files are 0600 whatever
the umask: a disk image holds whatever its guest stored (keys, password hashes), and
there is no source mode to copy as ``cp`` would; ``chmod`` it to share it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from ..fileio import close_quietly


def check_destination(path: Path, *, overwrite: bool) -> None:
    """Refuse a destination that exists (unless ``overwrite``) or that a file may not
    replace; raises OSError with the path."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise OSError(errno.EINVAL, "is not a regular file", str(path))
    if not overwrite:
        raise FileExistsError(errno.EEXIST, "exists", str(path))


class OutputFile:
    def __init__(self, path: Path, *, overwrite: bool = False) -> None:
        self.path = path
        self.overwrite = overwrite
        self.fd = -1
        self.temp: Path | None = None

    def open(self) -> int:
        """Create the temporary file; returns its descriptor (read-write)."""
        check_destination(self.path, overwrite=self.overwrite)
        fd, temp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name[:200]}.", suffix=".part"
        )
        self.fd, self.temp = fd, Path(temp)
        return fd

    def commit(self) -> None:
        """Give the (synced) file its name, then sync the folder."""
        assert self.temp is not None
        close_quietly(self.fd)
        self.fd = -1
        if self.overwrite:
            check_destination(self.path, overwrite=True)
            os.replace(self.temp, self.path)
        else:
            self._link_into_place(self.temp)
        self.temp = None
        folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def _link_into_place(self, temp: Path) -> None:
        try:
            os.link(temp, self.path)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "appeared while copying", str(self.path)) from None
        except OSError as exc:  # a filesystem without hard links
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            check_destination(self.path, overwrite=False)
            os.rename(temp, self.path)
            return
        os.unlink(temp)

    def discard(self) -> None:
        """Close and remove the temporary file (never the destination)."""
        close_quietly(self.fd)
        self.fd = -1
        if self.temp is not None:
            with contextlib.suppress(FileNotFoundError):
                self.temp.unlink()
            self.temp = None
