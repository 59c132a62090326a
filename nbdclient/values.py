"""Plain values the NBD client hands out: extents, block sizes, export listings, TLS
options, and the client's runstate."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Runstate(enum.Enum):
    """Where a :class:`~nbdclient.Client` is in its life (libnbd's READY/DEAD/CLOSED,
    qemu.qmp's DISCONNECTING).  A client exists only once the handshake is done.

    READY -> DEAD when the server breaks the protocol or the connection is lost;
    READY or DEAD -> DISCONNECTING -> CLOSED through ``disconnect()``.
    """

    READY = "ready"  # commands may be sent
    DEAD = "dead"  # the connection broke: commands raise its ProtocolError
    DISCONNECTING = "disconnecting"  # disconnect() is closing the connection
    CLOSED = "closed"  # disconnected: commands raise StateError


@dataclass(frozen=True, slots=True)
class Extent:
    """One extent of a meta context: ``length`` bytes at ``offset`` with context ``flags``."""

    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class BlockSize:
    """Block size constraints of an export (NBD_INFO_BLOCK_SIZE)."""

    minimum: int
    preferred: int
    maximum: int


@dataclass(frozen=True, slots=True)
class ExportListing:
    """One entry of NBD_OPT_LIST: an export name and its optional description."""

    name: str
    description: str


@dataclass(frozen=True, slots=True)
class TLSOptions:
    """TLS settings for NBD_OPT_STARTTLS: X.509 certificates or a pre-shared key.

    X.509: ``ca_file`` verifies the server; ``cert_file``/``key_file`` authenticate the
    client.  PSK: ``psk_file`` holds ``username:hexkey`` lines (the format of GnuTLS's
    psktool and qemu's ``keys.psk``); the key of ``username`` is used, by default the
    login name (as libnbd does).  The two kinds do not mix.  When TLS is asked for,
    the client never falls back to plaintext.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_hostname: str | None = None
    verify: bool = True
    psk_file: str | None = None
    username: str | None = None

    def __post_init__(self) -> None:
        if self.psk_file is not None and (self.ca_file or self.cert_file or self.key_file):
            raise ValueError("TLS with a pre-shared key takes no certificate or CA file")

    @property
    def psk(self) -> bool:
        """True for TLS-PSK, False for X.509."""
        return self.psk_file is not None
