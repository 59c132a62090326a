"""nbdclient: an asyncio NBD client (fixed newstyle, structured replies, extended
headers, meta contexts and block status, TLS, pipelining).

Start with :func:`connect`; see :class:`Client` for the commands.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Client, connect
    from .constants import STATE_DIRTY, STATE_HOLE, STATE_ZERO, TransmissionFlag
    from .errors import (
        ConnectionLostError,
        NBDError,
        NBDTimeoutError,
        NegotiationError,
        ProtocolError,
        RemoteProtocolError,
        RequestError,
        StateError,
        UnsupportedError,
    )
    from .queries import list_exports, list_meta_contexts, query_export
    from .uri import NBDURI, parse_uri, unix_uri
    from .values import BlockSize, ExportListing, Extent, Runstate, TLSOptions

#: where each public name lives: imported on first use, so that a program that only
#: needs a constant or the URI parser does not pay for asyncio and ssl at start-up
_HOME = {
    "Client": "client",
    "connect": "client",
    "list_exports": "queries",
    "list_meta_contexts": "queries",
    "query_export": "queries",
    "STATE_DIRTY": "constants",
    "STATE_HOLE": "constants",
    "STATE_ZERO": "constants",
    "TransmissionFlag": "constants",
    "ConnectionLostError": "errors",
    "NBDError": "errors",
    "NBDTimeoutError": "errors",
    "NegotiationError": "errors",
    "ProtocolError": "errors",
    "RemoteProtocolError": "errors",
    "RequestError": "errors",
    "StateError": "errors",
    "UnsupportedError": "errors",
    "NBDURI": "uri",
    "parse_uri": "uri",
    "unix_uri": "uri",
    "BlockSize": "values",
    "ExportListing": "values",
    "Extent": "values",
    "Runstate": "values",
    "TLSOptions": "values",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'nbdclient' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "NBDURI",
    "STATE_DIRTY",
    "STATE_HOLE",
    "STATE_ZERO",
    "BlockSize",
    "Client",
    "ConnectionLostError",
    "ExportListing",
    "Extent",
    "NBDError",
    "NBDTimeoutError",
    "NegotiationError",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestError",
    "Runstate",
    "StateError",
    "TLSOptions",
    "TransmissionFlag",
    "UnsupportedError",
    "connect",
    "list_exports",
    "list_meta_contexts",
    "parse_uri",
    "query_export",
    "unix_uri",
]
