"""What the reply machine (``_replies``) reports: one event per finished request, or
one protocol violation after which the connection is dead.  Plain values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import RemoteProtocolError, RequestError
from .values import Extent


@dataclass(frozen=True, slots=True)
class RequestDone:
    """A request succeeded; ``extents`` is the block status result (None otherwise)."""

    cookie: int
    extents: dict[str, list[Extent]] | None


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """The server failed one request; the connection stays usable."""

    cookie: int
    error: RequestError


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The server broke the protocol: no more replies are read, every request is lost."""

    error: RemoteProtocolError


Event = RequestDone | RequestFailed | ProtocolViolation
