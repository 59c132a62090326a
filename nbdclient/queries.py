"""What a server tells in its option phase, without starting transmission: its exports
(NBD_OPT_LIST), an export's meta contexts (NBD_OPT_LIST_META_CONTEXT), an export's size
and flags (NBD_OPT_INFO).  Each query opens a connection, haggles TLS and replies as
:func:`~nbdclient.client.connect` does, asks, and closes with NBD_OPT_ABORT."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from . import _negotiate as ng
from ._handshake import ExportInfo
from .client import _resolve, _tls_for
from .constants import Option
from .errors import NBDTimeoutError, UnsupportedError
from .uri import NBDURI
from .values import ExportListing, TLSOptions


@contextlib.asynccontextmanager
async def _option_phase(
    uri: NBDURI, tls: TLSOptions | None, timeout: float, what: str, *, replies: bool
) -> AsyncIterator[ng.Negotiator]:
    """A connection kept in the option phase (greeting, STARTTLS, reply haggling) and
    closed with NBD_OPT_ABORT; for the queries that never start transmission."""
    try:
        async with asyncio.timeout(timeout):
            negotiator = await ng.Negotiator.open(uri)
            try:
                await negotiator.greeting()
                tls_options = _tls_for(uri, tls)
                if tls_options is not None:
                    await negotiator.starttls(tls_options, uri.host)
                if replies:
                    await negotiator.negotiate_replies(structured=True, extended=True)
                yield negotiator
            finally:
                await negotiator.abort()
    except TimeoutError as exc:
        raise NBDTimeoutError(f"{what} on {uri} took longer than {timeout:g} s") from exc


async def list_exports(
    target: str | NBDURI, *, tls: TLSOptions | None = None, timeout: float = 10.0
) -> list[ExportListing]:
    """NBD_OPT_LIST: the server's export names and descriptions."""
    uri = _resolve(target, None)
    async with _option_phase(uri, tls, timeout, "listing exports", replies=False) as session:
        return await session.list_exports()


async def list_meta_contexts(
    target: str | NBDURI,
    *,
    export: str | None = None,
    queries: Sequence[str] = (),
    tls: TLSOptions | None = None,
    timeout: float = 10.0,
) -> list[str]:
    """NBD_OPT_LIST_META_CONTEXT: the contexts of an export matching ``queries``
    (e.g. ``"qemu:"``, ``"qemu:dirty-bitmap:"``; none = all)."""
    uri = _resolve(target, export)
    async with _option_phase(uri, tls, timeout, "listing meta contexts", replies=True) as s:
        contexts = await s.meta_context_option(Option.LIST_META_CONTEXT, uri.export, tuple(queries))
        return list(contexts)


async def query_export(
    target: str | NBDURI,
    *,
    export: str | None = None,
    tls: TLSOptions | None = None,
    timeout: float = 10.0,
) -> ExportInfo:
    """NBD_OPT_INFO: size, flags, name, description and block sizes, without connecting."""
    uri = _resolve(target, export)
    async with _option_phase(uri, tls, timeout, "querying the export", replies=True) as s:
        info = await s.info_or_go(Option.INFO, uri.export)
        if info is None:
            raise UnsupportedError("server does not support NBD_OPT_INFO")
        return info
