"""The output of a live restore: a qcow2 overlay whose backing file is the served point.

The backing file is the NBD URI of the served point with the backing format ``raw``:
the export carries the disk's own bytes, not an image, and naming the format keeps
qemu from probing it (a guest can write anything into its disk, a qcow2 header
included, and a probed one would make qemu open whatever backing file that header
names).  ``qemu-img create`` opens the served point to take its size, so an overlay
exists only over a point that answers.

Until the copy is complete, qemu reads every cluster the overlay lacks from the served
point; the copy (``block-stream``) then makes qemu rewrite the header without a backing
file.  :func:`backing_file` reads the header's backing file name (no qemu involved).
:func:`in_use` tells whether a qemu has the overlay open: qemu holds its image locks
(Linux open file description locks, bytes 100 to 299 of the file) while it does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from pathlib import Path

from backupd.errors import BackupdError, UsageError
from backupd.private import create_exclusive
from backupd.qemu.tools import qemu_img

BACKING_FORMAT = "raw"
#: qemu's image locks (block/file-posix.c: RAW_LOCK_PERM_BASE 100, SHARED_BASE 200)
_LOCK_START, _LOCK_LENGTH = 100, 200
_FLOCK = struct.Struct("@hhqqi4x")
_HEADER = struct.Struct(">4sIQI")  # magic, version, backing_file_offset, backing_file_size
_MAGIC = b"QFI\xfb"


async def create(partial: Path, output: Path, uri: str) -> None:
    """Make the overlay at ``partial`` and give it the name ``output`` once complete
    (UsageError, nothing left, when ``output`` appeared meanwhile)."""
    os.close(create_exclusive(partial))
    try:
        await qemu_img("create", "-q", "-f", "qcow2", "-F", BACKING_FORMAT, "-b", uri, str(partial))
        try:
            os.link(partial, output)  # never over an existing file
        except FileExistsError:
            raise UsageError(f"{output} exists; a live restore writes a new file") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def backing_file(path: Path) -> str | None:
    """The backing file name in the qcow2 header of ``path`` (None: it has none)."""
    try:
        with open(path, "rb") as image:
            raw = image.read(_HEADER.size)
            magic, _, offset, size = _HEADER.unpack(raw.ljust(_HEADER.size, b"\0"))
            if magic != _MAGIC:
                raise BackupdError(f"{path} is not a qcow2 image")
            if offset == 0:
                return None
            if size > 1023:
                raise BackupdError(f"{path}: its backing file name is {size} bytes long")
            image.seek(offset)
            return image.read(size).decode(errors="replace")
    except OSError as exc:
        raise BackupdError(f"cannot read {path}: {exc.strerror or exc}") from None


def in_use(path: Path) -> bool:
    """Whether a process (a qemu) holds qemu's image locks on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _LOCK_START, _LOCK_LENGTH, 0)
        kind = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query))[0]
    finally:
        os.close(fd)
    return bool(kind != fcntl.F_UNLCK)


def node_name(disk: str) -> str:
    """A qemu node name for the restored disk (at most 31 characters, a letter first)."""
    name = f"drive-{disk}"
    return name if len(name) <= 31 else "drive-restored"


def blockdev_option(node: str, output: Path) -> str:
    """The ``-blockdev`` option that opens ``output`` in qemu (a comma in the path is
    doubled, as qemu's option syntax wants)."""
    filename = str(output).replace(",", ",,")
    return f"-blockdev driver=qcow2,node-name={node},file.driver=file,file.filename={filename}"
