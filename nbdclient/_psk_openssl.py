"""TLS-PSK for interpreters whose ``ssl`` module has no PSK callbacks (before 3.13).

asyncio's TLS layer (``loop.start_tls``) drives an :class:`ssl.SSLObject` over two
:class:`ssl.MemoryBIO` objects.  :class:`OpenSSLPSKContext` is an
:class:`ssl.SSLContext` whose ``wrap_bio`` returns :class:`OpenSSLPSKObject`, the same
interface served by a pyOpenSSL connection with its own memory BIOs, so the rest of
the client (and asyncio's flow control, buffered reads, shutdown) is unchanged.

pyOpenSSL has no PSK API of its own; the PSK client callback is registered through
the OpenSSL bindings of ``cryptography`` (``SSL_CTX_set_psk_client_callback``, which
that project binds for exactly this use) on pyOpenSSL's context.  Imported only when
a PSK connection is made; needs the ``psk`` extra (pyOpenSSL).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

_lib: Any = Binding.lib
_ffi: Any = Binding.ffi

_RECORD = 1 << 14  # the most data one TLS record carries
_OUT_CHUNK = 1 << 18
_CLIENT_CALLBACK = (
    "unsigned int (*)(SSL *, const char *, char *, unsigned int, unsigned char *, unsigned int)"
)


def available() -> bool:
    """True when the bound OpenSSL can register a PSK client callback."""
    return bool(getattr(_lib, "Cryptography_HAS_PSK", False)) and hasattr(
        _lib, "SSL_CTX_set_psk_client_callback"
    )


def _as_ssl_error(exc: SSL.Error) -> ssl.SSLError:
    """An :mod:`ssl` exception for a pyOpenSSL one, as asyncio's TLS layer expects
    (with ``reason`` set, as the ``ssl`` module's own exceptions have it)."""
    kind: type[ssl.SSLError]
    if isinstance(exc, SSL.WantReadError):
        kind, code, text = ssl.SSLWantReadError, ssl.SSL_ERROR_WANT_READ, "read would block"
    elif isinstance(exc, SSL.WantWriteError):
        kind, code, text = ssl.SSLWantWriteError, ssl.SSL_ERROR_WANT_WRITE, "write would block"
    elif isinstance(exc, SSL.ZeroReturnError):
        kind, code, text = ssl.SSLZeroReturnError, ssl.SSL_ERROR_ZERO_RETURN, "TLS closed"
    elif isinstance(exc, SSL.SysCallError):
        kind, code, text = ssl.SSLEOFError, ssl.SSL_ERROR_EOF, "EOF in violation of protocol"
    else:
        queue = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
        reasons = [str(entry[-1]) for entry in queue if entry and entry[-1]]
        text = ", ".join(reasons) or str(exc) or "TLS error"
        kind, code = ssl.SSLError, ssl.SSL_ERROR_SSL
        if "certificate verify failed" in reasons:
            kind = ssl.SSLCertVerificationError
    error = kind(code, text)
    error.reason = text
    return error


class OpenSSLPSKContext(ssl.SSLContext):
    """A client context for TLS-PSK (TLS 1.2 and 1.3) backed by pyOpenSSL.

    ``identity`` and ``key`` are sent for every connection made from it.  The
    ``ssl.SSLContext`` part is never used for a connection; only ``wrap_bio`` is.
    """

    _openssl: SSL.Context
    _callback: Any

    def __new__(cls, *_args: object, **_kwargs: object) -> OpenSSLPSKContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)

    def __init__(
        self, identity: bytes, key: bytes, *, tls12_ciphers: str, tls13_suites: str
    ) -> None:
        self.check_hostname = False
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(tls12_ciphers.encode())
        context.set_tls13_ciphersuites(tls13_suites.encode())
        # no CA is trusted: a server that presents a certificate instead of using the
        # key fails verification, so PSK never degrades to an unauthenticated server
        context.set_verify(SSL.VERIFY_PEER, lambda *_: False)
        self._callback = _ffi.callback(_CLIENT_CALLBACK, _client_callback(identity, key))
        _lib.SSL_CTX_set_psk_client_callback(context._context, self._callback)
        self._openssl = context

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> OpenSSLPSKObject:
        if server_side:
            raise ValueError("OpenSSLPSKContext makes client connections only")
        connection = SSL.Connection(self._openssl, None)
        connection.set_connect_state()
        return OpenSSLPSKObject(connection, incoming, outgoing, self)


def _client_callback(identity: bytes, key: bytes) -> Callable[[Any, Any, Any, int, Any, int], int]:
    def callback(
        _ssl: Any, _hint: Any, out_identity: Any, max_identity: int, out_key: Any, max_key: int
    ) -> int:
        # OpenSSL wants the identity NUL-terminated; 0 aborts the handshake
        if len(identity) + 1 > max_identity or len(key) > max_key:
            return 0
        _ffi.memmove(out_identity, identity + b"\0", len(identity) + 1)
        _ffi.memmove(out_key, key, len(key))
        return len(key)

    return callback


class OpenSSLPSKObject(ssl.SSLObject):
    """The :class:`ssl.SSLObject` interface over a pyOpenSSL memory-BIO connection.

    Every call first moves what arrived in ``incoming`` into OpenSSL and afterwards
    moves what OpenSSL produced into ``outgoing``; pyOpenSSL's exceptions become the
    :mod:`ssl` ones asyncio acts on.
    """

    def __init__(  # SSLObject.__init__ only refuses direct use: not called
        self,
        connection: SSL.Connection,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        context: OpenSSLPSKContext,
    ) -> None:
        self._connection = connection
        self._incoming = incoming
        self._outgoing = outgoing
        self._psk_context = context

    # ---- moving bytes between the BIOs --------------------------------------------

    def _take_incoming(self) -> None:
        if self._incoming.pending:
            self._connection.bio_write(self._incoming.read())

    def _give_outgoing(self) -> None:
        while True:
            try:
                data = self._connection.bio_read(_OUT_CHUNK)
            except SSL.WantReadError:
                return
            if not data:
                return
            self._outgoing.write(data)

    # ---- the SSLObject interface asyncio uses --------------------------------------------

    def do_handshake(self) -> None:
        self._take_incoming()
        try:
            self._connection.do_handshake()
        except SSL.Error as exc:
            raise _as_ssl_error(exc) from None
        finally:
            self._give_outgoing()

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        self._take_incoming()
        try:
            if buffer is None:
                return self._connection.recv(min(len, _RECORD))
            return self._read_into(memoryview(buffer).cast("B")[:len])
        except SSL.ZeroReturnError:
            return 0 if buffer is not None else b""  # close_notify, as ssl reports it
        except SSL.Error as exc:
            raise _as_ssl_error(exc) from None
        finally:
            self._give_outgoing()

    def _read_into(self, view: memoryview) -> int:
        """Decrypted data into ``view``, record after record, until it is full or
        OpenSSL needs more input (one call per record would cost a Python round trip
        through asyncio's TLS layer for every 16 KiB)."""
        filled = 0
        while filled < len(view):
            try:
                filled += self._connection.recv_into(view[filled:], _RECORD)
            except (SSL.WantReadError, SSL.ZeroReturnError):
                if filled:
                    return filled
                raise
        return filled

    def write(self, data: Any) -> int:
        self._take_incoming()
        try:
            written: int = self._connection.send(data)
            return written
        except SSL.Error as exc:
            raise _as_ssl_error(exc) from None
        finally:
            self._give_outgoing()

    def unwrap(self) -> None:
        self._take_incoming()
        try:
            done = self._connection.shutdown()
        except SSL.Error as exc:
            raise _as_ssl_error(exc) from None
        finally:
            self._give_outgoing()
        if not done:
            raise ssl.SSLWantReadError("waiting for the peer's close_notify")

    def pending(self) -> int:
        return self._connection.pending()

    def getpeercert(self, binary_form: bool = False) -> Any:
        certificate = self._connection.get_peer_certificate(as_cryptography=True)
        if certificate is None:
            return None
        from cryptography.hazmat.primitives.serialization import Encoding

        return certificate.public_bytes(Encoding.DER) if binary_form else {}

    def cipher(self) -> tuple[str, str, int] | None:
        name = self._connection.get_cipher_name()
        version = self._connection.get_cipher_version()
        bits = self._connection.get_cipher_bits()
        if name is None or version is None or bits is None:
            return None
        return name, version, bits

    def version(self) -> str | None:
        return self._connection.get_protocol_version_name()

    def compression(self) -> str | None:
        return None

    def selected_alpn_protocol(self) -> str | None:
        return None

    def shared_ciphers(self) -> list[tuple[str, str, int]] | None:
        return None

    @property
    def context(self) -> ssl.SSLContext:
        return self._psk_context

    @context.setter
    def context(self, value: ssl.SSLContext) -> None:
        raise AttributeError("the context of a TLS-PSK connection cannot be changed")

    @property
    def server_side(self) -> bool:
        return False

    @property
    def server_hostname(self) -> str | None:
        return None
