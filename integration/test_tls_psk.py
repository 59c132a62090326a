"""nbdclient over TLS with pre-shared keys, against qemu-nbd with tls-creds-psk:
everything the CLI and the library do, checked against nbdinfo / nbdcopy (libnbd, which
speaks PSK through GnuTLS), and every way the handshake must fail."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import nbdclient
from nbdclient import _tls
from nbdclient._negotiate import Negotiator
from nbdclient.extents import map_export
from nbdclient.uri import parse_uri

from .harness.chain import make_qcow2, qemu_img_check, qemu_img_compare, qemu_io
from .harness.servers import make_certificates, make_psk_keys, qemu_nbd, qemu_nbd_psk_args

pytestmark = pytest.mark.qemu

MiB = 1 << 20

# the PSK implementations this interpreter can run: pyOpenSSL always (test extra),
# the standard library's from Python 3.13 on
BACKENDS = ["pyopenssl", *(["stdlib"] if _tls.stdlib_has_psk() else [])]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    name: str = request.param
    monkeypatch.setattr(_tls, "stdlib_has_psk", lambda: name == "stdlib")
    return name


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """32 MiB qcow2: 0xab at 1-3 MiB, zeros at 8 MiB, 0xcd at 20 MiB (the only write
    recorded by bitmap b1)."""
    path = tmp_path / "disk.qcow2"
    make_qcow2(path, "32M", "write -P 0xab 1M 2M", "write -z 8M 1M")
    subprocess.run(["qemu-img", "bitmap", "--add", str(path), "b1"], check=True)
    qemu_io(path, "write -P 0xcd 20M 64k")
    return path


def expected_bytes() -> bytes:
    data = bytearray(32 * MiB)
    data[1 * MiB : 3 * MiB] = b"\xab" * (2 * MiB)
    data[20 * MiB : 20 * MiB + 65536] = b"\xcd" * 65536
    return bytes(data)


class PSKServer:
    """A qemu-nbd PSK export and the URIs to reach it as a given user with a key file."""

    def __init__(self, uri: str, sock: Path) -> None:
        self.uri = uri
        self.sock = sock

    def ours(self, keys: Path, user: str) -> str:
        return f"{self.uri}&tls-psk-file={keys}&tls-username={user}"

    def libnbd(self, keys: Path, user: str) -> str:
        # libnbd 1.14 (Debian 12) takes the user from the URI's userinfo only
        return f"nbds+unix://{user}@/exp?socket={self.sock}&tls-psk-file={keys}"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """The server's keys.psk (users alice and bob) in its own folder."""
    return make_psk_keys(tmp_path / "server", "alice", "bob")


def client_file(tmp_path: Path, line: str, name: str = "client.psk") -> Path:
    path = tmp_path / name
    path.write_text(line + "\n")
    path.chmod(0o600)
    return path


def line_of(keys: Path, user: str) -> str:
    return next(line for line in keys.read_text().splitlines() if line.startswith(f"{user}:"))


@pytest.fixture
def psk_server(image: Path, keys: Path, sockdir: Path) -> Iterator[PSKServer]:
    sock = sockdir / "psk.sock"
    with qemu_nbd(image, sock, extra=["-B", "b1", *qemu_nbd_psk_args(keys.parent)]) as u:
        yield PSKServer(u, sock)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdclient", *args], capture_output=True, text=True, timeout=120
    )


def nbdinfo(*args: str) -> str:
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, check=True).stdout


def test_cli_over_psk_matches_nbdinfo_and_nbdcopy(
    psk_server: PSKServer, keys: Path, tmp_path: Path
) -> None:
    """info, list, contexts, map (both contexts) and copy over TLS-PSK give what libnbd
    gives on the same export, byte for byte."""
    mine = client_file(tmp_path, line_of(keys, "alice"))
    uri, ref = psk_server.ours(mine, "alice"), psk_server.libnbd(mine, "alice")
    info = json.loads(run_cli("info", "--json", uri).stdout)
    assert info["tls"] is True and info["size"] == 32 * MiB
    assert info["size"] == json.loads(nbdinfo("--json", ref))["exports"][0]["export-size"]
    assert run_cli("list", uri).stdout.split() == ["exp"]
    assert run_cli("contexts", uri, "qemu:dirty-bitmap:").stdout.split() == ["qemu:dirty-bitmap:b1"]
    for context in ("base:allocation", "qemu:dirty-bitmap:b1"):
        ours = json.loads(run_cli("map", "--json", "--context", context, uri).stdout)
        theirs = json.loads(nbdinfo(f"--map={context}", "--json", ref))
        assert [(e["offset"], e["length"], e["flags"]) for e in ours] == [
            (e["offset"], e["length"], e["type"]) for e in theirs
        ]
        assert len(ours) >= 3
    out, ref_out = tmp_path / "copy.raw", tmp_path / "ref.raw"
    result = run_cli("copy", uri, str(out))
    assert result.returncode == 0, result.stderr
    subprocess.run(["nbdcopy", ref, str(ref_out)], check=True)
    assert out.read_bytes() == ref_out.read_bytes() == expected_bytes()


async def test_library_reads_over_psk(
    backend: str, psk_server: PSKServer, keys: Path, tmp_path: Path
) -> None:
    """connect, pipelined reads, pread_many, block status, list_exports and
    list_meta_contexts over PSK, with each PSK implementation."""
    uri = psk_server.ours(client_file(tmp_path, line_of(keys, "bob")), "bob")
    assert [e.name for e in await nbdclient.list_exports(uri)] == ["exp"]
    assert await nbdclient.list_meta_contexts(uri, queries=["qemu:dirty-bitmap:"]) == [
        "qemu:dirty-bitmap:b1"
    ]
    wanted = ["base:allocation", "qemu:dirty-bitmap:b1"]
    async with await nbdclient.connect(uri, meta_contexts=wanted) as client:
        assert client.tls and client.structured_replies
        data = bytearray(32 * MiB)
        view = memoryview(data)
        step = 512 * 1024
        await asyncio.gather(
            *(client.pread_into(view[o : o + step], o) for o in range(0, 16 * MiB, step))
        )
        await client.pread_many([(view[o : o + step], o) for o in range(16 * MiB, 32 * MiB, step)])
        assert data == expected_bytes()
        mapped = await map_export(client, dirty_context="qemu:dirty-bitmap:b1")
    assert [(m.offset, m.length) for m in mapped if not m.zero] == [
        (1 * MiB, 2 * MiB),
        (20 * MiB, 65536),
    ]
    assert [(m.offset, m.length) for m in mapped if m.dirty] == [(20 * MiB, 65536)]


async def test_library_writes_over_psk(
    backend: str, keys: Path, sockdir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "target.qcow2"
    make_qcow2(target, "16M")
    model = bytearray(16 * MiB)
    extra = qemu_nbd_psk_args(keys.parent)
    with qemu_nbd(target, sockdir / "w.sock", read_only=False, extra=extra) as u:
        mine = client_file(tmp_path, line_of(keys, "alice"))
        async with await nbdclient.connect(f"{u}&tls-psk-file={mine}&tls-username=alice") as c:
            payload = bytes(range(256)) * (12 * 1024)  # 3 MiB
            await c.pwrite(payload, MiB, fua=True)
            await c.zero(MiB, 2 * MiB)  # length, offset (as libnbd)
            await c.flush()
            assert await c.pread(4096, MiB) == payload[:4096]
    model[MiB : 4 * MiB] = payload
    model[2 * MiB : 3 * MiB] = bytes(MiB)
    (tmp_path / "model.raw").write_bytes(model)
    qemu_img_check(target)
    cmp = qemu_img_compare(target, tmp_path / "model.raw", fmt_b="raw")
    assert cmp.returncode == 0, cmp.stdout


@pytest.mark.parametrize(
    ("user", "key_from", "server", "error"),
    [
        ("alice", "random", "psk", "TLS-PSK handshake failed .*wrong key, or user 'alice'"),
        ("carol", "random", "psk", "TLS-PSK handshake failed .*user 'carol' unknown"),
        ("alice", "server", "plain", "server refused STARTTLS"),
        ("alice", "server", "x509", "the server presented a certificate"),
    ],
    ids=["wrong-key", "unknown-user", "plaintext-server", "x509-server"],
)
async def test_psk_refusals(
    backend: str,
    image: Path,
    keys: Path,
    sockdir: Path,
    tmp_path: Path,
    user: str,
    key_from: str,
    server: str,
    error: str,
) -> None:
    """Each failure ends the handshake with one NegotiationError line (CLI: exit 1,
    no traceback), and nothing is read in plaintext."""
    line = line_of(keys, "alice") if key_from == "server" else f"{user}:{'5a' * 32}"
    mine = client_file(tmp_path, line)
    extra: list[str] = []
    if server == "psk":
        extra = qemu_nbd_psk_args(keys.parent)
    elif server == "x509":
        certs = make_certificates(tmp_path / "pki")
        creds = f"tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir={certs}"
        extra = ["--object", creds, "--tls-creds", "tls0"]
    with qemu_nbd(image, sockdir / "r.sock", extra=extra):
        uri = (
            f"nbds+unix:///exp?socket={sockdir / 'r.sock'}&tls-psk-file={mine}&tls-username={user}"
        )
        with pytest.raises(nbdclient.NegotiationError, match=error):
            await nbdclient.connect(uri)
        result = run_cli("map", uri)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("nbdclient: ")
    assert "Traceback" not in result.stderr


async def test_x509_client_against_psk_server(psk_server: PSKServer, tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "pki")
    with pytest.raises(nbdclient.NegotiationError, match="TLS handshake failed"):
        await nbdclient.connect(f"{psk_server.uri}&tls-certificates={certs}")


async def test_tls12_only_server(
    backend: str, image: Path, keys: Path, sockdir: Path, tmp_path: Path
) -> None:
    """A qemu whose priority string leaves out TLS 1.3 still interoperates (TLS 1.2
    PSK suites), and the session really is TLS 1.2."""
    extra = qemu_nbd_psk_args(keys.parent, priority="NORMAL:-VERS-TLS1.3")
    with qemu_nbd(image, sockdir / "t.sock", extra=extra) as u:
        uri = f"{u}&tls-psk-file={client_file(tmp_path, line_of(keys, 'bob'))}&tls-username=bob"
        negotiator = await Negotiator.open(parse_uri(uri))
        try:
            await negotiator.greeting()
            tls = parse_uri(uri).tls
            assert tls is not None
            await negotiator.starttls(tls, None)
            session = negotiator.writer.get_extra_info("ssl_object")
            assert session.version() == "TLSv1.2"
            assert "PSK" in session.cipher()[0]
        finally:
            await negotiator.abort()
        async with await nbdclient.connect(uri) as client:
            assert await client.pread(2 * MiB, MiB) == b"\xab" * (2 * MiB)


async def test_server_killed_mid_session(
    backend: str, image: Path, keys: Path, sockdir: Path, tmp_path: Path
) -> None:
    """EOF under the TLS layer fails the pending and later requests; nothing hangs."""
    sock = sockdir / "k.sock"
    args = ["qemu-nbd", "-f", "qcow2", "-k", str(sock), "-x", "exp", "-r"]
    proc = subprocess.Popen(
        [*args, *qemu_nbd_psk_args(keys.parent), str(image)], stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(200):
            if sock.exists():
                break
            await asyncio.sleep(0.02)
        mine = client_file(tmp_path, line_of(keys, "alice"))
        uri = f"nbds+unix:///exp?socket={sock}&tls-psk-file={mine}&tls-username=alice"
        client = await nbdclient.connect(uri)
        assert await client.pread(4096, MiB) == b"\xab" * 4096
        proc.kill()
        proc.wait()
        with pytest.raises(nbdclient.ProtocolError):
            await asyncio.wait_for(client.pread(4 * MiB, 0), 10)
        await asyncio.wait_for(client.disconnect(), 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
