"""The source of a copy: one NBD export, its map, and reads over one or more connections.

A :class:`Source` starts with one connection, which negotiates ``base:allocation`` and
maps the export; when asked for what changed (a dirty-bitmap context) it starts with
two, one for the bitmap alone and one for ``base:allocation`` alone, so that the map
costs what changed, not the disk's allocation (:func:`~nbdclient.extents.map_dirty_first`).
:meth:`Source.spread` adds connections for the reads when the server allows multi-conn
(every connection then sees the same data); the copy engine spreads its readers over
them.  Use it as an async
context manager: every connection is closed on the way out.
"""

from __future__ import annotations

from types import TracebackType

from ..client import Client
from ..constants import BASE_ALLOCATION
from ..extents import MappedExtent, map_dirty_first, map_export
from ..multiconn import close_all, connect_each, connect_many
from ..uri import NBDURI


class Source:
    def __init__(
        self,
        target: str | NBDURI,
        first: Client,
        *,
        dirty_context: str | None,
        timeout: float,
        request_timeout: float | None,
    ) -> None:
        self.target = target
        self.clients = [first]
        self.dirty_context = dirty_context
        self._timeout = timeout
        self._request_timeout = request_timeout

    @classmethod
    async def open(
        cls,
        target: str | NBDURI,
        *,
        dirty_context: str | None = None,
        timeout: float = 10.0,
        request_timeout: float | None = None,
    ) -> Source:
        """Connect: ``base:allocation`` on one connection, and ``dirty_context`` (when
        given) on a connection of its own."""
        contexts = [[BASE_ALLOCATION]] + ([[dirty_context]] if dirty_context else [])
        clients = await connect_each(
            target, contexts, timeout=timeout, request_timeout=request_timeout
        )
        source = cls(
            target,
            clients[0],
            dirty_context=dirty_context,
            timeout=timeout,
            request_timeout=request_timeout,
        )
        source.clients = clients
        return source

    @property
    def size(self) -> int:
        return self.clients[0].size

    @property
    def max_request(self) -> int:
        """The largest read every connection takes."""
        return min(c.max_request for c in self.clients)

    async def map(self) -> list[MappedExtent]:
        """The export's extents: ``base:allocation`` merged with the dirty context.

        Without block status (a server without structured replies) the whole export is
        one data extent; a dirty context that was asked for must have been negotiated.
        """
        client = self.clients[0]
        if self.dirty_context is not None:
            extents = await map_dirty_first(self.clients[1], self.dirty_context, client)
            if not client.can_multi_conn():  # reads stay on one connection
                await close_all(self.clients[1:])
                self.clients = self.clients[:1]
            return extents
        if client.can_block_status(BASE_ALLOCATION):
            return await map_export(client)
        return [MappedExtent(0, client.size, zero=False, hole=False, dirty=True)]

    async def spread(self, connections: int) -> None:
        """Have ``connections`` connections in all, when the server allows multi-conn;
        else stay on one.  If one fails to open, none is added (and the error raised)."""
        wanted = connections - len(self.clients)
        if wanted <= 0 or not self.clients[0].can_multi_conn():
            return
        self.clients += await connect_many(
            self.target, wanted, timeout=self._timeout, request_timeout=self._request_timeout
        )

    async def aclose(self) -> None:
        clients, self.clients = self.clients, self.clients[:1]
        await close_all(clients)

    async def __aenter__(self) -> Source:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
