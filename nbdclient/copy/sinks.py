"""The copy engine's sinks that need nothing but nbdclient: a raw file, an NBD export,
and nothing at all.

- :class:`RawFileSink`: a new sparse file of the source's size (an
  :class:`~nbdclient.copy.outfile.OutputFile`); data lands at its source offsets,
  zeros stay holes, runs of :data:`DIRECT_MIN` bytes and more are written direct where
  the filesystem allows it.
- :class:`NBDSink`: a writable NBD export at least as large as the source; data as
  WRITE, zeros as WRITE_ZEROES (writes of zeros where the server has none), a FLUSH at
  the end.
- :class:`NullSink`: reads and forgets (``null:``), to measure the source side.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from ..client import Client
from ..errors import UnsupportedError
from ..fileio import DataFile
from ..multiconn import close_all, connect_many
from ..uri import NBDURI
from .engine import Batch, Run
from .outfile import OutputFile

#: the largest write of zeros when the server has no WRITE_ZEROES
ZERO_CHUNK = 1 << 20

#: runs shorter than this are written buffered: a direct write waits for the device,
#: and a raw file of scattered 64 KiB extents took 2.6 s per 512 MiB written direct
#: against 1.9 s buffered; from here on direct I/O pays (no page-cache copy, and the
#: host's cache keeps what it had)
DIRECT_MIN = 256 << 10


class RawFileSink:
    granularity = 1

    def __init__(self, output: OutputFile, size: int, *, direct: bool = True) -> None:
        fd = output.open()
        try:
            os.ftruncate(fd, size)
            self._out = DataFile(fd, direct=direct)
        except BaseException:
            output.discard()
            raise
        self._output = output

    def place(self, offset: int, length: int) -> int:
        return offset

    def _write_runs(self, buf: memoryview, runs: Sequence[Run]) -> None:
        for run in runs:
            assert run.target is not None
            view = buf[run.position : run.position + run.length]
            self._out.write(view, run.target, direct=run.length >= DIRECT_MIN)

    async def write(self, batch: Batch, buf: memoryview) -> None:
        await self._out.store(batch.length, self._write_runs, buf, batch.runs())

    async def zero(self, offset: int, length: int) -> None:
        """Nothing to do: the new file reads as zero wherever nothing was written."""

    async def finish(self) -> None:
        await self._out.offload(os.fsync, self._out.fd)
        self._out.close()
        self._output.commit()

    async def abort(self) -> None:
        await self._out.settle()  # no thread writes into the file any more
        self._out.close()
        self._output.discard()


class NBDSink:
    granularity = 1

    def __init__(self, client: Client) -> None:
        self._client = client

    @classmethod
    async def open(cls, target: str | NBDURI, *, size: int, timeout: float = 10.0) -> NBDSink:
        """Connect to a writable export of at least ``size`` bytes."""
        (client,) = await connect_many(target, 1, timeout=timeout)
        try:
            if client.size < size:
                raise UnsupportedError(
                    f"NBD target is smaller than the disk ({client.size} < {size} bytes)"
                )
            if client.is_read_only():
                raise UnsupportedError("NBD target is read-only")
        except BaseException:
            await close_all([client])
            raise
        return cls(client)

    def place(self, offset: int, length: int) -> int:
        return offset

    async def write(self, batch: Batch, buf: memoryview) -> None:
        # awaited until the server has the bytes: then nothing holds the buffer any more
        await asyncio.gather(
            *(
                self._client.pwrite(buf[run.position : run.position + run.length], run.target)
                for run in batch.runs()
                if run.target is not None
            )
        )

    async def zero(self, offset: int, length: int) -> None:
        if self._client.can_zero():
            await self._client.zero(length, offset)
            return
        blank = bytes(min(length, ZERO_CHUNK))
        for start in range(offset, offset + length, len(blank)):
            await self._client.pwrite(blank[: min(len(blank), offset + length - start)], start)

    async def finish(self) -> None:
        if self._client.can_flush():
            await self._client.flush()
        await close_all([self._client])

    async def abort(self) -> None:
        await close_all([self._client])


class NullSink:
    granularity = 1

    def place(self, offset: int, length: int) -> int:
        return offset

    async def write(self, batch: Batch, buf: memoryview) -> None:
        """Forget the bytes."""

    async def zero(self, offset: int, length: int) -> None:
        """Nothing to make zero."""

    async def finish(self) -> None:
        """Nothing to finish."""

    async def abort(self) -> None:
        """Nothing to remove."""
