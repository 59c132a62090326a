"""A client of the qemu guest agent (qemu-ga), for fs-freeze and thaw.

qemu-ga speaks QMP's wire format without a greeting or capability negotiation, and its
virtio-serial channel keeps whatever a previous client left half-sent.  So this is a
small client of its own: it opens with ``guest-sync-delimited`` (qemu-ga answers after a
0xFF byte, which flushes stale bytes out of both directions), matches replies by id and
drops stale ones (a late reply to a command we stopped waiting for), and recognises a
QMP monitor by its greeting at once instead of waiting for a timeout.
:attr:`GuestAgent.freeze_sent` is set before a freeze leaves, so the caller knows a thaw
is owed (see :mod:`backupd.quiesce`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import stat
from typing import Any

from backupd.errors import QemuConnectError, QemuError

log = logging.getLogger("backupd.agent")

SYNC_TIMEOUT = 10.0
_DELIMITER = b"\xff"
_MAX_MESSAGE = 1 << 20


class GuestAgentError(QemuError):
    """The guest agent is unreachable, not qemu-ga, or refused a command."""


def _check_socket(path: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise QemuConnectError(f"guest agent socket {path} does not exist") from None
    except PermissionError:
        raise QemuConnectError(f"permission denied on guest agent socket {path}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise QemuConnectError(f"guest agent path {path} is not a socket")


class GuestAgent:
    """One connection to qemu-ga on a unix socket (``guest_agent:`` in the config)."""

    def __init__(self, path: str, *, timeout: float = SYNC_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._buffer = b""
        #: set before the freeze command is written: from then on a thaw is owed
        self.freeze_sent = False

    async def connect(self) -> None:
        """Open the socket and synchronise; raises GuestAgentError or QemuConnectError."""
        _check_socket(self.path)
        try:
            async with asyncio.timeout(self.timeout):
                self._reader, self._writer = await asyncio.open_unix_connection(self.path)
        except TimeoutError:
            raise GuestAgentError(f"guest agent socket {self.path}: connect timed out") from None
        except OSError as exc:
            reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else exc
            raise QemuConnectError(
                f"cannot connect to the guest agent socket {self.path}: {reason}"
            ) from None
        await self.sync()

    async def sync(self) -> None:
        """``guest-sync-delimited``: everything qemu-ga sent before its answer is stale."""
        token = random.getrandbits(62)
        self._send(_DELIMITER + self._encode("guest-sync-delimited", {"id": token}, None))
        try:
            async with asyncio.timeout(self.timeout):
                await self._skip_to_delimiter()
                reply = await self._read_message()
        except TimeoutError:
            raise GuestAgentError(
                f"guest agent socket {self.path}: no answer to guest-sync within "
                f"{self.timeout:g} s (is qemu-ga running in the guest, and no other client "
                "connected to this socket?)"
            ) from None
        if reply.get("return") != token:
            raise GuestAgentError(
                f"guest agent socket {self.path} answered guest-sync wrongly: {reply!r:.200}"
            )

    def _encode(self, command: str, arguments: dict[str, Any] | None, ident: int | None) -> bytes:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        if ident is not None:
            message["id"] = ident
        return json.dumps(message).encode()

    def _send(self, data: bytes) -> None:
        if self._writer is None:
            raise GuestAgentError(f"guest agent socket {self.path} is not connected")
        self._writer.write(data)

    async def _fill(self) -> None:
        assert self._reader is not None
        chunk = await self._reader.read(65536)
        if not chunk:
            raise GuestAgentError(f"guest agent socket {self.path}: connection closed")
        self._buffer += chunk
        if len(self._buffer) > _MAX_MESSAGE:
            raise GuestAgentError(f"guest agent socket {self.path}: reply too large")

    async def _skip_to_delimiter(self) -> None:
        while True:
            self._check_qmp_greeting()
            index = self._buffer.find(_DELIMITER)
            if index >= 0:
                self._buffer = self._buffer[index + 1 :]
                return
            await self._fill()

    def _check_qmp_greeting(self) -> None:
        if b'"QMP"' in self._buffer[:4096] and b'"qemu"' in self._buffer[:4096]:
            raise GuestAgentError(
                f"guest agent socket {self.path} is a QMP monitor, not the guest agent "
                "(guest_agent: must name qemu-ga's virtio-serial chardev socket)"
            )

    async def _read_message(self) -> dict[str, Any]:
        decoder = json.JSONDecoder()
        while True:
            text = self._buffer.lstrip()
            if text:
                try:
                    value, end = decoder.raw_decode(text.decode(errors="replace"))
                except ValueError:
                    pass
                else:
                    self._buffer = text.decode(errors="replace")[end:].encode()
                    if not isinstance(value, dict):
                        raise GuestAgentError(f"guest agent socket {self.path}: bad reply")
                    return value
            await self._fill()

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Send one command and wait for its reply (stale replies are dropped)."""
        ident = random.getrandbits(62)
        self._send(self._encode(command, arguments, ident))
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                while True:
                    reply = await self._read_message()
                    if reply.get("id", ident) == ident:
                        break
                    log.debug("guest agent: dropped a stale reply %r", reply)
        except TimeoutError:
            raise GuestAgentError(
                f"guest agent did not answer {command} within {limit:g} s"
            ) from None
        if "error" in reply:
            error = reply["error"] or {}
            raise GuestAgentError(f"guest agent refused {command}: {error.get('desc', error)}")
        return reply.get("return")

    async def status(self) -> str:
        """``thawed`` or ``frozen``."""
        return str(await self.execute("guest-fsfreeze-status"))

    async def freeze(self, timeout: float) -> int:
        """Freeze every guest file system; returns how many were frozen."""
        self.freeze_sent = True  # before the bytes leave: a cancel from here on owes a thaw
        return int(await self.execute("guest-fsfreeze-freeze", timeout=timeout))

    async def thaw(self, timeout: float) -> None:
        """Thaw, reconnecting once if this connection broke; raises GuestAgentError."""
        try:
            await self.execute("guest-fsfreeze-thaw", timeout=timeout)
        except GuestAgentError as first:
            if "timed out" in str(first) or "did not answer" in str(first):
                raise
            await self.close()
            try:
                await self.connect()
                await self.execute("guest-fsfreeze-thaw", timeout=timeout)
            except QemuError as exc:
                raise GuestAgentError(f"{first}; reconnecting: {exc}") from None
        self.freeze_sent = False

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        self._buffer = b""
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
