"""nbdclient: an asyncio NBD client (fixed newstyle, structured replies, extended
headers, meta contexts and block status, TLS, pipelining).

Start with :func:`connect`; see :class:`Client` for the commands.
"""

from .client import Client, connect, list_exports, list_meta_contexts, query_export
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
from .uri import NBDURI, parse_uri, unix_uri
from .values import BlockSize, ExportListing, Extent, Runstate, TLSOptions

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
