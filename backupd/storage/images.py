"""A stored image, opened once: what the gate reads and how qemu opens the same bytes.

An :class:`ImageFile` is opened by :meth:`VMRepo.image <backupd.storage.vmrepo.VMRepo.
image>`; the gate (:mod:`backupd.chain`) inspects it through :attr:`ImageFile.
inspectable` and, once it is accepted, qemu gets :meth:`ImageFile.qemu_file` (a
``file`` node for ``--blockdev``), which reads exactly what was checked:

- :class:`LocalImage`: a descriptor opened without following symlinks; qemu gets
  ``/dev/fd/N`` (inherited, :attr:`pass_fds`), so a file swapped in the repository
  after the check is not what qemu reads.
- :class:`backupd.storage.s3image.ObjectImage`: an object pinned to the version the
  gate read; qemu reads it over NBD from backupd itself, the metadata from the very
  bytes the gate checked.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path, PurePath
from typing import Protocol

from backupd.qcow2.inspector import ImageReader


class ImageFile(Protocol):
    #: where it is, for messages (a path, or an ``s3://`` URL as a path)
    path: PurePath
    #: the local descriptor (-1 for an image that is not a local file)
    fd: int

    @property
    def size(self) -> int: ...

    @property
    def inspectable(self) -> int | ImageReader:
        """What :func:`~backupd.qcow2.inspector.inspect_image` reads."""
        ...

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """Descriptors qemu must inherit to open :meth:`qemu_file`."""
        ...

    def qemu_file(self) -> dict[str, object]:
        """The image's bytes as a qemu ``file`` node (read-only)."""
        ...

    async def read(self, offset: int, length: int) -> bytes:
        """Stored bytes (fewer at the end of the image), off the event loop."""
        ...

    def close(self) -> None: ...


class LocalImage:
    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path: PurePath = path

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    @property
    def inspectable(self) -> int:
        return self.fd

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self.fd,)

    def qemu_file(self) -> dict[str, object]:
        return {"driver": "file", "filename": f"/dev/fd/{self.fd}", "read-only": True}

    async def read(self, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(os.pread, self.fd, length, offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
