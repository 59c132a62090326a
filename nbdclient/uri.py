"""NBD URIs (the NBD URI specification, doc/uri.md of the NBD project).

``nbd://host[:port]/export``, ``nbds://…`` (TLS), ``nbd+unix:///export?socket=PATH``,
``nbds+unix:///export?socket=PATH``.  TLS files come from the query parameters
``tls-ca-file``, ``tls-certificate-file``/``tls-key-file`` or ``tls-certificates=DIR``
(a directory with ``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``, as qemu and
libnbd use), and ``tls-hostname``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .constants import DEFAULT_PORT
from .values import TLSOptions

SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")


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


def _tls_from_query(query: dict[str, list[str]]) -> TLSOptions:
    def one(key: str) -> str | None:
        values = query.get(key)
        return values[-1] if values else None

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


def parse_uri(text: str) -> NBDURI:
    """Parse an NBD URI; ValueError with a clear message when it is not one."""
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"not an NBD URI (scheme must be one of {', '.join(SCHEMES)}): {text!r}")
    query = parse_qs(parts.query, keep_blank_values=True)
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    tls = _tls_from_query(query) if scheme.startswith("nbds") else None
    if scheme.endswith("+unix"):
        sockets = query.get("socket")
        if not sockets or not sockets[-1]:
            raise ValueError(f"{scheme} URI needs ?socket=PATH: {text!r}")
        if parts.netloc:
            raise ValueError(f"{scheme} URI must not name a host: {text!r}")
        return NBDURI(scheme, None, DEFAULT_PORT, sockets[-1], export, tls)
    host = parts.hostname
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
