"""A hostile server: fuzzed replies never hang the client past its timeouts, never make
it allocate without bound, and only ever raise nbdclient's own errors."""

from __future__ import annotations

import asyncio
import random
import struct
import tracemalloc
from pathlib import Path

import nbdclient
from nbdclient.constants import ReplyType
from nbdclient.extents import map_export

from .fakeserver import FakeServer, Request, Session


def hostile_reply(rng: random.Random, session: Session, request: Request) -> bytes:
    cookie = request.cookie if rng.random() < 0.8 else rng.getrandbits(64)
    kind = rng.choice([0, 1, 2, 5, 6, 0x8001, 0x8002, rng.getrandbits(16)])
    length = rng.choice([0, 1, 7, 8, 12, request.length + 8, 0xFFFFFFFF, rng.getrandbits(32)])
    flags = rng.choice([0, 1, rng.getrandbits(16)])
    magic = rng.choice([0x668E33EF, 0x67446698, 0x6E8A278C, rng.getrandbits(32)])
    if magic == 0x67446698:
        header = struct.pack(">IIQ", magic, rng.choice([0, 5, rng.getrandbits(32)]), cookie)
    elif magic == 0x6E8A278C:
        header = struct.pack(">IHHQQQ", magic, flags, kind, cookie, request.offset, length)
    else:
        header = struct.pack(">IHHQI", magic & 0xFFFFFFFF, flags, kind, cookie, length)
    body_len = min(length, rng.choice([0, 4, 12, 64, 600]))
    body = bytearray(rng.randbytes(body_len))
    if kind == ReplyType.OFFSET_DATA and body_len >= 8 and rng.random() < 0.5:
        struct.pack_into(">Q", body, 0, request.offset)
    if kind in (ReplyType.ERROR, ReplyType.ERROR_OFFSET) and body_len >= 6:
        body[6:] = rng.choice([b"\xff\xfe\xfd", b"ok", bytes(len(body) - 6)])[: len(body) - 6]
    wire = header + bytes(body)
    if rng.random() < 0.3:
        wire = wire[: rng.randrange(len(wire) + 1)]  # torn
    return wire


async def test_fuzzed_replies(sockdir: Path) -> None:
    rng = random.Random(1234)
    outcomes: dict[str, int] = {}

    async def handler(session: Session, request: Request) -> None:
        session.write(hostile_reply(rng, session, request))
        if rng.random() < 0.2:
            session.writer.close()

    tracemalloc.start()
    try:
        async with FakeServer(str(sockdir / "f"), handler=handler) as srv:
            for _ in range(300):
                client = await nbdclient.connect(
                    srv.uri, meta_contexts=["base:allocation"], request_timeout=0.2
                )
                try:
                    async with asyncio.timeout(3):  # a hang would trip this, not the client
                        if rng.random() < 0.5:
                            await client.pread(4096, 4096)
                        else:
                            await client.block_status(65536, 0)
                    outcomes["ok"] = outcomes.get("ok", 0) + 1
                except nbdclient.NBDError as exc:
                    name = type(exc).__name__
                    outcomes[name] = outcomes.get(name, 0) + 1
                finally:
                    await client.disconnect()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak traced memory {peak}"
    assert outcomes.get("RemoteProtocolError", 0) > 50
    assert sum(outcomes.values()) == 300


async def test_hostile_extents(sockdir: Path) -> None:
    """Block-status replies with well-formed framing but nonsense extents (zero lengths,
    lengths past the request or the export, unknown context ids, nothing at all): a map
    of the whole export either completes, covering every byte exactly once in order, or
    fails with nbdclient's own error; it never spins or hangs."""
    rng = random.Random(99)
    outcomes: dict[str, int] = {}

    async def handler(session: Session, request: Request) -> None:
        ids = list(session.contexts.values())
        chunks = []
        for cid in ids:
            if rng.random() < 0.1:
                cid = rng.getrandbits(32)  # a context nobody asked for
            extents = [
                (rng.choice([0, 0, 512, 4096, request.length, 1 << 31]), rng.getrandbits(2))
                for _ in range(rng.choice([0, 1, 3, 20]))
            ]
            chunks.append((cid, extents))
        for i, (cid, extents) in enumerate(chunks):
            session.write(
                session.status_chunk(request.cookie, cid, extents, done=i == len(chunks) - 1)
            )
        if not chunks:
            session.write(session.done(request.cookie))

    async with FakeServer(str(sockdir / "e"), handler=handler) as srv:
        for _ in range(200):
            client = await nbdclient.connect(
                srv.uri,
                meta_contexts=["base:allocation", "qemu:dirty-bitmap:b1"],
                request_timeout=0.2,
            )
            try:
                async with asyncio.timeout(3):
                    extents = await map_export(client, dirty_context="qemu:dirty-bitmap:b1")
                position = 0
                for e in extents:
                    assert e.offset == position and e.length > 0
                    position += e.length
                assert position == client.size
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except nbdclient.NBDError as exc:
                name = type(exc).__name__
                outcomes[name] = outcomes.get(name, 0) + 1
            finally:
                await client.disconnect()
    assert sum(outcomes.values()) == 200
    assert outcomes.get("ok", 0) > 10 and len(outcomes) > 1, outcomes
