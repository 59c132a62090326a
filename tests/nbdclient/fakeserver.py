"""An in-process, scriptable NBD server for tests: it produces what real servers
cannot (protocol violations, torn replies, extended headers, quirks).

The handshake is configurable (oldstyle greeting, no GO, extended headers, refusing
STARTTLS or accepting it and then sending plaintext, error messages); transmission
requests go to a handler coroutine that the test supplies and that writes whatever
bytes it wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nbdclient.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    OLDSTYLE_MAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    Info,
    Option,
    OptionReply,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)


@dataclass(frozen=True)
class Request:
    flags: int
    command: int
    cookie: int
    offset: int
    length: int
    payload: bytes


Handler = Callable[["Session", Request], Awaitable[None]]


@dataclass
class ServerConfig:
    size: int = 1 << 20
    flags: int = int(
        TransmissionFlag.HAS_FLAGS
        | TransmissionFlag.SEND_FLUSH
        | TransmissionFlag.SEND_WRITE_ZEROES
        | TransmissionFlag.SEND_TRIM
        | TransmissionFlag.SEND_FUA
        | TransmissionFlag.SEND_DF
        | TransmissionFlag.SEND_CACHE
    )
    oldstyle: bool = False
    support_go: bool = True
    support_extended: bool = False
    support_structured: bool = True
    refuse_starttls: bool = True
    # accept STARTTLS and send these bytes in plaintext right after the ACK (an attacker
    # on the path injecting replies before the TLS session exists)
    starttls_then: bytes | None = None
    go_error: tuple[int, str] | None = None
    contexts: tuple[str, ...] = ("base:allocation", "qemu:dirty-bitmap:b1")
    block_size: tuple[int, int, int] = (1, 4096, 32 << 20)
    exports: tuple[tuple[str, str], ...] = (("exp", "a test export"),)
    stall_handshake: bool = False


@dataclass
class Session:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    config: ServerConfig
    extended: bool = False
    structured: bool = False
    contexts: dict[str, int] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    # reply builders ---------------------------------------------------------------
    def simple(self, cookie: int, error: int = 0, data: bytes = b"") -> bytes:
        return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie) + data

    def chunk(
        self, cookie: int, kind: int, payload: bytes, *, done: bool, offset: int = 0
    ) -> bytes:
        flags = ReplyFlag.DONE if done else 0
        if self.extended:
            header = struct.pack(
                ">IHHQQQ", EXTENDED_REPLY_MAGIC, flags, kind, cookie, offset, len(payload)
            )
        else:
            header = struct.pack(
                ">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)
            )
        return header + payload

    def data_chunk(self, cookie: int, offset: int, data: bytes, *, done: bool) -> bytes:
        return self.chunk(
            cookie, ReplyType.OFFSET_DATA, struct.pack(">Q", offset) + data, done=done
        )

    def hole_chunk(self, cookie: int, offset: int, length: int, *, done: bool) -> bytes:
        return self.chunk(
            cookie, ReplyType.OFFSET_HOLE, struct.pack(">QI", offset, length), done=done
        )

    def error_chunk(self, cookie: int, errno: int, message: str, *, done: bool = True) -> bytes:
        raw = message.encode()
        return self.chunk(
            cookie, ReplyType.ERROR, struct.pack(">IH", errno, len(raw)) + raw, done=done
        )

    def status_chunk(
        self, cookie: int, context_id: int, extents: list[tuple[int, int]], *, done: bool
    ) -> bytes:
        if self.extended:
            body = struct.pack(">II", context_id, len(extents)) + b"".join(
                struct.pack(">QQ", n, f) for n, f in extents
            )
            return self.chunk(cookie, ReplyType.BLOCK_STATUS_EXT, body, done=done)
        body = struct.pack(">I", context_id) + b"".join(
            struct.pack(">II", n, f) for n, f in extents
        )
        return self.chunk(cookie, ReplyType.BLOCK_STATUS, body, done=done)

    def done(self, cookie: int) -> bytes:
        """Success of a non-read command."""
        if self.extended:
            return self.chunk(cookie, ReplyType.NONE, b"", done=True)
        return self.simple(cookie)


async def default_handler(session: Session, request: Request) -> None:
    """A correct server over ``session.data``."""
    if request.command == Command.READ:
        data = bytes(session.data[request.offset : request.offset + request.length])
        if session.structured or session.extended:
            session.write(session.data_chunk(request.cookie, request.offset, data, done=True))
        else:
            session.write(session.simple(request.cookie, 0, data))
    elif request.command == Command.WRITE:
        session.data[request.offset : request.offset + len(request.payload)] = request.payload
        session.write(session.done(request.cookie))
    elif request.command == Command.WRITE_ZEROES:
        session.data[request.offset : request.offset + request.length] = bytes(request.length)
        session.write(session.done(request.cookie))
    elif request.command == Command.BLOCK_STATUS:
        parts = [
            session.status_chunk(request.cookie, cid, [(request.length, 0)], done=False)
            for cid in session.contexts.values()
        ]
        parts.append(session.chunk(request.cookie, ReplyType.NONE, b"", done=True))
        session.write(b"".join(parts))
    else:
        session.write(session.done(request.cookie))


class FakeServer:
    """``async with FakeServer(path, config, handler) as server: ...``"""

    def __init__(
        self, path: str, config: ServerConfig | None = None, handler: Handler = default_handler
    ) -> None:
        self.path = path
        self.config = config or ServerConfig()
        self.handler = handler
        self.sessions: list[Session] = []
        self.requests: list[Request] = []
        self.options: list[int] = []
        self._server: asyncio.AbstractServer | None = None
        self.data = bytearray(min(self.config.size, 64 << 20))

    @property
    def uri(self) -> str:
        return f"nbd+unix:///exp?socket={self.path}"

    async def __aenter__(self) -> FakeServer:
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for session in self.sessions:
            session.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(reader, writer, self.config, data=self.data)
        self.sessions.append(session)
        try:
            if await self._handshake(session):
                await self._transmission(session)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _reply(self, session: Session, option: int, kind: int, data: bytes = b"") -> None:
        session.write(struct.pack(">QIII", OPTION_REPLY_MAGIC, option, kind, len(data)) + data)

    async def _handshake(self, session: Session) -> bool:
        cfg = self.config
        if cfg.oldstyle:
            session.write(struct.pack(">QQQI", NBDMAGIC, OLDSTYLE_MAGIC, cfg.size, 1) + bytes(124))
            return False
        session.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
        await session.reader.readexactly(4)
        if cfg.stall_handshake:
            await asyncio.sleep(3600)
        while True:
            magic, option, length = struct.unpack(">QII", await session.reader.readexactly(16))
            assert magic == IHAVEOPT
            data = await session.reader.readexactly(length)
            self.options.append(option)
            if option == Option.ABORT:
                self._reply(session, option, OptionReply.ACK)
                return False
            if option == Option.STARTTLS and cfg.starttls_then is not None:
                self._reply(session, option, OptionReply.ACK)
                session.write(cfg.starttls_then)
            elif option == Option.STARTTLS:
                self._reply(session, option, OptionReply.ERR_POLICY, b"TLS not configured")
            elif option == Option.EXTENDED_HEADERS:
                if cfg.support_extended:
                    session.extended = True
                    self._reply(session, option, OptionReply.ACK)
                else:
                    self._reply(session, option, OptionReply.ERR_UNSUP)
            elif option == Option.STRUCTURED_REPLY:
                if cfg.support_structured:
                    session.structured = True
                    self._reply(session, option, OptionReply.ACK)
                else:
                    self._reply(session, option, OptionReply.ERR_UNSUP)
            elif option == Option.LIST:
                for name, desc in cfg.exports:
                    raw = name.encode()
                    self._reply(
                        session,
                        option,
                        OptionReply.SERVER,
                        struct.pack(">I", len(raw)) + raw + desc.encode(),
                    )
                self._reply(session, option, OptionReply.ACK)
            elif option in (Option.SET_META_CONTEXT, Option.LIST_META_CONTEXT):
                (nlen,) = struct.unpack_from(">I", data)
                (count,) = struct.unpack_from(">I", data, 4 + nlen)
                pos = 8 + nlen
                queries = []
                for _ in range(count):
                    (qlen,) = struct.unpack_from(">I", data, pos)
                    queries.append(data[pos + 4 : pos + 4 + qlen].decode())
                    pos += 4 + qlen
                chosen = [
                    c
                    for c in cfg.contexts
                    if not queries
                    or any(c == q or (q.endswith(":") and c.startswith(q)) for q in queries)
                ]
                for index, name in enumerate(chosen):
                    cid = 10 + index if option == Option.SET_META_CONTEXT else 0
                    if option == Option.SET_META_CONTEXT:
                        session.contexts[name] = cid
                    self._reply(
                        session,
                        option,
                        OptionReply.META_CONTEXT,
                        struct.pack(">I", cid) + name.encode(),
                    )
                self._reply(session, option, OptionReply.ACK)
            elif option in (Option.GO, Option.INFO):
                if not cfg.support_go:
                    self._reply(session, option, OptionReply.ERR_UNSUP)
                    continue
                if cfg.go_error is not None:
                    kind, message = cfg.go_error
                    self._reply(session, option, kind, message.encode())
                    continue
                self._reply(
                    session,
                    option,
                    OptionReply.INFO,
                    struct.pack(">HQH", Info.EXPORT, cfg.size, cfg.flags),
                )
                self._reply(
                    session,
                    option,
                    OptionReply.INFO,
                    struct.pack(">HIII", Info.BLOCK_SIZE, *cfg.block_size),
                )
                self._reply(session, option, OptionReply.ACK)
                if option == Option.GO:
                    return True
            elif option == Option.EXPORT_NAME:
                session.write(struct.pack(">QH", cfg.size, cfg.flags))
                return True
            else:
                self._reply(session, option, OptionReply.ERR_UNSUP)

    async def _transmission(self, session: Session) -> None:
        while True:
            magic_raw = await session.reader.readexactly(4)
            (magic,) = struct.unpack(">I", magic_raw)
            if magic == EXTENDED_REQUEST_MAGIC:
                flags, command, cookie, offset, length = struct.unpack(
                    ">HHQQQ", await session.reader.readexactly(28)
                )
            else:
                assert magic == REQUEST_MAGIC
                flags, command, cookie, offset, length = struct.unpack(
                    ">HHQQI", await session.reader.readexactly(24)
                )
            payload = b""
            if command == Command.WRITE:
                payload = await session.reader.readexactly(length)
            if command == Command.DISC:
                return
            request = Request(flags, command, cookie, offset, length, payload)
            self.requests.append(request)
            await self.handler(session, request)
            await session.drain()
