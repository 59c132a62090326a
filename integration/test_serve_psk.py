"""backupd with TLS pre-shared keys on real qemu: ``serve --listen --tls-psk-file``
(qemu-storage-daemon does the TLS) read by nbdclient and nbdinfo, and ``restore --to``
into a PSK-protected qemu-nbd target."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import nbdclient
from integration.conftest import MiB, backupd, serving
from integration.harness.chain import make_qcow2, qemu_img_compare
from integration.harness.servers import (
    free_port,
    make_certificates,
    make_psk_keys,
    qemu_nbd,
    qemu_nbd_psk_args,
)
from integration.harness.vm import QemuVM
from integration.test_restore_e2e import make_chain

pytestmark = pytest.mark.qemu


def own_key(keys: Path, user: str, tmp_path: Path) -> Path:
    """A client's key file: only its own line of the server's keys.psk."""
    line = next(x for x in keys.read_text().splitlines() if x.startswith(f"{user}:"))
    path = tmp_path / f"{user}.psk"
    path.write_text(line + "\n")
    path.chmod(0o600)
    return path


async def test_serve_with_psk(vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path) -> None:
    config = config_for(vm)
    points = await make_chain(vm, config, rounds=2)
    keys = make_psk_keys(tmp_path / "server", "alice", "bob")
    alice = own_key(keys, "alice", tmp_path)
    port = free_port()
    with serving(config, "--listen", f"127.0.0.1:{port}", "--tls-psk-file", str(keys)) as uri:
        assert uri == f"nbds://127.0.0.1:{port}/vda"
        with pytest.raises(nbdclient.NegotiationError, match="TLS"):
            await nbdclient.connect(f"nbd://127.0.0.1:{port}/vda")  # never plaintext
        ours = f"{uri}?tls-psk-file={alice}&tls-username=alice"
        async with await nbdclient.connect(ours) as client:
            assert client.tls and client.is_read_only()
            assert await client.pread(client.size, 0) == points[-1]
        mapped = subprocess.run(
            [sys.executable, "-m", "nbdclient", "map", "--json", ours],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        theirs = subprocess.run(
            [
                "nbdinfo",
                "--map",
                "--json",
                f"nbds://alice@127.0.0.1:{port}/vda?tls-psk-file={alice}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert [(e["offset"], e["length"], e["flags"]) for e in json.loads(mapped)] == [
            (e["offset"], e["length"], e["type"]) for e in json.loads(theirs)
        ]
        wrong = tmp_path / "wrong.psk"
        wrong.write_text(f"alice:{'00' * 32}\n")
        with pytest.raises(nbdclient.NegotiationError, match="TLS-PSK handshake failed"):
            await nbdclient.connect(f"{uri}?tls-psk-file={wrong}&tls-username=alice")
        certs = make_certificates(tmp_path / "pki")
        with pytest.raises(nbdclient.NegotiationError, match="TLS handshake failed"):
            await nbdclient.connect(f"{uri}?tls-certificates={certs}")
    # the private copy of the keys qemu read is gone with the server
    assert not list(Path("/tmp").glob("backupd-serve-*/keys.psk"))


async def test_serve_psk_on_ipv6(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_for(vm)
    points = await make_chain(vm, config, rounds=1)
    keys = make_psk_keys(tmp_path / "server", "bob")
    port = free_port()
    with serving(config, "--listen", f"[::1]:{port}", "--tls-psk-file", str(keys)) as uri:
        assert uri == f"nbds://[::1]:{port}/vda"
        async with await nbdclient.connect(f"{uri}?tls-psk-file={keys}&tls-username=bob") as c:
            assert await c.pread(c.size, 0) == points[-1]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--tls-psk-file", "{missing}"], "cannot read --tls-psk-file"),
        (["--tls-psk-file", "{bad}"], "line 2: not USERNAME:HEXKEY"),
        (["--tls-psk-file", "{empty}"], "holds no USERNAME:HEXKEY line"),
        (["--socket", "{sock}", "--tls-psk-file", "{good}"], "go with --listen"),
        (["--tls-psk-file", "{good}", "--tls-dir", "{pki}"], "not allowed with"),
        (["--listen-bare"], "needs --tls-dir or --tls-psk-file"),
        (["--listen", "::1:10809"], "goes in brackets"),
    ],
)
def test_serve_tls_usage_errors(
    config_for: Callable[..., Path], tmp_path: Path, args: list[str], error: str
) -> None:
    """Refused before anything starts: exit 2 and one line."""
    files = {
        "missing": tmp_path / "missing.psk",
        "bad": tmp_path / "bad.psk",
        "empty": tmp_path / "empty.psk",
        "good": tmp_path / "good.psk",
        "sock": tmp_path / "s.sock",
        "pki": tmp_path,
    }
    files["bad"].write_text(f"alice:{'ab' * 32}\nbob {'cd' * 32}\n")
    files["empty"].write_text("\n")
    files["good"].write_text(f"alice:{'ab' * 32}\n")
    argv = [a.format(**files) for a in args]
    if argv == ["--listen-bare"]:
        argv = ["--listen", "127.0.0.1:10809"]
    elif "--listen" not in argv and "--socket" not in argv:
        argv += ["--listen", "127.0.0.1:10809"]
    config = tmp_path / "backupd.yaml"
    vms = {"guest1": {"qmp": str(tmp_path / "qmp.sock")}}
    config.write_text(json.dumps({"repository": str(tmp_path / "repo"), "vms": vms}))
    result = backupd(config, "serve", "--vm", "guest1", *argv)
    assert result.returncode == 2, result.stderr
    assert error in result.stderr and "Traceback" not in result.stderr
    if "--tls-dir" not in argv:  # (argparse's own refusals come with the usage line)
        assert result.stderr.count("\n") == 1


async def test_restore_into_psk_target(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path, sockdir: Path
) -> None:
    config = config_for(vm)
    points = await make_chain(vm, config, rounds=2)
    keys = make_psk_keys(tmp_path / "server", "alice")
    target = tmp_path / "target.qcow2"
    make_qcow2(target, "32M", "write -P 0x77 8M 1M")  # stale data that must be zeroed
    extra = qemu_nbd_psk_args(keys.parent)
    with qemu_nbd(target, sockdir / "t.sock", read_only=False, extra=extra) as uri:
        wrong = tmp_path / "wrong.psk"
        wrong.write_text(f"alice:{'00' * 32}\n")
        refused = backupd(
            config, "restore", "--vm", "guest1", "--disk", "vda", "--to",
            f"{uri}&tls-psk-file={wrong}&tls-username=alice",
        )  # fmt: skip
        assert refused.returncode == 1 and "TLS-PSK handshake failed" in refused.stderr
        assert "internal error" not in refused.stderr
        result = backupd(
            config, "restore", "--vm", "guest1", "--disk", "vda", "--to",
            f"{uri}&tls-psk-file={keys}&tls-username=alice",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    model = tmp_path / "model.raw"
    model.write_bytes(points[-1])
    cmp = qemu_img_compare(target, model, fmt_b="raw")
    assert cmp.returncode == 0, cmp.stdout
    assert len(points[-1]) == 32 * MiB
