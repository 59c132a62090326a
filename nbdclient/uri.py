"""NBD URIs (the NBD URI specification, doc/uri.md of the NBD project).

``nbd://host[:port]/export``, ``nbds://…`` (TLS), ``nbd+unix:///export?socket=PATH``,
``nbds+unix:///export?socket=PATH``.  X.509 files come from the query parameters
``tls-ca-file``, ``tls-certificate-file``/``tls-key-file`` or ``tls-certificates=DIR``
(a directory with ``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``, as qemu and
libnbd use), and ``tls-hostname``.  A pre-shared key comes from ``tls-psk-file=PATH``
(``username:hexkey`` lines) for the user named by ``tls-username=NAME`` or by the URI's
userinfo (``nbds://alice@host/export``, ``nbds+unix://alice@/export?socket=PATH``, the
form of the NBD URI specification and libnbd); by default the login name.
IPv6 addresses are written in brackets: ``nbds://[::1]:10809/export``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import SplitResult, parse_qs, quote, unquote, urlsplit

from .constants import DEFAULT_PORT
from .values import TLSOptions

SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")
_X509_KEYS = ("tls-certificates", "tls-ca-file", "tls-certificate-file", "tls-key-file")


@dataclass(frozen=True, slots=True)
class NBDURI:
    """A parsed NBD URI; ``str()`` gives it back."""

    scheme: str
    host: str | None
    port: int
    socket: str | None
    export: str
    tls: TLSOptions | None

    def __str__(self) -> str:
        path = "/" + quote(self.export, safe="")
        if self.socket is not None:
            return f"{self.scheme}://{path}?socket={quote(self.socket, safe='/')}"
        host = f"[{self.host}]" if self.host and ":" in self.host else (self.host or "")
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"{self.scheme}://{host}{port}{path}"

    def with_export(self, export: str) -> NBDURI:
        return NBDURI(self.scheme, self.host, self.port, self.socket, export, self.tls)


def _tls_from_query(query: dict[str, list[str]], userinfo: str | None) -> TLSOptions:
    def one(key: str) -> str | None:
        values = query.get(key)
        return values[-1] if values else None

    psk_file = one("tls-psk-file")
    username = one("tls-username")
    if userinfo is not None:
        if username is not None and username != userinfo:
            raise ValueError(f"tls-username={username!r} and user {userinfo!r} in the URI differ")
        username = userinfo
    if psk_file is not None:
        x509 = [k for k in _X509_KEYS if k in query]
        if x509:
            raise ValueError(f"tls-psk-file cannot be combined with {', '.join(x509)}")
        if not psk_file:
            raise ValueError("tls-psk-file= needs a file name")
        return TLSOptions(psk_file=psk_file, username=username or None)

    ca_file = one("tls-ca-file")
    cert_file = one("tls-certificate-file")
    key_file = one("tls-key-file")
    directory = one("tls-certificates")
    if directory:

        def inside(name: str) -> str | None:
            path = os.path.join(directory, name)
            return path if os.path.exists(path) else None

        ca_file = ca_file or inside("ca-cert.pem")
        cert_file = cert_file or inside("client-cert.pem")
        key_file = key_file or inside("client-key.pem")
    verify = one("tls-verify-peer") not in ("false", "0", "no")
    return TLSOptions(
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        server_hostname=one("tls-hostname"),
        verify=verify,
    )


def _userinfo(parts: SplitResult, text: str) -> str | None:
    """The user named before ``@`` in the authority (never a password)."""
    if parts.password is not None:
        raise ValueError("an NBD URI carries no password (a pre-shared key goes in tls-psk-file=)")
    return unquote(parts.username) if parts.username else None


def parse_uri(text: str) -> NBDURI:
    """Parse an NBD URI; ValueError with a clear message when it is not one."""
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # e.g. an unclosed '[' of an IPv6 address
        raise ValueError(f"not a valid URI ({exc}): {text!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"not an NBD URI (scheme must be one of {', '.join(SCHEMES)}): {text!r}")
    query = parse_qs(parts.query, keep_blank_values=True)
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    user = _userinfo(parts, text)
    tls = _tls_from_query(query, user) if scheme.startswith("nbds") else None
    if scheme.endswith("+unix"):
        sockets = query.get("socket")
        if not sockets or not sockets[-1]:
            raise ValueError(f"{scheme} URI needs ?socket=PATH: {text!r}")
        if parts.netloc.rpartition("@")[2]:
            raise ValueError(f"{scheme} URI must not name a host: {text!r}")
        return NBDURI(scheme, None, DEFAULT_PORT, sockets[-1], export, tls)
    host = parts.hostname
    hostport = parts.netloc.rpartition("@")[2]
    if hostport.count(":") > 1 and not hostport.startswith("["):
        raise ValueError(f"an IPv6 address in a URI goes in brackets, nbd://[::1]:10809/: {text!r}")
    if not host:
        raise ValueError(f"{scheme} URI needs a host: {text!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise ValueError(f"bad port in NBD URI {text!r}") from exc
    return NBDURI(scheme, host, port, None, export, tls)


def unix_uri(socket: str, export: str = "") -> NBDURI:
    """The URI of an export on a unix socket."""
    return NBDURI("nbd+unix", None, DEFAULT_PORT, socket, export, None)
