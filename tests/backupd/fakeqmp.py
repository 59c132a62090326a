"""An in-process, scriptable QMP monitor for tests: the QMP twin of
``tests/nbdclient/fakeserver.py``.

It speaks QMP on a unix socket as qemu does (greeting with the version,
``qmp_capabilities``, ``execute`` with ids answered in order, asynchronous events) in
front of a :class:`~tests.backupd.fakeqemu.FakeQemu` model, and records a timeline of
every command and event.  Hooks make what a real qemu rarely does on demand: a command
that fails (:meth:`FakeQmp.fail`), one that hangs (:meth:`FakeQmp.hang`: held until
released and then carried out, as a slow qemu would, or never answered at all), an
event sent at a chosen moment (:meth:`FakeQmp.send_event`), and a late
``BLOCK_EXPORT_DELETED`` (:attr:`FakeQmp.export_delete_delay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.backupd.fakeqemu import Crash, FakeQemu, QmpError

Match = Callable[[str, dict[str, Any]], bool]


@dataclass
class Failure:
    match: Match
    desc: str
    error_class: str
    times: int


@dataclass
class Hang:
    """A command held by the monitor: :attr:`reached` is set when it arrives; with
    ``apply`` it is carried out and answered on :meth:`release`, else dropped."""

    match: Match
    apply: bool
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    #: set once a released command was carried out and answered
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    command: str = ""

    def release(self) -> None:
        self.released.set()


def matcher(
    command: str | None, nth: int, where: Callable[[dict[str, Any]], bool], *, on: bool = False
) -> Match:
    """The ``nth`` call of ``command`` (any command when None) whose arguments pass
    ``where`` (and with ``on``, every such call after it too)."""
    seen = 0

    def match(name: str, args: dict[str, Any]) -> bool:
        nonlocal seen
        if (command is None or name == command) and where(args):
            seen += 1
            return seen >= nth if on else seen == nth
        return False

    return match


async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """JSON objects as they arrive (QMP needs no newline between them)."""
    decoder = json.JSONDecoder()
    buffer = ""
    while chunk := await reader.read(65536):
        buffer += chunk.decode()
        while buffer := buffer.lstrip():
            try:
                message, end = decoder.raw_decode(buffer)
            except ValueError:
                break  # incomplete: wait for more
            buffer = buffer[end:]
            yield message


class FakeQmp:
    """A QMP monitor for ``qemu`` on the unix socket ``path``."""

    def __init__(self, qemu: FakeQemu, path: Path) -> None:
        self.qemu = qemu
        self.path = path
        #: "-> command {args}" and "<- EVENT {data}", in the order they happened
        self.timeline: list[str] = []
        self.commands: list[tuple[str, dict[str, Any]]] = []
        #: seconds between block-export-del's answer and its BLOCK_EXPORT_DELETED
        self.export_delete_delay = 0.0
        self._failures: list[Failure] = []
        self._hangs: list[Hang] = []
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._nbd: socket.socket | None = None
        self._later: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FakeQmp:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for hang in self._hangs:
            hang.release()
        for task in self._later:
            task.cancel()
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._stop_nbd()

    # -- hooks ---------------------------------------------------------------------

    def fail(
        self,
        command: str,
        desc: str,
        *,
        error_class: str = "GenericError",
        nth: int = 1,
        times: int = 1,
        where: Callable[[dict[str, Any]], bool] = lambda args: True,
    ) -> None:
        """Refuse ``command`` (its ``nth`` matching call, and ``times`` calls from there)."""
        match = matcher(command, nth, where, on=True)
        self._failures.append(Failure(match, desc, error_class, times))

    def hang(
        self,
        command: str | None = None,
        *,
        nth: int = 1,
        apply: bool = True,
        where: Callable[[dict[str, Any]], bool] = lambda args: True,
    ) -> Hang:
        """Hold ``command`` (or the ``nth`` command of all): see :class:`Hang`.  Like
        qemu, the monitor answers in order: what comes after a held command waits."""
        hang = Hang(matcher(command, nth, where), apply)
        self._hangs.append(hang)
        return hang

    async def send_event(self, name: str, data: dict[str, Any]) -> None:
        self._emit(name, data)
        for writer in self._writers:
            await writer.drain()

    def called(self, command: str) -> list[dict[str, Any]]:
        return [args for name, args in self.commands if name == command]

    # -- the protocol ----------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        major, minor, micro = self.qemu.version
        version = {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": ""}
        self._send(writer, {"QMP": {"version": version, "capabilities": []}})
        try:
            async for message in _messages(reader):
                await self._message(writer, message)
        except (ConnectionError, Crash):
            pass
        finally:
            writer.close()
            self._writers.remove(writer)

    async def _message(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        command = str(message.get("execute"))
        args = dict(message.get("arguments") or {})
        reply_id = message.get("id")
        if command == "qmp_capabilities":
            self._reply(writer, reply_id, {"return": {}})
            return
        self.commands.append((command, args))
        self.timeline.append(f"-> {command} {json.dumps(args, sort_keys=True)}")
        # every hook sees every call (each counts its own matches)
        hang = next(iter([h for h in self._hangs if h.match(command, args)]), None)
        if hang is not None:
            hang.command = command
            hang.reached.set()
            if not hang.apply:
                return
            await hang.released.wait()
        self._reply(writer, reply_id, self._execute(command, args))
        await writer.drain()
        if hang is not None:
            hang.answered.set()

    def _execute(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        failing = [f for f in self._failures if f.match(command, args) and f.times > 0]
        if failing:
            failing[0].times -= 1
            return {"error": {"class": failing[0].error_class, "desc": failing[0].desc}}
        try:
            result = self.qemu.execute(command, args)
        except QmpError as exc:
            self.qemu.events.clear()
            return {"error": {"class": exc.error_class, "desc": exc.desc}}
        except Crash:
            self.timeline.append(f"qemu aborted: {self.qemu.crashed}")
            self._crash()
            raise
        self._side_effects(command, args)
        return {"return": result}

    def _side_effects(self, command: str, args: dict[str, Any]) -> None:
        """The NBD server's socket; an export that goes a little later."""
        if command == "nbd-server-start":
            self._start_nbd(str(self.qemu.server))
        elif command == "nbd-server-stop":
            self._stop_nbd()
        elif command == "block-export-del":
            task = asyncio.ensure_future(self._delete_export_later(str(args["id"])))
            self._later.add(task)
            task.add_done_callback(self._later.discard)

    async def _delete_export_later(self, export_id: str) -> None:
        await asyncio.sleep(self.export_delete_delay)
        self.qemu.finish_export_delete(export_id)
        self._flush_events()

    def _reply(self, writer: asyncio.StreamWriter, reply_id: Any, body: dict[str, Any]) -> None:
        if reply_id is not None:
            body["id"] = reply_id
        self._send(writer, body)
        self._flush_events()

    def _flush_events(self) -> None:
        events, self.qemu.events = self.qemu.events, []
        for name, data in events:
            self._emit(name, data)

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        self.timeline.append(f"<- {name} {json.dumps(data, sort_keys=True)}")
        now = time.time()
        stamp = {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}
        for writer in self._writers:
            self._send(writer, {"event": name, "data": data, "timestamp": stamp})

    def _send(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        if not writer.is_closing():
            writer.write(json.dumps(message).encode() + b"\r\n")

    def _crash(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()

    def _start_nbd(self, path: str) -> None:
        """Like qemu, listen on the NBD socket (and leave the file behind on stop)."""
        self._nbd = socket.socket(socket.AF_UNIX)
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()
        self._nbd.bind(path)
        self._nbd.listen()

    def _stop_nbd(self) -> None:
        if self._nbd is not None:
            self._nbd.close()
            self._nbd = None
