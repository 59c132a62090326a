"""The asyncio side of the NBD handshake: opening the socket and haggling options.

Uses asyncio streams for the (small, sequential) handshake; the transmission phase
takes the transport over afterwards (see ``_connection``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass, field

from . import _handshake as hs
from ._tls import client_context, default_username
from .constants import Info, Option, OptionReply
from .errors import ConnectionLostError, NegotiationError, RemoteProtocolError
from .uri import NBDURI
from .values import ExportListing, TLSOptions

_GO_INFOS = (Info.EXPORT, Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE)


@dataclass(slots=True)
class Negotiated:
    """What the handshake established, handed to the transmission phase."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    export: str
    info: hs.ExportInfo
    structured_replies: bool = False
    extended_headers: bool = False
    tls: bool = False
    meta_contexts: dict[str, int] = field(default_factory=dict)


class Negotiator:
    """Drives one connection through the option phase."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.tls = False
        self.structured = False
        self.extended = False
        self.no_zeroes = False

    @classmethod
    async def open(cls, uri: NBDURI) -> Negotiator:
        try:
            if uri.socket is not None:
                reader, writer = await asyncio.open_unix_connection(uri.socket, limit=1 << 22)
            else:
                reader, writer = await asyncio.open_connection(uri.host, uri.port, limit=1 << 22)
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            where = uri.socket if uri.socket is not None else f"{uri.host}:{uri.port}"
            reason = exc.strerror or str(exc)
            raise ConnectionLostError(f"cannot connect to NBD server at {where}: {reason}") from exc
        return cls(reader, writer)

    async def _read(self, n: int) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionLostError("server closed the connection during the handshake") from exc
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionLostError(f"connection failed during the handshake: {exc}") from exc

    async def _send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionLostError(f"connection failed during the handshake: {exc}") from exc

    async def greeting(self) -> None:
        hs.parse_greeting_prefix(await self._read(hs.GREETING_PREFIX.size))
        (flags,) = hs.CLIENT_FLAGS.unpack(b"\0\0" + await self._read(2))
        answer = hs.client_flags_for(flags)
        self.no_zeroes = bool(answer & 2)
        await self._send(hs.CLIENT_FLAGS.pack(answer))

    async def option(self, option: Option, data: bytes = b"") -> None:
        await self._send(hs.encode_option(option, data))

    async def reply(self, option: Option) -> tuple[int, bytes]:
        header = hs.parse_option_reply_header(await self._read(hs.OPTION_REPLY.size), option)
        payload = await self._read(header.length) if header.length else b""
        return header.reply_type, payload

    async def simple_option(self, option: Option) -> tuple[bool, int, bytes]:
        """Send an option without data that is answered by ACK or an error."""
        await self.option(option)
        reply_type, payload = await self.reply(option)
        if reply_type == OptionReply.ACK:
            return True, reply_type, payload
        if OptionReply.is_error(reply_type):
            return False, reply_type, payload
        raise RemoteProtocolError(
            f"unexpected {OptionReply.describe(reply_type)} reply to {option.name}"
        )

    async def abort(self) -> None:
        """NBD_OPT_ABORT and close; the server may close without replying."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.option(Option.ABORT), 1.0)
            await asyncio.wait_for(self.reply(Option.ABORT), 1.0)
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)

    async def starttls(self, tls: TLSOptions, host: str | None) -> None:
        """NBD_OPT_STARTTLS and the TLS handshake; never a plaintext fallback."""
        context = client_context(tls)  # a bad local key file never reaches the server
        ok, reply_type, payload = await self.simple_option(Option.STARTTLS)
        if not ok:
            raise hs.negotiation_error(Option.STARTTLS, reply_type, payload)
        self._refuse_early_bytes()
        server_hostname: str | None = None
        if context.check_hostname:
            server_hostname = tls.server_hostname or host or "localhost"
        try:
            await self.writer.start_tls(context, server_hostname=server_hostname)
        except (OSError, ssl.SSLError) as exc:
            raise NegotiationError(_tls_failure(tls, exc)) from exc
        self._refuse_early_bytes()
        if tls.psk and self.writer.get_extra_info("peercert") is not None:
            raise NegotiationError("TLS-PSK: the server answered with a certificate, not the key")
        self.tls = True
        self.structured = self.extended = False

    def _refuse_early_bytes(self) -> None:
        """Nothing may arrive between the STARTTLS reply and the client's next option:
        bytes there were sent in plaintext (or unasked), and reading them as data of
        the TLS session would let anyone on the path inject replies."""
        # StreamReader has no public count of what it holds; _buffer is that count
        waiting = len(getattr(self.reader, "_buffer", b""))
        if waiting:
            raise RemoteProtocolError(
                f"server sent {waiting} bytes after accepting STARTTLS, "
                "before the TLS session was set up"
            )

    async def negotiate_replies(self, *, structured: bool, extended: bool) -> None:
        if extended:
            ok, _, _ = await self.simple_option(Option.EXTENDED_HEADERS)
            self.extended = ok
        if not self.extended and structured:
            ok, _, _ = await self.simple_option(Option.STRUCTURED_REPLY)
            self.structured = ok

    async def meta_context_option(
        self, option: Option, export: str, queries: tuple[str, ...]
    ) -> dict[str, int]:
        await self.option(option, hs.encode_meta_context_request(export, queries))
        replies = hs.MetaContextReplies(option, queries)
        while True:
            reply_type, payload = await self.reply(option)
            if reply_type == OptionReply.META_CONTEXT:
                replies.add(payload)
            elif reply_type == OptionReply.ACK:
                return replies.contexts
            elif OptionReply.is_error(reply_type):
                raise hs.negotiation_error(option, reply_type, payload)
            else:
                raise RemoteProtocolError(
                    f"unexpected {OptionReply.describe(reply_type)} reply to {option.name}"
                )

    async def list_exports(self) -> list[ExportListing]:
        await self.option(Option.LIST)
        exports: list[ExportListing] = []
        budget = hs.ReplyBudget(Option.LIST)
        while True:
            reply_type, payload = await self.reply(Option.LIST)
            if reply_type == OptionReply.SERVER:
                budget.spend(payload)
                exports.append(hs.parse_server_reply(payload))
            elif reply_type == OptionReply.ACK:
                return exports
            elif OptionReply.is_error(reply_type):
                raise hs.negotiation_error(Option.LIST, reply_type, payload)
            else:
                raise RemoteProtocolError(
                    f"unexpected {OptionReply.describe(reply_type)} reply to LIST"
                )

    async def info_or_go(self, option: Option, export: str) -> hs.ExportInfo | None:
        """NBD_OPT_INFO/GO; None when the server does not know the option (old server)."""
        await self.option(option, hs.encode_info_request(export, _GO_INFOS))
        info = hs.ExportInfo()
        while True:
            reply_type, payload = await self.reply(option)
            if reply_type == OptionReply.INFO:
                hs.apply_info_reply(info, payload)
            elif reply_type == OptionReply.ACK:
                if info.size is None:
                    raise RemoteProtocolError(f"{option.name} ended without NBD_INFO_EXPORT")
                return info
            elif reply_type == OptionReply.ERR_UNSUP and not self.extended:
                return None
            elif OptionReply.is_error(reply_type):
                if reply_type == OptionReply.ERR_UNKNOWN:
                    raise hs.negotiation_error(option, reply_type, payload) from None
                raise hs.negotiation_error(option, reply_type, payload)
            else:
                raise RemoteProtocolError(
                    f"unexpected {OptionReply.describe(reply_type)} reply to {option.name}"
                )

    async def export_name(self, export: str) -> hs.ExportInfo:
        """Old servers: NBD_OPT_EXPORT_NAME, which ends the handshake or closes."""
        await self.option(Option.EXPORT_NAME, export.encode("utf-8"))
        try:
            data = await self._read(hs.EXPORT_NAME_REPLY.size)
        except ConnectionLostError as exc:
            raise NegotiationError(f"server refused export {export!r}") from exc
        size, flags = hs.parse_export_name_reply(data)
        if not self.no_zeroes:
            await self._read(124)
        info = hs.ExportInfo(size=size, flags=flags)
        return info


def _psk_user(tls: TLSOptions) -> str:
    try:
        return tls.username or default_username()
    except NegotiationError:
        return "?"


def _tls_failure(tls: TLSOptions, exc: BaseException) -> str:
    """One line saying why the TLS handshake failed, with the likely causes for PSK."""
    if tls.psk and isinstance(exc, ssl.SSLCertVerificationError):
        return (
            "TLS-PSK handshake failed: the server presented a certificate "
            "(it is set up for X.509, not for a pre-shared key)"
        )
    if isinstance(exc, ConnectionError | EOFError) or not str(exc):
        reason = "the server closed the connection"
    else:
        reason = getattr(exc, "reason", None) or str(exc)
    if tls.psk:
        return (
            f"TLS-PSK handshake failed ({reason}): wrong key, "
            f"or user {_psk_user(tls)!r} unknown to the server"
        )
    return f"TLS handshake failed: {reason}"


async def negotiate(
    uri: NBDURI,
    *,
    export: str,
    tls: TLSOptions | None,
    meta_contexts: tuple[str, ...],
    structured_replies: bool,
    extended_headers: bool,
) -> Negotiated:
    """The whole handshake up to the transmission phase."""
    negotiator = await Negotiator.open(uri)
    try:
        await negotiator.greeting()
        if tls is not None:
            await negotiator.starttls(tls, uri.host)
        await negotiator.negotiate_replies(
            structured=structured_replies or bool(meta_contexts), extended=extended_headers
        )
        contexts: dict[str, int] = {}
        if meta_contexts and (negotiator.structured or negotiator.extended):
            # without structured replies there is no block status: callers see an empty
            # meta_contexts mapping and fall back (e.g. treat everything as data)
            contexts = await negotiator.meta_context_option(
                Option.SET_META_CONTEXT, export, meta_contexts
            )
        info = await negotiator.info_or_go(Option.GO, export)
        if info is None:
            contexts = {}
            info = await negotiator.export_name(export)
    except BaseException:
        await negotiator.abort()
        raise
    return Negotiated(
        reader=negotiator.reader,
        writer=negotiator.writer,
        export=export,
        info=info,
        structured_replies=negotiator.structured,
        extended_headers=negotiator.extended,
        tls=negotiator.tls,
        meta_contexts=contexts,
    )
