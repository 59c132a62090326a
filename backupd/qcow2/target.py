"""Where the bytes of a qcow2 image being written go: the seam between the streaming
writer (which decides *where* every byte lies) and the storage that keeps them.

A :class:`ByteTarget` takes positioned writes in any order, is told which bytes are
never written (they read as zeros), and ends the image with the writer's metadata and
header.  :class:`FileTarget` is a local file (``pwrite``, direct I/O where the
filesystem takes it, the file fsynced before it counts); an object-store upload is
another (:class:`backupd.storage.s3stage.UploadTarget`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from backupd.qcow2.layout import align_up
from backupd.qcow2.writer import Qcow2Stats, Qcow2Writer
from nbdclient.copy import OutputFile
from nbdclient.fileio import DIRECT_ALIGN, DataFile

T = TypeVar("T")


class ByteTarget(Protocol):
    async def store(self, buf: memoryview, span: int, offset: int, prepare: Callable[[], T]) -> T:
        """Run ``prepare()`` (work on ``buf[:span]`` in place, e.g. hashing it; its
        result is returned), then write ``buf[:span]`` at ``offset``; in a thread where
        that pays.  ``buf`` may be padded past ``span`` (its cluster is the writer's)."""
        ...

    async def zeroes(self, offset: int, length: int) -> None:
        """Bytes ``[offset, offset + length)`` are never written: they read as zeros."""
        ...

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """CPU work off the event loop (compression)."""
        ...

    async def finish(self, writer: Qcow2Writer) -> Qcow2Stats:
        """Write ``writer``'s metadata and header last; the image is then complete."""
        ...

    async def abort(self) -> None:
        """Drop what was written (no write is still running)."""
        ...


class FileTarget:
    """The writer's own file (``writer.fd``), or the file of ``output``."""

    def __init__(
        self, writer: Qcow2Writer, *, output: OutputFile | None = None, direct: bool = True
    ) -> None:
        self._writer = writer
        self._output = output
        self._out = DataFile(writer.fd, direct=direct)

    async def store(self, buf: memoryview, span: int, offset: int, prepare: Callable[[], T]) -> T:
        return await self._out.store(span, self._store, buf, span, offset, prepare)

    def _store(self, buf: memoryview, span: int, offset: int, prepare: Callable[[], T]) -> T:
        result = prepare()
        if self._out.direct:
            padded = align_up(span, DIRECT_ALIGN)
            buf[span:padded] = bytes(padded - span)  # the disk's tail: its cluster is ours
            self._out.write(buf[:padded], offset)
        else:
            self._out.write(buf[:span], offset)
        return result

    async def zeroes(self, offset: int, length: int) -> None:
        """Nothing to do: a file reads as zeros where nothing was written."""

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._out.offload(fn, *args)

    async def finish(self, writer: Qcow2Writer) -> Qcow2Stats:
        await self._out.settle()
        self._out.close()
        stats = await self._out.offload(writer.finish)
        if self._output is not None:
            self._output.commit()
        return stats

    async def abort(self) -> None:
        await self._out.settle()  # no thread writes into the file any more
        self._out.close()
        self._writer.abort()
        if self._output is not None:
            self._output.discard()
