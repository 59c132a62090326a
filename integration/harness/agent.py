"""A stand-in for qemu-ga on a unix socket, for what a real guest cannot be made to do on
cue (a freeze that takes seconds, an agent that never answers).  It behaves like qemu-ga
where backupd relies on it: the freeze state belongs to the guest, not the connection (a
freeze whose client went away still completes, and stays); 0xFF resets the parser and
``guest-sync-delimited`` answers after a 0xFF; commands of a connection run in order;
replies echo the request's id; while frozen only the allowed commands run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ALLOWED_WHILE_FROZEN = {
    "guest-ping",
    "guest-info",
    "guest-sync",
    "guest-sync-delimited",
    "guest-fsfreeze-status",
    "guest-fsfreeze-thaw",
}


class FakeGuestAgent:
    def __init__(self, path: Path, *, freeze_seconds: float = 0.0, filesystems: int = 2) -> None:
        self.path = path
        self.freeze_seconds = freeze_seconds
        self.filesystems = filesystems
        self.frozen = False
        self.calls: list[str] = []
        #: when True, commands are read but never answered (a hung agent)
        self.silent = False
        self._server: asyncio.AbstractServer | None = None

    async def _run(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        if self.frozen and command not in ALLOWED_WHILE_FROZEN:
            return {"error": {"class": "GenericError", "desc": "the agent is in frozen state"}}
        if command in ("guest-sync", "guest-sync-delimited"):
            return {"return": arguments.get("id")}
        if command == "guest-fsfreeze-status":
            return {"return": "frozen" if self.frozen else "thawed"}
        if command == "guest-fsfreeze-freeze":
            await asyncio.sleep(self.freeze_seconds)
            self.frozen = True
            return {"return": self.filesystems}
        if command == "guest-fsfreeze-thaw":
            count, self.frozen = (self.filesystems if self.frozen else 0), False
            return {"return": count}
        return {"error": {"class": "CommandNotFound", "desc": f"unknown command {command}"}}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = json.JSONDecoder()
        pending = ""
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(4096):
                if b"\xff" in chunk:  # qemu-ga drops a half-parsed command at 0xFF
                    pending, chunk = "", chunk[chunk.rindex(b"\xff") + 1 :]
                pending += chunk.decode()
                while pending.strip():
                    try:
                        request, end = decoder.raw_decode(pending.lstrip())
                    except ValueError:
                        break
                    pending = pending.lstrip()[end:]
                    command = str(request.get("execute"))
                    self.calls.append(command)
                    # the guest finishes what it was asked even if the client goes away
                    reply = await asyncio.shield(self._run(command, request.get("arguments", {})))
                    if self.silent:
                        continue
                    if "id" in request:
                        reply["id"] = request["id"]
                    prefix = b"\xff" if command == "guest-sync-delimited" else b""
                    writer.write(prefix + json.dumps(reply).encode() + b"\n")
                    await writer.drain()
        writer.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[FakeGuestAgent]:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        try:
            yield self
        finally:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def thawed_every_freeze(self) -> bool:
        return not self.frozen
