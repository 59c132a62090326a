"""Each sink of the copy engine against a real qemu-nbd: a raw file (direct and
buffered), an NBD target, null:, and the qcow2 sink writing a restore output; results
checked byte for byte against qemu-img.  Output files: 0600, complete or absent, an
existing file refused unless replaced on purpose, a symlink replaced and never
followed, a file that appears during the copy left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import nbdclient
import nbdclient.fileio as fileio
from backupd.restore import restore_to_file
from nbdclient.copy import (
    CopyOptions,
    OutputFile,
    Plan,
    RawFileSink,
    Source,
    copy,
    copy_to_nbd,
    copy_to_null,
)

from .harness.chain import make_qcow2, qemu_img_check, qemu_img_compare
from .harness.servers import qemu_nbd

pytestmark = pytest.mark.qemu

MiB = 1 << 20
SIZE = 24 * MiB + 1536  # an odd size: the last 4 KiB block is partly past the end
DATA = 2 * MiB + 2 * 65536 + 1536  # the data extents: whole clusters, but the last


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """Data in runs of several sizes (one unaligned to 4 KiB), explicit zeros, data up
    to the very end."""
    return make_qcow2(
        tmp_path / "src.qcow2",
        SIZE,
        "write -P 0x11 0 1M",
        "write -P 0x22 3M 64k",
        "write -P 0x33 5M 512",
        "write -z 6M 2M",
        "write -P 0x44 9M 1M",
        "write -P 0x55 24M 1536",
    )


@pytest.fixture
def reference(source: Path, tmp_path: Path) -> bytes:
    raw = tmp_path / "reference.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(source), str(raw)], check=True)
    data = raw.read_bytes()
    raw.unlink()
    return data


@pytest.fixture
def served(source: Path, sockdir: Path) -> Iterator[str]:
    with qemu_nbd(source, sockdir / "src.sock") as uri:
        yield uri


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "buffered"])
async def test_raw_file_sink(served: str, reference: bytes, tmp_path: Path, direct: bool) -> None:
    dest = tmp_path / "out.raw"
    old = os.umask(0o022)
    try:
        async with await Source.open(served) as src:
            plan = Plan.from_extents(await src.map())
            sink = RawFileSink(OutputFile(dest), src.size, direct=direct)
            stats = await copy(src, plan, sink, requests=4, request_size=256 << 10)
    finally:
        os.umask(old)
    assert dest.read_bytes() == reference
    assert stats.bytes_read == plan.read_bytes >= DATA and stats.size == SIZE
    assert dest.stat().st_blocks * 512 <= DATA + 2 * MiB  # thin: zeros stayed holes
    assert dest.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


async def test_nbd_sink(served: str, source: Path, tmp_path: Path, sockdir: Path) -> None:
    target = make_qcow2(tmp_path / "target.qcow2", SIZE, f"write -P 0x99 0 {SIZE}")
    with qemu_nbd(target, sockdir / "t.sock", read_only=False) as uri:
        stats = await copy_to_nbd(served, uri, CopyOptions(requests=4))
    assert stats.bytes_zero > 20 * MiB  # the stale bytes there were zeroed
    cmp = qemu_img_compare(source, target)
    assert cmp.returncode == 0, cmp.stdout
    small = make_qcow2(tmp_path / "small.qcow2", SIZE - 4096, "write -P 0x77 0 64k")
    with qemu_nbd(small, sockdir / "small.sock", read_only=False) as uri:
        with pytest.raises(nbdclient.UnsupportedError, match="smaller than the disk"):
            await copy_to_nbd(served, uri)
    qemu_img_check(small)


async def test_null_sink(served: str) -> None:
    stats = await copy_to_null(served, CopyOptions(connections=2, request_size=64 << 10))
    async with await Source.open(served) as src:
        assert stats.bytes_read == Plan.from_extents(await src.map()).read_bytes
    assert stats.size == SIZE and stats.bytes_zero + stats.bytes_read == SIZE


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "buffered"])
async def test_qcow2_sink_restore_output(
    served: str,
    source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    direct: bool,
) -> None:
    if not direct:
        monkeypatch.setattr(fileio, "open_direct", lambda fd: -1)
    out = tmp_path / "restored.qcow2"
    stats = await restore_to_file(served, out, fmt="qcow2", request_size=128 << 10)
    assert stats.data == DATA and stats.zero == SIZE - DATA
    qemu_img_check(out)
    cmp = qemu_img_compare(source, out)
    assert cmp.returncode == 0, cmp.stdout
    assert out.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["restored.qcow2", "src.qcow2"]


async def test_output_appearing_during_the_copy_is_left_alone(served: str, tmp_path: Path) -> None:
    out = tmp_path / "vda.raw"

    def appear(_: int) -> None:
        if not out.exists():
            out.write_bytes(b"someone else's file")

    with pytest.raises(FileExistsError, match="appeared while copying"):
        await restore_to_file(served, out, progress=appear)
    assert out.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.qcow2", "vda.raw"]
    stats = await restore_to_file(served, out, force=True)  # replaced on purpose
    assert out.stat().st_size == SIZE and stats.data == DATA


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdclient", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_copy_output_file(served: str, reference: bytes, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"must survive")
    dest = tmp_path / "out.raw"
    dest.symlink_to(victim)
    refused = run_cli("copy", "-q", served, str(dest))
    assert refused.returncode == 2 and "exists; use --force" in refused.stderr
    assert "Traceback" not in refused.stderr
    done = run_cli("copy", "-q", "--force", served, str(dest))
    assert done.returncode == 0, done.stderr
    assert not dest.is_symlink() and dest.read_bytes() == reference
    assert victim.read_bytes() == b"must survive"
    assert dest.stat().st_mode & 0o777 == 0o600
    device = run_cli("copy", "-q", "--force", served, "/dev/null")
    assert device.returncode == 2 and "not a regular file" in device.stderr
    nowhere = run_cli("copy", "-q", served, str(tmp_path / "no" / "such.raw"))
    assert nowhere.returncode == 2 and "does not exist" in nowhere.stderr
