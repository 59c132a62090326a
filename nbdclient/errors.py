"""The errors nbdclient raises, arranged by what the caller can do about them.

- :class:`NegotiationError`: the server refused during the handshake (its message is kept).
- :class:`ProtocolError`: the connection is dead; every pending request failed with it.
  :class:`RemoteProtocolError` when the server broke the protocol,
  :class:`ConnectionLostError` on EOF, reset or close.
- :class:`RequestError`: one command failed; the connection is still usable.
- :class:`UnsupportedError`: the server lacks the feature.
- :class:`NBDTimeoutError`: connect, handshake or request exceeded its timeout.
- :class:`StateError`: the client was used in the wrong state.
"""

from __future__ import annotations

from .constants import Errno
from .values import Runstate


class NBDError(Exception):
    """Base of every error nbdclient raises."""


class NegotiationError(NBDError):
    """The server refused an option during the handshake."""

    def __init__(
        self,
        message: str,
        *,
        option: int | None = None,
        reply_type: int | None = None,
        server_message: str = "",
    ) -> None:
        text = message if not server_message else f"{message}: {server_message}"
        super().__init__(text)
        self.option = option
        self.reply_type = reply_type
        self.server_message = server_message


class ProtocolError(NBDError):
    """The connection is unusable; every pending request fails with this error."""


class RemoteProtocolError(ProtocolError):
    """The server violated the NBD protocol."""


class ConnectionLostError(ProtocolError):
    """The connection was closed or reset."""


class RequestError(NBDError):
    """One command failed on the server; the connection is still usable."""

    def __init__(self, command: str, errno: int, server_message: str = "") -> None:
        self.command = command
        self.errno = errno
        self.errno_name = Errno.name_of(errno)
        self.server_message = server_message
        detail = f": {server_message}" if server_message else ""
        super().__init__(f"{command} failed with {self.errno_name}{detail}")


class UnsupportedError(NBDError):
    """The server does not offer what was asked for."""


class NBDTimeoutError(NBDError):
    """A connect, handshake or request did not finish in time."""


class StateError(NBDError):
    """The client was used in a state that does not allow the call: ``state`` is where
    it was, ``required`` where it would have had to be."""

    def __init__(
        self, message: str, *, state: Runstate | None = None, required: Runstate | None = None
    ) -> None:
        super().__init__(message)
        self.state = state
        self.required = required
