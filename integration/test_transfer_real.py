"""The copy path against a real qemu-nbd, in process: direct-I/O and buffered writes
(a filesystem that refuses O_DIRECT) give the same qcow2, byte for byte, with an odd
disk size whose last cluster is partly past the end."""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import pytest

import backupd.transfer as transfer
import nbdclient.fileio as fileio
from backupd.config import Transfer
from backupd.digests import hexdigest
from backupd.manifest import DiskRecord
from backupd.qcow2.sink import Qcow2Sink
from integration.harness.chain import make_qcow2, qemu_img_check, qemu_img_compare
from integration.harness.servers import qemu_nbd

MiB = 1 << 20
SIZE = 40 * MiB + 3 * 512  # the last cluster holds 1536 bytes of disk


class OneFile:
    """A staging of one image at a given path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    def sink(
        self, disk: str, size: int, *, backing_file: str | None, compress: bool, **_: int
    ) -> Qcow2Sink:
        return Qcow2Sink.create(
            self.path, size, backing_file=backing_file, digests=True, compress=compress
        )


async def full_copy(source: Path, out: Path, sockdir: Path, settings: Transfer) -> DiskRecord:
    """A full backup copy of ``source``, served by qemu-nbd, into ``out``."""
    with qemu_nbd(source, sockdir / "s.sock") as uri:
        return await transfer.transfer_disk(
            name="vda",
            node="n",
            uri=uri,
            dirty_context=None,
            staging=OneFile(out),
            backing_file=None,
            settings=settings,
        )


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "buffered"])
@pytest.mark.parametrize("request_size", [64 << 10, 512 << 10])
async def test_copy_matches_source(
    tmp_path: Path, sockdir: Path, monkeypatch: pytest.MonkeyPatch, direct: bool, request_size: int
) -> None:
    source = tmp_path / "src.qcow2"
    lengths = [64 << 10 << (i % 5) for i in range(12)]  # 64 KiB .. 1 MiB
    writes = [f"write -P {0x10 + i} {i * 3 * MiB + i * 65536} {n}" for i, n in enumerate(lengths)]
    make_qcow2(source, SIZE, *writes, "write -P 0xee 40M 1536")  # data up to the very end
    opened: list[int] = []
    real_open = fileio.open_direct

    def open_direct(path: Path) -> int:
        fd = real_open(path) if direct else -1
        opened.append(fd)
        return fd

    monkeypatch.setattr(fileio, "open_direct", open_direct)
    out = tmp_path / "out.qcow2"
    record = await full_copy(source, out, sockdir, Transfer(2, 8, request_size, False))
    if direct and opened[0] < 0:
        pytest.skip(f"the filesystem of {tmp_path} does not do direct I/O")
    assert (opened[0] >= 0) == direct
    qemu_img_check(out)
    cmp = qemu_img_compare(source, out)
    assert cmp.returncode == 0, cmp.stdout
    # every digest matches the stored bytes, and the runs cover the data exactly once
    data = out.read_bytes()
    for run in record.digests:
        assert hexdigest(data[run.host_offset : run.host_offset + run.length]) == run.digest
    guest = sorted((r.guest_offset, r.length) for r in record.digests)
    assert all(a[0] + a[1] <= b[0] for a, b in itertools.pairwise(guest))
    assert sum(n for _, n in guest) == record.bytes_copied
    assert record.bytes_copied == sum(lengths) + 1536


async def test_compressed_copy(tmp_path: Path, sockdir: Path) -> None:
    """Compressed clusters (and raw ones where random data does not shrink): the same
    guest bytes, a clean image, and digests of exactly the stored bytes."""
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        f.seek(MiB)
        f.write(b"\x5a" * (3 * MiB))  # compresses
        f.seek(9 * MiB + 4096)
        f.write(os.urandom(2 * MiB))  # does not
        f.seek(40 * MiB)
        f.write(b"\x01" * 1536)  # the partial last cluster
    source = tmp_path / "src.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(source)], check=True
    )
    out = tmp_path / "out.qcow2"
    record = await full_copy(source, out, sockdir, Transfer(2, 8, 512 << 10, True))
    qemu_img_check(out)
    cmp = qemu_img_compare(source, out)
    assert cmp.returncode == 0, cmp.stdout
    data = out.read_bytes()
    for run in record.digests:
        assert hexdigest(data[run.host_offset : run.host_offset + run.length]) == run.digest
    assert record.compressed and record.bytes_copied == 3 * MiB + 2 * MiB + 65536 + 1536
    assert 2 * MiB < record.bytes_stored < 3 * MiB  # random data stored raw, the rest packed
