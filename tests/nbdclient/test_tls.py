"""TLS settings without a TLS server: NBD URIs with TLS parameters (X.509, PSK, IPv6
hosts), PSK files, and what the client refuses around STARTTLS."""

from __future__ import annotations

from pathlib import Path

import pytest

import nbdclient
from nbdclient._tls import load_identity, read_psk_key
from nbdclient.constants import Option
from nbdclient.uri import parse_uri

from .fakeserver import FakeServer, ServerConfig

KEY = "0123456789abcdef" * 4


def test_psk_uri_with_username_parameter() -> None:
    uri = parse_uri("nbds+unix:///vda?socket=/run/s.sock&tls-psk-file=/etc/k.psk&tls-username=al")
    assert uri.socket == "/run/s.sock" and uri.export == "vda"
    assert uri.tls == nbdclient.TLSOptions(psk_file="/etc/k.psk", username="al")
    assert uri.tls.psk


def test_psk_uri_with_userinfo() -> None:
    """The NBD URI specification (and libnbd) put the user before '@'."""
    unix = parse_uri("nbds+unix://alice@/vda?socket=/s&tls-psk-file=k.psk")
    assert unix.tls is not None and unix.tls.username == "alice" and unix.socket == "/s"
    tcp = parse_uri("nbds://b%40b@[2001:db8::7]:10900/vda?tls-psk-file=k.psk")
    assert (tcp.host, tcp.port, tcp.export) == ("2001:db8::7", 10900, "vda")
    assert tcp.tls is not None and tcp.tls.username == "b@b"
    assert parse_uri("nbds://h/e?tls-psk-file=k").tls == nbdclient.TLSOptions(psk_file="k")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("nbds://bob@h/e?tls-psk-file=k&tls-username=al", "differ"),
        ("nbds://h/e?tls-psk-file=k&tls-certificates=/pki", "tls-certificates"),
        ("nbds://h/e?tls-psk-file=k&tls-ca-file=ca.pem", "tls-ca-file"),
        ("nbds://h/e?tls-psk-file=", "needs a file name"),
        ("nbds://al:secret@h/e?tls-psk-file=k", "no password"),
        ("nbds+unix://host/e?socket=/s", "must not name a host"),
        ("nbds://::1/e", "brackets"),
        ("nbds://[::1/e", "not a valid URI"),
    ],
)
def test_bad_tls_uris(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error) as info:
        parse_uri(text)
    assert "secret" not in str(info.value)


def test_ipv6_hosts_keep_their_brackets() -> None:
    uri = parse_uri("nbds://[::1]:10809/vda?tls-certificates=/nonexistent")
    assert uri.host == "::1" and uri.port == 10809
    assert str(uri) == "nbds://[::1]/vda"
    assert str(parse_uri("nbd://[fe80::2]:99/")) == "nbd://[fe80::2]:99/"


def test_x509_and_psk_do_not_mix() -> None:
    with pytest.raises(ValueError, match="pre-shared key"):
        nbdclient.TLSOptions(psk_file="k.psk", ca_file="ca.pem")


def test_psk_file_lookup(tmp_path: Path) -> None:
    keys = tmp_path / "keys.psk"
    keys.write_text(f"# made by psktool\n\nqemu:{'ff' * 32}\nalice:{KEY}\n")
    assert read_psk_key(str(keys), "alice") == bytes.fromhex(KEY)
    assert read_psk_key(str(keys), "qemu") == b"\xff" * 32
    identity = load_identity(nbdclient.TLSOptions(psk_file=str(keys), username="alice"))
    assert identity.username == "alice" and identity.key == bytes.fromhex(KEY)
    assert KEY not in repr(identity)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (f"alice:{KEY}\n", "has no key for user 'bob'"),
        ("bob:not-hex\n", "line 1: the key of 'bob' is not"),
        ("bob:\n", "line 1: the key of 'bob' is not"),
        (f"alice:{KEY}\nbob {KEY}\n", "line 2: not USERNAME:HEXKEY"),
        (None, "cannot read TLS-PSK file .*No such file"),
    ],
)
def test_bad_psk_files(tmp_path: Path, content: str | None, error: str) -> None:
    keys = tmp_path / "keys.psk"
    if content is not None:
        keys.write_text(content)
    with pytest.raises(nbdclient.NegotiationError, match=error) as info:
        read_psk_key(str(keys), "bob")
    assert KEY not in str(info.value)


async def test_bad_psk_file_fails_before_starttls(tmp_path: Path, sockdir: Path) -> None:
    keys = tmp_path / "keys.psk"
    keys.write_text(f"alice:{KEY}\n")
    async with FakeServer(str(sockdir / "s")) as srv:
        with pytest.raises(nbdclient.NegotiationError, match="no key for user 'carol'"):
            await nbdclient.connect(
                f"nbds+unix:///exp?socket={srv.path}&tls-psk-file={keys}&tls-username=carol"
            )
        assert Option.STARTTLS not in srv.options


@pytest.mark.parametrize("extra", [b"\x00" * 20, b"junk that is not TLS"])
async def test_plaintext_after_starttls_ack_is_refused(sockdir: Path, extra: bytes) -> None:
    """Bytes that arrive in plaintext after the STARTTLS ACK are never read as part of
    the TLS session: the connection fails and no further option is sent."""
    config = ServerConfig(starttls_then=extra)
    async with FakeServer(str(sockdir / "s"), config) as srv:
        with pytest.raises(nbdclient.RemoteProtocolError, match=f"sent {len(extra)} bytes"):
            await nbdclient.connect(srv.uri, tls=nbdclient.TLSOptions(verify=False))
        assert Option.STARTTLS in srv.options
        assert Option.GO not in srv.options
        assert Option.STRUCTURED_REPLY not in srv.options
