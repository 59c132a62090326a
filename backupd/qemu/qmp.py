"""The QMP connection: the only module that imports ``qemu.qmp``.

Translates its errors at this boundary: a socket that is missing, not a socket, not
permitted or not qemu becomes :class:`QemuConnectError` with one clear line; a refused
command becomes :class:`QemuCommandError`; every command has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp import QMPError as _QMPError

from backupd.errors import QemuCommandError, QemuConnectError, QemuError

log = logging.getLogger("backupd.qmp")

Address = str | tuple[str, int]


def _check_socket(path: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise QemuConnectError(
            f"QMP socket {path} does not exist (is the VM running?)", unreachable="does not exist"
        ) from None
    except PermissionError:
        raise QemuConnectError(f"permission denied on QMP socket {path}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise QemuConnectError(f"QMP path {path} is not a socket")


class Events:
    """Events of interest heard since the listener was registered."""

    def __init__(self, listener: EventListener) -> None:
        self._listener = listener

    async def get(self, timeout: float) -> Mapping[str, Any]:
        try:
            async with asyncio.timeout(timeout):
                event: Mapping[str, Any] = await self._listener.get()
                return event
        except TimeoutError:
            raise QemuError(f"qemu did not send the expected event within {timeout:g} s") from None


class QemuMonitor:
    """One QMP session (or a guest agent session with ``agent=True``)."""

    def __init__(self, address: Address, *, timeout: float = 30.0, agent: bool = False) -> None:
        self.address = address
        self.timeout = timeout
        self.agent = agent
        self._client = QMPClient("backupd-agent" if agent else "backupd")
        if agent:
            self._client.await_greeting = False
            self._client.negotiate = False
        self.version: tuple[int, int, int] = (0, 0, 0)

    def _where(self) -> str:
        if isinstance(self.address, tuple):
            return f"{self.address[0]}:{self.address[1]}"
        return self.address

    async def connect(self) -> None:
        if isinstance(self.address, str):
            _check_socket(self.address)
        what = "guest agent" if self.agent else "QMP"
        try:
            async with asyncio.timeout(min(self.timeout, 10.0)):
                await self._client.connect(self.address)
        except TimeoutError:
            await self._quiet_disconnect()
            raise QemuConnectError(
                f"{what} at {self._where()} did not answer within 10 s (is it qemu, and is "
                "no other client connected to this monitor?)"
            ) from None
        except ConnectError as exc:
            await self._quiet_disconnect()
            cause = exc.exc if hasattr(exc, "exc") else exc
            unreachable = ""
            if isinstance(cause, ConnectionRefusedError):
                unreachable = "refuses connections"
            elif isinstance(cause, FileNotFoundError):
                unreachable = "does not exist"
            if isinstance(cause, PermissionError):
                reason = "permission denied"
            elif isinstance(cause, ConnectionRefusedError):
                reason = "connection refused (is the VM running?)"
            elif isinstance(cause, OSError):
                reason = cause.strerror or str(cause)
            else:
                reason = f"it does not speak QMP like qemu ({type(cause).__name__})"
            raise QemuConnectError(
                f"cannot connect to {what} at {self._where()}: {reason}", unreachable=unreachable
            ) from None
        if not self.agent:
            greeting = self._client.greeting
            if greeting is not None:
                v: Any = greeting.QMP.version["qemu"]
                self.version = (int(v["major"]), int(v["minor"]), int(v["micro"]))

    @property
    def version_text(self) -> str:
        return ".".join(str(p) for p in self.version)

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        limit = timeout if timeout is not None else self.timeout
        log.debug("qmp -> %s %s", command, dict(arguments) if arguments else "")
        try:
            async with asyncio.timeout(limit):
                result = await self._client.execute(command, dict(arguments) if arguments else None)
        except ExecuteError as exc:
            raise QemuCommandError(command, exc.error_class, str(exc)) from None
        except TimeoutError:
            raise QemuError(f"qemu did not answer {command} within {limit:g} s") from None
        except (ExecInterruptedError, _QMPError, ConnectionError, EOFError) as exc:
            raise QemuError(
                f"connection to qemu lost during {command} ({exc or type(exc).__name__})"
            ) from None
        return result

    @contextlib.contextmanager
    def listen(
        self,
        names: str | tuple[str, ...],
        accept: Callable[[Mapping[str, Any]], bool] | None = None,
    ) -> Iterator[Events]:
        """Register for events *before* issuing the command that triggers them."""
        with self._client.listener(names, accept) as listener:
            yield Events(listener)

    async def _quiet_disconnect(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.disconnect()

    async def close(self) -> None:
        await self._quiet_disconnect()

    async def __aenter__(self) -> QemuMonitor:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
