"""The test harness's own qemu-ga client: one command per session on qemu's chardev
socket for the agent's virtio port.

The port is a byte stream that outlives its clients: replies to a client that went
away (e.g. a killed backupd) are still in it when the next client connects.  So every
session starts as qemu-ga's documentation asks: a 0xFF byte (qemu-ga drops any
half-read request), then ``guest-sync-delimited`` with a fresh token, whose reply
qemu-ga prefixes with 0xFF; everything before the reply carrying that token is stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from pathlib import Path
from typing import Any

SENTINEL = b"\xff"


class AgentError(RuntimeError):
    """qemu-ga answered with an error (e.g. a command refused while frozen)."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        super().__init__(f"qemu-ga refused {command}: {error.get('desc', error)}")
        self.error_class = str(error.get("class", ""))


async def _sync(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    token = random.getrandbits(62)
    request = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
    writer.write(SENTINEL + json.dumps(request).encode() + b"\n")
    await writer.drain()
    while True:
        await reader.readuntil(SENTINEL)
        with contextlib.suppress(ValueError):
            if json.loads(await reader.readline()).get("return") == token:
                return


async def _shutdown_refusal(reader: asyncio.StreamReader) -> None:
    """guest-shutdown answers only to refuse: raise its error if one comes in 2 s."""
    ended = (TimeoutError, ConnectionError, asyncio.IncompleteReadError)
    try:
        line = await asyncio.wait_for(reader.readline(), 2)
    except ended:
        return
    if line.strip():
        reply = json.loads(line)
        if "error" in reply:
            raise AgentError("guest-shutdown", reply["error"])


async def execute(
    path: Path, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 60
) -> Any:
    """Run COMMAND in a session of its own; returns its "return" value.
    ``guest-shutdown`` sends no reply when it succeeds: it returns None once sent."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 10)
    try:
        async with asyncio.timeout(timeout):
            await _sync(reader, writer)
            request: dict[str, Any] = {"execute": command}
            if arguments:
                request["arguments"] = arguments
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            if command == "guest-shutdown":
                return await _shutdown_refusal(reader)
            reply = json.loads(await reader.readline())
        if "error" in reply:
            raise AgentError(command, reply["error"])
        return reply["return"]
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
