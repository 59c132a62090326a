"""A small read-only NBD server (newstyle, fixed; simple replies) that hands qemu the
bytes of pinned objects: qemu-storage-daemon and qemu-img open a chain stored in a
bucket node by node as ``{"driver": "qcow2", "file": {"driver": "nbd", ...}}``, and
every read comes back through :meth:`ObjectImage.read_range
<backupd.storage.s3image.ObjectImage.read_range>` (the checked metadata from its shadow,
data by ranged GET of the pinned version, read ahead in blocks).

Why our own read path and not qemu's ``curl`` driver with presigned URLs: that driver
asks for the size with ``HEAD`` first, and a URL presigned for ``GET`` is refused for
``HEAD`` (the method is signed) - qemu 7.2 fails to open it; and it would read the live
object, not the version (and metadata) the gate checked.

One server per repository, on the bridge's loop, on a unix socket in a private folder.
Only what the NBD protocol (doc/proto.md) requires of a read-only server: options
``GO``, ``INFO``, ``EXPORT_NAME`` and ``ABORT`` (anything else is ``ERR_UNSUP``, so no
structured replies), commands ``READ``, ``FLUSH`` and ``DISC``; writes are refused with
``EPERM``.  Reads of one connection run concurrently, their replies never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from backupd.errors import BackupdError
from nbdclient.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    ClientFlag,
    Command,
    Errno,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)

if TYPE_CHECKING:
    from backupd.storage.s3image import ObjectImage

log = logging.getLogger("backupd.s3")

OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
REPLY = struct.Struct(">IIQ")
#: the largest request served (qemu asks for at most 32 MiB)
MAX_REQUEST = 32 << 20
#: reads of one connection in flight at once
IN_FLIGHT = 16
FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY | TransmissionFlag.CAN_MULTI_CONN


class _Closed(Exception):
    """The client went away or ended the session."""


class ObjectNBDServer:
    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self._exports: dict[str, ObjectImage] = {}
        self._names = (f"o{n}" for n in itertools.count(1))
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    async def start(self) -> ObjectNBDServer:
        self._server = await asyncio.start_unix_server(self._session, str(self.socket))
        self.socket.chmod(0o600)
        return self

    def add(self, image: ObjectImage) -> str:
        name = next(self._names)
        self._exports[name] = image
        return name

    def remove(self, name: str) -> None:
        self._exports.pop(name, None)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._sessions):
                task.cancel()
            await asyncio.gather(*self._sessions, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        shutil.rmtree(self.socket.parent, ignore_errors=True)

    # -- one client --------------------------------------------------------------------

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        image: ObjectImage | None = None
        try:
            image = await self._handshake(reader, writer)
            if image is not None:
                image.users += 1
                await _Transmission(image, reader, writer).serve()
        except (_Closed, ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.debug("NBD session for qemu failed", exc_info=True)
        finally:
            self._sessions.discard(task)
            if image is not None:
                image.users -= 1
                image.release()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> ObjectImage | None:
        """Option haggling; the export chosen by GO or EXPORT_NAME (None: aborted)."""
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        writer.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags))
        (client,) = struct.unpack(">I", await reader.readexactly(4))
        no_zeroes = bool(client & ClientFlag.NO_ZEROES)
        while True:
            magic, option, length = OPTION.unpack(await reader.readexactly(OPTION.size))
            if magic != IHAVEOPT or length > 65536:
                raise _Closed
            data = await reader.readexactly(length)
            if option == Option.EXPORT_NAME:
                image = self._exports.get(data.decode(errors="replace"))
                if image is None:
                    raise _Closed  # the protocol's way to refuse EXPORT_NAME
                tail = b"" if no_zeroes else bytes(124)
                writer.write(struct.pack(">QH", image.size, FLAGS) + tail)
                return image
            if option in (Option.GO, Option.INFO):
                image = self._go(writer, option, data)
                if image is not None and option == Option.GO:
                    return image
            elif option == Option.ABORT:
                self._reply(writer, option, OptionReply.ACK)
                await writer.drain()
                return None
            else:
                self._reply(writer, option, OptionReply.ERR_UNSUP)
            await writer.drain()

    def _go(self, writer: asyncio.StreamWriter, option: int, data: bytes) -> ObjectImage | None:
        if len(data) < 6:
            self._reply(writer, option, OptionReply.ERR_INVALID)
            return None
        (size,) = struct.unpack_from(">I", data)
        name = data[4 : 4 + size].decode(errors="replace")
        image = self._exports.get(name)
        if image is None:
            self._reply(writer, option, OptionReply.ERR_UNKNOWN, b"no such export")
            return None
        export = struct.pack(">HQH", Info.EXPORT, image.size, FLAGS)
        self._reply(writer, option, OptionReply.INFO, export)
        blocks = struct.pack(">HIII", Info.BLOCK_SIZE, 1, 4096, MAX_REQUEST)
        self._reply(writer, option, OptionReply.INFO, blocks)
        self._reply(writer, option, OptionReply.ACK)
        return image

    @staticmethod
    def _reply(writer: asyncio.StreamWriter, option: int, kind: int, data: bytes = b"") -> None:
        writer.write(OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, kind, len(data)) + data)


class _Transmission:
    """The transmission phase of one connection: requests in, simple replies out."""

    def __init__(
        self, image: ObjectImage, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.image = image
        self.reader = reader
        self.writer = writer
        self.slots = asyncio.Semaphore(IN_FLIGHT)

    async def serve(self) -> None:
        async with asyncio.TaskGroup() as group:
            while True:
                magic, _, kind, cookie, offset, length = REQUEST.unpack(
                    await self.reader.readexactly(REQUEST.size)
                )
                if magic != REQUEST_MAGIC:
                    raise _Closed
                if kind == Command.DISC:
                    return
                if kind == Command.READ:
                    await self.slots.acquire()
                    group.create_task(self._read(cookie, offset, length))
                    continue
                if kind == Command.WRITE:
                    await self.reader.readexactly(length)
                error = 0 if kind == Command.FLUSH else Errno.EPERM
                self._send(cookie, error)

    async def _read(self, cookie: int, offset: int, length: int) -> None:
        try:
            if length > MAX_REQUEST or offset + length > self.image.size:
                self._send(cookie, Errno.EINVAL)
                return
            try:
                data = await self.image.read_range(offset, length)
            except BackupdError as exc:
                log.warning("reading %s for qemu failed: %s", self.image.path, exc)
                self._send(cookie, Errno.EIO)
                return
            self._send(cookie, 0, data)
            await self.writer.drain()
        finally:
            self.slots.release()

    def _send(self, cookie: int, error: int, data: bytes = b"") -> None:
        # no await between the writes: replies of concurrent reads never interleave
        self.writer.write(REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie))
        if data:
            self.writer.write(data)
