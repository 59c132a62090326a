"""The client side of NBD_OPT_STARTTLS: SSL contexts for X.509 and for pre-shared keys.

X.509 uses the standard library's ``ssl``.  TLS-PSK uses the standard library's PSK
callbacks where the interpreter has them (``SSLContext.set_psk_client_callback``,
Python 3.13), and pyOpenSSL otherwise (the ``psk`` extra; see ``_psk_openssl``).  Both
give asyncio an ``ssl.SSLContext``, so the handshake and the transmission phase do not
know which kind of TLS they run over.

What qemu's GnuTLS server offers (``tls-creds-psk``: its priority is ``NORMAL`` plus
``+ECDHE-PSK:+DHE-PSK:+PSK``): TLS 1.3 with an external PSK and an (EC)DHE key share
(forward secrecy); with OpenSSL as client the binder hash is SHA-256, so the suite is
TLS_AES_128_GCM_SHA256 or TLS_CHACHA20_POLY1305_SHA256.  Where TLS 1.3 is switched
off (``priority=...:-VERS-TLS1.3``), TLS 1.2 with the AEAD PSK suites below.

A PSK client trusts no certificate: a server that answers with one instead of using
the key fails verification, so asking for PSK never ends on an unauthenticated server.
"""

from __future__ import annotations

import getpass
import os
import ssl
from dataclasses import dataclass, field

from .errors import NegotiationError, UnsupportedError
from .values import TLSOptions

# TLS 1.2: (EC)DHE-PSK first (forward secrecy), plain PSK last; AEAD ciphers only, and
# never RSA-PSK (that one wants a server certificate)
PSK_TLS12_CIPHERS = "kECDHEPSK+CHACHA20:kDHEPSK+AESGCM:kDHEPSK+CHACHA20:kPSK+AESGCM:kPSK+CHACHA20"
# TLS 1.3 suites whose hash is the PSK's (SHA-256); AES-GCM first (AES-NI)
PSK_TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256"

_MAX_IDENTITY = 128  # OpenSSL's PSK_MAX_IDENTITY_LEN (1.1; 3.x allows 256)
_MAX_KEY = 256
_MAX_FILE = 1 << 20


@dataclass(frozen=True, slots=True)
class PSKIdentity:
    """A user name and its key, as read from a PSK file."""

    username: str
    key: bytes = field(repr=False)


def client_context(tls: TLSOptions) -> ssl.SSLContext:
    """The SSL context for ``tls``: PSK when it names a PSK file, else X.509."""
    return psk_context(load_identity(tls)) if tls.psk else x509_context(tls)


def x509_context(tls: TLSOptions) -> ssl.SSLContext:
    """An X.509 client context: TLS >= 1.2, CA file, optional client certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def stdlib_has_psk() -> bool:
    """Whether this interpreter's ``ssl`` has PSK callbacks (Python 3.13 and later)."""
    return hasattr(ssl.SSLContext, "set_psk_client_callback")


def psk_context(identity: PSKIdentity, *, stdlib: bool | None = None) -> ssl.SSLContext:
    """A TLS-PSK client context (TLS 1.2 and 1.3) that offers ``identity``.

    ``stdlib`` picks the implementation (default: the standard library's when it has
    PSK callbacks, else pyOpenSSL); tests use it to run both where both exist.
    """
    if stdlib is None:
        stdlib = stdlib_has_psk()
    if stdlib:
        return _stdlib_psk_context(identity)
    try:
        from . import _psk_openssl
    except ImportError as exc:
        raise UnsupportedError(
            "TLS-PSK needs Python 3.13 or pyOpenSSL (pip install 'backupd[psk]')"
        ) from exc
    if not _psk_openssl.available():
        raise UnsupportedError("the OpenSSL of pyOpenSSL was built without PSK support")
    return _psk_openssl.OpenSSLPSKContext(
        identity.username.encode(),
        identity.key,
        tls12_ciphers=PSK_TLS12_CIPHERS,
        tls13_suites=PSK_TLS13_SUITES,
    )


def _stdlib_psk_context(identity: PSKIdentity) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED  # and no CA loaded: see the module docstring
    context.set_ciphers(PSK_TLS12_CIPHERS)
    answer = (identity.username, identity.key)
    context.set_psk_client_callback(lambda _hint: answer)  # type: ignore[attr-defined,unused-ignore]
    return context


def load_identity(tls: TLSOptions) -> PSKIdentity:
    """The user and key ``tls`` names: ``tls.username`` (default: the login name) in
    ``tls.psk_file``.  NegotiationError with the reason when there is none."""
    assert tls.psk_file is not None
    username = tls.username or default_username()
    if len(username.encode()) > _MAX_IDENTITY:
        raise NegotiationError(f"TLS-PSK user name {username[:20]!r}... is too long")
    return PSKIdentity(username, read_psk_key(tls.psk_file, username))


def default_username() -> str:
    """The login name, as libnbd uses it; the user name of the process where there
    is no login (a service, a container)."""
    try:
        return os.getlogin()
    except OSError:
        pass
    try:
        return getpass.getuser()
    except (OSError, KeyError) as exc:
        raise NegotiationError("TLS-PSK: no login name; give the user as tls-username=") from exc


def read_psk_key(path: str, username: str) -> bytes:
    """The key of ``username`` in a PSK file of ``username:hexkey`` lines."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read(_MAX_FILE)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise NegotiationError(f"cannot read TLS-PSK file {path}: {reason}") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, hexkey = line.partition(":")
        if not colon:
            raise NegotiationError(f"TLS-PSK file {path}, line {number}: not USERNAME:HEXKEY")
        if name != username:
            continue
        try:
            key = bytes.fromhex(hexkey)
        except ValueError:
            key = b""
        if not key or len(key) > _MAX_KEY:
            raise NegotiationError(
                f"TLS-PSK file {path}, line {number}: the key of {username!r} is not "
                f"1 to {_MAX_KEY} bytes in hexadecimal"
            )
        return key
    raise NegotiationError(f"TLS-PSK file {path} has no key for user {username!r}")
