"""A caller's buffer as an HTTP request body that is never copied whole.

Given a 16 MiB ``bytes`` or ``memoryview`` body, aiohttp on Python < 3.12.9 joins it
with the request headers (one copy), and asyncio's socket transport copies whatever the
socket did not take at once into its own buffer (a second copy): measured here, 1.3-2.8 s
of CPU per GiB uploaded and up to two extra part-sized allocations per request in
flight.  :class:`BodyView` hands aiohttp the buffer in 1 MiB slices, waiting for each to
drain, so at most one slice is ever copied; and it is file-like (``read``/``seek``/
``tell``/``len``) so botocore can hash it for a signed payload and read it again for a
retry.
"""

from __future__ import annotations

import io

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

SLICE = 1 << 20


class BodyView(Payload):
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        super().__init__(view, content_type="application/octet-stream")
        self._view = view
        self._size = len(view)
        self._pos = 0

    def __len__(self) -> int:
        return len(self._view)

    # -- file-like, for botocore (payload hash, content length, rewind on retry) --------

    def read(self, size: int = -1) -> memoryview:
        end = len(self._view) if size < 0 else min(len(self._view), self._pos + size)
        chunk = self._view[self._pos : end]
        self._pos = max(self._pos, end)
        return chunk

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    # -- aiohttp --------------------------------------------------------------------------

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._view.tobytes().decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        end = len(self._view) if content_length is None else min(content_length, len(self._view))
        for start in range(0, end, SLICE):
            # write() drains once more than 64 KiB are pending: one slice at a time
            await writer.write(self._view[start : min(end, start + SLICE)])
